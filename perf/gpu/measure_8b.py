"""Qwen3-VL-8B-shaped latency and memory on a lent GPU, projected to an A10.

No hub is reachable, so the model has the REAL Qwen3-VL-8B shapes (written out below from its published
config: 36 text layers x 4096, GQA 32/8 heads of 128, MLP 12288, vocabulary 151936; a 27-layer 1152-wide
vision tower with DeepStack at layers 8/16/24) and random weights. Random weights give real latency and memory: the
arithmetic and the bytes moved do not depend on the values. Every number it writes is untrained-model latency,
never quality. The tokenizer is the tiny checkpoint's, which is Qwen's real one (151,643 BPE ranks, the published
added-token ids), so prompts have their real token counts (recorded).

What it measures, each after warm-up, `--runs` times, median and spread recorded:
  1. the vision encoder at the fixed 448x448 grid (784 patches -> 196 visual tokens), batch 1/4/8;
  2. the seed's path: `generate(max_new_tokens=200)` on the same post (image + caption), batch 1;
  3. peak GPU memory of the decoder per batch size with the allocator capped to the decoder's share of an A10
     (22 GiB usable less what moderation.preflight plans for every other model, their CUDA contexts and TensorRT's
     workspace, less this process's own measured CUDA context), on posts at both prompt caps (caption 256 tokens,
     image text 128) and with a description; beside the plan's weights + activations + KV for the same batch;
  4. the one-prefill verdict through moderation.vlm.decoder.VerdictDecoder (shared policy prefix KV, one padded
     prefill of image tokens + caption, all questions in one pass), batch 1/4/8, en and zh, under that cap;
  5. per-token decode (one new token over the post's KV cache), batch 1 and 8;
  6. the gate's encoders at CLIP ViT-L/14 shapes (fp16): image batch 1/8/16 at 224 px, text batch 1/16/64 x 77;
  7. int8 weight-only: the decoder's own int8_weight_only scheme (moderation/vlm/int8.py, what the
     language_decoder_int8 model loads) for 3-5, then the same int8 weights through torch._weight_int8pack_mm where
     the device has that fused kernel (recorded either way).
Then projects each to an A10 by the ratio of peak FLOP/s (compute-bound: vision, prefill) or memory bandwidth
(bandwidth-bound: decode) between the measured GPU and the A10, floors it at the A10 roofline, and compares with
perf/budgets.yaml's `a10` budgets. Results: perf/results/gpu/measure_8b-<device>.json.

    python perf/gpu/measure_8b.py [--decoder-share-gib N]  # on the GPU machine (bf16); a few minutes on an H200
    python perf/gpu/measure_8b.py --tiny                   # CPU smoke test: tiny shapes, same code path (seconds)
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

# Qwen3-VL-8B(-Instruct) config.json, written out (no hub here).
QWEN3_VL_8B_TEXT = dict(
    vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, max_position_embeddings=262144, rms_norm_eps=1e-6, hidden_act="silu",
    attention_bias=False, tie_word_embeddings=False,
    rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": [24, 20, 20],
                     "mrope_interleaved": True},
)
QWEN3_VL_8B_VISION = dict(
    depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, patch_size=16, spatial_merge_size=2,
    temporal_patch_size=2, in_channels=3, out_hidden_size=4096, num_position_embeddings=2304,
    deepstack_visual_indexes=[8, 16, 24], hidden_act="gelu_pytorch_tanh",
)
# The same architecture at toy size (as export/build_tiny.py builds it), for the CPU smoke run.
TINY_TEXT = dict(
    vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, tie_word_embeddings=False,
    rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": [2, 3, 3],
                     "mrope_interleaved": True},
)
TINY_VISION = dict(
    depth=2, hidden_size=64, intermediate_size=128, num_heads=4, patch_size=16, spatial_merge_size=2,
    temporal_patch_size=2, in_channels=3, out_hidden_size=64, num_position_embeddings=256,
    deepstack_visual_indexes=[0, 1],
)
GRID = (1, 28, 28)            # 448x448 at patch 16: 784 patches, 196 visual tokens after the 2x2 merge
PATCH_DIM = 3 * 2 * 16 * 16   # channels x temporal x patch x patch = 1536

# Peak dense bf16/fp16 tensor FLOP/s (no sparsity) and memory bandwidth, from NVIDIA's data sheets.
GPU_PEAKS = {
    "A10": (125e12, 600e9), "A10G": (70e12, 600e9), "L4": (121e12, 300e9), "A100": (312e12, 2039e9),
    "H100 PCIe": (756e12, 2000e9), "H100 NVL": (835e12, 3900e9), "H100": (989e12, 3350e9),
    "H200": (989e12, 4800e9), "L40S": (362e12, 864e9),
}
A10_FLOPS, A10_BW = GPU_PEAKS["A10"]


def peaks_for(name: str) -> tuple[float, float] | None:
    for key in sorted(GPU_PEAKS, key=len, reverse=True):  # "H100 PCIe" before "H100"
        if key.lower() in name.lower():
            return GPU_PEAKS[key]
    return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, runs: int, warmup: int) -> dict:
    for _ in range(warmup):
        fn()
    sync(device)
    ms = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        sync(device)
        ms.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms), "runs": runs, "raw_ms": ms}


def find_tokenizer_dir(explicit: Path | None) -> Path:
    for d in [explicit, ROOT / "build/checkpoints/tiny-qwen3-vl",
              ROOT / "model_repository/language_decoder/1/checkpoint"]:
        if d and (d / "tokenizer.json").exists():
            return d
    raise SystemExit("error: no tokenizer found: run `make models` (or pass --tokenizer DIR)")


def build_config(tiny: bool, tokenizer):
    from transformers import Qwen3VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in
           ("<|endoftext|>", "<|im_end|>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")}
    text = dict(TINY_TEXT if tiny else QWEN3_VL_8B_TEXT)
    text["vocab_size"] = max(text["vocab_size"], len(tokenizer))
    text.update(bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    return Qwen3VLConfig(
        text_config=text, vision_config=dict(TINY_VISION if tiny else QWEN3_VL_8B_VISION),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False)


def build_model(config, device: torch.device, dtype: torch.dtype):
    from transformers import Qwen3VLForConditionalGeneration

    torch.manual_seed(0)
    with torch.device(device):  # initialise on the GPU: an 8.8 B fp32 init on the host would take minutes
        model = Qwen3VLForConditionalGeneration._from_config(config, dtype=dtype)
    return model.eval()


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


# --- measurements ------------------------------------------------------------------------------------------------
def measure_vision(model, device, dtype, batches, runs, warmup) -> dict:
    visual = model.model.visual
    out = {}
    for b in batches:
        pixels = torch.randn(GRID[1] * GRID[2] * b, PATCH_DIM, device=device, dtype=dtype)
        grid = torch.tensor([GRID] * b, device=device)

        def run(pixels=pixels, grid=grid):
            with torch.no_grad():
                visual(pixels, grid_thw=grid)
        out[str(b)] = timed(run, device, runs, warmup)
    return out


CAPTIONS = {
    "en": ["buy now, limited offer, click the link", "what a day at the beach", "this is so funny lol",
           "they should all be punished", "new slang for pills", "look at this", "peace and quiet", "nice weather"],
    "zh": ["限时优惠，点击链接立即购买", "海边的一天", "笑死我了", "他们都该受到惩罚", "新的药片黑话", "看看这个",
           "岁月静好", "今天天气真好"],
}
# the prompt caps a post can reach (moderation.vlm.inputs.MAX_CAPTION_TOKENS and the policy's ocr.prompt_max_tokens)
CAP_CAPTION_TOKENS, CAP_IMAGE_TEXT_TOKENS = 256, 128


def text_of_tokens(builder, n: int, seed: str) -> str:
    """Plain text that the prompt builder's tokenizer reads as about `n` tokens (varied words, no control tokens)."""
    words = (seed + " ") * (4 * n)
    ids = builder.text_ids(words)[:n]
    return builder.tok.decode(ids)


