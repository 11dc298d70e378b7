"""The Qwen3-VL vision tower for ONNX export: loaded alone from a checkpoint, and a batched,
fixed-resolution view of it.

`load_vision_tower` builds only the tower from the checkpoint's `vision_config` and reads only its
tensors (`model.visual.*`) from the safetensors shards, in the checkpoint's own dtype: exporting the
0.58 B-parameter tower of Qwen3-VL-8B never materialises the 8.2 B-parameter language model.

transformers runs the tower on packed patches of variable-size images and splits attention by
`cu_seqlens`, which a tracer freezes to one batch size. At one fixed grid every image has the same
patch count S, so attention can run on a [B, S] batch instead: the same weights and arithmetic, with a
dynamic batch axis that Triton's dynamic batcher (and the onnxruntime backend) can use."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers.models.qwen3_vl import modeling_qwen3_vl as mq
from transformers.vision_utils import get_vision_interpolation_indices_and_weights, get_vision_position_ids

# Qwen3-VL checkpoints saved by transformers (Qwen3-VL-8B-Instruct included) use the first; Qwen2-VL-era
# layouts the second.
VISUAL_PREFIXES = ("model.visual.", "visual.")


def checkpoint_tensor_files(checkpoint: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file that holds it (from model.safetensors.index.json when sharded)."""
    checkpoint = Path(checkpoint)
    index = checkpoint / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return {name: checkpoint / shard for name, shard in weight_map.items()}
    single = checkpoint / "model.safetensors"
    if not single.exists():
        raise FileNotFoundError(f"{checkpoint} has neither model.safetensors nor model.safetensors.index.json")
    from safetensors import safe_open

    with safe_open(str(single), framework="pt") as f:
        names = f.keys()  # safe_open handles are not iterable
    return dict.fromkeys(names, single)


def load_vision_tower(checkpoint: Path) -> tuple[mq.Qwen3VLVisionModel, dict]:
    """The checkpoint's vision tower alone, its tensors in the dtype they are stored in, and what was read:
    {"prefix", "tensors": [names read], "bytes", "dtype"}. Nothing of the language model is built or read."""
    from safetensors import safe_open
    from transformers import AutoConfig
    from transformers.initialization import no_init_weights

    vision_config = AutoConfig.from_pretrained(checkpoint).vision_config
    files = checkpoint_tensor_files(checkpoint)
    prefix = next((p for p in VISUAL_PREFIXES if any(n.startswith(p) for n in files)), None)
    if prefix is None:
        raise KeyError(f"{checkpoint} has no vision tower tensors (looked for {', '.join(VISUAL_PREFIXES)})")
    wanted = sorted(n for n in files if n.startswith(prefix))
    state, nbytes = {}, 0
    for shard in sorted({files[n] for n in wanted}):
        with safe_open(str(shard), framework="pt") as f:
            for name in (n for n in wanted if files[n] == shard):
                tensor = f.get_tensor(name)
                state[name[len(prefix):]] = tensor
                nbytes += tensor.numel() * tensor.element_size()
    # Parameters on the meta device take no memory; load_state_dict(assign=True) then adopts the read
    # tensors as they are (no fp32 copy, no random init of weights that are about to be replaced).
    with torch.device("meta"), no_init_weights():
        tower = mq.Qwen3VLVisionModel._from_config(vision_config)
    tower.load_state_dict(state, strict=True, assign=True)
    del state
    # The rotary inverse frequencies are computed, not stored: build that small module for real.
    tower.rotary_pos_emb = mq.Qwen3VLVisionRotaryEmbedding(vision_config)
    left = [n for n, t in [*tower.named_parameters(), *tower.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"vision tower tensors not in {checkpoint}: {left[:5]}")
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in tower.parameters()})
    return tower.eval(), {"prefix": prefix, "tensors": wanted, "bytes": nbytes, "dtype": ",".join(dtypes)}


class BatchedVisionEncoder(nn.Module):
    def __init__(self, visual: nn.Module, grid_thw: tuple[int, int, int] = (1, 28, 28)):
        super().__init__()
        self.visual = visual
        cfg = visual.config
        grid = torch.tensor([grid_thw], dtype=torch.long)
        with torch.no_grad():
            idx, w = get_vision_interpolation_indices_and_weights(
                grid, num_grid_per_side=visual.num_grid_per_side, mode=visual.interpolation_mode,
                align_corners=visual.interpolation_align_corners, spatial_merge_size=cfg.spatial_merge_size, kwargs={})
            pos = (visual.pos_embed(idx) * w[:, :, None]).sum(1)
            pids = get_vision_position_ids(grid, visual.spatial_merge_size, kwargs={})
            cos, sin = visual.rotary_pos_emb(pos, pids)
        self.register_buffer("pos_embeds", pos, persistent=False)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.seq = int(grid_thw[0] * grid_thw[1] * grid_thw[2])
        self.patch_dim = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2
        self.merge_unit = cfg.spatial_merge_size ** 2

    def cast_weights(self, dtype: torch.dtype) -> BatchedVisionEncoder:
        """The tower's weights and the position table in dtype; the rotary cos/sin stay fp32 because the
        rotation runs in fp32. Inputs and outputs stay fp32 whatever the weights are."""
        self.visual.to(dtype)
        self.pos_embeds = self.pos_embeds.to(dtype)
        return self

    def _attention(self, attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = attn.qkv(x).reshape(b, s, 3, attn.num_heads, -1).permute(2, 0, 1, 3, 4).unbind(0)
        q, k = mq.apply_rotary_pos_emb_vision(q, k, self.cos, self.sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, heads, S, d]
        weights = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * attn.scaling, dim=-1, dtype=torch.float32)
        out = torch.matmul(weights.to(v.dtype), v).transpose(1, 2).reshape(b, s, -1)
        return attn.proj(out)

    def forward(self, pixel_values: torch.Tensor):
        """pixel_values [B, S, patch_dim] -> (visual_tokens [B, S/4, D], deepstack [B, n, S/4, D])."""
        vis = self.visual
        b = pixel_values.shape[0]
        x = vis.patch_embed(pixel_values.reshape(-1, self.patch_dim)).reshape(b, self.seq, -1)
        x = x + self.pos_embeds.to(x.dtype)
        deepstack = []
        for i, blk in enumerate(vis.blocks):
            x = x + self._attention(blk.attn, blk.norm1(x))
            x = x + blk.mlp(blk.norm2(x))
            if i in vis.deepstack_visual_indexes:
                merger = vis.deepstack_merger_list[vis.deepstack_visual_indexes.index(i)]
                deepstack.append(merger(x.reshape(-1, x.shape[-1])).reshape(b, self.seq // self.merge_unit, -1))
        tokens = vis.merger(x.reshape(-1, x.shape[-1])).reshape(b, self.seq // self.merge_unit, -1)
        return tokens.to(torch.float32), torch.stack(deepstack, dim=1).to(torch.float32)
