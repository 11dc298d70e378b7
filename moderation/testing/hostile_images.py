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
    x: float = 4
    y, n = 4, 0
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


def unseen_copy(data: bytes, i: int, fmt: str | None = None) -> bytes:
    """The image re-encoded with a faint noise seeded by `i` (1 % of the pixels moved by up to 6 levels): a post
    no response cache has seen, down to the OCR crops (one changed pixel leaves every text line's crop as it was,
    and ocr_recognize's cache would answer it)."""
    import numpy as np

    im: Image.Image = Image.open(io.BytesIO(data))
    fmt = fmt or im.format
    arr = np.array(im.convert("L" if im.mode == "L" else "RGB"), dtype=np.int16)
    rng = np.random.default_rng(i)
    mask = rng.random(arr.shape[:2]) < 0.01
    arr[mask] += rng.integers(-6, 7, size=(int(mask.sum()),) + arr.shape[2:], dtype=np.int16)
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def stamped_copy(data: bytes, i: int, fmt: str | None = None) -> bytes:
    """The image re-encoded with a 64 x 64 patch of a colour from `i` at its centre: a large image no response
    cache has seen (the patch survives the encoders' downscaling, where one pixel of a 6324-px image would not)."""
    im: Image.Image = Image.open(io.BytesIO(data))
    fmt = fmt or im.format
    im = im.convert("RGB")
    w, h = im.size
    im.paste((i % 251, (i // 251) % 251, 91), (w // 2 - 32, h // 2 - 32, w // 2 + 32, h // 2 + 32))
    buf = io.BytesIO()
    im.save(buf, fmt, **({"quality": 75} if fmt == "JPEG" else {}))
    return buf.getvalue()
