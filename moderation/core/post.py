"""One post as a client sent it, validated: OPTIONS, policy, caption, decoded image, content hashes."""
from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from PIL import Image

from .errors import BadRequest, ModerationError, TooManyImages
from .hashing import post_hashes, sha256_hex
from .imaging import decode_image
from .options import Options, parse_options
from .pinned import pinned_policy
from .policy import Policy
from .text import Lang, decode_caption_as_sent, detect_lang, normalize_caption


@dataclass(frozen=True)
class PostImage:
    """One image of a post as decoded: its judged frames (the first is the image itself)."""
    # as sent: hashed only when RESULT names the image (media); None in a stage after preprocess (unpack_images)
    data: bytes | None = field(repr=False, compare=False)
    format: str
    size: tuple[int, int]           # as the header declares it
    frame_count: int                # frames in the file (1: a still image)
    frames: tuple[Image.Image, ...]
    frame_indices: tuple[int, ...]

    @property
    def sha256(self) -> str:
        if self.data is None:
            raise ValueError("an image rebuilt from preprocess's frames has no bytes to hash: read RequestRecord.media")
        return sha256_hex(self.data)

    def media(self) -> dict:
        """What RESULT and the audit row say of it: hashes and counts, never pixels."""
        return {"sha256": self.sha256, "format": self.format, "size": list(self.size), "frames": self.frame_count,
                "read": list(self.frame_indices)}


@dataclass
class Post:
    options: Options
    policy: Policy
    image_sha256: str
    text_sha256: str
    caption: str         # normalised: what the models read
    lang: Lang
    image: Image.Image  # the first image: RGB, EXIF orientation applied, first frame
    image_format: str
    image_size: tuple[int, int]
    caption_as_sent: str = ""  # before normalisation: what term matching reports against
    has_image: bool = True     # False for a text_only post: `image` is a blank placeholder
    images: tuple[PostImage, ...] = ()  # every image of the post, in order (empty for a text_only post)

    @property
    def judged_frames(self) -> list[tuple[int | None, int | None, Image.Image]]:
        """judged_items of the post's images (its placeholder for a text_only post)."""
        return judged_items(self.images) if self.images else [(None, None, self.image)]

    @property
    def media(self) -> list[dict] | None:
        """Each image's hashes and frames, for a post of several images or an animated one (None otherwise)."""
        if len(self.images) > 1 or any(im.frame_count > 1 for im in self.images):
            return [im.media() for im in self.images]
        return None


# What the models see in place of a text_only post's image: shapes only, never judged (no image signal is read).
PLACEHOLDER_SIDE = 224


def post_images(image: bytes | list[bytes] | tuple[bytes, ...] | None) -> list[bytes]:
    """A post's images as sent: one image, or several (IMAGE [batch, N]: empty elements are padding, so posts of
    fewer images fit beside others in one request). A post whose every element is empty keeps one empty image:
    a text_only post, or the `bad_image` of a post that sent nothing."""
    if image is None:
        return []
    if isinstance(image, (bytes, bytearray, memoryview)):
        return [bytes(image)]
    sent = [bytes(x) for x in image if x]
    return sent or [b""]


def parse_post(image: bytes | list[bytes], text: bytes, options: Options | bytes | None,
               hashes: dict | None = None, decoded: tuple[PostImage, ...] | None = None, pin: str = "") -> Post:
    """Validate everything a client sent (OPTIONS raw, or already parsed); raises ModerationError with a code
    that names the problem. `image`: one image's bytes or a post's images. `hashes`: the post's post_hashes()
    when the caller already computed them (of its first image). Each animation's frames are sampled (policy
    media.max_frames). `decoded`: the post's images as preprocess decoded them (unpack_images; `image` is then not
    read). `pin`: the policy version preprocess pinned the post to (core/pinned.py; "": the current one)."""
    if not isinstance(options, Options):
        options = parse_options(options)
    policy = pinned_policy(options.policy, pin)
    as_sent = decode_caption_as_sent(text)
    caption = normalize_caption(as_sent)
    lang = detect_lang(caption) if options.lang == "auto" else options.lang
    images = [] if decoded is not None else post_images(image)
    hashes = hashes or post_hashes(images[0] if images else None, text)
    if options.text_only:
        if any(images):
            raise BadRequest(f"a text_only post carries no image, but IMAGE has {sum(map(len, images))} bytes: send "
                             "IMAGE empty, or drop text_only")
        blank = Image.new("RGB", (PLACEHOLDER_SIDE, PLACEHOLDER_SIDE), (127, 127, 127))
        return Post(options, policy, hashes["image_sha256"], hashes["text_sha256"], caption, lang, blank, "none",
                    (0, 0), as_sent, has_image=False)
    if decoded is None:
        if len(images) > policy.media.max_images:
            raise TooManyImages(f"the post carries {len(images)} images; policy {policy.name!r} reads at most "
                                f"{policy.media.max_images} per post (media.max_images)")
        decoded = decode_post_images(images, policy)
    elif not decoded:
        raise BadRequest("the post's frames from preprocess hold no image and the post is not text_only")
    first = decoded[0]
    return Post(options, policy, hashes["image_sha256"], hashes["text_sha256"], caption, lang, first.frames[0],
                first.format, first.size, as_sent, images=tuple(decoded))


