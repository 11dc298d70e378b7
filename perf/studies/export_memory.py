"""Host memory of exporting the Qwen3-VL vision tower: each export runs in its own process and its peak
resident set (getrusage ru_maxrss of that child, from os.wait4) is recorded with the parity it reached.

Checkpoints are generated here (random weights, bf16, sharded like Qwen3-VL-8B-Instruct's), each holding the
real model's vision tower at its real width and a tiny text model, so the exports read the same tensors as the
real one does:
  width_depth2   1152 hidden, 16 heads, out 4096, 2 blocks (the test's tower)
  full_tower     Qwen3-VL-8B's tower: 27 blocks, deepstack [8, 16, 24]; 0.58 B parameters, 2.3 GB in fp32
Paths measured:
  tower_only       export.export_models.export_vision_encoder (reads model.visual.* only, in its dtype)
  whole_model_fp32 the earlier path: Qwen3VLForConditionalGeneration.from_pretrained(dtype=float32), then the
                   tower (here the text model is tiny; for the real 8B the whole model is what it loads)
and, from parameter counts on the meta device, what each path holds for the real Qwen3-VL-8B.

    .venv/bin/python -m perf export_memory            # writes perf/results/export_memory.json
    .venv/bin/python -m perf export_memory --quick    # width_depth2 only
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from perf.common import RESULTS, ROOT, dump_json, git_commit, machine

TINY_QWEN = ROOT / "build" / "checkpoints" / "tiny-qwen3-vl"  # its image-processor config (same patch layout)

# Qwen3-VL-8B-Instruct's config.json (text and vision), as published.
QWEN3_VL_8B_TEXT = {"hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
                    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
                    "tie_word_embeddings": False,
                    "rope_parameters": {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20],
                                        "mrope_interleaved": True}}
QWEN3_VL_8B_VISION = {"depth": 27, "hidden_size": 1152, "num_heads": 16, "intermediate_size": 4304,
                      "out_hidden_size": 4096, "num_position_embeddings": 2304,
                      "deepstack_visual_indexes": [8, 16, 24], "patch_size": 16, "spatial_merge_size": 2,
                      "temporal_patch_size": 2, "in_channels": 3, "hidden_act": "gelu_pytorch_tanh"}
TINY_TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 1024, "tie_word_embeddings": False,
             "rope_parameters": {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [2, 3, 3],
                                 "mrope_interleaved": True}}
TOWERS = {
    "width_depth2": QWEN3_VL_8B_VISION | {"depth": 2, "deepstack_visual_indexes": [0, 1]},
    "full_tower": QWEN3_VL_8B_VISION,
}
IMAGES = 2  # sample images in the parity batch (448x448 -> 784 patches each)


def _config(vision: dict, text: dict):
    from transformers import Qwen3VLConfig

    return Qwen3VLConfig(vision_config=vision, text_config=text, tie_word_embeddings=text["tie_word_embeddings"])


def parameter_counts() -> dict:
    """Parameters of Qwen3-VL-8B, whole and vision tower, counted on the meta device (nothing allocated)."""
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration(_config(QWEN3_VL_8B_VISION, QWEN3_VL_8B_TEXT))
    whole = sum(p.numel() for p in model.parameters())
    tower = sum(p.numel() for p in model.model.visual.parameters())
    return {"whole_model": whole, "vision_tower": tower, "language_model_and_head": whole - tower,
            "whole_model_fp32_gb": whole * 4 / 1e9, "whole_model_bf16_gb": whole * 2 / 1e9,
            "vision_tower_fp32_gb": tower * 4 / 1e9, "vision_tower_bf16_gb": tower * 2 / 1e9}


def _make_checkpoint(tower: str, out: Path) -> None:
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    torch.manual_seed(0)
    model = Qwen3VLForConditionalGeneration._from_config(_config(TOWERS[tower], TINY_TEXT), dtype=torch.bfloat16)
    model.save_pretrained(out, max_shard_size="500MB")
    shutil.copy2(TINY_QWEN / "preprocessor_config.json", out / "preprocessor_config.json")


def _pixels():
    import numpy as np

    from export.export_models import _sample_images
    from moderation.vlm.inputs import QwenPixels

    qp = QwenPixels(str(TINY_QWEN))
    return np.stack([qp(im)[0] for im in _sample_images(IMAGES)])


def _export_whole_model_fp32(checkpoint: Path, out: Path) -> dict:
    """The earlier path, kept here to be measured: the whole model in fp32, then the tower."""
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    from export.export_models import _parity, _torch_outputs, export_onnx
    from export.vision_export import BatchedVisionEncoder

    pixels = _pixels()
    vlm = Qwen3VLForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    encoder = BatchedVisionEncoder(vlm.model.visual).eval()
    feeds = {"PIXEL_VALUES": pixels}
    reference = _torch_outputs(encoder, feeds)
    external = export_onnx(encoder, (torch.from_numpy(pixels[:1]),), out, ["PIXEL_VALUES"],
                           ["VISUAL_TOKENS", "DEEPSTACK"], 17)
    return _parity(out, reference, feeds, 1e-4) | {"external_data": external,
                                                   "parameters_loaded": sum(p.numel() for p in vlm.parameters())}


def child(args) -> int:
    out = Path(args.out) / "model.onnx"
    if args.child == "make_checkpoint":
        _make_checkpoint(args.tower, Path(args.checkpoint))
        result = {}
    elif args.child == "tower_only":
        from export.export_models import export_vision_encoder

        result = export_vision_encoder(Path(args.checkpoint), out, _pixels(), dtype=args.dtype)
    else:
        result = _export_whole_model_fp32(Path(args.checkpoint), out)
    if out.exists():
        result["onnx_files"] = {p.name: p.stat().st_size for p in sorted(out.parent.iterdir())}
    print("RESULT " + json.dumps(result))
    return 0


def _run_child(*argv: str) -> dict:
    """Runs this module as a child process; returns its RESULT line, its rusage and the wall time."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "perf.studies.export_memory", *argv], cwd=ROOT, stdout=stdout,
                                stderr=stderr, text=True)
        _, status, usage = os.wait4(proc.pid, 0)  # the child's own rusage (Popen.wait would discard it)
        proc.returncode = os.waitstatus_to_exitcode(status)
        stdout.seek(0)
        stderr.seek(0)
        out, err = stdout.read(), stderr.read()
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"child {argv} failed ({proc.returncode}):\n{err[-4000:]}")
    line = next(ln for ln in reversed(out.splitlines()) if ln.startswith("RESULT "))
    return {"result": json.loads(line[len("RESULT "):]), "wall_s": round(wall, 1), "usage": usage}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=RESULTS / "export_memory.json")
    ap.add_argument("--quick", action="store_true", help="the 2-block tower only")
    ap.add_argument("--child", choices=["make_checkpoint", "tower_only", "whole_model_fp32"], help=argparse.SUPPRESS)
    ap.add_argument("--tower", choices=sorted(TOWERS), help=argparse.SUPPRESS)
    ap.add_argument("--checkpoint", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temporary one)")
    args = ap.parse_args(argv)
    if args.child:
        args.out = str(args.work)
        return child(args)

    runs = [("width_depth2", "tower_only", "float32"), ("width_depth2", "whole_model_fp32", "float32"),
            ("width_depth2", "tower_only", "float16")]
    if not args.quick:
        runs += [("full_tower", "tower_only", "float32"), ("full_tower", "tower_only", "float16")]
    report = {"commit": git_commit(), "machine": machine(),
              "settings": {"images": IMAGES, "patches_per_image": 784, "opset": 17, "checkpoint_dtype": "bfloat16",
                           "text_model_in_generated_checkpoints": TINY_TEXT, "towers": TOWERS,
                           "parity": "max |onnxruntime - torch fp32| / max |torch fp32| over both outputs",
                           "peak_rss": "ru_maxrss of the child process that ran the export (os.wait4)"},
              "qwen3_vl_8b_parameters": parameter_counts(), "runs": []}
    with tempfile.TemporaryDirectory(dir=args.work, prefix="export-memory-") as scratch:
        made = {}
        for tower, path, dtype in runs:
            ckpt = Path(scratch) / f"ckpt-{tower}"
            if tower not in made:
                made[tower] = _run_child("--child", "make_checkpoint", "--tower", tower, "--checkpoint", str(ckpt),
                                         "--work", scratch)
                made[tower]["checkpoint_bytes"] = sum(p.stat().st_size for p in ckpt.iterdir())
            work = Path(scratch) / f"out-{tower}-{path}-{dtype}"
            work.mkdir()
            run = _run_child("--child", path, "--checkpoint", str(ckpt), "--dtype", dtype, "--work", str(work))
            row = {"tower": tower, "path": path, "dtype": dtype, "peak_rss_gb": run["usage"].ru_maxrss * 1024 / 1e9,
                   "wall_s": run["wall_s"], "checkpoint_bytes": made[tower]["checkpoint_bytes"], **run["result"]}
            print(f"{tower:13s} {path:17s} {dtype:8s} peak RSS {row['peak_rss_gb']:.2f} GB, "
                  f"parity {row['parity_max_rel_diff']:.3g} (rel), files {row.get('onnx_files')}", flush=True)
            report["runs"].append(row)
            shutil.rmtree(work)
    dump_json(args.out, report, settings=args)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