def make_requests(decoder, config, batch: int, describe: bool = False, lang: str = "en", at_caps: bool = False):
    from moderation.core.policy import load_policy
    from moderation.vlm.decoder import DecoderRequest

    policy = load_policy()
    n_vis = GRID[1] * GRID[2] // 4
    builder = decoder.prompts(n_vis)
    hidden = config.text_config.hidden_size
    n_ds = len(config.vision_config.deepstack_visual_indexes)
    rng = np.random.default_rng(0)
    reqs = []
    for i in range(batch):
        caption = CAPTIONS[lang][i % len(CAPTIONS[lang])]
        image_text = ""
        if at_caps:
            caption = text_of_tokens(builder, CAP_CAPTION_TOKENS, caption)
            image_text = text_of_tokens(builder, CAP_IMAGE_TEXT_TOKENS, CAPTIONS[lang][(i + 1) % 8])
        body = np.asarray(builder.body_ids(policy, lang, caption, image_text), dtype=np.int64)
        reqs.append(DecoderRequest(body, rng.standard_normal((n_vis, hidden), dtype=np.float32),
                                   rng.standard_normal((n_ds, n_vis, hidden), dtype=np.float32), policy, lang,
                                   describe))
    questions = builder.questions(policy, lang)
    return reqs, {"lang": lang, "prefix_tokens": len(builder.prefix_ids(policy, lang)),
                  "body_tokens": int(max(len(r.body_ids) for r in reqs)), "questions": len(questions),
                  "question_tokens": sum(len(q.ids) for q in questions),
                  "question_tokens_max": max(len(q.ids) for q in questions)}


