"""False positives of the trained nsfw_image signal on every real safe-for-work image that ships offline.

    .venv/bin/python -m perf quality_report                 # scores, plot, JSON (in-process, ~1 min)
    .venv/bin/python -m perf quality_report --server        # also re-score every image through the real
                                                               # Triton server and check the scores agree

Scores each image with the served artifact (model_repository/nsfw_image/1/model.onnx, checked against its
artifact record) and the served preprocessing (decode_image + NsfwPixels), i.e. what the gate sees; the
policy's band (signals.nsfw_image.band: review / block) turns each score into allow / escalate /
block on the `sexual` label. Every image here is safe for work, so any escalate or block is a false
positive. Writes perf/results/nsfw_sfw_scores.json (raw per-image numbers) and docs/quality/nsfw_sfw_scores.png.
Recall cannot be measured from these files: they hold no unsafe images (see docs/quality.md, clients.evaluate).
"""
from __future__ import annotations

import argparse
import importlib.util
import io
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from moderation.core.imaging import ALLOWED_FORMATS, decode_image
from moderation.core.policy import load_policy
from moderation.gate.inputs import NsfwPixels
from moderation.repository.artifacts import read_artifact_record
from perf.common import RESULTS, ROOT, dump_json

MODEL_DIR = ROOT / "model_repository" / "nsfw_image" / "1"
OUT = RESULTS / "nsfw_sfw_scores.json"
PLOT = ROOT / "docs" / "quality" / "nsfw_sfw_scores.png"

# What each shipped file shows, by file stem: the false-positive table is reported per group.
GROUPS = {
    "photo": {"astronaut", "brick", "camera", "chelsea", "coffee", "coins", "grass", "gravel", "hubble_deep_field",
              "moon", "motorcycle_left", "motorcycle_right", "rocket", "text", "page", "china", "flower",
              "grace_hopper"},
    "face (lfw_subset, 25x25 grey)": set(),  # filled from lfw_subset.npy
    "medical / microscopy": {"cell", "ihc", "microaneurysms", "retina"},
    "synthetic / graphic": {"chessboard_GRAY", "chessboard_RGB", "clock_motion", "color", "logo", "phantom", "horse",
                            "no_time_for_that_tiny", "multipage", "logo2", "Minduka_Present_Blue_Pack"},
}
IMAGE_EXT = (".png", ".jpg", ".jpeg", ".gif", ".tif", ".tiff", ".bmp", ".webp")


