"""Posts as a platform sees them: distinct photos cut from the samples, near copies of a post (re-encoded, resized or
cropped, the caption re-typed), and a replayed trace of unique posts and copies of earlier popular ones. The cache
tests and the cache benchmarks (perf/cache_savings, perf/shared_cache.py) use the same copies."""
from __future__ import annotations

import io
import random
from collections import Counter
from typing import Any

NEAR_KINDS = ("jpeg50", "resize0.7", "crop5")


def jpeg(image: Any, quality: int) -> bytes:
    """A PIL image encoded as an RGB JPEG."""
    out = io.BytesIO()
    image.convert("RGB").save(out, "JPEG", quality=quality)
    return out.getvalue()


def unique_image(data: bytes, rng: random.Random) -> bytes:
    """A distinct photo cut from a sample: a random window of 35-60 % of each side, maybe mirrored."""
    from PIL import ImageOps

    from moderation.core.imaging import decode_image

    im = decode_image(data).image
    w, h = im.size
    fw, fh = rng.uniform(0.35, 0.6), rng.uniform(0.35, 0.6)
    x, y = rng.uniform(0, 1 - fw), rng.uniform(0, 1 - fh)
    im = im.crop((int(x * w), int(y * h), int((x + fw) * w), int((y + fh) * h)))
    return jpeg(ImageOps.mirror(im) if rng.random() < 0.5 else im, 90)

def near_copy(data: bytes, kind: str) -> bytes:
    """A re-encoded / resized / cropped copy of an image, as a repost would make it. crop5 removes 5 % of the
    width and height from every side (the image keeps 81 % of its area)."""
    from PIL import Image

    from moderation.core.imaging import decode_image

    im = decode_image(data).image
    w, h = im.size
    if kind == "jpeg50":
        return jpeg(im, 50)
    if kind == "resize0.7":
        return jpeg(im.resize((max(1, int(w * 0.7)), max(1, int(h * 0.7))), Image.Resampling.BICUBIC), 90)
    if kind == "crop5":
        dx, dy = int(w * 0.05), int(h * 0.05)
        return jpeg(im.crop((dx, dy, w - dx, h - dy)), 90)
    raise ValueError(kind)


def retyped(caption: str, i: int) -> str:
    """The same caption as someone re-typing it: other case / spacing (the cache normalises both)."""
    return ("  " + caption.upper() + " ") if i % 2 else caption.replace(" ", "  ")


def make_trace(n: int = 100, dup_rate: float = 0.30, exact_share: float = 0.4, popular: int = 5,
               seed: int = 0) -> list[dict]:
    """[{image, text, kind, of}]: `popular` sample posts first, then unique posts and round(n * dup_rate) copies of
    the popular ones interleaved, `exact_share` of the copies byte-identical, the rest near copies (NEAR_KINDS)."""
    from moderation.testing.samples import sample_posts

    rng = random.Random(seed)
    samples = sample_posts()
    n_dup = round(n * dup_rate)
    n_exact = round(n_dup * exact_share)
    kinds = ["exact"] * n_exact + [NEAR_KINDS[i % len(NEAR_KINDS)] for i in range(n_dup - n_exact)]
    rng.shuffle(kinds)
    popular_posts: list[dict[str, Any]] = [{"image": s.image_bytes(), "text": s.text, "kind": "original", "of": s.name}
                     for s in samples[:popular]]
    unique = []
    for i in range(n - n_dup - popular):
        s = samples[i % len(samples)]
        unique.append({"image": unique_image(s.image_bytes(), rng), "text": f"{s.text} (post {i})",
                       "kind": "unique", "of": s.name})
    # popular originals first (a copy needs an earlier original), then uniques and copies interleaved
    rest: list[dict | str] = unique + kinds
    rng.shuffle(rest)
    trace, copies = list(popular_posts), 0
    for item in rest:
        if isinstance(item, dict):
            trace.append(item)
            continue
        src = popular_posts[rng.randrange(len(popular_posts))]
        copies += 1
        if item == "exact":
            trace.append({"image": src["image"], "text": src["text"], "kind": "exact", "of": src["of"]})
        else:
            trace.append({"image": near_copy(src["image"], item), "text": retyped(src["text"], copies),
                          "kind": item, "of": src["of"]})
    return trace


def trace_mix(trace: list[dict]) -> dict:
    """How many posts of each kind, and the share that are copies."""
    c = Counter(t["kind"] for t in trace)
    dup = sum(v for k, v in c.items() if k not in ("unique", "original"))
    return {"posts": len(trace), "by_kind": dict(c), "duplicates": dup, "duplicate_rate": dup / len(trace)}
