"""A batched, fixed-resolution view of Qwen3-VL's vision tower for ONNX export.

transformers runs the tower on packed patches of variable-size images and splits attention by
`cu_seqlens`, which a tracer freezes to one batch size. At one fixed grid every image has the same
patch count S, so attention can run on a [B, S] batch instead: the same weights and arithmetic, with a
dynamic batch axis that Triton's dynamic batcher (and the onnxruntime backend) can use."""
from __future__ import annotations

import torch
from torch import nn
from transformers.models.qwen3_vl import modeling_qwen3_vl as mq
from transformers.vision_utils import get_vision_interpolation_indices_and_weights, get_vision_position_ids


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
        return tokens, torch.stack(deepstack, dim=1)
