"""One post as a client sent it, validated: OPTIONS, policy, caption, decoded image, content hashes."""
from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image

from .errors import BadRequest, ModerationError, TooManyImages
from .hashing import post_hashes, sha256_hex
from .imaging import decode_image
from .options import Options, parse_options
from .policy import Policy, load_policy
from .text import Lang, decode_caption_as_sent, detect_lang, normalize_caption


@dataclass(frozen=True)
class PostImage:
    """One image of a post as decoded: its judged frames (the first is the image itself)."""
    data: bytes = field(repr=False, compare=False)  # as sent: hashed only when RESULT names the image (media)
    format: str
    size: tuple[int, int]           # as the header declares it
    frame_count: int                # frames in the file (1: a still image)
    frames: tuple[Image.Image, ...]
    frame_indices: tuple[int, ...]

    @property
    def sha256(self) -> str:
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
               hashes: dict | None = None, read_frames: bool = True) -> Post:
    """Validate everything a client sent (OPTIONS raw, or already parsed); raises ModerationError with a code
    that names the problem. `image`: one image's bytes or a post's images. `hashes`: the post's post_hashes()
    when the caller already computed them (of its first image). `read_frames`: sample each animation's frames
    (policy media.max_frames); False decodes each image's first frame only (what the VLM's picture shows)."""
    if not isinstance(options, Options):
        options = parse_options(options)
    policy = load_policy(options.policy)
    as_sent = decode_caption_as_sent(text)
    caption = normalize_caption(as_sent)
    lang = detect_lang(caption) if options.lang == "auto" else options.lang
    images = post_images(image)
    hashes = hashes or post_hashes(images[0] if images else None, text)
    if options.text_only:
        if any(images):
            raise BadRequest(f"a text_only post carries no image, but IMAGE has {sum(map(len, images))} bytes: send "
                             "IMAGE empty, or drop text_only")
        blank = Image.new("RGB", (PLACEHOLDER_SIDE, PLACEHOLDER_SIDE), (127, 127, 127))
        return Post(options, policy, hashes["image_sha256"], hashes["text_sha256"], caption, lang, blank, "none",
                    (0, 0), as_sent, has_image=False)
    if len(images) > policy.media.max_images:
        raise TooManyImages(f"the post carries {len(images)} images; policy {policy.name!r} reads at most "
                            f"{policy.media.max_images} per post (media.max_images)")
    decoded = decode_post_images(images, policy, read_frames)
    first = decoded[0]
    return Post(options, policy, hashes["image_sha256"], hashes["text_sha256"], caption, lang, first.frames[0],
                first.format, first.size, as_sent, images=tuple(decoded))


def decode_post_images(images: list[bytes], policy: Policy, read_frames: bool = True) -> tuple[PostImage, ...]:
    """Each image decoded with its judged frames (policy media; the first frame only without `read_frames`); a bad
    one raises its code, naming the image when the post has several."""
    decoded = []
    for i, data in enumerate(images):
        try:
            d = decode_image(data, max_frames=policy.media.max_frames if read_frames else 1)
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
