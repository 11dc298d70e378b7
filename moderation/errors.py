"""Error codes every layer uses: the Triton models raise them, the result carries them, the audit log
records them and docs/errors.md lists them."""
from __future__ import annotations


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


class ArtifactMismatch(ModerationError):
    code = "artifact_mismatch"


def parse_error_text(text: str) -> tuple[str, str]:
    """Split '[code] message' (as produced by ModerationError.__str__) back into (code, message)."""
    text = text.strip()
    i = text.find("[")
    j = text.find("]", i + 1)
    if i != -1 and j != -1:
        return text[i + 1:j], text[j + 1:].strip()
    return "internal", text
