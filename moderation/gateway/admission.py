"""Admission at the public port: bounded calls and bytes in flight, and a fair share of the upstream per client so
one client cannot starve the others.

A call is admitted or shed at once (`overloaded`, retryable): shedding is immediate so a client never waits on a
queue it cannot see. An admitted call then waits for a running slot of its own client: a client alone may run
`per_client` calls at once; while other clients are active, each runs at most its even share of `per_client`
(at least one), so a greedy client's excess waits behind itself, never in front of a polite client's call, and a
polite client's call shares Triton with one greedy call rather than `per_client` of them. A client stays active
for `linger_s` after its last call ends: a client sending one call after another is active between its calls
too, and the greedy client does not take its share back in the gap. A client's waiting calls are bounded
(`per_client_queue`, then shed).

Client identity (identity.py): the caller, not its connection: a trusted front proxy's header when configured, else
the client id the caller names (signed when a client key is configured), else the peer's address without its port."""
from __future__ import annotations

import asyncio
import os
import time
from collections import deque
from dataclasses import dataclass

from .identity import ClientIdentity


@dataclass
class AdmissionLimits:
    max_calls: int = 256
    max_bytes: int = 384 * 1024 * 1024
    per_client: int = 2
    per_client_queue: int = 64
    linger_s: float = 1.0
    client_header: str = ""

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> AdmissionLimits:
        env = os.environ if environ is None else environ
        return cls(max_calls=int(env.get("MODERATION_GATEWAY_MAX_CALLS", cls.max_calls)),
                   max_bytes=int(env.get("MODERATION_GATEWAY_MAX_BYTES", cls.max_bytes)),
                   per_client=int(env.get("MODERATION_GATEWAY_PER_CLIENT", cls.per_client)),
                   per_client_queue=int(env.get("MODERATION_GATEWAY_PER_CLIENT_QUEUE", cls.per_client_queue)),
                   linger_s=float(env.get("MODERATION_GATEWAY_CLIENT_LINGER_S", cls.linger_s)),
                   client_header=env.get("MODERATION_GATEWAY_CLIENT_HEADER", "").lower())


class Shed(Exception):
    """The call is refused at once: the gateway is at a bound. The message says which."""


class _Client:
    def __init__(self):
        self.admitted = 0  # tickets not yet released: running, waiting, or about to wait
        self.running = 0
        self.queue: deque[asyncio.Future] = deque()  # calls waiting for a running slot, oldest first
        self.last_end = time.monotonic()

    @property
    def waiting(self) -> int:
        return len(self.queue)

    def busy(self) -> bool:
        return self.admitted > 0


class Admission:
    def __init__(self, limits: AdmissionLimits | None = None, clock=time.monotonic,
                 identity: ClientIdentity | None = None):
        self.limits = limits or AdmissionLimits()
        self.identity = identity or ClientIdentity(None, self.limits.client_header)
        self.calls = 0
        self.bytes = 0
        self._clock = clock
        self._clients: dict[str, _Client] = {}
        self._rewake: asyncio.TimerHandle | None = None

    def client_id(self, peer: str, metadata: tuple[tuple[str, str | bytes], ...]) -> str:
        return self.identity.resolve(peer, metadata)

    def admit(self, client: str, size: int) -> _Ticket:
        """Take a call of `size` bytes for `client`, or raise Shed. `async with ticket:` waits for a running slot."""
        lim = self.limits
        if self.calls >= lim.max_calls:
            raise Shed(f"the gateway has {self.calls} calls in flight (limit {lim.max_calls})")
        if self.bytes + size > lim.max_bytes:
            raise Shed(f"the gateway has {self.bytes} bytes in flight; this call adds {size} (limit {lim.max_bytes})")
        c = self._clients.get(client)
        if c is None:
            c = self._clients[client] = _Client()
        if c.running >= self.share() and c.waiting >= lim.per_client_queue:
            raise Shed(f"this client has {c.running} calls running and {c.waiting} waiting "
                       f"(limits {self.share()} and {lim.per_client_queue})")
        self.calls += 1
        self.bytes += size
        c.admitted += 1
        return _Ticket(self, c, size)

    def active_clients(self) -> int:
        """Clients with calls in flight or one that ended within `linger_s`; forgets the others."""
        horizon = self._clock() - self.limits.linger_s
        for key in [k for k, c in self._clients.items() if not c.busy() and c.last_end < horizon]:
            del self._clients[key]
        return len(self._clients)

    def share(self) -> int:
        """How many calls one client may run at once now: its even share of `per_client`, at least one."""
        return max(1, self.limits.per_client // max(1, self.active_clients()))

    def in_flight(self) -> dict[str, int]:
        return {"calls": self.calls, "bytes": self.bytes, "clients": sum(c.busy() for c in self._clients.values())}

    def _start(self, c: _Client) -> bool:
        if c.queue or c.running >= self.share():
            return False
        c.running += 1
        return True

    def _wake(self) -> None:
        """Hand free slots to waiting calls, oldest first within each client."""
        share = self.share()
        for c in list(self._clients.values()):
            while c.queue and c.running < share:
                waiter = c.queue.popleft()
                if not waiter.done():
                    c.running += 1
                    waiter.set_result(None)
        if any(c.queue for c in self._clients.values()) and self._rewake is None:
            # a lingering client's share comes back when its linger ends, with no call ending to notice it
            self._rewake = asyncio.get_running_loop().call_later(self.limits.linger_s, self._linger_over)

    def _linger_over(self) -> None:
        self._rewake = None
        self._wake()

    def _end(self, c: _Client) -> None:
        c.running -= 1
        c.last_end = self._clock()
        self._wake()


class _Ticket:
    """One admitted call: `async with ticket:` waits for a running slot, and releases everything on exit."""

    def __init__(self, admission: Admission, state: _Client, size: int):
        self.admission, self.state = admission, state
        self.size: int | None = size  # None once released
        self._slot = False

    async def __aenter__(self) -> _Ticket:
        a, c = self.admission, self.state
        if not a._start(c):
            waiter = asyncio.get_running_loop().create_future()
            c.queue.append(waiter)
            try:
                await waiter
            except BaseException:  # cancelled while waiting (the caller's deadline passed): nothing stays counted
                if waiter in c.queue:
                    c.queue.remove(waiter)
                elif waiter.done() and not waiter.cancelled():
                    a._end(c)  # the slot was handed over as the wait was cancelled: pass it on
                self.release()
                raise
        self._slot = True
        return self

    async def __aexit__(self, *exc) -> None:
        if self._slot:
            self._slot = False
            self.admission._end(self.state)
        self.release()

    def release(self) -> None:
        if self.size is None:
            return
        a = self.admission
        a.calls -= 1
        a.bytes -= self.size
        self.state.admitted -= 1
        self.size = None
