"""Qwen3-VL-8B-shaped latency on a lent GPU, projected to an A10.

No hub is reachable, so the model has the REAL Qwen3-VL-8B shapes (written out below from its published
config: 36 text layers x 4096, GQA 32/8 heads of 128, MLP 12288, vocabulary 151936; a 27-layer 1152-wide
vision tower with DeepStack at layers 8/16/24) and random weights. Random weights give real latency: the
arithmetic and the bytes moved do not depend on the values. Every number it writes is untrained-model latency,
never quality. The tokenizer is the tiny checkpoint's, which is Qwen's real one (151,643 BPE ranks, the published
added-token ids), so prompts have their real token counts (recorded).

What it measures, each after warm-up, `--runs` times, median and spread recorded:
  1. vision encoder at the fixed 448x448 grid (784 patches -> 196 visual tokens), batch 1/4/8;
  2. the prefill verdict through moderation.decoder.VerdictDecoder (shared policy prefix KV, one padded prefill
     of image tokens + caption, all questions in one batched pass), batch 1/4/8;
  3. per-token decode (one new token over a ~400-token KV cache), batch 1 and 8;
  4. the same 2-3 with int8 weight-only linear layers (torchao when installed, else torch._weight_int8pack_mm
     where the device has it, else a dequantise-on-the-fly fallback that saves memory, not time; recorded).
Then projects each to an A10 by the ratio of peak FLOP/s (compute-bound: vision, prefill) or memory bandwidth
(bandwidth-bound: decode) between the measured GPU and the A10, floors it at the A10 roofline, and compares with
perf/budgets.yaml's `a10` budgets. Results: perf/results/gpu/measure_8b-<device>.json.

    python perf/gpu/measure_8b.py                # on the GPU machine (bf16); ~3-6 minutes on an H100
    python perf/gpu/measure_8b.py --tiny         # CPU smoke test: tiny shapes, same code path (seconds)
"""
from __future__ import annotations

import argparse
import json
import platform
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


# --- int8 weight-only ------------------------------------------------------------------------------------------
class Int8WeightOnlyLinear(torch.nn.Module):
    """Per-output-channel symmetric int8 weights; activations stay in the model dtype."""

    def __init__(self, linear: torch.nn.Linear, fused: bool):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        self.register_buffer("qweight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(linear.weight.dtype))
        self.bias = linear.bias
        self.fused = fused

    def forward(self, x):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.fused:
            y = torch._weight_int8pack_mm(x2, self.qweight, self.scale)
        else:
            y = torch.nn.functional.linear(x2, self.qweight.to(x.dtype) * self.scale[:, None])
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], -1)


def quantize_int8(language_model, lm_head_owner, device, dtype) -> str:
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(language_model, Int8WeightOnlyConfig())
        quantize_(lm_head_owner, Int8WeightOnlyConfig(), filter_fn=lambda m, fqn: fqn == "lm_head")
        return "torchao Int8WeightOnlyConfig"
    except ImportError:
        pass
    try:  # does this device have the fused int8-weight matmul?
        torch._weight_int8pack_mm(torch.zeros(2, 64, device=device, dtype=dtype),
                                  torch.zeros(8, 64, device=device, dtype=torch.int8),
                                  torch.ones(8, device=device, dtype=dtype))
        fused = True
    except (RuntimeError, NotImplementedError):
        fused = False

    def swap(parent):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear):
                setattr(parent, name, Int8WeightOnlyLinear(child, fused))
            else:
                swap(child)

    swap(language_model)
    lm_head_owner.lm_head = Int8WeightOnlyLinear(lm_head_owner.lm_head, fused)
    return ("torch._weight_int8pack_mm (fused int8 weight matmul)" if fused else
            "dequantise-on-the-fly fallback (saves weight memory, NOT time: no fused int8 kernel on this device)")


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


def make_requests(decoder, config, batch: int, describe: bool = False):
    from moderation.core.policy import load_policy
    from moderation.vlm.decoder import DecoderRequest

    policy = load_policy()
    n_vis = GRID[1] * GRID[2] // 4
    builder = decoder.prompts(n_vis)
    hidden = config.text_config.hidden_size
    n_ds = len(config.vision_config.deepstack_visual_indexes)
    rng = np.random.default_rng(0)
    captions = ["buy now, limited offer, click the link", "what a day at the beach", "this is so funny lol",
                "they should all be punished", "new slang for pills", "look at this", "岁月静好", "今天天气真好"]
    reqs = []
    for i in range(batch):
        body = np.asarray(builder.body_ids(policy, "en", captions[i % len(captions)]), dtype=np.int64)
        reqs.append(DecoderRequest(body, rng.standard_normal((n_vis, hidden), dtype=np.float32),
                                   rng.standard_normal((n_ds, n_vis, hidden), dtype=np.float32), policy, "en",
                                   describe))
    prefix = len(builder.prefix_ids(policy, "en"))
    questions = builder.questions(policy, "en")
    return reqs, {"prefix_tokens": prefix, "body_tokens": int(len(reqs[0].body_ids)), "questions": len(questions),
                  "question_tokens_max": max(len(q.ids) for q in questions)}


