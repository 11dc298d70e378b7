"""How well image lists match: every shipped photo as a list entry (the PDQ hashes `clients.admin lists add-image`
stores: core/image_match.py's windows of the image), queried with its copies (re-encoded, resized, cropped on
every side, cropped on one edge) and, for false matches, with every other photo's copies and the rendered memes.

    .venv/bin/python -m perf pdq_lists          # writes perf/results/pdq_lists.json

Photos: every PNG/JPEG/GIF in scikit-image's data folder, scikit-learn's two sample images and matplotlib's sample
photos that ship in the installed wheels (a GIF by its first frame, as the server decodes it). "before" is an entry
of the whole image and its centred crops only (PDQ_ENTRY_CROPS), "after" adds the one-sided crops. Matching is
deterministic; only the per-post lookup cost is timed."""
from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from moderation.core.image_match import SIDES, PdqIndex, entry_hashes, one_side_crop
from moderation.core.imaging import PDQ_ENTRY_CROPS, decode_image, pdq_distance, pdq_hash
from moderation.core.policy import load_policy
from moderation.ops.lists import MIN_PDQ_QUALITY, MIN_SIDE
from moderation.testing.memes import memes, render
from moderation.testing.samples import image_paths
from perf.common import RESULTS, dump_json, git_commit, machine

# The copies a list must catch. "held_out" copies are cut where no stored window is (3.75 / 8.75 % from one edge,
# uneven cuts from two edges): they show how far matching carries between the windows.
SIDE_KINDS = tuple(f"{side}{pct}" for pct in (5, 10) for side in SIDES)
RESIZED_SIDE_KINDS = tuple(f"r0.8+{side}5" for side in SIDES)
CORNER_KINDS = ("top5+left5", "bottom10+right10")
KINDS = ("jpeg50", "resize0.8", "crop5", *SIDE_KINDS, *RESIZED_SIDE_KINDS, *CORNER_KINDS)
HELD_OUT = (*(f"{side}{pct}" for pct in (3.75, 8.75) for side in SIDES),
            "top7.5+left2.5", "bottom3+right8", "top4+right6", "bottom6+left4")
# The same picture shipped twice (grey and colour copies of one chessboard): a match between them is correct.
SAME_PICTURE = {frozenset({"chessboard_GRAY.png", "chessboard_RGB.png"})}
LOOKUP_ENTRIES = 1000


def shipped_photos() -> dict[str, bytes]:
    import importlib.util

    def pkg(name: str) -> Path:
        return Path(importlib.util.find_spec(name).origin).parent

    sk = pkg("skimage") / "data"
    paths = sorted([*sk.glob("*.png"), *sk.glob("*.jpg"), *sk.glob("*.gif")])
    paths += [pkg("sklearn") / "datasets" / "images" / n for n in ("china.jpg", "flower.jpg")]
    paths += sorted((pkg("matplotlib") / "mpl-data" / "sample_data").glob("*.[jp][pn]g"))
    return {p.name: p.read_bytes() for p in paths}


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, "JPEG", quality=quality)
    return decode_image(buf.getvalue()).image


def copy_of(image: Image.Image, kind: str) -> Image.Image:
    """A repost of `image`: JPEG q50, 0.8x resized, 5 % cut from every side (`crop5`), `<side><pct>` cut from one
    edge, `r0.8+<side>5` resized then cut, `<side>5+<side>5` cut from two edges; saved as JPEG q90 but jpeg50."""
    w, h = image.size
    if kind == "original":
        return image
    if kind == "jpeg50":
        return _jpeg(image, 50)
    if kind.startswith("r0.8") or kind == "resize0.8":
        image = image.resize((max(1, int(w * 0.8)), max(1, int(h * 0.8))), Image.BICUBIC)
        kind = kind.removeprefix("r0.8+") if kind.startswith("r0.8+") else ""
    if kind == "crop5":
        dx, dy = int(w * 0.05), int(h * 0.05)
        image = image.crop((dx, dy, w - dx, h - dy))
    elif kind:
        for cut in kind.split("+"):
            side = cut.rstrip("0123456789.")
            image = one_side_crop(image, side, float(cut[len(side):]) / 100)
    return _jpeg(image, 90)


def _matched(distances: list[int], limit: int) -> dict:
    return {"n": len(distances), "matched": sum(d <= limit for d in distances),
            "recall": round(sum(d <= limit for d in distances) / len(distances), 4), "max_distance": max(distances)}