def decode_post_images(images: list[bytes], policy: Policy) -> tuple[PostImage, ...]:
    """Each image decoded with its judged frames (policy media); a bad one raises its code, naming the image when the
    post has several."""
    decoded = []
    for i, data in enumerate(images):
        try:
            d = decode_image(data, max_frames=policy.media.max_frames)
        except ModerationError as e:
            if len(images) == 1:
                raise
            raise type(e)(f"image {i}: {e.message}") from None
        decoded.append(PostImage(data, d.format, d.original_size, d.frame_count, d.frames, d.frame_indices))
    return tuple(decoded)


def judged_items(images: tuple[PostImage, ...] | list[PostImage]) -> list[tuple[int | None, int | None, Image.Image]]:
    """(image index, frame index, frame) of every frame the image signals read, in order. The image index is None in
    a post of one image, the frame index None for a still image: evidence names only what it needs."""
    several = len(images) > 1
    return [(i if several else None, f if im.frame_count > 1 else None, frame)
            for i, im in enumerate(images) for f, frame in zip(im.frame_indices, im.frames, strict=True)]


# FRAMES, what preprocess hands the stages after it: each image of a post with its judged frames as decoded, so
# read_text and the VLM never decode an upload again. Layout: a 4-byte big-endian header length, the header (JSON:
# the first image's sha256 as sent, and per image its format, declared size, frame count and frames as [index,
# width, height]), then every frame's RGB bytes in that order. Frames are at most 2 x DECODE_SIDE on the longer side
# (core/imaging.py), so a post's FRAMES is bounded by media.max_images x media.max_frames of those.
FRAMES_HEADER = struct.Struct(">I")


def pack_images(images: Sequence[PostImage], image_sha256: str = "") -> bytes:
    """The post's decoded images as one FRAMES element (b"" for a post without images)."""
    if not images:
        return b""
    head = {"image_sha256": image_sha256,
            "images": [{"format": im.format, "size": list(im.size), "frame_count": im.frame_count,
                        "frames": [[n, *f.size] for n, f in zip(im.frame_indices, im.frames, strict=True)]}
                       for im in images]}
    header = json.dumps(head, separators=(",", ":")).encode("utf-8")
    return b"".join([FRAMES_HEADER.pack(len(header)), header] +
                    [f.tobytes() for im in images for f in im.frames])


def unpack_images(blob: bytes) -> tuple[tuple[PostImage, ...], str]:
    """pack_images' images (without the bytes as sent) and the first image's sha256; ValueError when `blob` is not
    one whole FRAMES element."""
    if not blob:
        return (), ""
    (n,) = FRAMES_HEADER.unpack_from(blob, 0)
    head = json.loads(bytes(blob[FRAMES_HEADER.size:FRAMES_HEADER.size + n]).decode("utf-8"))
    at, out = FRAMES_HEADER.size + n, []
    for im in head["images"]:
        frames, indices = [], []
        for index, w, h in im["frames"]:
            size = w * h * 3
            if at + size > len(blob):
                raise ValueError(f"FRAMES is cut short: a {w}x{h} frame needs {size} bytes, {len(blob) - at} remain")
            frames.append(Image.frombytes("RGB", (w, h), bytes(blob[at:at + size])))
            indices.append(int(index))
            at += size
        out.append(PostImage(None, im["format"], (int(im["size"][0]), int(im["size"][1])), int(im["frame_count"]),
                             tuple(frames), tuple(indices)))
    if at != len(blob):
        raise ValueError(f"FRAMES has {len(blob) - at} bytes after its last frame")
    return tuple(out), str(head.get("image_sha256", ""))
