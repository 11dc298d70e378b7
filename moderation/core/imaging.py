"""Safe image decoding for untrusted uploads, and the thumbnail fingerprint of a decoded image.

Every limit is checked from the header before pixels are decoded, so a decompression bomb costs a
header read, not gigabytes of memory, and a tiny file cannot buy a large decode: above FREE_PIXELS an image
may declare at most MAX_PIXELS_PER_BYTE pixels per encoded byte. No stage reads more than ~1000 px (CLIP, open_nsfw,
OCR detection at 480, the VLM at 448), so images decode to a longer side under 2 x DECODE_SIDE: a JPEG in the DCT
domain (Image.draft: 1/2, 1/4 or 1/8 scale, never the full frame; photos to 768-1535 px), other formats shrunk by
Image.reduce straight after decoding, the full frame freed at once (a screenshot keeps more pixels than a photo: its
text is what OCR reads). Preprocess decodes each image once; the stages after it read what it decoded (core/post.py
pack_images)."""
from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import BadImage, ImageTooLarge, UnsupportedImage
from .vectors import l2_normalize

MAX_IMAGE_BYTES = 20 * 1024 * 1024
MAX_PIXELS = 40_000_000  # 40 MP: larger than any phone photo, far below a bomb
MAX_SIDE = 16_384
ALLOWED_FORMATS = {"JPEG", "PNG", "WEBP", "GIF", "BMP"}
# Decode cost follows the pixels an image declares, not its bytes (Pillow allocates and composes a GIF's whole
# logical screen: a 35-byte GIF declaring 16384x2000 took 0.4-2.8 s). Up to FREE_PIXELS (2048x2048, ~0.1 s of
# decode) any size is fine; above it an image may declare at most MAX_PIXELS_PER_BYTE pixels per encoded byte.
# Codec ceilings: deflate's 1032:1 allows at most ~8256 px/B for a 1-bit PNG, GIF's 12-bit LZW codes ~2730 px/B.
# Measured with Pillow (perf/studies/decode_ratios.py, perf/results/decode_ratios.json): flat 1-bit PNGs <= 4799 px/B,
# flat GIFs <= 1297, flat 8-bit PNGs <= 745, lossy WebP <= 561, flat JPEGs <= 170, photos <= 38, a 4K
# screenshot as lossless WebP 1947: all accepted with >= 3.4x margin. Only lossless WebP of one flat colour goes
# higher (20840 px/B at 3840x2160, 23764 at 4096x4096): refused above FREE_PIXELS, it carries nothing to judge.
FREE_PIXELS = 2048 * 2048  # 4.2 MP
MAX_PIXELS_PER_BYTE = 16_384
DECODE_SIDE = 1024  # decoded images are shrunk by whole factors to a longer side below 2 x this
# A JPEG decodes in the DCT domain to the smallest 1/2, 1/4 or 1/8 scale whose longer side is still >= this share of
# DECODE_SIDE: a 4032x3024 phone photo decodes at 1/4 (1008x756; at 1/2 it was 3 MP, and every later resize, hash
# and OCR crop of the frame paid for the extra pixels).
DRAFT_SIDE_OF_DECODE_SIDE = 0.75

# Pillow's own bomb guard as a second line: raise instead of warn.
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
warnings.simplefilter("error", Image.DecompressionBombWarning)


# Animated GIF, WebP and APNG: at most FRAME_SCAN frames are looked at (every frame of a short animation, evenly
# spaced ones of a longer one); of those, a frame is kept when some 8x8 tile of its 64x64 grey thumbnail moved by
# FRAME_CHANGE grey levels (of 255) on average against the last frame kept (a caption drawn into one frame moves its
# tiles by tens of levels; GIF dithering noise by under one); the kept frames are then thinned evenly to the caller's
# max_frames, the first always kept.
# Reaching frame n decodes every frame before it (GIF disposal, WebP and APNG blending), so an animation read frame by
# frame costs its frame count x its size: above ANIMATION_PIXELS (~1 s of decoding on one core) it is refused.
FRAME_SCAN = 64
FRAME_CHANGE = 3.0
ANIMATION_PIXELS = 200_000_000


@dataclass(frozen=True)
class DecodedImage:
    image: Image.Image  # RGB, EXIF orientation applied, first frame
    format: str
    original_size: tuple[int, int]
    frame_count: int = 1  # frames the file holds (1: a still image)
    # the frames read (RGB, same size rules as `image`) and their indices in the file; the first is `image`
    frames: tuple[Image.Image, ...] = ()
    frame_indices: tuple[int, ...] = (0,)

    @property
    def animated(self) -> bool:
        return self.frame_count > 1


