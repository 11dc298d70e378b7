"""Caption validation and normalisation for untrusted text."""
from __future__ import annotations

import re
import unicodedata
from typing import Literal

from .errors import BadText, ModerationError, TextTooLong
from .hashing import sha256_hex
from .limits import MAX_TEXT_BYTES

# Zero-width and bidi controls are used to split banned words past keyword filters: drop them for the
# model; the audit hash is of the bytes as sent.
_INVISIBLE = re.compile("[\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff\u00ad]")
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_WS = re.compile(r"\s+")
_CJK = re.compile("[\u3400-\u9fff\uf900-\ufaff]")


def decode_utf8(data: bytes | str, *, name: str, max_bytes: int, bad: type[ModerationError],
                too_long: type[ModerationError]) -> str:
    """An untrusted UTF-8 field: type, size (checked before decoding) and encoding, each with a coded error."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    if not isinstance(data, (bytes, bytearray)):
        raise bad(f"{name} must be UTF-8 bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise too_long(f"{name} is {len(data)} bytes; the limit is {max_bytes}")
    try:
        return bytes(data).decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad(f"{name} is not valid UTF-8 (byte {e.start}: {e.reason})") from None


def decode_caption(data: bytes | str, *, max_bytes: int = MAX_TEXT_BYTES) -> str:
    return normalize_caption(decode_caption_as_sent(data, max_bytes=max_bytes))


def decode_caption_as_sent(data: bytes | str, *, max_bytes: int = MAX_TEXT_BYTES) -> str:
    """The caption's characters before normalisation (term matching reports spans and variants against them)."""
    return decode_utf8(data, name="caption", max_bytes=max_bytes, bad=BadText, too_long=TextTooLong)


def normalize_caption(text: str) -> str:
    text = unicodedata.normalize("NFKC", text)  # full-width and compatibility variants fold to one form
    text = _INVISIBLE.sub("", text)
    text = _CONTROL.sub(" ", text)
    return text.strip()


def fold_caption(text: str) -> str:
    """A caption as matching compares it: normalised, whitespace collapsed, case-folded."""
    return _WS.sub(" ", normalize_caption(text)).casefold()


def caption_key(caption: str) -> str:
    """The verdict cache's key of a caption: its folded form, hashed."""
    return sha256_hex(fold_caption(caption).encode())


# OCR reads stray marks in photos ("O" on a cup, "★★★" on a medal at 0.83): only confident lines with at least two
# letters, digits or CJK characters count as the image's words (cache key, term lists, profanity, the VLM prompt).
IMAGE_WORDS_MIN_CONFIDENCE = 0.8


def image_words(lines: list[dict] | None) -> str:
    """The words drawn in an image: its OCR lines (dicts with text and confidence) that count, one per line."""
    keep = [x["text"] for x in lines or () if x["confidence"] >= IMAGE_WORDS_MIN_CONFIDENCE
            and sum(c.isalnum() for c in x["text"]) >= 2]
    return "\n".join(keep)


Lang = Literal["en", "zh"]  # the prompt languages (a policy words its prompts in each)


def detect_lang(text: str) -> Lang:
    """'zh' when the caption is mostly Chinese, else 'en' (the prompt language)."""
    if not text:
        return "en"
    cjk = len(_CJK.findall(text))
    letters = sum(ch.isalpha() for ch in text)
    return "zh" if letters and cjk / letters >= 0.3 else "en"
