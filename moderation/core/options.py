"""Per-request OPTIONS (a JSON object in the OPTIONS tensor), validated strictly."""
from __future__ import annotations

import json
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import BadOptions
from .limits import MAX_OPTIONS_BYTES
from .text import decode_utf8


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(default_factory=lambda: uuid.uuid4().hex, min_length=1, max_length=128,
                            pattern=r"^[A-Za-z0-9_.:@-]+$")
    policy: str = Field("default", min_length=1, max_length=64)
    describe: bool = False
    lang: Literal["auto", "en", "zh"] = "auto"
    return_embedding: bool = False
    # Privacy, the verdict cache only: it stores nothing from this post and evicts every stored verdict the post
    # matches (moderation/gate/cache.py). Triton's response cache of encoder outputs cannot be cleared (docs/caches.md).
    forget: bool = False
    # Send the post to the VLM whatever the gate decided (reported posts, appeals, spot checks); audited.
    escalate: bool = False
    # Read the text drawn in the image (OCR); false skips it for this post.
    ocr: bool = True
    # A post with no image (IMAGE empty): only its text is judged; no image signal (nsfw_image, image lists,
    # OCR, the CLIP image embedding) is read. The VLM, if it runs, sees a blank placeholder image.
    text_only: bool = False


def parse_options(raw: bytes | str | None) -> Options:
    if raw is None or raw in (b"", ""):
        return Options()
    raw = decode_utf8(raw, name="OPTIONS", max_bytes=MAX_OPTIONS_BYTES, bad=BadOptions, too_long=BadOptions)
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise BadOptions(f"OPTIONS is not valid JSON: {e.msg} at position {e.pos}") from None
    except RecursionError:  # '[[[[...' within the size limit nests deeper than the parser's stack
        raise BadOptions("OPTIONS nests too deeply; send a flat JSON object") from None
    if not isinstance(data, dict):
        raise BadOptions(f"OPTIONS must be a JSON object, got {type(data).__name__}")
    try:
        return Options.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "OPTIONS"
        raise BadOptions(f"OPTIONS field {where!r}: {first['msg']}") from None
