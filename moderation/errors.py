"""Error codes every layer uses: the Triton models raise them, the result carries them, the audit log
records them and docs/errors.md lists them."""
from __future__ import annotations

import re


class ModerationError(Exception):
    """A request-level failure with a stable code. The message names the problem."""

    code = "internal"

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        if code:
            self.code = code
        self.message = message

    def to_dict(self) -> dict:
        return {"code": self.code, "message": self.message}

    def __str__(self) -> str:  # Triton shows this text to the client
        return f"[{self.code}] {self.message}"


class BadImage(ModerationError):
    code = "bad_image"


class ImageTooLarge(ModerationError):
    code = "image_too_large"


class UnsupportedImage(ModerationError):
    code = "unsupported_image"


class BadText(ModerationError):
    code = "bad_text"


class TextTooLong(ModerationError):
    code = "text_too_long"


class BadOptions(ModerationError):
    code = "bad_options"


class UnknownPolicy(ModerationError):
    code = "unknown_policy"


class ModelUnavailable(ModerationError):
    code = "model_unavailable"


class BadRequest(ModerationError):
    """The request's tensors themselves are wrong (a missing input, a wrong shape or row count)."""
    code = "bad_request"


class Overloaded(ModerationError):
    """A model's queue is full or a request waited past its queue timeout: retry later with backoff."""
    code = "overloaded"


class ArtifactMismatch(ModerationError):
    code = "artifact_mismatch"


# Triton's own texts for load shedding by the dynamic batcher's queue policy (max_queue_size, queue timeout).
OVERLOAD_TEXTS = ("Exceeds maximum queue size", "Request timeout expired")
# Triton's text when a python-backend stub process died (2.51 does not restart it by itself).
STUB_DEAD_TEXT = "is not healthy"
_CODE = re.compile(r"\[([a-z][a-z0-9_]*)\]")


def _codes(cls=ModerationError) -> set[str]:
    return {cls.code}.union(*(_codes(sub) for sub in cls.__subclasses__()))


# Every code a model of ours can put at the head of its error text (ModerationError.__str__, error_response).
SERVER_CODES = frozenset(_codes())
# Triton's gRPC status for a failure that carries no code of ours names it instead (docs/errors.md).
STATUS_CODES = {"UNAVAILABLE": "unavailable", "DEADLINE_EXCEEDED": "deadline_exceeded",
                "NOT_FOUND": "model_not_found", "INVALID_ARGUMENT": "bad_request"}


def _triton_code(text: str) -> str | None:
    """Our name for Triton's own load-shedding and dead-stub texts, which carry no code of ours."""
    if any(s in text for s in OVERLOAD_TEXTS):
        return "overloaded"
    if STUB_DEAD_TEXT in text:
        return "model_unavailable"
    return None


def _model_code(text: str) -> re.Match | None:
    """A model's `[code]` as the first bracketed token after Triton's own prefixes ("in ensemble '...', ",
    "[request id: ...] "); Triton's own refusals quote names the caller chose (an input named "[bad_image]"),
    so a code anywhere else is not ours."""
    m = _MODEL_FAILURE.match(text)
    return m if m and m.group(1) in SERVER_CODES else None


def parse_error_text(text: str) -> tuple[str, str]:
    """Split '[code] message' (as produced by ModerationError.__str__) back into (code, message). Triton's
    own prefixes such as "in ensemble 'moderate', [request id: <id_unknown>]" are not codes; Triton's
    load-shedding and dead-stub texts map to `overloaded` and `model_unavailable`."""
    text = text.strip()
    m = _CODE.search(text)
    if m:
        return m.group(1), text[m.end():].strip()
    return _triton_code(text) or "internal", text


def classify_failure(text: str, status: str = "") -> tuple[str, str]:
    """(code, message) for a failed call as a client sees it: a model's `[code]` at the head of the text, else
    Triton's load-shedding or dead-stub texts, else the gRPC status (`StatusCode.NOT_FOUND` or `NOT_FOUND`) ->
    model_not_found, bad_request, unavailable, deadline_exceeded; `internal` otherwise."""
    text = text.strip()
    m = _model_code(text)
    if m:
        return m.group(1), text[m.end():].strip()
    by_status = next((c for name, c in STATUS_CODES.items() if name in (status or "")), "internal")
    return _triton_code(text) or by_status, text


def coded_by_model(text: str) -> bool:
    """True when one of our models failed the request, so it wrote the audit row (see _model_code)."""
    return _model_code(text.strip()) is not None


_MODEL_FAILURE = re.compile(r"(?:in ensemble '[^']*', )?(?:\[request id: [^\]]*\] )?\[([a-z][a-z0-9_]*)\] ")
