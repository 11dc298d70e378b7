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

    def __str__(self) -> str:  # Triton shows this text to the client
        return f"[{self.code}] {self.message}"


def _coded(name: str, code: str, doc: str) -> type[ModerationError]:
    return type(name, (ModerationError,), {"code": code, "__doc__": doc, "__module__": __name__})


BadImage = _coded("BadImage", "bad_image", "The image bytes are empty, truncated, corrupt or not an image.")
ImageTooLarge = _coded("ImageTooLarge", "image_too_large", "The image exceeds a byte, side or pixel limit.")
UnsupportedImage = _coded("UnsupportedImage", "unsupported_image", "A recognised format that is not accepted.")
TooManyImages = _coded("TooManyImages", "too_many_images", "A post carries more images than its policy reads.")
BadText = _coded("BadText", "bad_text", "The caption is not UTF-8 bytes.")
TextTooLong = _coded("TextTooLong", "text_too_long", "The caption exceeds its byte limit.")
BadOptions = _coded("BadOptions", "bad_options", "OPTIONS is not a valid JSON object of known fields.")
UnknownPolicy = _coded("UnknownPolicy", "unknown_policy", "No policy file of that name.")
BadPolicy = _coded("BadPolicy", "bad_policy",
                   "The named policy cannot be used with the served models (e.g. an answer option that is not one "
                   "token of the decoder's vocabulary).")
ModelUnavailable = _coded("ModelUnavailable", "model_unavailable", "A model the request needs is not serving.")
BadRequest = _coded("BadRequest", "bad_request",
                    "The request's tensors themselves are wrong (a missing input, a wrong shape or row count).")
Overloaded = _coded("Overloaded", "overloaded",
                    "A model's queue is full or a request waited past its queue timeout: retry later with backoff.")
ModelNotFound = _coded("ModelNotFound", "model_not_found",
                      "An unknown model or version, or a model the public port does not serve (the internal ones).")
RequestTooLarge = _coded("RequestTooLarge", "request_too_large",
                         "The message is larger than any request the entry model can accept; refused unread.")
ArtifactMismatch = _coded("ArtifactMismatch", "artifact_mismatch", "A model file differs from its artifact record.")
Unauthorized = _coded("Unauthorized", "unauthorized",
                      "An operator call (the gateway's admin service) without the server's admin key, or with another.")
BadListEntry = _coded("BadListEntry", "bad_list_entry",
                      "A custom-list edit the policy cannot take: a label it does not have, an empty term, an image "
                      "too small or too plain for a perceptual hash, an entry id it does not hold.")


class AuditUnavailable(ModerationError):
    """The audit log cannot be written: the request is refused rather than served unaudited. Retry later."""

    code = "audit_unavailable"
    # Never the OS's text (errno, path): the caller learns only that the service could not audit its request.
    MESSAGE = "the audit log cannot be written; the request was not served"

    def __init__(self, message: str = MESSAGE):
        super().__init__(message)


# Triton's own texts for load shedding by the dynamic batcher's queue policy (max_queue_size, queue timeout).
OVERLOAD_TEXTS = ("Exceeds maximum queue size", "Request timeout expired")
# Triton's text when a python-backend stub process died (2.51 does not restart it by itself).
STUB_DEAD_TEXT = "is not healthy"


def _codes(cls=ModerationError) -> set[str]:
    return {cls.code}.union(*(_codes(sub) for sub in cls.__subclasses__()))


# Every code a model of ours can put at the head of its error text (ModerationError.__str__, error_response).
SERVER_CODES = frozenset(_codes())
# Triton's gRPC status for a failure that carries no code of ours names it instead (docs/errors.md).
STATUS_CODES = {"UNAVAILABLE": "unavailable", "DEADLINE_EXCEEDED": "deadline_exceeded",
                "NOT_FOUND": "model_not_found", "INVALID_ARGUMENT": "bad_request",
                "RESOURCE_EXHAUSTED": "request_too_large"}
# A model's `[code]` is the first bracketed token after Triton's own prefixes ("in ensemble '...', ",
# "[request id: ...] "); Triton's own refusals quote names the caller chose (an input named "[bad_image]"),
# so a code anywhere else is not ours.
_MODEL_FAILURE = re.compile(r"(?:in ensemble '[^']*', )?(?:\[request id: [^\]]*\] )?\[([a-z][a-z0-9_]*)\] ")


def _model_code(text: str) -> re.Match | None:
    m = _MODEL_FAILURE.match(text)
    return m if m and m.group(1) in SERVER_CODES else None


def _triton_code(text: str) -> str | None:
    """Our name for Triton's own load-shedding and dead-stub texts, which carry no code of ours."""
    if any(s in text for s in OVERLOAD_TEXTS):
        return "overloaded"
    if STUB_DEAD_TEXT in text:
        return "model_unavailable"
    return None


def classify_failure(text: str, status: str = "") -> tuple[str, str]:
    """(code, message) of a failed call: a model's `[code]` at the head of the text, else Triton's load-shedding
    or dead-stub texts, else the gRPC status (`StatusCode.NOT_FOUND` or `NOT_FOUND`) -> model_not_found,
    bad_request, unavailable, deadline_exceeded; `internal` otherwise. The one parser of error texts: clients,
    the gateway and clip_gate's BLS calls all use it."""
    text = text.strip()
    m = _model_code(text)
    if m:
        return m.group(1), text[m.end():].strip()
    by_status = next((c for name, c in STATUS_CODES.items() if name in (status or "")), "internal")
    return _triton_code(text) or by_status, text


def coded_by_model(text: str) -> bool:
    """True when one of our models failed the request, so it wrote the audit row (see _MODEL_FAILURE)."""
    return _model_code(text.strip()) is not None


def failed_call(model: str, error_text: str) -> ModerationError:
    """A failed call to another model as this request's error: the callee's code when it named one, else
    `model_unavailable` (the callee is down, overloaded or broken, not the request)."""
    code, message = classify_failure(error_text)
    return ModerationError(f"{model}: {message}", code=code if code != "internal" else "model_unavailable")
