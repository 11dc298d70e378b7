"""The pixels-per-encoded-byte bound in decode_image (moderation/core/imaging.py): a tiny file declaring a large
image is refused from its header before any pixel is decoded; legitimate flat and 1-bit images, real photos and
the sample posts still decode; the bound sits exactly where the constants say. The evidence for the constants
is perf/studies/decode_ratios.py."""
from __future__ import annotations

import io
import struct

import pytest
from PIL import Image, ImageFile

from moderation.core.errors import ImageTooLarge
from moderation.core.imaging import FREE_PIXELS, MAX_PIXELS_PER_BYTE, decode_image
from moderation.testing.bad_inputs import gif_screen_claiming
from moderation.testing.samples import image_paths


def _enc(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _gif(screen: tuple[int, int], frame: tuple[int, int] = (1, 1), pad_to: int = 0) -> bytes:
    """A GIF with the given logical screen and first-frame size (one byte of LZW data), padded with a comment
    extension to exactly pad_to bytes when given."""
    head = b"GIF89a" + struct.pack("<HHBBB", *screen, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    body = b"\x2c" + struct.pack("<HHHHB", 0, 0, *frame, 0) + b"\x02\x02\x4c\x01\x00" + b"\x3b"
    if not pad_to:
        return head + body
    need = pad_to - len(head) - len(body) - 3  # 0x21 0xFE ... 0x00 around the comment's sub-blocks
    blocks = b""
    while need > 0:
        n = min(255, need - 1)
        blocks += bytes([n]) + b"c" * n
        need -= n + 1
    data = head + b"\x21\xfe" + blocks + b"\x00" + body
    assert len(data) == pad_to, (len(data), pad_to)
    return data


def test_the_35_byte_gif_with_a_16384x2000_screen_is_refused_from_its_header(monkeypatch):
    data = gif_screen_claiming(16384, 2000)
    assert len(data) < 50
    decodes = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decodes.append(self) or None)
    with pytest.raises(ImageTooLarge) as e:
        decode_image(data)
    assert e.value.code == "image_too_large"
    assert f"declares 16384x2000 pixels in {len(data)} bytes" in e.value.message
    # the time it saves: perf/studies/decode_ratios.py
    assert not decodes, "the bound must hold before any pixel is decoded"


def test_a_small_screen_with_a_large_first_frame_is_refused():
    """Pillow grows a GIF's size to its first frame's extent: the frame's pixels count as declared too."""
    with pytest.raises(ImageTooLarge, match="declares 16384x2000 pixels"):
        decode_image(_gif((16, 16), frame=(16384, 2000)))


def test_the_logical_screen_is_checked_as_written_in_the_bytes(monkeypatch):
    """Even should Pillow report only the first frame's size, the logical screen in the header is bounded."""
    from moderation.core import imaging

    real = imaging._declared_sizes
    monkeypatch.setattr(imaging, "_declared_sizes", lambda data, fmt, size: real(data, fmt, (1, 1)))
    with pytest.raises(ImageTooLarge, match="declares 16384x2000 pixels \\(its GIF logical screen\\) in 35 bytes"):
        decode_image(gif_screen_claiming(16384, 2000))


def test_the_logical_screen_obeys_the_side_limit_too(monkeypatch):
    from moderation.core import imaging

    real = imaging._declared_sizes
    monkeypatch.setattr(imaging, "_declared_sizes", lambda data, fmt, size: real(data, fmt, (1, 1)))
    with pytest.raises(ImageTooLarge, match="per side"):
        decode_image(gif_screen_claiming(20000, 10))


def test_the_free_allowance_is_not_bounded_by_bytes():
    side = int(FREE_PIXELS ** 0.5)
    assert side * side == FREE_PIXELS  # 2048x2048: any encoding of it is fine
    out = decode_image(gif_screen_claiming(side, side))
    assert out.original_size == (side, side)
    with pytest.raises(ImageTooLarge, match="declares"):
        decode_image(gif_screen_claiming(side, side + 1))


def test_the_ratio_boundary_with_the_shipped_constants():
    """4096x1040 (4.26 MP, just over the allowance) needs 260 bytes at 16384 pixels per byte."""
    w, h = 4096, 1040
    assert w * h > FREE_PIXELS and (w * h) % MAX_PIXELS_PER_BYTE == 0
    exact = (w * h) // MAX_PIXELS_PER_BYTE
    assert decode_image(_gif((w, h), pad_to=exact)).original_size == (w, h)
    with pytest.raises(ImageTooLarge) as e:
        decode_image(_gif((w, h), pad_to=exact - 1))
    assert f"declares {w}x{h} pixels in {exact - 1} bytes" in e.value.message
    assert str(MAX_PIXELS_PER_BYTE) in e.value.message


def test_the_ratio_boundary_on_a_real_png():
    data = _enc(Image.new("RGB", (300, 200), (10, 20, 30)), "PNG")
    ratio = 300 * 200 / len(data)
    decode_image(data, free_pixels=0, max_pixels_per_byte=int(ratio) + 1)
    with pytest.raises(ImageTooLarge, match=f"declares 300x200 pixels in {len(data)} bytes"):
        decode_image(data, free_pixels=0, max_pixels_per_byte=int(ratio) - 1)
    decode_image(data, free_pixels=300 * 200, max_pixels_per_byte=1)  # inside the allowance: no bound


def _flat(mode: str = "RGB", size: tuple[int, int] = (4096, 4096), colour=(200, 30, 30)) -> Image.Image:
    return Image.new(mode, size, colour)


# Built per test, not at collection: every run that collects this file would pay for them.
LEGIT = {
    "flat RGB PNG 4096": lambda: _enc(_flat(), "PNG", optimize=True),
    "flat gray PNG 4096": lambda: _enc(_flat("L", colour=128), "PNG", optimize=True),
    "flat 1-bit PNG 4096": lambda: _enc(_flat("1", colour=1), "PNG", optimize=True),
    "flat 1-bit PNG 16384x2000": lambda: _enc(_flat("1", (16384, 2000), 1), "PNG", optimize=True),
    "blank A4 1-bit PNG": lambda: _enc(_flat("1", (2480, 3508), 1), "PNG", optimize=True),
    "flat GIF 4096": lambda: _enc(_flat(), "GIF"),
    "flat 1-bit GIF 4096": lambda: _enc(_flat("1", colour=1), "GIF"),
    "flat JPEG 4096": lambda: _enc(_flat(), "JPEG", quality=90),
    "flat progressive JPEG 4096": lambda: _enc(_flat("L", colour=3), "JPEG", progressive=True),
    "flat lossy WebP 4096": lambda: _enc(_flat(), "WEBP"),
    "flat lossless WebP 2048": lambda: _enc(_flat(size=(2048, 2048)), "WEBP", lossless=True),
}


@pytest.mark.parametrize("name", list(LEGIT))
def test_legitimate_flat_images_decode(name):
    data = LEGIT[name]()
    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
    assert w * h <= FREE_PIXELS or w * h / len(data) <= MAX_PIXELS_PER_BYTE / 3, "keep a 3x margin"
    assert decode_image(data).original_size == (w, h)


@pytest.mark.parametrize("name", list(image_paths()))
def test_real_photos_and_their_6x_enlargements_decode(name):
    path = image_paths()[name]
    data = path.read_bytes()
    assert decode_image(data).image.size
    with Image.open(path) as im:
        big = im.convert("RGB").resize((im.width * 6, im.height * 6))
    if big.width <= 16384 and big.width * big.height <= 40_000_000:
        jpeg = _enc(big, "JPEG", quality=90)
        assert decode_image(jpeg).original_size == big.size


def test_only_flat_lossless_webp_exceeds_the_bound():
    """The one legitimate encoding measured above the bound: a single flat colour as lossless WebP (~20800
    pixels per byte at 3840x2160). It is refused above the allowance; it carries nothing to judge."""
    data = _enc(Image.new("RGB", (3840, 2160), (1, 2, 3)), "WEBP", lossless=True)
    assert 3840 * 2160 / len(data) > MAX_PIXELS_PER_BYTE
    with pytest.raises(ImageTooLarge, match="declares 3840x2160 pixels"):
        decode_image(data)
