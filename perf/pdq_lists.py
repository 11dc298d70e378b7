"""How well image lists match: every shipped photo as a list entry (its PDQ hash and those of its centred crops,
as `clients.admin lists add-image` stores them), queried with its re-encoded (JPEG q50), 0.8x-resized and
5 %-cropped copies (`perf.cache_savings.near_copy`'s crop: 5 % off every side) and with every other photo.

    .venv/bin/python -m perf.pdq_lists          # writes perf/results/pdq_lists.json

Photos: every PNG/JPEG/GIF in scikit-image's data folder, scikit-learn's two sample images and matplotlib's sample
photos that ship in the installed wheels. Deterministic (no timing), so one run."""
from __future__ import annotations

import io
import itertools
import sys
from pathlib import Path

from PIL import Image

from moderation.core.imaging import PDQ_ENTRY_CROPS, centred_crop, decode_image, pdq_distance, pdq_hash
from moderation.core.policy import load_policy
from moderation.ops.lists import MIN_PDQ_QUALITY, MIN_SIDE
from perf.common import RESULTS, dump_json

KINDS = ("jpeg50", "resize0.8", "crop5")


def shipped_photos() -> dict[str, bytes]:
    import importlib.util

    def pkg(name: str) -> Path:
        return Path(importlib.util.find_spec(name).origin).parent

    sk = pkg("skimage") / "data"
    paths = sorted([*sk.glob("*.png"), *sk.glob("*.jpg"), *sk.glob("*.gif")])
    paths += [pkg("sklearn") / "datasets" / "images" / n for n in ("china.jpg", "flower.jpg")]
    paths += sorted((pkg("matplotlib") / "mpl-data" / "sample_data").glob("*.[jp][pn]g"))
    return {p.name: p.read_bytes() for p in paths}


def copy_of(image: Image.Image, kind: str) -> Image.Image:
    def jpeg(im, q):
        buf = io.BytesIO()
        im.convert("RGB").save(buf, "JPEG", quality=q)
        return decode_image(buf.getvalue()).image

    w, h = image.size
    if kind == "jpeg50":
        return jpeg(image, 50)
    if kind == "resize0.8":
        return jpeg(image.resize((max(1, int(w * 0.8)), max(1, int(h * 0.8))), Image.BICUBIC), 90)
    dx, dy = int(w * 0.05), int(h * 0.05)
    return jpeg(image.crop((dx, dy, w - dx, h - dy)), 90)


def measure() -> dict:
    limit = load_policy("default").decisions.image_match_distance
    images = {k: decode_image(v).image for k, v in shipped_photos().items()}
    entries = {k: [pdq_hash(centred_crop(im, keep)) for keep in PDQ_ENTRY_CROPS] for k, im in images.items()}
    listable = {k for k, e in entries.items() if e[0][1] >= MIN_PDQ_QUALITY and min(images[k].size) >= MIN_SIDE}

    def distance(query: str, entry: list) -> int:
        return min(pdq_distance(query, h) for h, _ in entry)

    copies = []
    for k in sorted(listable):
        for kind in KINDS:
            d = distance(pdq_hash(copy_of(images[k], kind))[0], entries[k])
            copies.append({"photo": k, "copy": kind, "distance": d, "matched": d <= limit,
                           "size": list(images[k].size)})
    pairs = []
    for a, b in itertools.permutations(sorted(listable), 2):
        d = distance(entries[a][0][0], entries[b])
        pairs.append({"query": a, "entry": b, "distance": d, "matched": d <= limit})
    false = [p for p in pairs if p["matched"]]
    return {
        "what": __doc__.split("\n\n")[0],
        "threshold": limit, "entry_crops": list(PDQ_ENTRY_CROPS), "min_quality": MIN_PDQ_QUALITY, "min_side": MIN_SIDE,
        "photos": len(images), "listable": len(listable),
        "refused": {k: {"size": list(images[k].size), "quality": entries[k][0][1]}
                    for k in sorted(set(images) - listable)},
        "copies": {kind: {"n": sum(c["copy"] == kind for c in copies),
                          "matched": sum(c["matched"] for c in copies if c["copy"] == kind),
                          "max_distance": max(c["distance"] for c in copies if c["copy"] == kind)}
                   for kind in KINDS},
        "missed_copies": [c for c in copies if not c["matched"]],
        "different_pairs": len(pairs), "false_matches": false,
        "false_match_rate": len(false) / len(pairs),
        "closest_different": sorted(pairs, key=lambda p: p["distance"])[:6],
        "raw": {"copies": copies},
    }


def main() -> int:
    out = measure()
    dump_json(RESULTS / "pdq_lists.json", out)
    print({k: out[k] for k in ("photos", "listable", "copies", "different_pairs", "false_match_rate")})
    print("false matches:", [(p["query"], p["entry"], p["distance"]) for p in out["false_matches"]])
    print("missed copies:", [(c["photo"], c["copy"], c["distance"]) for c in out["missed_copies"]])
    return 0


if __name__ == "__main__":
    sys.exit(main())