def measure_verdict(decoder, config, device, batches, runs, warmup, lang: str = "en") -> dict:
    out = {}
    for b in batches:
        reqs, tokens = make_requests(decoder, config, b, lang=lang)
        last = {}

        def run(reqs=reqs, last=last):
            last["r"] = decoder.score(reqs)
        res = timed(run, device, runs, warmup)
        res.update(tokens, per_post_ms=res["median_ms"] / b, stage_ms_last_run=last["r"][0].timings_ms)
        out[str(b)] = res
    return out


def measure_seed_generate(model, tokenizer, device, dtype, new_tokens: int, runs: int, warmup: int) -> dict:
    """The seed's path: the whole post (image patches through the vision tower, system prompt, caption) prefilled
    and `new_tokens` tokens generated greedily (forced to the full length: random weights may stop early)."""
    from moderation.core.policy import load_policy
    from moderation.vlm.prompts import PromptBuilder

    policy = load_policy()
    builder = PromptBuilder(tokenizer, GRID[1] * GRID[2] // 4)
    ids = builder.prefix_ids(policy, "en") + builder.body_ids(policy, "en", CAPTIONS["en"][0])
    input_ids = torch.tensor([ids], device=device)
    kwargs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                  mm_token_type_ids=(input_ids == builder.image_token_id).int(),
                  pixel_values=torch.randn(GRID[1] * GRID[2], PATCH_DIM, device=device, dtype=dtype),
                  image_grid_thw=torch.tensor([GRID], device=device))
    last = {}

    def run():
        with torch.no_grad():
            last["out"] = model.generate(**kwargs, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                         do_sample=False)
    res = timed(run, device, runs, warmup)
    generated = int(last["out"].shape[1] - input_ids.shape[1])
    res.update(prompt_tokens=len(ids), new_tokens=generated, ms_per_new_token=res["median_ms"] / max(1, generated))
    return res


def measure_clip(device, tiny: bool, runs: int, warmup: int) -> dict:
    """The gate's image and text encoders at CLIP ViT-L/14 shapes (the published config, random weights), fp16."""
    from transformers import CLIPConfig, CLIPModel

    if tiny:
        cfg = CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=2, max_position_embeddings=77),
                         vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=2, image_size=224, patch_size=14),
                         projection_dim=32)
    else:
        cfg = CLIPConfig.from_pretrained(ROOT / "tests" / "data" / "checkpoints" / "clip-vit-large-patch14")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        clip = CLIPModel._from_config(cfg, dtype=dtype).eval()
    size, ctx = cfg.vision_config.image_size, cfg.text_config.max_position_embeddings
    out = {"dtype": str(dtype).removeprefix("torch."), "params_image": count(clip.vision_model)
           + count(clip.visual_projection), "params_text": count(clip.text_model) + count(clip.text_projection),
           "image": {}, "text": {}}
    for b in (1, 8, 16):
        pixels = torch.randn(b, 3, size, size, device=device, dtype=dtype)

        def image(pixels=pixels):
            with torch.no_grad():
                clip.get_image_features(pixel_values=pixels)
        out["image"][str(b)] = timed(image, device, runs, warmup)
    for b in (1, 16, 64):
        ids = torch.randint(0, cfg.text_config.vocab_size, (b, ctx), device=device)

        def text(ids=ids):
            with torch.no_grad():
                clip.get_text_features(input_ids=ids)
        out["text"][str(b)] = timed(text, device, runs, warmup)
    return out


# --- memory ------------------------------------------------------------------------------------------------------
def process_overhead(device) -> dict:
    """GPU memory this process holds outside PyTorch's allocator (CUDA context, cuBLAS handles and workspaces), read
    after a bf16 matmul has loaded the libraries; assumes no other process on the GPU."""
    if device.type != "cuda":
        return {}
    x = torch.randn(1024, 1024, device=device, dtype=torch.bfloat16)
    (x @ x).sum().item()
    free, total = torch.cuda.mem_get_info(device)
    reserved = torch.cuda.memory_reserved(device)
    return {"gpu_total_bytes": total, "outside_allocator_bytes": total - free - reserved}


def decoder_plan(qwen_cfg: dict, batch: int, int8: bool) -> dict:
    """moderation.preflight's figures for the language decoder at `batch` (bytes)."""
    from moderation.preflight import (
        PREFIX_CACHE_ENTRIES,
        PromptLayout,
        decoder_activation_bytes,
        kv_bytes,
        qwen_text_params,
    )

    layout, p = PromptLayout(), qwen_text_params(qwen_cfg)
    if int8:  # int8 Linear weights, one bf16 scale per output row; embedding and norms stay bf16
        weights = p["linear"] + p["linear_rows"] * 2 + p["other"] * 2
    else:
        weights = (p["linear"] + p["other"] - p["tied"]) * 2
    kv = kv_bytes(qwen_cfg, batch, layout.peak_tokens, 2) + kv_bytes(qwen_cfg, PREFIX_CACHE_ENTRIES, layout.prefix, 2)
    act = decoder_activation_bytes(qwen_cfg, batch, layout, 2, int8)
    return {"weights": weights, "activations": act, "kv": kv, "total": weights + act + kv}


