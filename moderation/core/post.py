"""One post as a client sent it, validated: OPTIONS, policy, caption, decoded image, content hashes."""
from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from .errors import BadRequest
from .hashing import post_hashes
from .imaging import decode_image
from .options import Options, parse_options
from .policy import Policy, load_policy
from .text import decode_caption_as_sent, detect_lang, normalize_caption


@dataclass
class Post:
    options: Options
    policy: Policy
    image_sha256: str
    text_sha256: str
    caption: str         # normalised: what the models read
    lang: str
    image: Image.Image  # RGB, EXIF orientation applied, first frame
    image_format: str
    image_size: tuple[int, int]
    caption_as_sent: str = ""  # before normalisation: what term matching reports against
    has_image: bool = True     # False for a text_only post: `image` is a blank placeholder
    frame_count: int = 1       # frames in the image file (1: a still image)
    # the frames judged (policy media.max_frames; the first is `image`) and their indices in the file
    frames: tuple[Image.Image, ...] = ()
    frame_indices: tuple[int, ...] = (0,)

    @property
    def judged_frames(self) -> list[tuple[int | None, Image.Image]]:
        """(frame index, or None for a still image; frame) of every frame the signals read."""
        if self.frame_count <= 1 or not self.frames:
            return [(None, self.image)]
        return list(zip(self.frame_indices, self.frames, strict=True))


# What the models see in place of a text_only post's image: shapes only, never judged (no image signal is read).
PLACEHOLDER_SIDE = 224


def parse_post(image: bytes, text: bytes, options: Options | bytes | None, hashes: dict | None = None) -> Post:
    """Validate everything a client sent (OPTIONS raw, or already parsed); raises ModerationError with a code
    that names the problem. `hashes`: the post's post_hashes() when the caller already computed them."""
    if not isinstance(options, Options):
        options = parse_options(options)
    policy = load_policy(options.policy)
    as_sent = decode_caption_as_sent(text)
    caption = normalize_caption(as_sent)
    lang = detect_lang(caption) if options.lang == "auto" else options.lang
    hashes = hashes or post_hashes(image, text)
    if options.text_only:
        if image:
            raise BadRequest(f"a text_only post carries no image, but IMAGE has {len(image)} bytes: send IMAGE "
                             "empty, or drop text_only")
        blank = Image.new("RGB", (PLACEHOLDER_SIDE, PLACEHOLDER_SIDE), (127, 127, 127))
        return Post(options, policy, hashes["image_sha256"], hashes["text_sha256"], caption, lang, blank, "none",
                    (0, 0), as_sent, has_image=False)
    decoded = decode_image(image, max_frames=policy.media.max_frames)
    return Post(options, policy, hashes["image_sha256"], hashes["text_sha256"], caption, lang, decoded.image,
                decoded.format, decoded.original_size, as_sent, frame_count=decoded.frame_count,
                frames=decoded.frames, frame_indices=decoded.frame_indices)
