"""When to send an escalation to the INT8 decoder: the gate tracks its own escalations in flight on the
full-precision decoder (count and the age of the oldest, i.e. how long the decoder's queue has been holding
work) and checks them against the policy's decoder.fallback thresholds before each escalation.

Nothing to probe or poll: the signal falls as in-flight escalations finish, so traffic returns to the
full-precision decoder by itself once the peak passes. Counts are per gate instance (each instance sees its
own share of the load)."""
from __future__ import annotations

import itertools
import time
from contextlib import contextmanager

from ..core.contracts import FallbackInfo
from ..core.policy import DecoderFallback


class FallbackSwitch:
    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self._inflight: dict[int, float] = {}
        self._ids = itertools.count()

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def oldest_wait_ms(self) -> float:
        return (self.clock() - min(self._inflight.values())) * 1e3 if self._inflight else 0.0

    def check(self, settings: DecoderFallback | None) -> FallbackInfo | None:
        """None: use the full-precision decoder. Otherwise where to go instead and why."""
        if settings is None:
            return None
        n, wait = self.inflight, self.oldest_wait_ms()
        reason = None
        if settings.max_inflight is not None and n >= settings.max_inflight:
            reason = "inflight"
        elif settings.max_queue_ms is not None and wait >= settings.max_queue_ms:
            reason = "queue"
        if reason is None:
            return None
        return FallbackInfo(model=settings.model, reason=reason, inflight=n, oldest_wait_ms=round(wait, 3))

    @contextmanager
    def track(self):
        """Around one escalation to the full-precision decoder."""
        key = next(self._ids)
        self._inflight[key] = self.clock()
        try:
            yield
        finally:
            self._inflight.pop(key, None)