def decoder_share_from_plan(gpu_memory: int) -> float | None:
    """Bytes of an A10 the preflight plan leaves the language decoder's process (its own CUDA context included), or
    None where the plan cannot be made here (it renders the configs through tritonclient's protobufs)."""
    try:
        from moderation.preflight import plan, read_config

        ckpt = ROOT / "tests" / "data" / "checkpoints"
        p = plan(read_config(ckpt / "qwen3-vl-8b-instruct"), read_config(ckpt / "clip-vit-large-patch14"), gpu_memory)
    except ImportError:
        return None
    decoder = next(m for m in p.models if m.name == "language_decoder")
    context = sum(v for k, v in p.runtime.items() if "language_decoder" in k)
    return gpu_memory - (p.total - decoder.total - context)


def measure_memory(decoder, config, device, batches, qwen_cfg, int8: bool) -> dict:
    """Peak allocator bytes of VerdictDecoder.score per batch on posts at both prompt caps (and, at the largest
    batch, every post asking for a description), under whatever cap is in force, beside the plan."""
    if device.type != "cuda":
        return {}
    import gc

    gc.collect()
    torch.cuda.empty_cache()
    weights = torch.cuda.memory_allocated(device)
    out = {"weights_resident_bytes": weights, "batches": {}}
    cases = [(b, False) for b in batches] + [(batches[-1], True)]
    for b, describe in cases:
        reqs, tokens = make_requests(decoder, config, b, describe=describe, at_caps=True)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        row = {"body_tokens": tokens["body_tokens"], "describe": describe}
        try:
            decoder.score(reqs)
            sync(device)
            row.update(ok=True, peak_allocated_bytes=torch.cuda.max_memory_allocated(device),
                       peak_reserved_bytes=torch.cuda.max_memory_reserved(device), kv_bytes=dict(decoder.kv_bytes))
            row["peak_over_weights_bytes"] = row["peak_allocated_bytes"] - weights
        except torch.cuda.OutOfMemoryError as e:
            row.update(ok=False, error=str(e).splitlines()[0][:300])
        row["plan"] = decoder_plan(qwen_cfg, b, int8)
        out["batches"][f"{b}{'+describe' if describe else ''}"] = row
        torch.cuda.empty_cache()
    return out


def measure_decode(model, device, batches, context: int, tokens: int, runs: int, warmup: int) -> dict:
    lm = model.model.language_model
    out = {}
    for b in batches:
        ids = torch.randint(0, 1000, (b, context), device=device)

        def run(ids=ids):
            with torch.no_grad():
                o = lm(input_ids=ids, use_cache=True)
                cache, nxt = o.cache, model.lm_head(o.last_hidden_state[:, -1]).argmax(-1)[:, None]
                sync(device)
                t0 = time.perf_counter()
                for _ in range(tokens):
                    h = lm(input_ids=nxt, cache=cache, use_cache=True).last_hidden_state
                    nxt = model.lm_head(h[:, -1]).argmax(-1)[:, None]
                sync(device)
                run.per_token.append((time.perf_counter() - t0) * 1e3 / tokens)
        run.per_token = []
        timed(run, device, runs, warmup)
        per = run.per_token[warmup:]
        out[str(b)] = {"context_tokens": context, "new_tokens": tokens, "median_ms_per_token": statistics.median(per),
                       "min_ms_per_token": min(per), "runs": len(per), "raw_ms_per_token": per}
    return out


def _stage(measured_ms: float, scale: float, floor_measured: float, floor_a10: float) -> dict:
    """Three A10 figures for one stage: `roofline_floor_ms` (the A10 at peak: optimistic); `scaled_ms` (all of the
    measured time scaled by the peak ratio: pessimistic, since launch and host overhead do not grow with FLOP/s);
    `a10_ms` (the central estimate: the measured time less the measured GPU's roofline time plus the A10's, i.e. the
    overhead above the roofline kept as measured), never below the floor."""
    kept = measured_ms - floor_measured + floor_a10
    return {"measured_ms": measured_ms, "scaled_ms": measured_ms * scale, "roofline_floor_ms": floor_a10,
            "measured_gpu_roofline_ms": floor_measured, "a10_ms": max(kept, floor_a10)}


