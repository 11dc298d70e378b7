"""A catalogue of hostile, broken and odd-but-valid posts, built in memory (no huge buffers: bombs are
crafted headers). tests/test_bad_input.py sends every case to a real server; perf/soak.py mixes them
into its traffic. Each case names the error code it must get (docs/errors.md) or "ok" when the post
must be moderated normally, and a word its error message must contain.

    .venv/bin/python -m perf bad_inputs --url 127.0.0.1:8001     # one line per case: expected vs got
"""
from __future__ import annotations

import io
import json
import struct
import zlib
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from PIL import Image

from moderation.core.limits import ENTRY_MAX_POSTS

OK = "ok"


@dataclass(frozen=True)
class Case:
    name: str
    expect: str  # an error code, or "ok"
    says: str = ""  # a word the error message must contain (case-insensitive)
    image: bytes | None = None
    text: bytes | None = None
    options: dict | bytes | None = None  # bytes: sent verbatim (malformed on purpose)
    client_ok: bool = True  # expressible through clients.client.ModerationClient
    note: str = ""
    extra: dict = field(default_factory=dict)


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


@lru_cache(maxsize=1)
def photo() -> Image.Image:
    """A real photo (the sample posts' first image), 640x427."""
    from moderation.testing.samples import sample_posts

    with Image.open(io.BytesIO(sample_posts()[0].image_bytes())) as im:
        return im.convert("RGB")


def good_jpeg() -> bytes:
    return _encode(photo(), "JPEG", quality=90)


