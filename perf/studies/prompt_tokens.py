"""The verdict prompt's token counts with Qwen's real vocabulary (the tiny checkpoint's tokenizer is Qwen's: 151,643
BPE ranks and the published added-token ids), per language: the policy prefix (computed once per model and
reused), the post body (image tokens + caption + image text + the assistant header) for the sample posts and at
the caps, and the question pass. These counts size the decoder's KV cache and its prefill FLOPs.

    .venv/bin/python -m perf prompt_tokens      # writes perf/results/prompt_tokens.json
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from moderation.core.policy import load_policy
from moderation.testing.samples import sample_posts
from moderation.vlm.inputs import MAX_CAPTION_TOKENS
from perf.common import RESULTS, ROOT, dump_json, git_commit, machine

QWEN = ROOT / "build" / "checkpoints" / "tiny-qwen3-vl"
VISUAL_TOKENS = 196  # 448x448 -> 784 patches -> 196 tokens after the 2x2 merge


def measure(tokenizer_dir: Path) -> dict:
    from transformers import AutoTokenizer

    from moderation.vlm.prompts import PromptBuilder

    builder = PromptBuilder(AutoTokenizer.from_pretrained(tokenizer_dir), VISUAL_TOKENS)
    policy = load_policy("default")
    longest_caption = "违" * (4 * MAX_CAPTION_TOKENS)  # one token per character: cut at the cap
    captions = [p.text for p in sample_posts()]
    out = {}
    for lang in ("en", "zh"):
        bodies = [len(builder.body_ids(policy, lang, c)) for c in captions]
        capped = builder.text_ids(longest_caption)[:MAX_CAPTION_TOKENS]
        image_text = builder.text_ids("字" * 1000)[:policy.ocr.prompt_max_tokens]
        at_caps = len(builder.body_ids(policy, lang, builder.tok.decode(capped), builder.tok.decode(image_text)))
        questions = builder.questions(policy, lang)
        out[lang] = {
            "prefix": len(builder.prefix_ids(policy, lang)),
            "body_sample_posts": {"n": len(bodies), "min": min(bodies), "median": statistics.median(bodies),
                                  "max": max(bodies)},
            "body_at_caps": at_caps,
            "body_template_only": len(builder.body_ids(policy, lang, "")),
            "questions": len(questions),
            "question_tokens": sorted(len(q.ids) for q in questions),
            "question_tokens_total": sum(len(q.ids) for q in questions),
            "describe_prompt": len(builder.describe_ids(policy, lang)),
        }
    return {"tokenizer": str(tokenizer_dir.relative_to(ROOT)) if tokenizer_dir.is_relative_to(ROOT)
            else str(tokenizer_dir), "visual_tokens": VISUAL_TOKENS, "caption_cap": MAX_CAPTION_TOKENS,
            "image_text_cap": policy.ocr.prompt_max_tokens, "policy": policy.id, "counts": out}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", type=Path, default=QWEN)
    ap.add_argument("--out", type=Path, default=RESULTS / "prompt_tokens.json")
    args = ap.parse_args(argv)
    result = {"what": "verdict prompt token counts with Qwen's real vocabulary", "commit": git_commit(),
              "machine": machine(), **measure(args.tokenizer)}
    dump_json(args.out, result, settings=args)
    print(result["counts"])


if __name__ == "__main__":
    main()