def project(results: dict, peaks, text_params: int, vision_params: int, weight_bytes_per_param: float) -> dict:
    """A10 estimate per stage from the measured GPU: compute-bound stages (vision, prefill) by peak FLOP/s, decode by
    memory bandwidth; see _stage for the three figures. The verdict reads the weights twice (body prefill, then the
    question pass); one decoded token reads them once."""
    if peaks is None:
        return {"note": "measured device has no known peak numbers (CPU or unlisted GPU): no ratio projection"}
    flops, bw = peaks
    fr, br = flops / A10_FLOPS, bw / A10_BW
    out = {"flops_ratio_measured_over_a10": fr, "bandwidth_ratio_measured_over_a10": br, "stages": {}}
    weights = text_params * weight_bytes_per_param
    for b, r in results["vision"].items():
        work = 2 * vision_params * GRID[1] * GRID[2] * int(b)
        out["stages"][f"vision_b{b}"] = _stage(r["median_ms"], fr, work / flops * 1e3, work / A10_FLOPS * 1e3)
    for b, r in results["verdict"].items():
        # the prefix KV is reused; a post's questions are one block after its body
        toks = (r["body_tokens"] + r.get("question_tokens", r["questions"] * r["question_tokens_max"])) * int(b)
        work = 2 * text_params * toks
        floor_a10 = max(work / A10_FLOPS, 2 * weights / A10_BW) * 1e3
        st = _stage(r["median_ms"], fr, max(work / flops, 2 * weights / bw) * 1e3, floor_a10)
        st["a10_posts_per_s"] = int(b) / st["a10_ms"] * 1e3
        st["a10_posts_per_s_scaled"] = int(b) / max(st["scaled_ms"], floor_a10) * 1e3
        out["stages"][f"verdict_b{b}"] = st
    for b, r in results["decode"].items():
        out["stages"][f"decode_b{b}"] = _stage(r["median_ms_per_token"], br, weights / bw * 1e3,
                                               weights / A10_BW * 1e3)
    return out


def compare_budgets(projection: dict) -> dict:
    import yaml

    budgets = yaml.safe_load((ROOT / "perf" / "budgets.yaml").read_text()).get("a10", {})
    stages = projection.get("stages", {})
    out = {}
    if "vision_b1" in stages and "vision_encoder" in budgets:
        out["vision_encoder_p50"] = {"a10_ms": stages["vision_b1"]["a10_ms"],
                                     "a10_upper_ms": stages["vision_b1"]["scaled_ms"],
                                     "budget_ms": budgets["vision_encoder"]["p50_ms"]}
    if "verdict_b1" in stages and "language_decoder" in budgets:
        out["language_decoder_p50"] = {"a10_ms": stages["verdict_b1"]["a10_ms"],
                                       "a10_upper_ms": stages["verdict_b1"]["scaled_ms"],
                                       "budget_ms": budgets["language_decoder"]["p50_ms"]}
        verdicts = [v for k, v in stages.items() if k.startswith("verdict_")]
        out["language_decoder_throughput"] = {
            "a10_posts_per_s": max(v["a10_posts_per_s"] for v in verdicts),
            "a10_lower_posts_per_s": max(v["a10_posts_per_s_scaled"] for v in verdicts),
            "budget_min": budgets["language_decoder"]["throughput_min"]}
    for v in out.values():
        if "budget_ms" in v:
            v["within"] = v["a10_ms"] <= v["budget_ms"]
            v["within_at_upper"] = v["a10_upper_ms"] <= v["budget_ms"]
        else:
            v["within"] = v["a10_posts_per_s"] >= v["budget_min"]
            v["within_at_lower"] = v["a10_lower_posts_per_s"] >= v["budget_min"]
    return out


def fused_int8_forward(self, x):
    """Int8WeightOnlyLinear through the fused int8-weight matmul (no dequantized copy of the weight)."""
    y = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), self.qweight, self.scale.to(x.dtype))
    if self.bias is not None:
        y = y + self.bias.to(x.dtype)
    return y.reshape(*x.shape[:-1], -1)


def fused_int8_supported(device, dtype) -> str | None:
    """None when torch._weight_int8pack_mm runs on this device, else why not."""
    try:
        torch._weight_int8pack_mm(torch.zeros(2, 64, device=device, dtype=dtype),
                                  torch.zeros(8, 64, device=device, dtype=torch.int8),
                                  torch.ones(8, device=device, dtype=dtype))
        return None
    except (RuntimeError, NotImplementedError) as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"


def set_cap(device, cap_bytes: int | None) -> dict:
    """Cap PyTorch's allocator on this process to `cap_bytes` (None: lift the cap)."""
    if device.type != "cuda":
        return {}
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap_bytes / total) if cap_bytes else 1.0, device)
    return {"allocator_cap_bytes": cap_bytes, "fraction": min(1.0, cap_bytes / total) if cap_bytes else 1.0}


