"""Uploads that are cheap to send and were expensive to judge, for tests and benchmarks (perf/cost_bounds.py):
a small PNG packed with tiny words (one recognition per detected word) and maximum-size flat JPEGs."""
from __future__ import annotations

import io
import random

from PIL import Image, ImageDraw, ImageFont

from .memes import FONT

WORDS = ("cat", "dog", "sun", "tea", "map", "red", "box", "pen", "sky", "cup", "hat", "jam", "owl", "fox", "ink")


def dense_text_png(words: int = 555, side: int = 480, seed: int = 0, px: int = 11, word_gap: int = 9,
                   row_gap: int = 6) -> bytes:
    """A white `side` x `side` PNG with up to `words` small words in rows (black, `px`-pixel font). At the default
    gaps detection finds each row as one long box (33 boxes); with word_gap 22, row_gap 8, px 10 it finds a box
    per word (spaced_words_png)."""
    font = ImageFont.truetype(str(FONT), px)
    rng = random.Random(seed)
    im = Image.new("L", (side, side), 255)
    draw = ImageDraw.Draw(im)
    x, y, n = 4, 4, 0
    while n < words and y + px < side:
        word = rng.choice(WORDS)
        width = draw.textlength(word, font=font)
        if x + width > side - 4:
            x, y = 4, y + px + row_gap
            continue
        draw.text((x, y), word, fill=0, font=font)
        x += width + word_gap
        n += 1
    buf = io.BytesIO()
    im.save(buf, "PNG", optimize=True)
    return buf.getvalue()


def spaced_words_png(seed: int = 0) -> bytes:
    """320 small words far enough apart that detection finds a box per word."""
    return dense_text_png(words=555, seed=seed, px=10, word_gap=22, row_gap=8)


def flat_jpeg(width: int = 6324, height: int = 6324, quality: int = 75) -> bytes:
    """One flat colour at `width` x `height`: a maximum-size upload of well under a megabyte."""
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (180, 200, 220)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def with_pixel_changed(data: bytes, i: int, fmt: str | None = None) -> bytes:
    """The image re-encoded with pixel (0, 0) set from `i`: a post no cache has seen."""
    im = Image.open(io.BytesIO(data))
    fmt = fmt or im.format
    im = im.convert("L" if im.mode == "L" else "RGB")
    im.putpixel((0, 0), i % 251 if im.mode == "L" else (i % 251, (i // 251) % 251, 7))
    buf = io.BytesIO()
    im.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()