def good_png() -> bytes:
    return _encode(photo().resize((160, 107)), "PNG")


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_claiming(width: int, height: int, body: bytes | None = None) -> bytes:
    """A PNG whose IHDR claims width x height (8-bit RGB) with a tiny IDAT: a decompression bomb's header,
    never its pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(body if body is not None else b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def gif_claiming(width: int, height: int) -> bytes:
    """A GIF whose logical screen and single frame claim width x height, with one byte of pixel data."""
    head = b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02\x4c\x01\x00"
    return head + frame + b"\x3b"


def gif_screen_claiming(width: int, height: int) -> bytes:
    """A 35-byte GIF whose logical screen claims width x height around a single 1x1 frame: Pillow allocates and
    composes the whole screen, so before the pixels-per-byte bound this cost 0.4-2.8 s of decode at 16384x2000."""
    head = b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x4c\x01\x00"
    return head + frame + b"\x3b"


def animated_gif(frames: int = 240, side: int = 256) -> bytes:
    """Many frames (each a shifted gradient): the decoder must read only the first."""
    x = np.linspace(0, 255, side, dtype=np.float32)
    ims = [Image.fromarray(((x[None, :] + 7 * i + x[:, None]) % 256).astype(np.uint8), "L").convert("P")
           for i in range(frames)]
    buf = io.BytesIO()
    ims[0].save(buf, "GIF", save_all=True, append_images=ims[1:], duration=20, loop=0)
    return buf.getvalue()


def exif_rotated_jpeg() -> bytes:
    im = photo().resize((200, 100))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW on display
    return _encode(im, "JPEG", exif=exif.tobytes())


def png16() -> bytes:
    arr = (np.linspace(0, 65535, 64 * 48, dtype=np.uint32).reshape(48, 64)).astype(np.uint16)
    return _encode(Image.fromarray(arr), "PNG")  # uint16 -> mode I;16, saved as 16-bit grayscale


def palette_png_with_transparency() -> bytes:
    im = photo().resize((120, 80)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return _encode(im, "PNG", transparency=0)


def rgba_png() -> bytes:
    im = photo().resize((120, 80)).convert("RGBA")
    a = np.asarray(im).copy()
    a[:, :60, 3] = 0  # left half fully transparent
    return _encode(Image.fromarray(a, "RGBA"), "PNG")


def cases() -> list[Case]:
    jpg, png = good_jpeg(), good_png()
    cap = b"a quiet street at dusk"
    return [
        # --- image bytes ---------------------------------------------------------------------------------
        Case("zero_byte_image", "bad_image", "empty", image=b"", text=cap),
        Case("empty_png_0x0", "bad_image", "PNG signature", image=png_claiming(0, 0), text=cap,
             note="a PNG header claiming a 0x0 image"),
        Case("nul_bytes_image", "bad_image", "not a recognised", image=b"\x00" * 4096, text=cap),
        Case("truncated_jpeg", "bad_image", "truncated", image=jpg[: len(jpg) // 2], text=cap),
        Case("truncated_png", "bad_image", "truncated", image=png[: len(png) // 2], text=cap),
        Case("text_as_image", "bad_image", "not a recognised", image=b"hello, this caption is not an image",
             text=cap),
        Case("png_header_garbage_body", "bad_image", "corrupt",
             image=png[:33] + bytes(range(256)) * 8, text=cap),
        Case("jpeg_header_garbage_body", "bad_image", "image",
             image=b"\xff\xd8\xff\xe0" + bytes(range(255, -1, -1)) * 8, text=cap),
        Case("png_bomb_50000x50000", "image_too_large", "decompression bomb",
             image=png_claiming(50000, 50000), text=cap, note="IHDR claims 2.5 gigapixels; rejected from the header"),
        Case("gif_bomb_65535x65535", "image_too_large", "decompression bomb",
             image=gif_claiming(65535, 65535), text=cap),
        Case("gif_logical_screen_16384x2000", "image_too_large", "declares",
             image=gif_screen_claiming(16384, 2000), text=cap,
             note="35 bytes declaring a 32.8 MP logical screen: over the pixels-per-encoded-byte bound"),
        Case("svg_payload", "unsupported_image", "SVG",
             image=b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10">'
                   b'<script>alert(1)</script></svg>', text=cap),
        Case("html_payload", "unsupported_image", "HTML",
             image=b"<!DOCTYPE html><html><body><img src=x onerror=alert(1)></body></html>", text=cap),
        Case("tiff_image", "unsupported_image", "TIFF", image=_encode(photo().resize((64, 48)), "TIFF"), text=cap),
        # --- valid but odd images: moderated normally -------------------------------------------------------
        Case("huge_animated_gif", OK, image=animated_gif(), text=cap, note="240 frames; the first is judged"),
        Case("one_by_one_png", OK, image=_encode(Image.new("RGB", (1, 1), (200, 30, 30)), "PNG"), text=cap),
        Case("aspect_4000x1", OK, image=_encode(Image.new("RGB", (4000, 1), (10, 200, 10)), "PNG"), text=cap),
        Case("aspect_1x4000", OK, image=_encode(Image.new("RGB", (1, 4000), (10, 10, 200)), "PNG"), text=cap),
        Case("cmyk_jpeg", OK, image=_encode(photo().resize((160, 107)).convert("CMYK"), "JPEG"), text=cap),
        Case("png_16bit_gray", OK, image=png16(), text=cap),
        Case("palette_png_transparency", OK, image=palette_png_with_transparency(), text=cap),
        Case("rgba_png", OK, image=rgba_png(), text=cap),
        Case("exif_rotated_jpeg", OK, image=exif_rotated_jpeg(), text=cap),
        Case("webp_image", OK, image=_encode(photo().resize((160, 107)), "WEBP"), text=cap),
        # --- captions -------------------------------------------------------------------------------------------
        Case("empty_caption", OK, image=png, text=b""),
        Case("caption_5mb", "text_too_long", "5000000 bytes", image=png, text=b"spam " * 1_000_000),
        Case("invalid_utf8_caption", "bad_text", "UTF-8", image=png, text=b"caf\xe9 \xff\xfe broken"),
        Case("control_and_zero_width_caption", OK, image=png,
             text="fr\u200bee mo\u200dney\x00\x07 \u202eclick\ufeff now\x1b[31m".encode()),
        Case("mixed_zh_en_emoji_caption", OK, image=png, text="今天 the 猫 is so cute 😺🔥 吗？ ok".encode()),
        # --- options --------------------------------------------------------------------------------------------
        Case("malformed_options_json", "bad_options", "JSON", image=png, text=cap, options=b'{"policy": "default",',
             client_ok=False),
        Case("options_not_an_object", "bad_options", "object", image=png, text=cap, options=b"[1, 2, 3]",
             client_ok=False),
        Case("options_unknown_field", "bad_options", "colour", image=png, text=cap,
             options={"colour": "blue"}, client_ok=False),
        Case("options_bad_request_id", "bad_options", "request_id", image=png, text=cap,
             options={"request_id": "has spaces; and quotes'"}),
        Case("unknown_policy", "unknown_policy", "no_such_policy", image=png, text=cap,
             options={"policy": "no_such_policy"}),
        Case("policy_path_traversal", "unknown_policy", "not a valid name", image=png, text=cap,
             options={"policy": "../../etc/passwd"}),
        # --- tensors: missing inputs reach preprocess (optional in the ensemble) and get coded there ---------
        Case("missing_image_input", "bad_request", "IMAGE", image=None, text=cap, client_ok=False),
        Case("missing_text_input", "bad_request", "TEXT", image=png, text=None, client_ok=False),
    ]


# Requests Triton itself refuses before any model runs (no model can write their audit row): the gRPC status
# and the word the message contains. Observable on /metrics as nv_inference_request_failure{model="moderate"}
# (except an unknown model, which has no series) and in the client as the coded failure below.
TRITON_REJECTS = {
    "wrong_dtype": ("INVALID_ARGUMENT", "bad_request", "data-type"),
    "wrong_shape": ("INVALID_ARGUMENT", "bad_request", "shape"),
    "batch_too_large": ("INVALID_ARGUMENT", "bad_request", "batch-size"),
    "unknown_input_name": ("INVALID_ARGUMENT", "bad_request", "unexpected inference input"),
    "unknown_model": ("NOT_FOUND", "model_not_found", "not served here"),
    "unknown_version": ("NOT_FOUND", "model_not_found", "version"),
}


def options_bytes(case: Case, request_id: str) -> bytes:
    if isinstance(case.options, bytes):
        return case.options
    opts = {"request_id": request_id, **(case.options or {})}
    return json.dumps(opts, ensure_ascii=False).encode()


def raw_inputs(module, case: Case, request_id: str) -> list:
    """tritonclient InferInputs for a case, exactly as a hand-written client would send them."""
    inputs = []
    for name, value in (("IMAGE", case.image), ("TEXT", case.text), ("OPTIONS", options_bytes(case, request_id))):
        if value is None:
            continue
        t = module.InferInput(name, [1, 1], "BYTES")
        t.set_data_from_numpy(np.array([[value]], dtype=np.object_))
        inputs.append(t)
    return inputs


def triton_reject_request(module, kind: str, image: bytes, text: bytes,
                          request_id: str = "") -> tuple[str, list, str]:
    """(model, inputs, version) for one of TRITON_REJECTS; OPTIONS carries request_id when one is given."""
    def t(name, arr, dtype="BYTES"):
        x = module.InferInput(name, list(arr.shape), dtype)
        x.set_data_from_numpy(arr)
        return x

    def one(v) -> np.ndarray:
        return np.array([[v]], dtype=np.object_)

    opts = [t("OPTIONS", one(json.dumps({"request_id": request_id}).encode()))] if request_id else []
    good = [t("IMAGE", one(image)), t("TEXT", one(text)), *opts]
    if kind == "wrong_dtype":
        return "moderate", [t("IMAGE", np.zeros((1, 1), np.float32), "FP32"), *good[1:]], ""
    if kind == "wrong_shape":  # TEXT is one caption per post (IMAGE [posts, N] carries a post's images)
        return "moderate", [good[0], t("TEXT", np.array([[text, text]], dtype=np.object_)), *opts], ""
    if kind == "batch_too_large":
        n = ENTRY_MAX_POSTS + 1  # one over moderate's max_batch_size
        return "moderate", [t("IMAGE", np.array([[image]] * n, dtype=np.object_)),
                            t("TEXT", np.array([[text]] * n, dtype=np.object_))], ""  # no id: 17 posts, one row
    if kind == "unknown_input_name":
        return "moderate", good[:2] + [t("CAPTION", one(text))], ""  # 3 inputs: at most 3 are declared
    if kind == "unknown_model":
        return "no_such_model", good, ""
    if kind == "unknown_version":
        return "moderate", good, "99"
    raise KeyError(kind)