def guarded(fn, *args) -> dict:
    """fn(*args), or the error it raised (recorded in the results, so one failed part keeps the others)."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - recorded, never hidden
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}


def measure_int8(decoder, model, config, device, dtype, batches, runs, warmup, qwen_cfg, cap, context, decode_tokens,
                 peaks, text_params, vision_params, save) -> dict:
    """The language_decoder_int8 model's own scheme (moderation/vlm/int8.py), applied in place to the measured decoder
    (serving applies it on the CPU before the move), then the same int8 weights through the fused kernel."""
    from moderation.vlm.int8 import Int8WeightOnlyLinear, quantize_decoder

    quantize_decoder(decoder.model, "int8_weight_only", device)
    int8 = save.report["int8_weight_only"] = {
        "method": "moderation.vlm.int8 int8_weight_only (dequantized block by block inside the matmul)"}
    set_cap(device, cap)
    try:
        int8["memory"] = measure_memory(decoder, config, device, batches, qwen_cfg, int8=True)
        save("int8 memory")
        int8["verdict"] = measure_verdict(decoder, config, device, [1, batches[-1]], 3, 1)
        save("int8 verdict")
        int8["decode"] = measure_decode(model, device, [1], context, 8, 2, 1)
        save("int8 decode")
    finally:
        set_cap(device, None)
    int8["a10_projection"] = project({"vision": {}, **int8}, peaks, text_params, vision_params, 1.0)
    why_not = fused_int8_supported(device, dtype)
    if why_not is None:
        with mock.patch.object(Int8WeightOnlyLinear, "forward", fused_int8_forward):
            fused = {"method": "torch._weight_int8pack_mm (fused int8-weight matmul) on the same int8 weights",
                     "verdict": measure_verdict(decoder, config, device, [1, batches[-1]], 3, 1),
                     "decode": measure_decode(model, device, [1, batches[-1]], context, decode_tokens, 2, 1)}
        fused["a10_projection"] = project({"vision": {}, **fused}, peaks, text_params, vision_params, 1.0)
    else:
        fused = {"method": "torch._weight_int8pack_mm", "unsupported": why_not}
    int8["fused"] = fused
    return int8


def report_from_log(log: Path, tokenizer) -> dict:
    """The report of a run whose JSON was not written (stopped before the end): the medians its log printed, with the
    prompt token counts recomputed from the same tokenizer and policy. No per-run times: the log has none."""
    import ast

    from moderation.core.policy import load_policy
    from moderation.vlm.prompts import PromptBuilder

    text = log.read_text()
    head = re.search(r"text ([\d.]+) B, vision ([\d.]+) B params on (.+?) \((\w+)\).*?outside the allocator "
                     r"([\d.]+) GiB", text)
    found = {key: ast.literal_eval(m.group(1)) for key, pat in (
        ("vision", r"^vision: (\{.*?\}) ms"), ("verdict", r"^verdict: en (\{.*?\}),"),
        ("verdict_zh", r"^verdict: en .*?, zh (\{.*?\}) ms"), ("decode", r"^decode: (\{.*?\}) ms/token"),
        ("clip_image", r"^clip image (\{.*?\}),"), ("clip_text", r"^clip image .*?, text (\{.*?\}) ms"))
        if (m := re.search(pat, text, re.M))}
    generate = re.search(r"^seed generate\((\d+)\): ([\d.]+) ms", text, re.M)
    policy, builder = load_policy(), PromptBuilder(tokenizer, GRID[1] * GRID[2] // 4)
    results: dict = {"vision": {b: {"median_ms": v} for b, v in found.get("vision", {}).items()}}
    for key, lang in (("verdict", "en"), ("verdict_zh", "zh")):
        qs = builder.questions(policy, lang)
        tokens = {"lang": lang, "prefix_tokens": len(builder.prefix_ids(policy, lang)),
                  "body_tokens": len(builder.body_ids(policy, lang, CAPTIONS[lang][0])), "questions": len(qs),
                  "question_tokens": sum(len(q.ids) for q in qs), "question_tokens_max": max(len(q.ids) for q in qs)}
        results[key] = {b: {"median_ms": v, "per_post_ms": v / int(b), **tokens} for b, v in found.get(key, {}).items()}
    results["decode"] = {b: {"median_ms_per_token": v} for b, v in found.get("decode", {}).items()}
    if generate:
        ms, n = float(generate.group(2)), int(generate.group(1))
        results["seed_generate"] = {"median_ms": ms, "new_tokens": n, "ms_per_new_token": ms / n}
    results["clip_vit_l14"] = {"dtype": "float16"}
    for part in ("image", "text"):
        results["clip_vit_l14"][part] = {b: {"median_ms": v} for b, v in found.get(f"clip_{part}", {}).items()}
    return {"text_params": int(float(head.group(1)) * 1e9), "vision_params": int(float(head.group(2)) * 1e9),
            "device": head.group(3), "dtype": head.group(4),
            "memory": {"outside_allocator_bytes": int(float(head.group(5)) * 2**30)}, "results": results}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="toy shapes (CPU smoke test of the same code path)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--tokenizer", type=Path, default=None)
    ap.add_argument("--runs", type=int, default=None)
    ap.add_argument("--decode-tokens", type=int, default=None)
    ap.add_argument("--generate-tokens", type=int, default=None, help="the seed path's max_new_tokens (200)")
    ap.add_argument("--a10-memory-gib", type=float, default=22.0, help="usable memory of the A10 the plan is for")
    ap.add_argument("--decoder-share-gib", type=float, default=None,
                    help="the decoder process's share of that memory (default: from moderation.preflight's plan)")
    ap.add_argument("--no-int8", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "perf" / "results" / "gpu")
    ap.add_argument("--from-log", type=Path, default=None,
                    help="write the report of a run stopped before its JSON from the medians its log printed")
    args = ap.parse_args(argv)
    if args.from_log:
        from transformers import AutoTokenizer

        rep = report_from_log(args.from_log, AutoTokenizer.from_pretrained(find_tokenizer_dir(args.tokenizer)))
        peaks = peaks_for(rep["device"])
        rep = {"what": "Qwen3-VL-8B shapes, random weights: latency only, never quality (medians from the run's log)",
               "untrained": True, "log": str(args.from_log.resolve().relative_to(ROOT)), **rep}
        rep["a10_projection"] = project(rep["results"], peaks, rep["text_params"], rep["vision_params"], 2.0)
        rep["a10_budgets"] = compare_budgets(rep["a10_projection"])
        slug = "".join(c if c.isalnum() else "-" for c in rep["device"].lower()).strip("-")
        path = args.out / f"measure_8b-{slug}.json"
        path.write_text(json.dumps(rep, indent=2, ensure_ascii=False))
        print(f"wrote {path}")
        return 0

    from transformers import AutoTokenizer, Qwen3VLForConditionalGeneration

    from moderation.vlm.decoder import VerdictDecoder, select_device
    device = select_device(args.device)
    if device.type == "cuda" and device.index is None:  # the allocator's per-process cap takes an indexed device
        device = torch.device("cuda", torch.cuda.current_device())
    dtype_name = "bfloat16" if device.type == "cuda" else "float32"
    dtype = getattr(torch, dtype_name)
    runs = args.runs or (10 if not args.tiny else 2)
    warmup = 2 if not args.tiny else 1
    batches = [1, 4, 8] if not args.tiny else [1, 2]
    decode_tokens = args.decode_tokens or (32 if not args.tiny else 3)
    generate_tokens = args.generate_tokens or (200 if not args.tiny else 16)
    tok_dir = find_tokenizer_dir(args.tokenizer)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    config = build_config(args.tiny, tokenizer)
    qwen_cfg = config.to_dict() if args.tiny else json.loads(
        (ROOT / "tests" / "data" / "checkpoints" / "qwen3-vl-8b-instruct" / "config.json").read_text())
    overhead = process_overhead(device)
    a10 = int(args.a10_memory_gib * 2**30)
    share = int(args.decoder_share_gib * 2**30) if args.decoder_share_gib else decoder_share_from_plan(a10)
    cap = int(share - overhead["outside_allocator_bytes"]) if share and overhead else None
    t0 = time.perf_counter()
    model = build_model(config, device, dtype)
    build_s = time.perf_counter() - t0
    text_params = count(model.model.language_model) + count(model.lm_head)
    vision_params = count(model.model.visual)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"{'tiny' if args.tiny else 'Qwen3-VL-8B-shaped'} random model: text {text_params / 1e9:.3f} B, "
          f"vision {vision_params / 1e9:.3f} B params on {device_name} ({dtype_name}); built in {build_s:.1f} s; "
          f"outside the allocator {overhead.get('outside_allocator_bytes', 0) / 2**30:.2f} GiB; "
          f"decoder share {share / 2**30 if share else float('nan'):.2f} GiB", flush=True)
    peaks = peaks_for(device_name) if device.type == "cuda" else None
    results, memory = {}, {"a10_memory_bytes": a10, "decoder_share_bytes": share, **overhead}
    report = {
        "what": ("Qwen3-VL-8B shapes" if not args.tiny else "tiny shapes (smoke test)")
                + ", random weights: latency and memory only, never quality",
        "untrained": True, "device": device_name, "dtype": dtype_name, "torch": torch.__version__,
        "transformers": __import__("transformers").__version__, "text_params": text_params,
        "vision_params": vision_params, "build_s": build_s, "runs": runs, "warmup": warmup,
        "tokenizer": str(tok_dir.relative_to(ROOT)) if tok_dir.is_relative_to(ROOT) else str(tok_dir),
        "results": results, "memory": memory, "phase_end_s": {},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    slug = ("tiny-" if args.tiny else "") + "".join(c if c.isalnum() else "-" for c in device_name.lower()).strip("-")
    path = args.out / f"measure_8b-{slug}.json"
    started = time.perf_counter()

    def save(phase: str = "") -> None:
        """Written after every phase, so a run cut short keeps what it measured."""
        if phase:
            report["phase_end_s"][phase] = round(time.perf_counter() - started, 1)
            print(f"[{report['phase_end_s'][phase]:7.1f} s] {phase} done", flush=True)
        path.write_text(json.dumps(report, indent=2, ensure_ascii=False))
    save.report = report

    results["vision"] = measure_vision(model, device, dtype, batches, runs, warmup)
    print(f"vision: { {b: round(r['median_ms'], 2) for b, r in results['vision'].items()} } ms", flush=True)
    save("vision")
    results["seed_generate"] = guarded(measure_seed_generate, model, tokenizer, device, dtype, generate_tokens,
                                       max(2, runs // 4), 1)
    print(f"seed generate({generate_tokens}): {results['seed_generate'].get('median_ms')} ms", flush=True)
    save("seed_generate")
    # The decoder under test is the serving class itself; its from_pretrained is fed the random model (it drops the
    # vision tower, as in serving: visual tokens come from the vision_encoder model).
    with mock.patch.object(Qwen3VLForConditionalGeneration, "from_pretrained", return_value=model):
        decoder = VerdictDecoder(tok_dir, device=str(device), dtype=dtype_name)
    results["decoder_device"] = decoder.device_label
    memory.update(set_cap(device, cap))
    memory["bf16"] = measure_memory(decoder, config, device, batches, qwen_cfg, int8=False)
    save("memory")
    context = (results_ctx := make_requests(decoder, config, 1)[1])["prefix_tokens"] + results_ctx["body_tokens"]
    results["verdict"] = measure_verdict(decoder, config, device, batches, runs, warmup)
    results["verdict_zh"] = measure_verdict(decoder, config, device, batches, runs, warmup, lang="zh")
    print(f"verdict: en { {b: round(r['median_ms'], 2) for b, r in results['verdict'].items()} }, zh "
          f"{ {b: round(r['median_ms'], 2) for b, r in results['verdict_zh'].items()} } ms per batch", flush=True)
    save("verdict")
    results["decode"] = measure_decode(model, device, [1, batches[-1]], context, decode_tokens, max(2, runs // 3), 1)
    print(f"decode: { {b: round(r['median_ms_per_token'], 2) for b, r in results['decode'].items()} } ms/token",
          flush=True)
    set_cap(device, None)
    report["a10_projection"] = project(results, peaks, text_params, vision_params, 2.0)
    report["a10_budgets"] = compare_budgets(report["a10_projection"])
    save("decode")
    clip = results["clip_vit_l14"] = guarded(measure_clip, device, args.tiny, runs, warmup)
    print(f"clip image { {b: round(r['median_ms'], 2) for b, r in clip.get('image', {}).items()} }, "
          f"text { {b: round(r['median_ms'], 2) for b, r in clip.get('text', {}).items()} } ms {clip.get('error', '')}",
          flush=True)
    save("clip")
    if not args.no_int8:
        int8 = report["int8_weight_only"] = guarded(
            measure_int8, decoder, model, config, device, dtype, batches, runs, warmup, qwen_cfg, cap, context,
            decode_tokens, peaks, text_params, vision_params, save)
        fused = int8.get("fused", {})
        ms = {b: round(r["median_ms"], 2) for b, r in int8.get("verdict", {}).items()}
        per_token = {b: round(r["median_ms_per_token"], 2) for b, r in int8.get("decode", {}).items()}
        fused_verdict = fused.get("verdict", {})
        fused_ms = fused.get("unsupported") or {b: round(r["median_ms"], 2) for b, r in fused_verdict.items()}
        print(f"int8: verdict {ms} ms, decode {per_token} ms/token; fused: {fused_ms} {int8.get('error', '')}",
              flush=True)
        save("int8")
    print(f"wrote {path}")
    for name, m in memory.get("bf16", {}).get("batches", {}).items():
        print(f"  memory b{name}: " + (f"peak {m['peak_allocated_bytes'] / 2**30:.2f} GiB allocated, "
                                        f"{m['peak_reserved_bytes'] / 2**30:.2f} reserved" if m["ok"] else m["error"])
              + f"; plan {m['plan']['total'] / 2**30:.2f} GiB")
    stages = report["a10_projection"].get("stages", {})
    if stages:
        print(f"A10 projection (x{report['a10_projection']['flops_ratio_measured_over_a10']:.2f} FLOP/s, "
              f"x{report['a10_projection']['bandwidth_ratio_measured_over_a10']:.2f} bandwidth, roofline floor):")
        for k, v in stages.items():
            print(f"  {k:>12}: measured {v['measured_ms']:8.2f} ms -> A10 {v['a10_ms']:8.2f} ms "
                  f"(floor {v['roofline_floor_ms']:.2f})")
    else:
        print(f"A10 projection: {report['a10_projection']['note']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
