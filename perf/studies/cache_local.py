"""The verdict cache's local check (core/imaging.py local_difference) over every shipped photo: how often copies a
platform sees of one post still hit (re-encoded, resized, lightly cropped) and how often a post with a pasted patch
(2 % and 5 % of the area: another photo's region, or a block of text) misses, at a sweep of thresholds.

    .venv/bin/python -m perf cache_local        # writes perf/results/cache_local.json
"""
from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from moderation.core.imaging import local_difference, local_thumbnail
from moderation.testing.memes import FONT
from moderation.testing.samples import image_paths
from perf.common import RESULTS, dump_json, git_commit, machine

THRESHOLDS = (0.15, 0.2, 0.22, 0.24, 0.25, 0.26, 0.28, 0.3, 0.35)
PATCH_AREAS = (0.02, 0.05)
POSITIONS = 3  # random placements per (photo, patch source, area)


def _jpeg(image: Image.Image, quality: int = 90) -> Image.Image:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def copies(image: Image.Image) -> dict[str, Image.Image]:
    w, h = image.size
    dx, dy = int(w * 0.05), int(h * 0.05)
    small = image.resize((int(w * 0.8), int(h * 0.8)), Image.BICUBIC)
    sw, sh = small.size
    return {
        "jpeg_q50": _jpeg(image, 50),
        "resize_0.7": _jpeg(image.resize((int(w * 0.7), int(h * 0.7)), Image.BICUBIC)),
        "crop_5pct_every_side": _jpeg(image.crop((dx, dy, w - dx, h - dy))),
        "crop_5pct_left": _jpeg(image.crop((dx, 0, w, h))),
        "crop_5pct_bottom": _jpeg(image.crop((0, 0, w, h - dy))),
        "crop_2pct_top": _jpeg(image.crop((0, int(h * 0.02), w, h))),
        "resize_0.8_crop_5pct_right": _jpeg(small.crop((0, 0, sw - int(sw * 0.05), sh))),
    }


def _text_block(side: int, rng) -> Image.Image:
    block = Image.new("RGB", (side, side), tuple(int(c) for c in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(block)
    font = ImageFont.truetype(str(FONT), max(10, side // 6))
    for i, line in enumerate(("加微信", "WIN $$$", "点击领取")):
        draw.text((4, 4 + i * side // 3), line, font=font, fill="white", stroke_width=1, stroke_fill="black")
    return block


def patched(image: Image.Image, area: float, source: Image.Image | None, rng) -> Image.Image:
    w, h = image.size
    side = int((area * w * h) ** 0.5)
    patch = source.resize((side, side), Image.BICUBIC) if source is not None else _text_block(side, rng)
    out = image.copy()
    out.paste(patch, (int(rng.integers(0, w - side)), int(rng.integers(0, h - side))))
    return _jpeg(out)


def measure(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    photos = {k: Image.open(p).convert("RGB") for k, p in image_paths().items() if k != "gif"}
    rows = []
    started = time.perf_counter()
    for name, image in photos.items():
        stored = local_thumbnail(image)
        for kind, copy in copies(image).items():
            rows.append({"photo": name, "case": "copy", "kind": kind,
                         "difference": local_difference(stored, local_thumbnail(copy))})
        for area in PATCH_AREAS:
            for source in [*(s for s in photos if s != name), "text"]:
                for _ in range(POSITIONS):
                    p = patched(image, area, None if source == "text" else photos[source], rng)
                    rows.append({"photo": name, "case": f"patch_{round(area * 100)}pct", "kind": source,
                                 "difference": local_difference(stored, local_thumbnail(p))})
    per_compare_ms = (time.perf_counter() - started) * 1e3 / len(rows)
    sweep = []
    for t in THRESHOLDS:
        row = {"threshold": t}
        for case in ("copy", "patch_2pct", "patch_5pct"):
            diffs = np.array([r["difference"] for r in rows if r["case"] == case])
            rate = float((diffs <= t).mean()) if case == "copy" else float((diffs > t).mean())
            row["copy_hit_rate" if case == "copy" else f"{case}_miss_rate"] = round(rate, 4)
        sweep.append(row)
    summary = {case: {"n": len(d), "min": round(min(d), 4), "median": round(float(np.median(d)), 4),
                      "max": round(max(d), 4)}
               for case in ("copy", "patch_2pct", "patch_5pct")
               for d in [[r["difference"] for r in rows if r["case"] == case]]}
    return {"photos": sorted(photos), "copies": sorted(copies(next(iter(photos.values())))),
            "patch_areas": PATCH_AREAS, "positions_per_source": POSITIONS, "summary": summary, "sweep": sweep,
            "per_compare_ms_incl_thumbnails": round(per_compare_ms, 2), "rows": rows}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=RESULTS / "cache_local.json")
    args = ap.parse_args(argv)
    result = {"what": "verdict-cache local check: copies that must hit, patched posts that must miss",
              "commit": git_commit(), "machine": machine(), **measure()}
    dump_json(args.out, result, settings=args)
    print(result["summary"])
    for row in result["sweep"]:
        print(row)


if __name__ == "__main__":
    main()