def decode_image(data: bytes, *, max_bytes: int = MAX_IMAGE_BYTES, max_pixels: int = MAX_PIXELS,
                 free_pixels: int = FREE_PIXELS, max_pixels_per_byte: int = MAX_PIXELS_PER_BYTE,
                 decode_side: int | None = DECODE_SIDE, max_frames: int = 1) -> DecodedImage:
    """Decode untrusted bytes into an RGB image or raise a ModerationError naming the problem. The image's longer
    side is below 2 x `decode_side` (None: full size); `original_size` is the size the header declares. An animation
    is read to at most `max_frames` distinct frames spread over it (sample_frames); 1 reads the first frame only."""
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
            for sw, sh, what in _declared_sizes(data, fmt, (w, h)):
                if sw > MAX_SIDE or sh > MAX_SIDE or sw * sh > max_pixels:
                    raise ImageTooLarge(f"image declares {sw}x{sh} pixels{what} ({sw * sh} pixels); the limits are "
                                        f"{MAX_SIDE} per side and {max_pixels} pixels")
                if sw * sh > free_pixels and sw * sh > max_pixels_per_byte * len(data):
                    raise ImageTooLarge(
                        f"image declares {sw}x{sh} pixels{what} in {len(data)} bytes; above {free_pixels} pixels an "
                        f"image may declare at most {max_pixels_per_byte} pixels per encoded byte")
            im.seek(0)  # animated GIF/WebP: the first frame only
            if decode_side and fmt == "JPEG" and max(w, h) >= 2 * decode_side * DRAFT_SIDE_OF_DECODE_SIDE:
                # the largest DCT scale (1/2, 1/4, 1/8) that keeps the longer side at least DRAFT_SIDE
                scale = max(w, h) / (decode_side * DRAFT_SIDE_OF_DECODE_SIDE)
                im.draft(im.mode, (max(1, int(w / scale)), max(1, int(h / scale))))
            im.load()
            rgb = _to_rgb(ImageOps.exif_transpose(_reduced(im, decode_side)))
            count = int(getattr(im, "n_frames", 1) or 1)
            frames: tuple[Image.Image, ...] = (rgb,)
            indices: tuple[int, ...] = (0,)
            if max_frames > 1 and count > 1:
                if count * w * h > ANIMATION_PIXELS:
                    raise ImageTooLarge(
                        f"animation has {count} frames of {w}x{h} ({count * w * h} pixels in all); animations are "
                        f"read frame by frame up to {ANIMATION_PIXELS} pixels: send a shorter or smaller one")
                frames, indices = sample_frames(im, rgb, count, max_frames, decode_side)
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
    return DecodedImage(image=rgb, format=fmt, original_size=(w, h), frame_count=count, frames=frames,
                        frame_indices=indices)


def _grey_thumbnail(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("L").resize((LOCAL_SIDE, LOCAL_SIDE), Image.Resampling.BOX), dtype=np.float32)


