"""INT8 vs full precision, side by side in one process: agreement and speed of the encoders (onnxruntime
dynamic quantization, model.int8.onnx) and the decoder (int8 weights, moderation.int8).

    .venv/bin/python -m perf int8_bench [--runs 15] [--out perf/results/int8.json]      (make bench-int8)

Inputs: the sample posts (moderation.samples, real photos) plus each photo with the next post's caption (mismatched
variants): 22 posts. Agreement: the gate's band (allow / block / escalate) per post with fp32 vs int8 CLIP encoders
(default policy; concept bank encoded by the same encoder; written as gate_routes), the decoder's verdict (violation
at the policy threshold, the set of labels at the label threshold), max |score difference|. Speed: each variant
timed on the same batch, fp32 and int8 alternating run by run, 1 thread each; median and raw milliseconds are
written.
The models are the tiny random-initialised ones: agreement is measured on noise logits near 0.5 and speed on
layers too small for int8 GEMMs to pay off; the numbers show the machinery works, not what an 8B model gains."""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from perf.common import RESULTS, dump_json

REPO = Path("model_repository")


def posts():
    from moderation.testing.samples import sample_posts

    base = sample_posts()
    return [(p.image_bytes(), p.text) for p in base] + \
           [(p.image_bytes(), base[(i + 1) % len(base)].text) for i, p in enumerate(base)]


def _time_pair(fns: dict, runs: int) -> dict:
    for f in fns.values():  # warm-up
        f()
    raw = {k: [] for k in fns}
    for _ in range(runs):
        for k, f in fns.items():  # alternating: drift on a shared machine hits both
            t = time.perf_counter()
            f()
            raw[k].append((time.perf_counter() - t) * 1e3)
    return {k: {"median_ms": statistics.median(v), "raw_ms": [round(x, 3) for x in v]} for k, v in raw.items()}


def encoders(items, runs: int) -> dict:
    import onnxruntime as ort

    from moderation.core.imaging import decode_image
    from moderation.core.policy import load_policy
    from moderation.gate.inputs import ClipPixels, ClipTokens
    from moderation.gate.scoring import ConceptBank, judge
    from moderation.vlm.inputs import QwenPixels

    clip_dir = str(REPO / "preprocess" / "1" / "clip")
    images = [decode_image(b).image for b, _ in items]
    pix = np.stack([ClipPixels(clip_dir)(im) for im in images])
    tokens = ClipTokens(clip_dir)
    ids, mask = tokens([t for _, t in items])
    qp = QwenPixels(str(REPO / "vlm_preprocess" / "1" / "qwen"))
    qpix = np.stack([qp(im)[0] for im in images[:4]])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1

    def sessions(model):
        return {k: ort.InferenceSession(str(REPO / model / "1" / f), opts, providers=["CPUExecutionProvider"])
                for k, f in (("fp32", "model.onnx"), ("int8", "model.int8.onnx"))}

    feeds = {"clip_image": {"pixel_values": pix}, "clip_text": {"input_ids": ids, "attention_mask": mask},
             "vision_encoder": {"PIXEL_VALUES": qpix}}
    out, emb = {}, {}
    for model, feed in feeds.items():
        s = sessions(model)
        res = {k: sess.run(None, feed) for k, sess in s.items()}
        a, b = res["fp32"][0].reshape(len(res["fp32"][0]), -1), res["int8"][0].reshape(len(res["int8"][0]), -1)
        cos = np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        timing = _time_pair({k: (lambda sess=sess, feed=feed: sess.run(None, feed)) for k, sess in s.items()}, runs)
        out[model] = {"batch": int(len(a)), "max_abs_diff": float(np.max(np.abs(a - b))),
                      "min_cosine": float(cos.min()),
                      "bytes": {k: (REPO / model / "1" / f).stat().st_size for k, f in
                                (("fp32", "model.onnx"), ("int8", "model.int8.onnx"))},
                      "timing": timing,
                      "speedup_int8": timing["fp32"]["median_ms"] / timing["int8"]["median_ms"]}
        emb[model] = {k: r[0] for k, r in res.items()}
        if model == "clip_text":
            emb["sessions_text"] = s

    # the gate's band (allow / block / escalate) with fp32 vs int8 CLIP encoders
    policy = load_policy("default")
    routes = {}
    for k in ("fp32", "int8"):
        i, m = tokens([t for _, t in ConceptBank.concept_texts(policy)])
        bank = ConceptBank.from_embeddings(policy, emb["sessions_text"][k].run(
            None, {"input_ids": i, "attention_mask": m})[0])
        routes[k] = [judge(policy, bank, emb["clip_image"][k][j], emb["clip_text"][k][j],
                           has_caption=bool(items[j][1].strip()))["band"] for j in range(len(items))]
    agree = sum(a == b for a, b in zip(routes["fp32"], routes["int8"], strict=False))
    out["gate_routes"] = {"posts": len(items), "agree": agree, "agreement_pct": 100.0 * agree / len(items),
                          "fp32": routes["fp32"], "int8": routes["int8"]}
    return out


