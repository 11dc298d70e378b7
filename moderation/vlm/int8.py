"""The decoder's int8 weights, applied when the model loads (the ONNX encoders' INT8 files are made at
export time: export/quantize.py).

Decoder schemes (`quantization` of a language_decoder model or version):
  int8_dynamic      CPU: torch.ao dynamic quantization of every nn.Linear (int8 weights, per-tensor scale;
                    activations quantized per batch at run time; int8 GEMM through fbgemm/onednn).
  int8_weight_only  any device: int8 weights with a per-output-channel scale, dequantized inside the matmul
                    (halves weight memory against bf16; a fused kernel such as torchao's is the GPU fast path).
                    Applied on the CPU before the model moves to its device (moderation/vlm/decoder.py).
  int8              int8_dynamic on CPU, int8_weight_only elsewhere.
The int8 weights are a deterministic function of the fp32 checkpoint, so a version ships the checkpoint plus
quantization.json (recorded in artifact.json) and quantizes at load instead of pickling packed tensors."""
from __future__ import annotations

import warnings

import torch
from torch import nn

SCHEMES = ("none", "int8", "int8_dynamic", "int8_weight_only")
# Largest block of int8 weights dequantized at once in Int8WeightOnlyLinear (elements; 32 MiB in bf16): a memory
# plan counts it as the layer's transient (moderation.preflight)
DEQUANT_BLOCK_ELEMENTS = 1 << 24


class Int8WeightOnlyLinear(nn.Module):
    qweight: torch.Tensor  # buffers (register_buffer), typed for their readers
    scale: torch.Tensor
    """y = x @ (q * scale)^T + b with q int8 [out, in] and a per-output-channel scale (symmetric)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        self.register_buffer("qweight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(linear.weight.dtype))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def dequantized_rows(self, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        w = self.qweight[start:stop].to(dtype)
        return w.mul_(self.scale[start:stop].to(dtype)[:, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # dequantized a block of output rows at a time: the transient full-precision weight stays under
        # DEQUANT_BLOCK_ELEMENTS (an 8B lm_head would otherwise need 1.2 GB of bf16 per call)
        rows = max(1, DEQUANT_BLOCK_ELEMENTS // self.in_features)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if rows >= self.out_features:
            return nn.functional.linear(x, self.dequantized_rows(0, self.out_features, x.dtype), bias)
        y = x.new_empty(*x.shape[:-1], self.out_features)
        for start in range(0, self.out_features, rows):
            stop = min(start + rows, self.out_features)
            y[..., start:stop] = nn.functional.linear(x, self.dequantized_rows(start, stop, x.dtype),
                                                      None if bias is None else bias[start:stop])
        return y


def _weight_only(module: nn.Module) -> int:
    n = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, Int8WeightOnlyLinear(child))
            n += 1
        else:
            n += _weight_only(child)
    return n


def resolve_scheme(scheme: str | None, device: torch.device) -> str:
    scheme = (scheme or "none").strip().lower()
    if scheme not in SCHEMES:
        raise ValueError(f"quantization must be one of {SCHEMES}, not {scheme!r}")
    if scheme == "int8":
        return "int8_dynamic" if device.type == "cpu" else "int8_weight_only"
    if scheme == "int8_dynamic" and device.type != "cpu":
        raise ValueError("int8_dynamic runs on CPU only; use int8_weight_only (or int8) on a GPU")
    return scheme


def quantize_decoder(model: nn.Module, scheme: str | None, device: torch.device) -> tuple[nn.Module, str, int]:
    """Quantize every nn.Linear of `model` (the language model and lm_head: the vision tower is dropped before).
    Returns (model, resolved scheme, number of Linear layers quantized)."""
    scheme = resolve_scheme(scheme, device)
    if scheme == "none":
        return model, scheme, 0
    n_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
    if scheme == "int8_dynamic":
        from torch.ao.quantization import quantize_dynamic

        # torch.ao eager quantization is deprecated in favour of torchao; the pinned torch still has it
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=True)
        return model, scheme, n_linear
    return model, scheme, _weight_only(model)
