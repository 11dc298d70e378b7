"""The A10-like cost profile for `make bench` (c): a random-weight Qwen3-VL whose language model is sized
so that, on this CPU, one escalated post costs about as many gate-path posts as Qwen3-VL-8B on an A10
does (R = VLM cost / gate cost ~ 27, derived in docs/performance.md). The tiny default decoder makes the
VLM nearly free and would flatter nothing and prove nothing.

Built under build/bench/ (never committed): the checkpoint, then a separate copy of the model repository
with this decoder and a vision encoder re-exported for its width (export.export_models.export_all).
Everything else (CLIP, nsfw_image, configs, model.py files) is the committed repository's.

    .venv/bin/python -m perf a10_profile      # build (skipped when up to date)
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from perf.common import ROOT
from perf.variants import copy_repository

OUT = ROOT / "build" / "bench"
TINY = ROOT / "build" / "checkpoints" / "tiny-qwen3-vl"
CLIP = ROOT / "build" / "checkpoints" / "tiny-clip"
# Language model: 16 layers, width 768 (GQA 12/4 heads of 64), MLP 2304: ~110 M parameters in the layers,
# about 2 x 110e6 x 300 tokens = 66 GFLOP per escalated post (body prefill + question pass). Picked by
# measuring in-process on this CPU (8 layers x 512 gave R ~ 10, 12 x 768 gave R ~ 21; this gives R ~ 27); the bench
# measures and reports the ratio it actually gets in each run.
PROFILE = dict(hidden_size=768, intermediate_size=2304, num_hidden_layers=16, num_attention_heads=12,
               num_key_value_heads=4, head_dim=64)
SEED = 20261126


def build_checkpoint(out: Path = OUT / "a10-profile-qwen3-vl") -> Path:
    from transformers import AutoTokenizer, Qwen3VLConfig, Qwen3VLForConditionalGeneration

    stamp = out / "profile.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("profile") == PROFILE:
        return out
    torch.manual_seed(SEED)
    tiny = Qwen3VLConfig.from_pretrained(TINY)
    text = tiny.text_config.to_dict()
    text.update(PROFILE)
    # mrope sections must sum to head_dim / 2 (the tiny model's 16-dim heads use [2, 3, 3])
    text["rope_parameters"] = dict(text.get("rope_parameters") or {}, mrope_section=[12, 10, 10])
    vision = tiny.vision_config.to_dict()
    vision["out_hidden_size"] = PROFILE["hidden_size"]
    cfg = Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=tiny.image_token_id,
                        video_token_id=tiny.video_token_id, vision_start_token_id=tiny.vision_start_token_id,
                        vision_end_token_id=tiny.vision_end_token_id, tie_word_embeddings=False)
    model = Qwen3VLForConditionalGeneration(cfg).eval()
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(TINY).save_pretrained(out)
    for name in ("preprocessor_config.json",):
        shutil.copy2(TINY / name, out / name)
    n = sum(p.numel() for p in model.parameters())
    text_n = sum(p.numel() for p in model.model.language_model.layers.parameters())
    (out / "UNTRAINED.json").write_text(json.dumps(
        {"untrained": True, "seed": SEED, "parameters": n, "language_layers_parameters": text_n,
         "note": "random-initialised Qwen3-VL sized for the A10-like cost profile of make bench; outputs are noise"},
        indent=2))
    stamp.write_text(json.dumps({"profile": PROFILE, "parameters": n, "language_layers_parameters": text_n}))
    return out


def build_repository(out: Path = OUT / "repo-a10-profile") -> Path:
    """Copy of the committed repository with the A10-profile decoder and a matching vision encoder."""
    from export.export_models import export_all

    ckpt = build_checkpoint()
    # always a fresh copy (~10 s): the committed repository may have gained models or configs since
    copy_repository(out)
    export_all(ckpt, CLIP, out, "1", 1e-3, link=True, opset=17)
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    print(build_repository())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
