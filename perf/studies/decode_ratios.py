"""Pixels declared per encoded byte for legitimate images, the evidence behind moderation/core/imaging.py's
MAX_PIXELS_PER_BYTE: flat-colour PNGs (RGB, 8-bit gray, 1-bit), flat GIFs, flat and progressive JPEGs, WebP
(lossy and lossless), a 1-bit scanned A4 page, a 4K screenshot, the sample photos at 1x and 6x, and the
bad-input matrix's "ok" images. Each row: size, bytes, pixels per byte, Pillow's load time, and whether
decode_image accepts it. Writes perf/results/decode_ratios.json.

    .venv/bin/python -m perf decode_ratios
"""
from __future__ import annotations

import argparse
import io
import time
import warnings
from pathlib import Path

from PIL import Image, ImageDraw

from moderation.core.errors import ModerationError
from moderation.core.imaging import FREE_PIXELS, MAX_PIXELS_PER_BYTE, decode_image
from perf.common import RESULTS, dump_json

OUT = RESULTS / "decode_ratios.json"


def _enc(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _screenshot() -> Image.Image:
    sc = Image.new("RGB", (3840, 2160), (245, 245, 245))
    d = ImageDraw.Draw(sc)
    for y in range(0, 2160, 120):
        d.rectangle((100, y, 3700, y + 80), outline=(30, 30, 200))
        d.text((120, y + 30), "menu item " * 20, fill=(0, 0, 0))
    return sc


def _a4_page() -> Image.Image:
    page = Image.new("1", (2480, 3508), 1)  # A4 at 300 dpi, 1-bit, lines of text
    d = ImageDraw.Draw(page)
    for y in range(300, 3200, 60):
        d.text((200, y), "Lorem ipsum dolor sit amet, consectetur " * 2, fill=0)
    return page


def images() -> list[tuple[str, bytes]]:
    from moderation.testing.bad_inputs import OK, cases
    from moderation.testing.samples import image_paths

    out: list[tuple[str, bytes]] = []
    for side in (2048, 4096, 8192):
        for mode, label, colour in (("RGB", "RGB", (200, 30, 30)), ("L", "gray", 128), ("1", "1-bit", 1)):
            out.append((f"flat {label} PNG {side}", _enc(Image.new(mode, (side, side), colour), "PNG", optimize=True)))
        flat = Image.new("RGB", (side, side), (200, 30, 30))
        out += [(f"flat GIF {side}", _enc(flat, "GIF")),
                (f"flat 1-bit GIF {side}", _enc(Image.new("1", (side, side), 1), "GIF")),
                (f"flat JPEG q90 {side}", _enc(flat, "JPEG", quality=90)),
                (f"flat WebP lossy {side}", _enc(flat, "WEBP")),
                (f"flat WebP lossless {side}", _enc(flat, "WEBP", lossless=True))]
    out += [("flat 1-bit PNG 16384x2000", _enc(Image.new("1", (16384, 2000), 1), "PNG", optimize=True)),
            ("flat GIF 16384x2000", _enc(Image.new("RGB", (16384, 2000), (1, 2, 3)), "GIF")),
            ("flat progressive JPEG 6000x5000", _enc(Image.new("L", (6000, 5000), 3), "JPEG", progressive=True)),
            ("flat WebP lossless 3840x2160", _enc(Image.new("RGB", (3840, 2160), (1, 2, 3)), "WEBP", lossless=True)),
            ("blank A4 1-bit PNG", _enc(Image.new("1", (2480, 3508), 1), "PNG", optimize=True)),
            ("A4 text 1-bit PNG", _enc(_a4_page(), "PNG", optimize=True)),
            ("A4 text GIF", _enc(_a4_page(), "GIF"))]
    sc = _screenshot()
    out += [("4K screenshot PNG", _enc(sc, "PNG")), ("4K screenshot GIF", _enc(sc, "GIF")),
            ("4K screenshot WebP lossless", _enc(sc, "WEBP", lossless=True))]
    for name, path in image_paths().items():
        out.append((f"sample {name}{path.suffix}", path.read_bytes()))
        with Image.open(path) as im:
            big = im.convert("RGB").resize((im.width * 6, im.height * 6))
        if big.width * big.height > FREE_PIXELS:
            out += [(f"sample {name} x6 JPEG q90", _enc(big, "JPEG", quality=90)),
                    (f"sample {name} x6 PNG", _enc(big, "PNG"))]
    out += [(f"matrix {c.name}", c.image) for c in cases() if c.expect == OK and c.image]
    return out


def measure(name: str, data: bytes) -> dict:
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # 8192² (67 MP) is over 40 MP: measured anyway
    try:
        with warnings.catch_warnings(), Image.open(io.BytesIO(data)) as im:
            warnings.simplefilter("ignore")
            w, h = im.size
            t = time.perf_counter()
            im.load()
            load_ms = (time.perf_counter() - t) * 1000
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    try:
        decode_image(data)
        verdict = "accepted"
    except ModerationError as e:
        verdict = e.code + (" (ratio)" if "per encoded byte" in e.message else " (size limit)")
    return {"name": name, "size": f"{w}x{h}", "pixels": w * h, "bytes": len(data),
            "pixels_per_byte": round(w * h / len(data), 1), "load_ms": round(load_ms, 1), "decode_image": verdict}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    rows = sorted((measure(n, d) for n, d in images()), key=lambda r: -r["pixels_per_byte"])
    for r in rows:
        print(f"{r['name']:36s} {r['size']:>12s} {r['bytes']:9d} B {r['pixels_per_byte']:9.1f} px/B "
              f"load {r['load_ms']:7.1f} ms  {r['decode_image']}")
    dump_json(args.out, {"free_pixels": FREE_PIXELS, "max_pixels_per_byte": MAX_PIXELS_PER_BYTE, "rows": rows},
              settings=args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