def measure_verdict(decoder, config, device, batches, runs, warmup) -> dict:
    out = {}
    for b in batches:
        reqs, tokens = make_requests(decoder, config, b)
        last = {}

        def run(reqs=reqs, last=last):
            last["r"] = decoder.score(reqs)
        res = timed(run, device, runs, warmup)
        res.update(tokens, per_post_ms=res["median_ms"] / b, stage_ms_last_run=last["r"][0].timings_ms)
        out[str(b)] = res
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


def project(results: dict, peaks, text_params: int, vision_params: int, weight_bytes_per_param: float) -> dict:
    """A10 estimate per stage: measured time x (measured GPU peak / A10 peak), compute-bound stages by FLOP/s,
    decode by bandwidth; never below the A10 roofline floor for the same work."""
    if peaks is None:
        return {"note": "measured device has no known peak numbers (CPU or unlisted GPU): no ratio projection"}
    flops, bw = peaks
    fr, br = flops / A10_FLOPS, bw / A10_BW
    out = {"flops_ratio_measured_over_a10": fr, "bandwidth_ratio_measured_over_a10": br, "stages": {}}
    for b, r in results["vision"].items():
        floor = 2 * vision_params * GRID[1] * GRID[2] * int(b) / A10_FLOPS * 1e3
        out["stages"][f"vision_b{b}"] = {"measured_ms": r["median_ms"], "scaled_ms": r["median_ms"] * fr,
                                         "roofline_floor_ms": floor, "a10_ms": max(r["median_ms"] * fr, floor)}
    for b, r in results["verdict"].items():
        toks = (r["body_tokens"] + r["questions"] * r["question_tokens_max"]) * int(b)  # prefix KV is reused
        floor = max(2 * text_params * toks / A10_FLOPS, text_params * weight_bytes_per_param / A10_BW) * 1e3
        out["stages"][f"verdict_b{b}"] = {"measured_ms": r["median_ms"], "scaled_ms": r["median_ms"] * fr,
                                          "roofline_floor_ms": floor, "a10_ms": max(r["median_ms"] * fr, floor),
                                          "a10_posts_per_s": int(b) / max(r["median_ms"] * fr, floor) * 1e3}
    for b, r in results["decode"].items():
        floor = text_params * weight_bytes_per_param / A10_BW * 1e3
        out["stages"][f"decode_b{b}"] = {"measured_ms": r["median_ms_per_token"],
                                         "scaled_ms": r["median_ms_per_token"] * br, "roofline_floor_ms": floor,
                                         "a10_ms": max(r["median_ms_per_token"] * br, floor)}
    return out