def decoder(items, runs: int) -> dict:
    import onnxruntime as ort
    import torch

    from moderation.core.imaging import decode_image
    from moderation.core.policy import load_policy
    from moderation.core.text import detect_lang
    from moderation.vlm.decoder import DecoderRequest, VerdictDecoder
    from moderation.vlm.inputs import QwenPixels

    torch.set_num_threads(1)
    ckpt = REPO / "language_decoder" / "1" / "checkpoint"
    policy = load_policy("default")
    variants = {"fp32": VerdictDecoder(ckpt), "int8_dynamic": VerdictDecoder(ckpt, quantization="int8_dynamic"),
                "int8_weight_only": VerdictDecoder(ckpt, quantization="int8_weight_only")}
    qp = QwenPixels(str(ckpt))
    sess = ort.InferenceSession(str(REPO / "vision_encoder" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    builder = variants["fp32"].prompts(qp.num_visual_tokens)
    reqs = []
    for img, text in items:
        tok, ds = sess.run(None, {"PIXEL_VALUES": qp(decode_image(img).image)[0][None]})
        lang = detect_lang(text)
        reqs.append(DecoderRequest(np.array(builder.body_ids(policy, lang, text)), tok[0], ds[0], policy, lang))
    results = {k: d.score(reqs) for k, d in variants.items()}
    th_v, th_l = policy.decoder.violation_threshold, policy.signals["vlm"].band.review

    def verdict(r):
        return (r.violation >= th_v, tuple(sorted(k for k, v in r.labels.items() if v >= th_l)))

    out = {}
    ref = results["fp32"]
    for k in ("int8_dynamic", "int8_weight_only"):
        agree = sum(verdict(a) == verdict(b) for a, b in zip(results[k], ref, strict=False))
        diffs = [abs(a.violation - b.violation) for a, b in zip(results[k], ref, strict=False)]
        diffs += [abs(a.labels[lab] - b.labels[lab])
                  for a, b in zip(results[k], ref, strict=False) for lab in a.labels]
        diffs += [abs(a.sentiment[s] - b.sentiment[s])
                  for a, b in zip(results[k], ref, strict=False) for s in a.sentiment]
        out[k] = {"posts": len(reqs), "verdict_agree": agree, "verdict_agreement_pct": 100.0 * agree / len(reqs),
                  "violation_agreement_pct": 100.0 * sum((a.violation >= th_v) == (b.violation >= th_v)
                                                         for a, b in zip(results[k], ref, strict=False)) / len(reqs),
                  "max_abs_score_diff": float(max(diffs)), "mean_abs_score_diff": float(np.mean(diffs)),
                  "device_label": variants[k].device_label}
    timing = _time_pair({k: (lambda d=d: d.score(reqs[:8])) for k, d in variants.items()}, runs)
    out["timing_batch8"] = timing
    out["speedup_vs_fp32"] = {k: timing["fp32"]["median_ms"] / timing[k]["median_ms"] for k in timing if k != "fp32"}
    out["score_range_fp32"] = [float(min(r.violation for r in ref)), float(max(r.violation for r in ref))]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--out", type=Path, default=RESULTS / "int8.json")
    args = ap.parse_args(argv)
    items = posts()
    t = time.time()
    report = {"what": "INT8 vs fp32 agreement and speed, in one process, CPU, 1 thread per session",
              "models": "tiny random-initialised (UNTRAINED): agreement on noise logits, speed of tiny layers",
              "runs": args.runs, "posts": len(items),
              "encoders": encoders(items, args.runs), "decoder": decoder(items, args.runs),
              "seconds": None}
    report["seconds"] = round(time.time() - t, 1)
    dump_json(args.out, report, settings=args)
    enc, dec = report["encoders"], report["decoder"]
    for m in ("clip_image", "clip_text", "vision_encoder"):
        e = enc[m]
        print(f"{m:15s} fp32 {e['timing']['fp32']['median_ms']:8.2f} ms  "
              f"int8 {e['timing']['int8']['median_ms']:8.2f} ms  "
              f"x{e['speedup_int8']:.2f}  min cos {e['min_cosine']:.4f}")
    print(f"gate routes agree {enc['gate_routes']['agree']}/{enc['gate_routes']['posts']}")
    for k in ("int8_dynamic", "int8_weight_only"):
        d = dec[k]
        print(f"decoder {k:17s} verdicts agree {d['verdict_agree']}/{d['posts']}  "
              f"max |diff| {d['max_abs_score_diff']:.4f}  "
              f"x{dec['speedup_vs_fp32'][k]:.2f} (fp32 {dec['timing_batch8']['fp32']['median_ms']:.1f} ms, batch 8)")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
