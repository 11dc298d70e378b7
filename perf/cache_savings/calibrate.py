"""Calibration, in-process: do the `cache` policy thresholds separate near copies from different photos?"""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np

from moderation.testing.traces import NEAR_KINDS, near_copy
from perf.common import REPO


def calibrate(repo: Path = REPO) -> dict:
    """Cosine of near copies vs different photos for the CLIP image embedding and the fingerprint."""
    import onnxruntime as ort

    from moderation.core.imaging import decode_image, fingerprint
    from moderation.core.policy import load_policy
    from moderation.gate.inputs import ClipPixels
    from moderation.testing.samples import image_paths

    px = ClipPixels(str(repo / "preprocess" / "1" / "clip"))
    sess = ort.InferenceSession(str(repo / "clip_image" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name

    def feats(data: bytes):
        im = decode_image(data).image
        e = sess.run(None, {name: px(im)[None]})[0][0]
        return e / np.linalg.norm(e), fingerprint(im)

    orig = {k: feats(p.read_bytes()) for k, p in image_paths().items()}
    copies = {(k, kind): feats(near_copy(p.read_bytes(), kind))
              for k, p in image_paths().items() for kind in NEAR_KINDS}
    same = [{"image": k, "copy": kind, "clip": float(e @ orig[k][0]), "fingerprint": float(f @ orig[k][1])}
            for (k, kind), (e, f) in copies.items()]
    # different photos: originals against each other, and every near copy against every other original
    diff = [{"a": a, "b": b, "clip": float(orig[a][0] @ orig[b][0]), "fingerprint": float(orig[a][1] @ orig[b][1])}
            for a, b in itertools.combinations(orig, 2)]
    diff += [{"a": f"{k}/{kind}", "b": o, "clip": float(e @ orig[o][0]), "fingerprint": float(f @ orig[o][1])}
             for (k, kind), (e, f) in copies.items() for o in orig if o != k]
    cfg = load_policy("default").cache

    def match(r: dict) -> bool:
        return r["clip"] >= cfg.image_threshold and (
            cfg.fingerprint_threshold is None or r["fingerprint"] >= cfg.fingerprint_threshold)

    out = {
        "what": "cosine similarity, in-process: served clip_image ONNX (tiny random CLIP, untrained) and the "
                "cache fingerprint (8x8 RGB thumbnail); near copies of each sample photo vs different photos",
        "images": len(orig), "near_copies": len(same), "different_pairs": len(diff),
        "clip": {"near_copy_min": min(r["clip"] for r in same),
                 "near_copy_mean": float(np.mean([r["clip"] for r in same])),
                 "different_max": max(r["clip"] for r in diff),
                 "different_mean": float(np.mean([r["clip"] for r in diff]))},
        "fingerprint": {"near_copy_min": min(r["fingerprint"] for r in same),
                        "different_max": max(r["fingerprint"] for r in diff)},
        "thresholds": {"image_threshold": cfg.image_threshold, "fingerprint_threshold": cfg.fingerprint_threshold},
        "near_copies_matched": sum(map(match, same)), "different_pairs_matched": sum(map(match, diff)),
        "worst_near_copy_clip": min(same, key=lambda r: r["clip"]),
        "worst_near_copy_fingerprint": min(same, key=lambda r: r["fingerprint"]),
        "closest_different_clip": max(diff, key=lambda r: r["clip"]),
        "closest_different_fingerprint": max(diff, key=lambda r: r["fingerprint"]),
    }
    out["separates"] = out["near_copies_matched"] == len(same) and out["different_pairs_matched"] == 0
    return out
