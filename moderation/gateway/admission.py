"""Admission at the public port: bounded calls and bytes in flight, and a concurrency limit per client so one
client cannot starve the others.

A call is admitted or shed at once (`overloaded`, retryable): shedding is immediate so a client never waits on a
queue it cannot see. An admitted call takes one of its client's `per_client` slots; a client with all its slots
busy waits in its own bounded queue (up to `per_client_queue` calls, then shed), so a greedy client's excess waits
behind itself, never in front of a polite client's call. Triton's own queues behind the gateway then hold at most
`per_client` calls of any one client.

Client identity: the connection's peer for an anonymous caller, or the value of a configured header set by a
trusted front proxy (MODERATION_GATEWAY_CLIENT_HEADER); a caller-chosen header is never trusted by default."""
from __future__ import annotations

import asyncio
import os
from collections import defaultdict
from dataclasses import dataclass


@dataclass
class AdmissionLimits:
    max_calls: int = 256
    max_bytes: int = 384 * 1024 * 1024
    per_client: int = 2
    per_client_queue: int = 64
    client_header: str = ""

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> AdmissionLimits:
        env = os.environ if environ is None else environ
        return cls(max_calls=int(env.get("MODERATION_GATEWAY_MAX_CALLS", cls.max_calls)),
                   max_bytes=int(env.get("MODERATION_GATEWAY_MAX_BYTES", cls.max_bytes)),
                   per_client=int(env.get("MODERATION_GATEWAY_PER_CLIENT", cls.per_client)),
                   per_client_queue=int(env.get("MODERATION_GATEWAY_PER_CLIENT_QUEUE", cls.per_client_queue)),
                   client_header=env.get("MODERATION_GATEWAY_CLIENT_HEADER", "").lower())


class Shed(Exception):
    """The call is refused at once: the gateway is at a bound. The message says which."""


class _Client:
    def __init__(self, slots: int):
        self.running = self.waiting = 0
        self.slots = asyncio.Semaphore(slots)


class Admission:
    def __init__(self, limits: AdmissionLimits | None = None):
        self.limits = limits or AdmissionLimits()
        self.calls = 0
        self.bytes = 0
        self._clients: dict[str, _Client] = defaultdict(self._new_client)

    def _new_client(self) -> _Client:
        return _Client(self.limits.per_client)

    def client_id(self, peer: str, metadata: tuple[tuple[str, str | bytes], ...]) -> str:
        if self.limits.client_header:
            for k, v in metadata:
                if k == self.limits.client_header and v:
                    return f"header:{v if isinstance(v, str) else v.decode('latin-1')}"[:200]
        return f"peer:{peer}"

    def admit(self, client: str, size: int) -> _Ticket:
        """Take a call of `size` bytes for `client`, or raise Shed. The ticket's `wait()` takes a client slot."""
        lim = self.limits
        if self.calls >= lim.max_calls:
            raise Shed(f"the gateway has {self.calls} calls in flight (limit {lim.max_calls})")
        if self.bytes + size > lim.max_bytes:
            raise Shed(f"the gateway has {self.bytes} bytes in flight; this call adds {size} (limit {lim.max_bytes})")
        c = self._clients[client]
        if c.running >= lim.per_client and c.waiting >= lim.per_client_queue:
            raise Shed(f"this client has {c.running} calls running and {c.waiting} waiting "
                       f"(limits {lim.per_client} and {lim.per_client_queue})")
        self.calls += 1
        self.bytes += size
        return _Ticket(self, client, c, size)

    def in_flight(self) -> dict[str, int]:
        return {"calls": self.calls, "bytes": self.bytes, "clients": len(self._clients)}


class _Ticket:
    """One admitted call: `async with ticket:` waits for a client slot, and releases everything on exit."""

    def __init__(self, admission: Admission, client: str, state: _Client, size: int):
        self.admission, self.client, self.state, self.size = admission, client, state, size
        self._slot = False

    async def __aenter__(self) -> _Ticket:
        self.state.waiting += 1
        try:
            await self.state.slots.acquire()
            self._slot = True
            self.state.running += 1
        except BaseException:  # cancelled while waiting (the caller's deadline passed): nothing stays counted
            self.state.waiting -= 1
            self.release()
            raise
        self.state.waiting -= 1
        return self

    async def __aexit__(self, *exc) -> None:
        if self._slot:
            self.state.running -= 1
            self.state.slots.release()
        self.release()

    def release(self) -> None:
        if self.size is None:
            return
        a = self.admission
        a.calls -= 1
        a.bytes -= self.size
        self.size = None
        if not self.state.running and not self.state.waiting and a._clients.get(self.client) is self.state:
            del a._clients[self.client]
