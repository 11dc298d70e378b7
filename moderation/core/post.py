"""One post as a client sent it, validated: OPTIONS, policy, caption, decoded image, content hashes."""
from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

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


def parse_post(image: bytes, text: bytes, options: Options | bytes | None, hashes: dict | None = None) -> Post:
    """Validate everything a client sent (OPTIONS raw, or already parsed); raises ModerationError with a code
    that names the problem. `hashes`: the post's post_hashes() when the caller already computed them."""
    if not isinstance(options, Options):
        options = parse_options(options)
    policy = load_policy(options.policy)
    as_sent = decode_caption_as_sent(text)
    caption = normalize_caption(as_sent)
    decoded = decode_image(image)
    lang = detect_lang(caption) if options.lang == "auto" else options.lang
    hashes = hashes or post_hashes(image, text)
    return Post(options, policy, hashes["image_sha256"], hashes["text_sha256"], caption, lang, decoded.image,
                decoded.format, decoded.original_size, as_sent)