def frame_change(a: np.ndarray, b: np.ndarray) -> float:
    """The largest mean grey-level change of one 8x8 tile between two 64x64 grey thumbnails."""
    d = np.abs(a - b).reshape(LOCAL_SIDE // LOCAL_TILE, LOCAL_TILE, LOCAL_SIDE // LOCAL_TILE, LOCAL_TILE)
    return float(d.mean(axis=(1, 3)).max())


def sample_frames(im: Image.Image, first: Image.Image, count: int, max_frames: int,
                  decode_side: int | None) -> tuple[tuple[Image.Image, ...], tuple[int, ...]]:
    """Frames of an open animation (positioned on frame 0, decoded as `first`) worth judging: the scan and the
    change rule above, then at most `max_frames` of the changed frames, evenly spread, frame 0 always first."""
    scan = min(FRAME_SCAN, count)
    candidates = sorted({round(i * (count - 1) / (scan - 1)) for i in range(scan)} - {0})
    kept, indices, last = [first], [0], _grey_thumbnail(first)
    for n in candidates:
        im.seek(n)
        im.load()
        frame = _to_rgb(_reduced(im, decode_side))
        thumb = _grey_thumbnail(frame)
        if frame_change(thumb, last) >= FRAME_CHANGE:
            kept.append(frame)
            indices.append(n)
            last = thumb
    if len(kept) > max_frames:  # thin evenly, keeping frame 0
        pick = sorted({round(i * (len(kept) - 1) / (max_frames - 1)) for i in range(max_frames)})
        kept, indices = [kept[i] for i in pick], [indices[i] for i in pick]
    return tuple(kept), tuple(indices)


# What changed between two judged frames of one animation, on a grid of CHANGE_CELL x CHANGE_CELL cells of the decoded
# frame: a cell changed when its mean grey level moved by CHANGE_LEVEL (of 255); a caption drawn into a frame moves
# its cells by tens of levels, GIF dithering and re-quantisation by under five. A later frame's text outside the rows
# where it differs from the earlier frame it is closest to was read in that frame (read_bands, ocr/reader.py
# read_frames), and the image models (open_nsfw, CLIP) score a frame only when it differs from every frame scored
# before it in at least SEEN_CHANGE of the picture (at their 224x224 input a smaller change is under ~32x32 pixels:
# too small for them to see; gate/inputs.py scored_frames).
CHANGE_CELL = 8
CHANGE_LEVEL = 12.0
CHANGE_PAD = 2  # cells kept above and below a changed row, so a line of text is read whole
SEEN_CHANGE = 0.02


FrameCells = tuple[tuple[int, int], np.ndarray]  # a frame's size and its cells' mean grey levels


def frame_cells(frame: Image.Image) -> FrameCells:
    """What change masks compare of a frame, computed once per frame however many frames it is compared with.
    Image.reduce rounds up: a partial cell at an edge is a cell of its own."""
    return frame.size, np.asarray(frame.convert("L").reduce(CHANGE_CELL), dtype=np.float32)


def cells_changed(before: FrameCells, after: FrameCells) -> np.ndarray:
    """Bool [rows, cols] of the cells that changed from `before` to `after` (all of them when the sizes differ)."""
    if before[0] != after[0]:
        return np.ones(after[1].shape, dtype=bool)
    return np.abs(before[1] - after[1]) >= CHANGE_LEVEL


def change_mask(before: Image.Image, after: Image.Image) -> np.ndarray:
    """cells_changed of two frames."""
    return cells_changed(frame_cells(before), frame_cells(after))


def read_bands(frames: tuple[Image.Image, ...] | list[Image.Image]) -> list[tuple[tuple[int, int], ...] | None]:
    """For each judged frame of one image, the rows OCR reads: None (all of it) for the first, else the rows where it
    differs from the earlier frame it differs from least (every earlier frame's text was read, whole or by its own
    rows, so the rest of this one was too)."""
    cells = [frame_cells(f) for f in frames]
    out: list[tuple[tuple[int, int], ...] | None] = [None]
    for k in range(1, len(frames)):
        masks = [cells_changed(cells[j], cells[k]) for j in range(k)]
        out.append(changed_bands(min(masks, key=lambda m: int(m.sum())), frames[k].height))
    return out


def changed_bands(mask: np.ndarray, height: int) -> tuple[tuple[int, int], ...]:
    """The pixel rows [top, bottom) of a frame `height` px tall holding its changed cells, each band widened by
    CHANGE_PAD cells and touching bands merged; empty when nothing changed."""
    rows = np.flatnonzero(mask.any(axis=1))
    bands: list[list[int]] = []
    for r in rows.tolist():
        top, bottom = max(0, (r - CHANGE_PAD) * CHANGE_CELL), min(height, (r + 1 + CHANGE_PAD) * CHANGE_CELL)
        if bands and top <= bands[-1][1]:
            bands[-1][1] = max(bands[-1][1], bottom)
        else:
            bands.append([top, bottom])
    return tuple((t, b) for t, b in bands)


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


def _declared_sizes(data: bytes, fmt: str, size: tuple[int, int]) -> list[tuple[int, int, str]]:
    """Every size the header makes the decoder allocate: Pillow's size (for a GIF, its logical screen grown to
    the first frame's extent) and, for a GIF, the logical screen as written, read from the bytes themselves so
    the bound does not rest on how a Pillow version folds the two together."""
    out = [(size[0], size[1], "")]
    if fmt == "GIF" and len(data) >= 10:
        sw, sh = struct.unpack_from("<HH", data, 6)
        if (sw, sh) != size:
            out.append((sw, sh, " (its GIF logical screen)"))
    return out


def _reduced(im: Image.Image, decode_side: int | None) -> Image.Image:
    """`im` shrunk by the whole factor that brings its longer side below 2 x `decode_side` (a box filter over
    factor x factor blocks), keeping its EXIF for the orientation; `im` itself when it is already small enough."""
    factor = max(im.size) // decode_side if decode_side else 0
    if factor < 2:
        return im
    exif = im.info.get("exif")
    if im.mode in ("1", "P") or im.mode.startswith("I;16"):  # modes Image.reduce does not take
        im = _to_rgb(im)
    small = im.reduce(factor)
    if exif is not None:
        small.info["exif"] = exif
    return small


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


FINGERPRINT_SIDE = 8


def fingerprint(image: Image.Image) -> np.ndarray:
    """8x8 RGB thumbnail, mean-removed and unit length (192 floats): the verdict cache's cheap second check
    against false CLIP matches (gate/cache.py)."""
    thumb = image.convert("RGB").resize((FINGERPRINT_SIDE, FINGERPRINT_SIDE), Image.Resampling.BILINEAR)
    x = np.asarray(thumb, dtype=np.float32).reshape(-1)
    return l2_normalize(x - x.mean())


# The verdict cache's local check (gate/entries.py): a 64x64 RGB thumbnail of each post, aligned to a stored
# entry's by an affine fit (OpenCV's ECC: a re-encoded, resized or lightly cropped copy moves and scales its
# content a little) and compared tile by tile, so one changed region (a pasted payload) fails the match although
# the global embedding and fingerprint barely move. Calibrated over the shipped photos (perf/studies/cache_local.py).
LOCAL_SIDE = 64
LOCAL_TILE = 8
LOCAL_BLUR_SIGMA = 1.0


def local_thumbnail(image: Image.Image) -> bytes:
    """64x64 RGB thumbnail (box filter), uint8, row-major: 12,288 bytes."""
    thumb = image.convert("RGB").resize((LOCAL_SIDE, LOCAL_SIDE), Image.Resampling.BOX)
    return np.asarray(thumb, dtype=np.uint8).tobytes()


def _standardized(thumb: bytes) -> np.ndarray:
    import cv2

    x = np.frombuffer(thumb, dtype=np.uint8).reshape(LOCAL_SIDE, LOCAL_SIDE, 3).astype(np.float32)
    x = (x - x.mean()) / (x.mean(axis=2).std() + 1e-3)
    return cv2.GaussianBlur(x, (0, 0), LOCAL_BLUR_SIGMA)


def local_difference(stored: bytes, query: bytes) -> float:
    """The largest mean difference of any 8x8 tile between two local thumbnails after aligning `stored` to `query`
    (standardised units: 0 for the same picture; re-encoded, resized and 5 %-cropped copies of the shipped photos
    stay below 0.23, a pasted patch of 2 % of the area reaches 0.2-3)."""
    import cv2

    a, b = _standardized(stored), _standardized(query)
    warp = np.eye(2, 3, dtype=np.float32)
    criteria = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 50, 1e-4)
    try:
        # opencv's stubs type inputMask without None, which the function takes (no mask)
        _, warp = cv2.findTransformECC(b.mean(axis=2), a.mean(axis=2), warp, cv2.MOTION_AFFINE, criteria,  # type: ignore[call-overload]
                                       None, 1)
    except cv2.error:  # no convergence (flat or unrelated images): compare unaligned
        warp = np.eye(2, 3, dtype=np.float32)
    aligned = cv2.warpAffine(a, warp, (LOCAL_SIDE, LOCAL_SIDE), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                             borderMode=cv2.BORDER_REPLICATE)
    n = LOCAL_SIDE // LOCAL_TILE
    tiles = np.abs(aligned - b).mean(axis=2).reshape(n, LOCAL_TILE, n, LOCAL_TILE).mean(axis=(1, 3))
    return float(tiles.max())


# Centred crops whose PDQ hashes a list entry also stores: PDQ follows re-encoding and resizing but not
# translation, so a copy cut by up to ~7 % on every side matches the entry's nearest crop (docs/quality.md).
PDQ_ENTRY_CROPS = (1.0, 0.95, 0.9, 0.85)


def pdq_hash(image: Image.Image) -> tuple[str, int]:
    """Meta's PDQ perceptual hash (256 bits, hex) of an image and its quality (0-100; below 50 the hash says
    little: flat or tiny images)."""
    import pdqhash

    bits, quality = pdqhash.compute(np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8)))
    return np.packbits(np.asarray(bits, dtype=np.uint8)).tobytes().hex(), int(quality)


def centred_crop(image: Image.Image, keep: float) -> Image.Image:
    w, h = image.size
    dx, dy = int(w * (1 - keep) / 2), int(h * (1 - keep) / 2)
    return image.crop((dx, dy, w - dx, h - dy)) if keep < 1 else image


def pdq_distance(a: str, b: str) -> int:
    return (int(a, 16) ^ int(b, 16)).bit_count()
