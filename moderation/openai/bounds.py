"""What the HTTP front end holds at once: requests in progress and body bytes in flight, both checked from the
headers before a body is read, and how long a body may take to arrive.

A request reserves its declared Content-Length from the byte budget before its body is read and keeps it until
its answer is sent (the body, its parsed copy and the decoded image live that long); a chunked body without a
length reserves as it arrives. Past either bound a request is refused at once (429, Retry-After), never queued."""
from __future__ import annotations

import os
from dataclasses import dataclass

from ..core.limits import MAX_IMAGE_BYTES, MAX_OPTIONS_BYTES, MAX_TEXT_BYTES

# One post's worth of JSON: the image base64-encoded (4/3) plus its caption and framing.
MAX_BODY_BYTES = MAX_IMAGE_BYTES * 4 // 3 + MAX_TEXT_BYTES * 6 + MAX_OPTIONS_BYTES + 64 * 1024
# A request is at most 4 deep ({"input": [{"image_url": {"url"}}]}); nothing legal comes near this.
MAX_JSON_DEPTH = 32
RETRY_AFTER_S = 1


@dataclass
class FrontEndLimits:
    max_requests: int = 64
    max_bytes: int = 128 * 1024 * 1024
    body_timeout_s: float = 30.0
    max_body_bytes: int = MAX_BODY_BYTES

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> FrontEndLimits:
        env = os.environ if environ is None else environ
        limits = cls(max_requests=int(env.get("MODERATION_OPENAI_MAX_REQUESTS", cls.max_requests)),
                     max_bytes=int(env.get("MODERATION_OPENAI_MAX_BYTES", cls.max_bytes)),
                     body_timeout_s=float(env.get("MODERATION_OPENAI_BODY_TIMEOUT_S", cls.body_timeout_s)))
        if limits.max_requests < 1 or limits.max_bytes < 1 or limits.body_timeout_s <= 0:
            raise ValueError("MODERATION_OPENAI_MAX_REQUESTS, _MAX_BYTES and _BODY_TIMEOUT_S must be positive")
        return limits


class Busy(Exception):
    """Refused at once: the front end is at one of its bounds (the message says which)."""


class InFlight:
    """Requests in progress and the body bytes they reserved. Single event loop: no locks."""

    def __init__(self, limits: FrontEndLimits):
        self.limits = limits
        self.requests = 0
        self.bytes = 0

    def admit(self, declared: int | None) -> Reservation:
        """Take one request slot and its declared bytes (None: chunked, reserved as it arrives), or raise Busy."""
        if self.requests >= self.limits.max_requests:
            raise Busy(f"{self.requests} requests in progress, the limit is {self.limits.max_requests}")
        reservation = Reservation(self)
        self.requests += 1
        if declared:
            try:
                reservation.grow(declared)
            except Busy:
                reservation.release()
                raise
        return reservation


class Reservation:
    def __init__(self, owner: InFlight):
        self.owner, self.bytes, self.released = owner, 0, False

    def grow(self, n: int) -> None:
        owner = self.owner
        if owner.bytes + n > owner.limits.max_bytes:
            raise Busy(f"{owner.bytes} body bytes in flight; {n} more would pass the limit of "
                       f"{owner.limits.max_bytes}")
        owner.bytes += n
        self.bytes += n

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.owner.bytes -= self.bytes
            self.owner.requests -= 1