def compare_budgets(projection: dict) -> dict:
    import yaml

    budgets = yaml.safe_load((ROOT / "perf" / "budgets.yaml").read_text()).get("a10", {})
    stages = projection.get("stages", {})
    out = {}
    if "vision_b1" in stages and "vision_encoder" in budgets:
        out["vision_encoder_p50"] = {"a10_ms": stages["vision_b1"]["a10_ms"],
                                     "budget_ms": budgets["vision_encoder"]["p50_ms"]}
    if "verdict_b1" in stages and "language_decoder" in budgets:
        out["language_decoder_p50"] = {"a10_ms": stages["verdict_b1"]["a10_ms"],
                                       "budget_ms": budgets["language_decoder"]["p50_ms"]}
        best = max(v.get("a10_posts_per_s", 0) for v in stages.values())
        out["language_decoder_throughput"] = {"a10_posts_per_s": best,
                                              "budget_min": budgets["language_decoder"]["throughput_min"]}
    for v in out.values():
        if "budget_ms" in v:
            v["within"] = v["a10_ms"] <= v["budget_ms"]
        else:
            v["within"] = v["a10_posts_per_s"] >= v["budget_min"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="toy shapes (CPU smoke test of the same code path)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--tokenizer", type=Path, default=None)
    ap.add_argument("--runs", type=int, default=None)
    ap.add_argument("--decode-tokens", type=int, default=None)
    ap.add_argument("--no-int8", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "perf" / "results" / "gpu")
    args = ap.parse_args(argv)

    from transformers import AutoTokenizer, Qwen3VLForConditionalGeneration

    from moderation.vlm.decoder import VerdictDecoder, select_device

    device = select_device(args.device)
    dtype_name = "bfloat16" if device.type == "cuda" else "float32"
    dtype = getattr(torch, dtype_name)
    runs = args.runs or (10 if not args.tiny else 2)
    warmup = 2 if not args.tiny else 1
    batches = [1, 4, 8] if not args.tiny else [1, 2]
    decode_tokens = args.decode_tokens or (32 if not args.tiny else 3)
    tok_dir = find_tokenizer_dir(args.tokenizer)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    config = build_config(args.tiny, tokenizer)
    t0 = time.perf_counter()
    model = build_model(config, device, dtype)
    build_s = time.perf_counter() - t0
    text_params = count(model.model.language_model) + count(model.lm_head)
    vision_params = count(model.model.visual)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"{'tiny' if args.tiny else 'Qwen3-VL-8B-shaped'} random model: text {text_params / 1e9:.3f} B, "
          f"vision {vision_params / 1e9:.3f} B params on {device_name} ({dtype_name}); built in {build_s:.1f} s",
          flush=True)

    results = {"vision": measure_vision(model, device, dtype, batches, runs, warmup)}
    print(f"vision: { {b: round(r['median_ms'], 2) for b, r in results['vision'].items()} } ms", flush=True)
    # The decoder under test is the serving class itself; its from_pretrained is fed the random model.
    with mock.patch.object(Qwen3VLForConditionalGeneration, "from_pretrained", return_value=model):
        decoder = VerdictDecoder(tok_dir, device=str(device), dtype=dtype_name)
    results["decoder_device"] = decoder.device_label
    context = (results_ctx := make_requests(decoder, config, 1)[1])["prefix_tokens"] + results_ctx["body_tokens"]
    results["verdict"] = measure_verdict(decoder, config, device, batches, runs, warmup)
    print(f"verdict: { {b: round(r['median_ms'], 2) for b, r in results['verdict'].items()} } ms per batch",
          flush=True)
    results["decode"] = measure_decode(model, device, [1, batches[-1]], context, decode_tokens, max(2, runs // 3), 1)
    print(f"decode: { {b: round(r['median_ms_per_token'], 2) for b, r in results['decode'].items()} } ms/token",
          flush=True)
    peak_mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    peaks = peaks_for(device_name) if device.type == "cuda" else None
    report = {
        "what": ("Qwen3-VL-8B shapes" if not args.tiny else "tiny shapes (smoke test)")
                + ", random weights: latency only",
        "untrained": True, "device": device_name, "dtype": dtype_name, "torch": torch.__version__,
        "transformers": __import__("transformers").__version__, "text_params": text_params,
        "vision_params": vision_params, "build_s": build_s, "gpu_peak_memory_gib": peak_mem,
        "tokenizer": str(tok_dir.relative_to(ROOT)) if tok_dir.is_relative_to(ROOT) else str(tok_dir),
        "results": results,
    }
    report["a10_projection"] = project(results, peaks, text_params, vision_params, 2.0)
    if not args.no_int8:
        method = quantize_int8(model.model.language_model, model, device, dtype)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        int8 = {"method": method, "verdict": measure_verdict(decoder, config, device, batches, runs, warmup),
                "decode": measure_decode(model, device, [1, batches[-1]], context, decode_tokens, max(2, runs // 3), 1)}
        int8["gpu_peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        int8["a10_projection"] = project({"vision": {}, **int8}, peaks, text_params, vision_params, 1.0)
        report["int8_weight_only"] = int8
        print(f"int8 ({method}): verdict { {b: round(r['median_ms'], 2) for b, r in int8['verdict'].items()} } ms, "
              f"decode { {b: round(r['median_ms_per_token'], 2) for b, r in int8['decode'].items()} } ms/token",
              flush=True)
    report["a10_budgets"] = compare_budgets(report["a10_projection"])
    args.out.mkdir(parents=True, exist_ok=True)
    slug = ("tiny-" if args.tiny else "") + "".join(c if c.isalnum() else "-" for c in device_name.lower()).strip("-")
    path = args.out / f"measure_8b-{slug}.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")
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