def lookup_cost(hashes_per_entry: int, repeats: int = 50) -> dict:
    """Per-post cost of comparing one hash with LOOKUP_ENTRIES entries: the index (core/image_match.py) against
    a hex parse per stored hash (what image_hits did before)."""
    rng = np.random.default_rng(0)
    entries = [[rng.bytes(32).hex() for _ in range(hashes_per_entry)] for _ in range(LOOKUP_ENTRIES)]
    query = rng.bytes(32).hex()
    index = PdqIndex(entries)
    t = time.perf_counter()
    for _ in range(repeats):
        fast = index.distances(query).tolist()
    indexed = (time.perf_counter() - t) / repeats
    t = time.perf_counter()
    for _ in range(max(1, repeats // 10)):
        slow = [min(pdq_distance(query, h) for h in e) for e in entries]
    parsed = (time.perf_counter() - t) / max(1, repeats // 10)
    assert fast == slow
    return {"entries": LOOKUP_ENTRIES, "hashes_per_entry": hashes_per_entry, "index_ms": round(indexed * 1e3, 3),
            "hex_parse_per_hash_ms": round(parsed * 1e3, 3)}


def measure() -> dict:
    limit = load_policy("default").decisions.image_match_distance
    images = {k: decode_image(v).image for k, v in shipped_photos().items()}
    stored = {k: [h for h, _ in entry_hashes(im)] for k, im in images.items()}
    quality = {k: pdq_hash(im)[1] for k, im in images.items()}
    listable = sorted(k for k in images if quality[k] >= MIN_PDQ_QUALITY and min(images[k].size) >= MIN_SIDE)
    designs = {"before": len(PDQ_ENTRY_CROPS), "after": len(stored[listable[0]])}

    def distance(query: str, entry: str, design: str) -> int:
        return min(pdq_distance(query, h) for h in stored[entry][:designs[design]])

    queries = {k: {kind: pdq_hash(copy_of(images[k], kind))[0] for kind in ("original", *KINDS, *HELD_OUT)}
               for k in images}
    copies = [{"photo": k, "copy": kind, "size": list(images[k].size),
               **{f"distance_{d}": distance(queries[k][kind], k, d) for d in designs}}
              for k in listable for kind in (*KINDS, *HELD_OUT)]

    def recall(kinds, design, photos=None):
        rows = [c for c in copies if c["copy"] in kinds and (photos is None or c["photo"] in photos)]
        return {**{kind: _matched([c[f"distance_{design}"] for c in rows if c["copy"] == kind], limit)
                   for kind in kinds}, "all": _matched([c[f"distance_{design}"] for c in rows], limit)}

    # False matches: every photo and each of its copies against every other photo's entry, and every rendered
    # meme against the entries of the photos it was not drawn on.
    by_path = {p.name: name for name, p in image_paths().items()}
    meme_hashes = {m.name: (pdq_hash(decode_image(render(m)).image)[0], image_paths()[m.photo].name)
                   for m in memes()}
    pairs = []
    for entry in listable:
        for query in images:
            if query != entry:
                for kind, h in queries[query].items():
                    pairs.append({"query": query, "copy": kind, "entry": entry,
                                  **{f"distance_{d}": distance(h, entry, d) for d in designs}})
        for name, (h, photo) in meme_hashes.items():
            if photo != entry:
                pairs.append({"query": f"meme:{name}", "copy": "render", "entry": entry,
                              **{f"distance_{d}": distance(h, entry, d) for d in designs}})
    own_meme = [{"meme": name, "entry": photo, **{f"distance_{d}": distance(h, photo, d) for d in designs}}
                for name, (h, photo) in meme_hashes.items() if photo in listable]

    def false(design):
        hits = [p for p in pairs if p[f"distance_{design}"] <= limit]
        real = [p for p in hits if frozenset({p["query"], p["entry"]}) not in SAME_PICTURE]
        closest = sorted((p for p in pairs if frozenset({p["query"], p["entry"]}) not in SAME_PICTURE),
                         key=lambda p: p[f"distance_{design}"])[:6]
        return {"pairs": len(pairs), "matches": len(hits), "rate": round(len(hits) / len(pairs), 5),
                "matches_between_different_pictures": len(real),
                "rate_between_different_pictures": round(len(real) / len(pairs), 5),
                "closest_different": [{k: p[k] for k in ("query", "copy", "entry", f"distance_{design}")}
                                      for p in closest]}

    return {
        "what": __doc__.split("\n\n")[0], "commit": git_commit(), "machine": machine(),
        "threshold": limit, "entry_crops": list(PDQ_ENTRY_CROPS), "hashes_per_entry": designs,
        "min_quality": MIN_PDQ_QUALITY, "min_side": MIN_SIDE,
        "photos": len(images), "listable": len(listable), "sample_posts_photos": sorted(by_path),
        "refused": {k: {"size": list(images[k].size), "quality": quality[k]}
                    for k in sorted(set(images) - set(listable))},
        "recall": {d: recall(KINDS, d) for d in designs},
        "recall_one_edge": {d: recall((*SIDE_KINDS, *RESIZED_SIDE_KINDS), d)["all"] for d in designs},
        "recall_held_out": {d: recall(HELD_OUT, d) for d in designs},
        "recall_sample_posts_photos": {d: recall(KINDS, d, set(by_path))["all"] for d in designs},
        "missed_copies": [c for c in copies if c["distance_after"] > limit],
        "false_matches": {d: false(d) for d in designs},
        "memes_against_their_own_photo": own_meme,
        "lookup_cost": {d: lookup_cost(n) for d, n in designs.items()},
        "raw": {"copies": copies},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=RESULTS / "pdq_lists.json")
    args = ap.parse_args(argv)
    out = measure()
    dump_json(args.out, out, settings=args)
    for d in out["hashes_per_entry"]:
        r, f = out["recall"][d], out["false_matches"][d]
        print(d, {k: f"{v['matched']}/{v['n']}" for k, v in r.items()}, "one edge", out["recall_one_edge"][d],
              "held out", out["recall_held_out"][d]["all"],
              "false", f"{f['matches']}/{f['pairs']}",
              f"(different pictures {f['matches_between_different_pictures']})",
              "lookup", out["lookup_cost"][d])
    print("missed copies:", [(c["photo"], c["copy"], c["distance_after"]) for c in out["missed_copies"]])
    print("closest different (after):", out["false_matches"]["after"]["closest_different"][:3])
    return 0


if __name__ == "__main__":
    sys.exit(main())
