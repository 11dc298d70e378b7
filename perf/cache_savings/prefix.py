"""Prompt-prefix KV reuse, in-process: the served decoder checkpoint with the policy prefix reused vs recomputed."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from perf.common import REPO
from perf.harness import DecoderInputs


def prefix_saving(trace: list[dict], repo: Path = REPO, posts: int = 12, rounds: int = 3) -> dict:
    """The same posts scored by two decoders of the served checkpoint, one reusing the policy-prefix KV and one
    recomputing it per call, alternating post by post (batch size 1, as in the replay)."""
    import torch

    from moderation.vlm.decoder import VerdictDecoder

    torch.set_num_threads(2)  # the served language_decoder's torch_threads
    make_request = DecoderInputs(repo, intra_op_threads=1)
    reqs, vision_ms = [], []
    for t in trace[:posts]:
        req, ms = make_request(t["image"], t["text"].encode(), json.dumps({"policy": "default"}).encode())
        reqs.append(req)
        vision_ms.append(ms)
    ckpt = repo / "language_decoder" / "1" / "checkpoint"
    decoders = {"reuse": VerdictDecoder(ckpt, reuse_prefix=True), "recompute": VerdictDecoder(ckpt, reuse_prefix=False)}
    for d in decoders.values():  # warm-up, and the reusing decoder computes its prefix once here
        d.score(reqs[:1])
    times = {k: {"score_ms": [], "prefix_ms": [], "prefill_ms": []} for k in decoders}
    scores_equal = True
    for _ in range(rounds):
        for r in reqs:
            outs = {}
            for name, d in decoders.items():
                t0 = time.perf_counter()
                res = d.score([r])[0]
                times[name]["score_ms"].append((time.perf_counter() - t0) * 1e3)
                times[name]["prefix_ms"].append(res.timings_ms["prefix"])
                times[name]["prefill_ms"].append(res.timings_ms["prefill"])
                outs[name] = res
            scores_equal &= abs(outs["reuse"].violation - outs["recompute"].violation) < 1e-4
    mean = {k: {m: float(np.mean(v)) for m, v in t.items()} for k, t in times.items()}
    pre = {k: mean[k]["prefix_ms"] + mean[k]["prefill_ms"] for k in mean}
    builder = decoders["reuse"].prompts(reqs[0].visual_tokens.shape[0])
    return {
        "what": f"in-process, language_decoder checkpoint of {Path(repo).name} (random Qwen3-VL, untrained), "
                f"batch 1, {len(reqs)} trace posts x {rounds} rounds, decoders alternating post by post, "
                "torch 2 threads",
        "prefix_tokens": len(builder.prefix_ids(reqs[0].policy, reqs[0].lang)),
        "body_tokens_mean": float(np.mean([len(r.body_ids) for r in reqs])),
        "mean_ms": mean,
        "vision_encoder_ms": float(np.mean(vision_ms)),
        "prefill_ms": pre,
        "prefill_saving": 1 - pre["reuse"] / pre["recompute"],
        "decoder_call_saving": 1 - mean["reuse"]["score_ms"] / mean["recompute"]["score_ms"],
        "same_violation_scores": bool(scores_equal),
        "prefix_computed": decoders["reuse"].stats["prefix_computed"],
        "prefix_reused": decoders["reuse"].stats["prefix_reused"],
    }