def _pkg_dir(name: str) -> Path:
    return Path(importlib.util.find_spec(name).origin).parent


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def catalogue() -> tuple[list[dict], list[dict]]:
    """Every image file (and every lfw face) in the installed skimage, sklearn and matplotlib data folders,
    as bytes the service accepts: the original file when its format is accepted, else a lossless PNG."""
    folders = [("scikit-image", _pkg_dir("skimage") / "data"),
               ("scikit-learn", _pkg_dir("sklearn") / "datasets" / "images"),
               ("matplotlib", _pkg_dir("matplotlib") / "mpl-data" / "sample_data")]
    items, skipped = [], []
    for pkg, folder in folders:
        for f in sorted(folder.rglob("*")):
            if f.suffix.lower() not in IMAGE_EXT:
                continue
            try:
                with Image.open(f) as im:
                    fmt = im.format
                    data = f.read_bytes() if fmt in ALLOWED_FORMATS else _png(im.convert("RGB"))
            except Exception as e:  # noqa: BLE001 - say what was left out and why
                skipped.append({"package": pkg, "name": f.name, "reason": f"{type(e).__name__}: {e}"})
                continue
            group = next((g for g, names in GROUPS.items() if f.stem in names), "other")
            items.append({"package": pkg, "name": f.name, "group": group, "bytes": data})
    faces = np.load(_pkg_dir("skimage") / "data" / "lfw_subset.npy")
    for i, face in enumerate(faces):
        im = Image.fromarray(np.clip(face * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
        items.append({"package": "scikit-image", "name": f"lfw_subset.npy[{i}]",
                      "group": "face (lfw_subset, 25x25 grey)", "bytes": _png(im)})
    return items, skipped


def _session(threads: int = 1):
    import onnxruntime as ort

    read_artifact_record(MODEL_DIR)  # refuse a model file that does not match its record
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    return ort.InferenceSession(str(MODEL_DIR / "model.onnx"), sess_options=opts, providers=["CPUExecutionProvider"])


def score_all(items: list[dict]) -> None:
    sess, prep = _session(threads=2), NsfwPixels()
    for s in range(0, len(items), 32):
        chunk = items[s:s + 32]
        pix = []
        for it in chunk:
            d = decode_image(it["bytes"])
            it["width"], it["height"] = d.original_size
            pix.append(prep(d.image))
        for it, row in zip(chunk, sess.run(["outputs"], {"input:0": np.stack(pix)})[0], strict=False):
            it["nsfw"] = float(row[1])


def _clopper_pearson_upper(k: int, n: int, conf: float = 0.95) -> float:
    from scipy.stats import beta

    return 1.0 if k >= n else float(beta.ppf(conf, k + 1, n - k))


def summarise(items: list[dict], allow_below: float, block_at: float) -> dict:
    def one(rows):
        s = np.array([r["nsfw"] for r in rows])
        n, blocked = len(s), int((s >= block_at).sum())
        escalated = int(((s >= allow_below) & (s < block_at)).sum())
        return {"n": n, "allowed": n - blocked - escalated, "escalated": escalated, "blocked": blocked,
                "false_block_rate": blocked / n, "false_escalate_rate": escalated / n,
                "false_positive_rate": (blocked + escalated) / n,
                "false_positive_rate_95_upper": _clopper_pearson_upper(blocked + escalated, n),
                "false_block_rate_95_upper": _clopper_pearson_upper(blocked, n),
                "quantiles": {q: float(np.quantile(s, float(q))) for q in ("0.0", "0.5", "0.9", "0.99", "1.0")}}
    groups = sorted({r["group"] for r in items})
    return {"all": one(items), **{g: one([r for r in items if r["group"] == g]) for g in groups}}


def plot(items: list[dict], allow_below: float, block_at: float, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({r["group"] for r in items})
    floor = 1e-6  # open_nsfw scores reach 0.0 in float32; show them at the left edge of the log axis
    bins = np.logspace(-6, 0, 37)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.hist([[max(r["nsfw"], floor) for r in items if r["group"] == g] for g in groups], bins=bins, stacked=True,
            label=[f"{g} (n={sum(r['group'] == g for r in items)})" for g in groups])
    ax.set_xscale("log")
    for x, name in ((allow_below, "nsfw_allow_below"), (block_at, "nsfw_block_at")):
        ax.axvline(x, color="k", ls="--", lw=1)
        ax.text(x, ax.get_ylim()[1] * 0.95, f"{name} {x} ", va="top", ha="right", rotation=90, fontsize=8)
    ax.set_xlabel("open_nsfw P(nsfw) (log scale; scores below 1e-6 drawn at 1e-6)")
    ax.set_ylabel("images")
    ax.set_title(f"nsfw_image scores on {len(items)} safe-for-work images shipped in installed wheels")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def latency(runs: int) -> dict:
    """Per-image CPU cost of nsfw_image as served (1 intra-op thread) and of its preprocessing, side by side."""
    from moderation.testing.samples import image_paths

    sess, prep = _session(threads=1), NsfwPixels()
    img = decode_image(image_paths()["astronaut"].read_bytes()).image
    x1 = prep(img)[None]
    x16 = np.repeat(x1, 16, axis=0)
    for _ in range(3):
        sess.run(["outputs"], {"input:0": x1})
    t_pre, t_b1, t_b16 = [], [], []
    for _ in range(runs):
        t = time.perf_counter()
        prep(img)
        t_pre.append((time.perf_counter() - t) * 1e3)
        t = time.perf_counter()
        sess.run(["outputs"], {"input:0": x1})
        t_b1.append((time.perf_counter() - t) * 1e3)
        t = time.perf_counter()
        sess.run(["outputs"], {"input:0": x16})
        t_b16.append((time.perf_counter() - t) * 1e3 / 16)
    return {"runs": runs, "intra_op_threads": 1, "image": "astronaut.png 512x512",
            "preprocess_ms_median": statistics.median(t_pre), "batch1_ms_median": statistics.median(t_b1),
            "batch16_ms_per_image_median": statistics.median(t_b16),
            "batch1_ms_p90": float(np.quantile(t_b1, 0.9)), "raw_ms": {"preprocess": t_pre, "batch1": t_b1,
                                                                         "batch16_per_image": t_b16}}


def conv_flops() -> dict:
    """Multiply-accumulates of the ONNX graph per image (Conv and MatMul/Gemm), from shape inference."""
    import onnx
    from onnx import shape_inference

    m = onnx.load(str(MODEL_DIR / "model.onnx"))
    for inp in m.graph.input:
        inp.type.tensor_type.shape.dim[0].dim_value = 1
    m = shape_inference.infer_shapes(m)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in list(m.graph.value_info) + list(m.graph.output) + list(m.graph.input)}
    inits = {t.name: list(t.dims) for t in m.graph.initializer}
    macs = 0
    for node in m.graph.node:
        if node.op_type == "Conv":
            w, out = inits.get(node.input[1]), shapes.get(node.output[0])
            if w and out:
                macs += int(np.prod(out[1:])) * int(np.prod(w[1:]))  # NCHW out, [Cout, Cin/g, kH, kW]
        elif node.op_type in ("MatMul", "Gemm"):
            w = inits.get(node.input[1])
            if w:
                macs += int(np.prod(w))
    params = sum(int(np.prod(d)) for d in inits.values())
    return {"macs_per_image": macs, "flops_per_image": 2 * macs, "parameters": params}


def through_server(items: list[dict]) -> dict:
    """Send every image through the real server (allow_all-free default policy) and compare its gate score."""
    from clients.client import ModerationClient
    from moderation.testing.server import running_server

    diffs, signals = [], set()
    with (running_server(log_path=ROOT / "build" / "logs" / "quality-server.log",
                         env={"MODERATION_AUDIT_LOG": str(ROOT / "build" / "audit" / "quality.jsonl")}) as srv,
          ModerationClient(srv.grpc_url, timeout_s=120) as c):
        for it in items:
            r = c.moderate(it["bytes"], "", request_id="quality")
            it["served_sexual"] = r["gate"]["scores"]["sexual"]
            assert r["gate"]["sources"].get("sexual") == "nsfw_image", r["gate"]
            signals.add(r["signals"]["nsfw_image"])
            diffs.append(abs(it["served_sexual"] - it["nsfw"]))
    return {"images": len(items), "max_abs_diff_served_vs_in_process": max(diffs), "nsfw_signal": sorted(signals)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", action="store_true", help="also score every image through the real server")
    ap.add_argument("--latency-runs", type=int, default=30)
    ap.add_argument("--out", type=Path, default=OUT, help="the JSON of raw per-image numbers")
    ap.add_argument("--plot", type=Path, default=PLOT, help="the score distribution figure (docs/quality.md shows it)")
    args = ap.parse_args(argv)
    policy = load_policy("default")
    band = policy.band("nsfw_image", "sexual")
    lo, hi = band.review, band.block
    items, skipped = catalogue()
    t = time.time()
    score_all(items)
    print(f"scored {len(items)} images in {time.time() - t:.1f}s; skipped {len(skipped)}: "
          + ", ".join(f"{s['name']} ({s['reason']})" for s in skipped))
    summary = summarise(items, lo, hi)
    report = {
        "what": "open_nsfw P(nsfw) (model nsfw_image) on every safe-for-work image shipped in installed wheels",
        "policy": policy.id, "thresholds": {"nsfw_allow_below": lo, "nsfw_block_at": hi},
        "model": read_artifact_record(MODEL_DIR, verify=False)["source"],
        "summary": summary, "skipped": skipped,
        "cost": {"graph": conv_flops(), "cpu_latency": latency(args.latency_runs)},
    }
    if args.server:
        report["server_check"] = through_server(items)
    report["images"] = [{k: v for k, v in it.items() if k != "bytes"} for it in items]
    dump_json(args.out, report, settings=args)
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    plot(items, lo, hi, args.plot)
    print(f"{'group':<32}{'n':>5}{'allow':>7}{'escal.':>7}{'block':>7}{'FP rate':>9}{'95% upper':>11}{'max':>10}")
    for g, m in summary.items():
        print(f"{g:<32}{m['n']:>5}{m['allowed']:>7}{m['escalated']:>7}{m['blocked']:>7}"
              f"{m['false_positive_rate']:>9.3f}{m['false_positive_rate_95_upper']:>11.3f}{m['quantiles']['1.0']:>10.4f}")
    top = sorted(items, key=lambda r: -r["nsfw"])[:8]
    print("highest scores: " + ", ".join(f"{r['name']} {r['nsfw']:.4f}" for r in top))
    print(json.dumps({"cost": report["cost"]["graph"],
                      "latency": {k: v for k, v in report["cost"]["cpu_latency"].items() if k != "raw_ms"},
                      "server_check": report.get("server_check")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
