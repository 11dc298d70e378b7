"""The one way this service talks to Redis (MODERATION_REDIS_URL): a client with short timeouts and no retries, and
the circuit breaker that decides when to try again. The shared verdict cache (gate/shared_cache.py) and the policy
lists (core/list_store.py) both use it, so an outage looks the same to both."""
from __future__ import annotations

import threading
import time
from pathlib import Path

REDIS_URL_ENV = "MODERATION_REDIS_URL"
DEFAULT_TIMEOUT_MS = 250.0


def redis_url(env) -> str:
    return (env.get(REDIS_URL_ENV) or "").strip()


def redis_client(url: str, env, client_name: str):
    """A client for `url` (redis://host:port/db) with MODERATION_REDIS_TIMEOUT_MS socket and connect timeouts
    (default 250) and no retries (the caller's breaker decides); the password, when Redis wants one, from the file
    MODERATION_REDIS_PASSWORD_FILE names (a mounted secret, never the URL)."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    timeout = float(env.get("MODERATION_REDIS_TIMEOUT_MS", DEFAULT_TIMEOUT_MS)) / 1e3
    extra = {}
    if env.get("MODERATION_REDIS_PASSWORD_FILE"):
        extra["password"] = Path(env["MODERATION_REDIS_PASSWORD_FILE"]).read_text().strip()
    return redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                retry=Retry(NoBackoff(), 0), retry_on_timeout=False, health_check_interval=0,
                                decode_responses=False, client_name=client_name, **extra)


def redis_errors() -> tuple[type[BaseException], ...]:
    """What a Redis call raises when Redis is down, slow or refuses the call."""
    import redis

    return (redis.RedisError, OSError)


class CircuitBreaker:
    """Closed: every call goes to Redis. One failure opens it for `cooldown_s` (doubling up to `max_cooldown_s`
    while trials keep failing): calls are refused without touching the network. After the cool-down one trial
    call goes through; its success closes the breaker."""

    def __init__(self, cooldown_s: float = 0.5, max_cooldown_s: float = 5.0, clock=time.monotonic):
        self.base, self.max, self.clock = cooldown_s, max_cooldown_s, clock
        self._lock = threading.Lock()
        self._until: float | None = None
        self._cooldown = cooldown_s
        self.opened = 0

    @property
    def is_open(self) -> bool:
        return self._until is not None

    def allow(self) -> bool:
        with self._lock:
            if self._until is None:
                return True
            now = self.clock()
            if now < self._until:
                return False
            self._until = now + self._cooldown  # this call is the trial; others wait for its outcome
            return True

    def success(self) -> bool:
        """True when this closed an open breaker."""
        with self._lock:
            was = self._until is not None
            self._until, self._cooldown = None, self.base
            return was

    def failure(self) -> bool:
        """True when this opened a closed breaker."""
        with self._lock:
            was_closed = self._until is None
            self._cooldown = self.base if was_closed else min(self.max, self._cooldown * 2)
            self._until = self.clock() + self._cooldown
            self.opened += was_closed
            return was_closed
