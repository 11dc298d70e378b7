"""Waiting on something a real server or process does, bounded: tests poll, never sleep for a guessed time."""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(condition: Callable[[], T], what: str, limit_s: float, every_s: float = 0.1) -> T:
    """Poll `condition` until it returns something true and return that; AssertionError naming `what` after
    `limit_s`."""
    deadline = time.monotonic() + limit_s
    while True:
        got = condition()
        if got:
            return got
        assert time.monotonic() < deadline, f"{what}: not within {limit_s:.0f} s"
        time.sleep(every_s)
