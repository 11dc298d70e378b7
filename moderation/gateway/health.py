"""Readiness of the public port: grpc.health.v1 (Check and Watch, what Envoy, Istio, grpc-health-probe and
Kubernetes `grpc:` probes send) and the gateway's answer to ServerReady, from one probe loop.

Ready means a call on this port would be served: Triton answers ServerReady (strict readiness: every model
loaded) and, in the fail_closed audit mode, the audit log can take rows. The overall service (""), the inference
service's name and each public model report the same status. On shutdown every status turns NOT_SERVING before
the gateway stops taking calls, so probes drop the endpoint first.

A detail beside readiness: the service `moderation.lists` is NOT_SERVING while some policy's last good lists are in
force because its newest cannot be read (the lists store, Redis, unreachable or emptied; a lists file that fails to
parse: Triton's `moderation_lists_stale` gauge, read from its metrics each probe). The overall status stays SERVING
then, on purpose: the last good lists are a correct state to serve (`grpc_health_probe -service=moderation.lists`
tells an operator; the gateway logs which policies)."""
from __future__ import annotations

import asyncio
import contextlib

from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2

from ..core.audit import FAIL_CLOSED, AuditLog

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVER_READY = "/inference.GRPCInferenceService/ServerReady"
LISTS_SERVICE = "moderation.lists"


def stale_lists(metrics_url: str) -> list[str]:
    """Policies whose last good lists are in force, from Triton's moderation_lists_stale gauge."""
    import re
    import urllib.request

    with urllib.request.urlopen(metrics_url, timeout=2) as r:
        text = r.read().decode("utf-8", "replace")
    return sorted(m.group(1) for m in re.finditer(r'^moderation_lists_stale\{[^}]*policy="([^"]*)"[^}]*\} 1(?:\.0)?$',
                                                  text, re.M))


class Readiness:
    def __init__(self, channel: aio.Channel, audit: AuditLog, services: tuple[str, ...], interval_s: float = 0.5,
                 triton_metrics: str | None = None):
        self.channel, self.audit, self.interval_s = channel, audit, interval_s
        self.triton_metrics = triton_metrics
        self.stale_lists: list[str] = []
        self.services = ("", "inference.GRPCInferenceService", *services)
        self.servicer = health.aio.HealthServicer()
        self.upstream_ready = False
        self.audit_ok = True
        self._task: asyncio.Task | None = None
        self._server_ready = channel.unary_unary(SERVER_READY)

    def add_to(self, server: aio.Server) -> None:
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)

    @property
    def ready(self) -> bool:
        return self.upstream_ready and self.audit_ok

    async def probe(self) -> bool:
        try:
            raw = await self._server_ready(service_pb2.ServerReadyRequest().SerializeToString(), timeout=2)
            self.upstream_ready = service_pb2.ServerReadyResponse.FromString(raw).ready
        except aio.AioRpcError:
            self.upstream_ready = False
        if self.audit.mode == FAIL_CLOSED:  # an audit log that cannot take rows makes the service unready
            self.audit_ok = await asyncio.to_thread(self.audit.writable)
        status = SERVING if self.ready else NOT_SERVING
        for name in self.services:
            await self.servicer.set(name, status)
        if self.triton_metrics:
            await self._probe_lists()
        return self.ready

    async def _probe_lists(self) -> None:
        if not self.triton_metrics:
            return
        try:
            stale = await asyncio.to_thread(stale_lists, self.triton_metrics)
        except OSError:  # Triton's metrics not answering: the last status stands
            return
        if stale != self.stale_lists:
            print(f"gateway: the newest lists of {stale} cannot be read; their last good lists are in force (Triton's "
                  "log says why)" if stale else "gateway: every policy's newest lists are in force", flush=True)
        self.stale_lists = stale
        await self.servicer.set(LISTS_SERVICE, NOT_SERVING if stale else SERVING)

    async def start(self) -> None:
        await self.probe()

        async def loop():
            while True:
                await asyncio.sleep(self.interval_s)
                with contextlib.suppress(Exception):  # a probe that fails leaves the last status until the next
                    await self.probe()

        self._task = asyncio.create_task(loop())

    async def shutdown(self) -> None:
        if self._task:
            self._task.cancel()
        await self.servicer.enter_graceful_shutdown()
