"""Audit gateway: the public gRPC endpoint, a proxy in front of Triton's own (loopback) gRPC port.

Why it exists: Triton 2.51 refuses some requests before any model runs — a wrong dtype or shape, a batch over
max_batch_size, an unknown input name, a full queue at the ensemble's first step, a dead python stub. No model sees
those, and Triton neither logs nor counts them, so without this nothing would audit them. What it does:
- serves inference only for the public models (core/limits.PUBLIC_MODELS): any other model name is answered
  `model_not_found` here and audited; Triton's own port takes inference only with the key the gateway holds, so the
  internal models are reached only through the ensemble and BLS, and only they write `stage: moderate` rows;
- refuses before Triton, coded and audited, what no model could accept: a message over MAX_REQUEST_BYTES (refused
  by gRPC from its length prefix, never buffered: `request_too_large`), absurd input counts, names or versions,
  a zero batch dimension, a body that is not a request;
- admits a bounded number of calls and bytes in flight, and a bounded number per client (admission.py): the rest
  is shed at once with `overloaded`;
- forwards admitted calls byte for byte; a failed inference whose error carries no code of ours (so no model wrote
  its row) gets one audit row here. Every call gets exactly one row, from a model or from here: the summary is
  bounded and total (summary.py), and a row that cannot be built is replaced by a minimal one.
Health, metadata and the restricted admin protocols (with the caller's key header) pass through untouched, so
Triton still enforces the admin key. The gateway's own admin service (`/moderation.Admin/*`: custom lists, reviewer
feedback; admin.py) checks the same key itself and writes its rows into the same audit log.

    python -m moderation.gateway --listen 127.0.0.1:8001 --upstream 127.0.0.1:8011 [--metrics 127.0.0.1:8003]

Environment: MODERATION_AUDIT_LOG (the same file the models append to; rows are flock-serialised),
MODERATION_ADMIN_KEY / _FILE (the key Triton's inference protocol needs; never on a command line),
MODERATION_GATEWAY_* (admission limits, see admission.py).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time

import grpc
from grpc import aio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from tritonclient.grpc import service_pb2

from ..core import memory
from ..core.audit import DELETED_METRIC, DROPPED_METRIC, FAIL_OPEN, FAILURES_METRIC, AuditLog
from ..core.auth import GRPC_ADMIN_HEADER, admin_key
from ..core.caller import client_key
from ..core.errors import classify_failure, coded_by_model
from ..core.hashing import sha256_hex
from ..core.limits import MAX_REQUEST_BYTES, PUBLIC_MODELS
from .admin import AdminService
from .admission import Admission, AdmissionLimits, Shed
from .health import Readiness
from .identity import ClientIdentity
from .summary import cap, parse_request, refusal, request_summary

SERVICE = "inference.GRPCInferenceService"
INFER = f"/{SERVICE}/ModelInfer"
STREAM_INFER = f"/{SERVICE}/ModelStreamInfer"
# Triton's own gRPC message limit (INT32_MAX) towards Triton and back to callers; the public port takes less.
MAX_MESSAGE_BYTES = 2**31 - 1
CHANNEL_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
# Transport headers grpc sets itself on the upstream call; everything else (the admin key) is forwarded.
_TRANSPORT_HEADERS = ("user-agent", "content-type", "te", "grpc-accept-encoding", "grpc-encoding", "grpc-timeout")
_REFUSAL_STATUS = {"model_not_found": grpc.StatusCode.NOT_FOUND, "bad_request": grpc.StatusCode.INVALID_ARGUMENT,
                   "overloaded": grpc.StatusCode.UNAVAILABLE, "request_too_large": grpc.StatusCode.RESOURCE_EXHAUSTED}


def _metadata(context) -> tuple[tuple[str, str | bytes], ...]:
    return tuple((k, v) for k, v in (context.invocation_metadata() or ())
                 if not k.startswith(":") and k not in _TRANSPORT_HEADERS)


def needs_row(message: str, summary: dict) -> bool:
    """Audit here unless one of our models already did: its `[code]` heads the message. Triton's prefixes quote
    the request id and model name, which the caller chose, so a code there is trusted only when they hold no
    bracket or quote that could fake it."""
    chosen = f"{summary.get('triton_request_id') or ''}{summary.get('model') or ''}"
    return not coded_by_model(message) or any(c in chosen for c in "[]'")


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.calls = Counter("moderation_gateway_calls", "gRPC calls through the gateway, by method and status",
                             ["method", "status"], registry=self.registry)
        self.audited = Counter("moderation_gateway_audited_failures",
                               "Failed inferences no model had audited, written to the audit log by the gateway",
                               ["code"], registry=self.registry)
        self.refused = Counter("moderation_gateway_refused", "Calls the gateway answered itself, by code",
                               ["code"], registry=self.registry)
        # the audit log's own counts (core/audit.py on_count), exported under the names the models use
        self.audit_counts = {name: Counter(name.removesuffix("_total"), text, registry=self.registry)
                             for name, text in ((FAILURES_METRIC, "Audit rows the gateway could not write"),
                                                (DROPPED_METRIC, "Spooled audit rows dropped (fail_open, spool full)"),
                                                (DELETED_METRIC, "Audit rows deleted by retention"))}
        self.seconds = Histogram("moderation_gateway_call_seconds", "Call latency seen by the gateway (upstream "
                                 "included)", ["method"], registry=self.registry,
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.in_flight = Gauge("moderation_gateway_in_flight", "Admitted calls and their bytes", ["what"],
                               registry=self.registry)


class AuditGateway:
    def __init__(self, listen: str, upstream: str, audit: AuditLog | None = None, grace_s: float = 30.0,
                 key: str | None = None, limits: AdmissionLimits | None = None,
                 public: tuple[str, ...] = PUBLIC_MODELS, max_request_bytes: int = MAX_REQUEST_BYTES,
                 triton_metrics: str | None = None):
        self.listen, self.upstream, self.grace_s = listen, upstream, grace_s
        self.triton_metrics = triton_metrics
        self.metrics = Metrics()
        self.audit = audit or AuditLog(on_count=lambda name, n: self.metrics.audit_counts[name].inc(n))
        if self.audit.mode == FAIL_OPEN:  # spooled rows reach the disk when it takes rows again, traffic or not
            self.audit.start_flusher()
        self.key = admin_key() if key is None else key
        self.admin = AdminService(self.key, self.audit, observe=self._observe)
        self.public, self.max_request_bytes = tuple(public), max_request_bytes
        limits = limits or AdmissionLimits.from_env()
        self.admission = Admission(limits, identity=ClientIdentity(client_key(), limits.client_header))
        self.metrics.in_flight.labels(what="calls").set_function(lambda: self.admission.calls)
        self.metrics.in_flight.labels(what="bytes").set_function(lambda: self.admission.bytes)
        self.channel: aio.Channel | None = None
        self.server: aio.Server | None = None
        self.readiness: Readiness | None = None
        self._readable: set[str] | None = None  # models whose config and statistics this port opens

    async def start(self) -> int:
        self.channel = aio.insecure_channel(self.upstream, options=CHANNEL_OPTIONS)
        # The public limit is checked by gRPC from each message's length prefix, before the body is buffered.
        self.server = aio.server(options=[("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                                          ("grpc.max_receive_message_length", self.max_request_bytes)])
        self.readiness = Readiness(self.channel, self.audit, self.public, triton_metrics=self.triton_metrics)
        self.readiness.add_to(self.server)
        self.server.add_generic_rpc_handlers((_Router(self),))
        port = self.server.add_insecure_port(self.listen)
        if not port:
            raise OSError(f"cannot listen on {self.listen}")
        await self.server.start()
        await self.readiness.start()
        return port

    async def stop(self) -> None:
        if self.readiness:
            await self.readiness.shutdown()  # probes see NOT_SERVING while in-flight calls drain
        if self.server:
            await self.server.stop(self.grace_s)  # in-flight calls finish (Triton drains its own too)
        if self.channel:
            await self.channel.close()

    def _channel(self) -> aio.Channel:
        if self.channel is None:
            raise RuntimeError("the gateway is not started")
        return self.channel

    def _upstream_metadata(self, context) -> tuple[tuple[str, str | bytes], ...]:
        """The caller's metadata for an inference Triton will run: its own copy of the key header never passes."""
        md = tuple((k, v) for k, v in _metadata(context) if k != GRPC_ADMIN_HEADER)
        return md + ((GRPC_ADMIN_HEADER, self.key),) if self.key else md

    async def _write(self, row: dict) -> None:
        try:  # flock + fsync off the event loop, before the caller hears the answer; shielded: a call gRPC or the
            # caller cancels (an oversized message is refused by cancelling it) still gets its row
            await asyncio.shield(asyncio.to_thread(self.audit.write, row))
        except Exception as e:  # noqa: BLE001 - counted by the audit log's hook; never a failed call here
            print(f"gateway: audit write failed: {type(e).__name__}", file=sys.stderr, flush=True)

    async def _record(self, raw: bytes | None, status: grpc.StatusCode, message: str, started: float,
                      req=None, code: str | None = None, always: bool = False, **extra) -> None:
        """One row for a call no model audited. Never raises: a summary that fails becomes a minimal row."""
        try:
            summary = request_summary(raw, req) if raw is not None else {"model": None}
            if not always and not needs_row(message, summary):
                return
            if code is None:
                code, message = classify_failure(message, status.name)
            row = {"request_id": summary.pop("request_id", None), "stage": "gateway", **summary, **extra,
                   "grpc_status": status.name, "error": {"code": code, "message": cap(message, 512)}}
        except Exception as e:  # noqa: BLE001 - the row must exist even if the summary cannot be built
            row = {"request_id": None, "stage": "gateway", "summary_error": type(e).__name__,
                   "request_sha256": sha256_hex(raw) if isinstance(raw, bytes) else None, "grpc_status": status.name,
                   "error": {"code": code or "internal", "message": cap(message, 512)}}
        row["latency_ms"] = {"total": round((time.perf_counter() - started) * 1e3, 3)}
        self.metrics.audited.labels(code=row["error"]["code"]).inc()
        await self._write(row)

    async def _refuse(self, raw: bytes | None, req, code: str, message: str, started: float, **extra) -> str:
        """Audit a call the gateway answers itself; the text the caller gets."""
        self.metrics.refused.labels(code=code).inc()
        await self._record(raw, _REFUSAL_STATUS[code], message, started, req=req, code=code, always=True, **extra)
        return f"[{code}] {message}"

    def _admit(self, context, size: int):
        return self.admission.admit(self.admission.client_id(context.peer(), _metadata(context)), size)

    def infer(self):
        """ModelInfer, served as a stream handler so that a call whose message gRPC refused (over the size limit)
        still reaches here and is audited: the handler starts on the call's headers, the message never arrives."""
        call = self._channel().unary_unary(INFER)  # no (de)serialisers: bytes in, bytes out

        async def handler(requests, context):
            started = time.perf_counter()
            messages = aiter(requests)
            raw = await anext(messages, None)
            await messages.aclose()  # grpc's receiver holds its last message until it is closed: 20 MB a call
            if raw is None:
                await self._refuse(None, None, "request_too_large", f"no request message arrived: over the "
                                   f"{self.max_request_bytes}-byte limit of this port, or none was sent", started,
                                   peer=cap(context.peer()))
                self._observe("ModelInfer", grpc.StatusCode.RESOURCE_EXHAUSTED, started)
                return  # gRPC has answered RESOURCE_EXHAUSTED already
            req = parse_request(raw)
            code, message = refusal(req, self.public)
            try:
                ticket = None if code else self._admit(context, len(raw))
            except Shed as e:
                code, message = "overloaded", f"{e}; retry with backoff"
            if code:
                text = await self._refuse(raw, req, code, message, started)
                self._observe("ModelInfer", _REFUSAL_STATUS[code], started)
                await context.abort(_REFUSAL_STATUS[code], text)
            assert ticket is not None  # admitted: every other path aborted above
            async with ticket:
                try:
                    response = await call(raw, metadata=self._upstream_metadata(context),
                                          timeout=context.time_remaining())
                except aio.AioRpcError as e:
                    await self._record(raw, e.code(), e.details() or "", started, req=req)
                    self._observe("ModelInfer", e.code(), started)
                    await context.abort(e.code(), e.details() or "")
            self._observe("ModelInfer", grpc.StatusCode.OK, started)
            yield response

        return grpc.stream_stream_rpc_method_handler(handler)

    def unary(self, method: str):
        call = self._channel().unary_unary(method)
        name = method.rsplit("/", 1)[1]
        # Reading the config and statistics of the public models and of the models their ensembles compose is open
        # on this port (perf_analyzer reads both, the composing models' to break an ensemble down; they are not
        # what the 2025 CVEs were about): the gateway presents the key for exactly those reads. Any other model's,
        # and every other restricted protocol, still needs the caller's own key (Triton checks it).
        opened = {"ModelConfig": service_pb2.ModelConfigRequest,
                  "ModelStatistics": service_pb2.ModelStatisticsRequest}.get(name)

        async def handler(request: bytes, context) -> bytes:
            started = time.perf_counter()
            metadata = _metadata(context)
            all_stats = False
            # a caller with its own key reads as an operator: passed through, Triton checks that key
            keyless = not any(k == GRPC_ADMIN_HEADER for k, _ in metadata)
            if opened is not None and keyless and await self._public_read(opened, request):
                metadata = self._upstream_metadata(context)
                all_stats = name == "ModelStatistics" and not opened.FromString(request).name
            try:
                response = await call(request, metadata=metadata, timeout=context.time_remaining())
            except aio.AioRpcError as e:
                self._observe(name, e.code(), started)
                await context.abort(e.code(), e.details() or "")
            if all_stats:  # every model's statistics asked for without a key: those this port opens, only
                stats = service_pb2.ModelStatisticsResponse.FromString(response)
                keep = [m for m in stats.model_stats if m.name in (self._readable or ())]
                del stats.model_stats[:]
                stats.model_stats.extend(keep)
                response = stats.SerializeToString()
            if name == "ServerReady" and self.readiness and not self.readiness.audit_ok:
                response = service_pb2.ServerReadyResponse(ready=False).SerializeToString()
            self._observe(name, grpc.StatusCode.OK, started)
            return response

        return grpc.unary_unary_rpc_method_handler(handler)

    async def _public_read(self, message_type, request: bytes) -> bool:
        try:
            name = message_type.FromString(request).name
        except Exception:  # noqa: BLE001 - not a request of that type: forwarded as it is, Triton answers
            return False
        if self._readable is None:
            self._readable = await self._composed(self.public)
        if not name and message_type is service_pb2.ModelStatisticsRequest:
            return True  # every model's: answered with the opened models' statistics only
        return name in self._readable

    async def _composed(self, names: tuple[str, ...]) -> set[str]:
        """The public models and, recursively, the models their ensemble steps name (read with the key)."""
        call = self._channel().unary_unary(f"/{SERVICE}/ModelConfig")
        seen, todo = set(), list(names)
        while todo:
            name = todo.pop()
            if name in seen:
                continue
            seen.add(name)
            try:
                raw = await call(service_pb2.ModelConfigRequest(name=name).SerializeToString(),
                                 metadata=((GRPC_ADMIN_HEADER, self.key),) if self.key else (), timeout=10)
            except aio.AioRpcError:
                continue
            steps = service_pb2.ModelConfigResponse.FromString(raw).config.ensemble_scheduling.step
            todo += [s.model_name for s in steps]
        return seen

    def stream(self):
        """ModelStreamInfer: every message is checked as ModelInfer's is; a refused one is answered in-band (as
        Triton answers its own errors on a stream) and audited, and the stream goes on."""
        call = self._channel().stream_stream(STREAM_INFER)

        async def handler(requests, context):
            started = time.perf_counter()
            pending: dict[str, list[tuple[bytes, float]]] = {}  # request id -> requests waiting for an answer
            out: asyncio.Queue = asyncio.Queue()
            try:
                ticket = self._admit(context, 0)
            except Shed as e:
                text = await self._refuse(None, None, "overloaded", f"{e}; retry with backoff", started)
                await context.abort(grpc.StatusCode.UNAVAILABLE, text)

            async def forward():
                async for raw in requests:
                    t0 = time.perf_counter()
                    req = parse_request(raw)
                    code, message = refusal(req, self.public)
                    if code:
                        text = await self._refuse(raw, req, code, message, t0)
                        out.put_nowait(service_pb2.ModelStreamInferResponse(
                            error_message=text, infer_response=service_pb2.ModelInferResponse(
                                model_name=req.model_name if req else "", id=req.id if req else "")
                        ).SerializeToString())
                        continue
                    assert req is not None  # refusal() refuses a body that is not a request
                    pending.setdefault(req.id, []).append((raw, t0))
                    yield raw

            async def pump():
                try:
                    async for raw in call(forward(), metadata=self._upstream_metadata(context),
                                          timeout=context.time_remaining()):
                        resp = service_pb2.ModelStreamInferResponse.FromString(raw)
                        waiting = pending.get(resp.infer_response.id) or next((v for v in pending.values() if v), [])
                        if waiting:
                            request, t0 = waiting.pop(0)
                            if resp.error_message:  # a stream answers errors in-band, without a status
                                status = (grpc.StatusCode.NOT_FOUND if "not found" in resp.error_message
                                          else grpc.StatusCode.INVALID_ARGUMENT)
                                await self._record(request, status, resp.error_message, t0)
                        out.put_nowait(raw)
                except aio.AioRpcError as e:
                    for waiting in pending.values():  # the stream broke: everything unanswered is audited
                        for request, t0 in waiting:
                            await self._record(request, e.code(), e.details() or "", t0)
                    out.put_nowait(e)
                finally:
                    out.put_nowait(None)

            async with ticket:
                task = asyncio.create_task(pump())
                try:
                    while (item := await out.get()) is not None:
                        if isinstance(item, aio.AioRpcError):
                            self._observe("ModelStreamInfer", item.code(), started)
                            await context.abort(item.code(), item.details() or "")
                        yield item
                finally:
                    task.cancel()
            self._observe("ModelStreamInfer", grpc.StatusCode.OK, started)

        return grpc.stream_stream_rpc_method_handler(handler)

    def _observe(self, method: str, status: grpc.StatusCode, started: float) -> None:
        self.metrics.calls.labels(method=method, status=status.name).inc()
        self.metrics.seconds.labels(method=method).observe(time.perf_counter() - started)


class _Router(grpc.GenericRpcHandler):
    """Every method of Triton's GRPCInferenceService and of the admin service, built once; anything else is
    UNIMPLEMENTED."""

    def __init__(self, gateway: AuditGateway):
        methods = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods
        self.handlers = {}
        for m in methods:
            path = f"/{SERVICE}/{m.name}"
            self.handlers[path] = gateway.unary(path)
        self.handlers[INFER] = gateway.infer()
        self.handlers[STREAM_INFER] = gateway.stream()
        self.handlers.update(gateway.admin.handlers())  # /moderation.Admin/*: operator actions, behind the key

    def service(self, handler_call_details):
        return self.handlers.get(handler_call_details.method)


async def serve(listen: str, upstream: str, metrics: str | None, triton_metrics: str | None = None) -> None:
    gateway = AuditGateway(listen, upstream, triton_metrics=triton_metrics)
    port = await gateway.start()
    if metrics:
        host, _, mport = metrics.rpartition(":")
        start_http_server(int(mport), addr=host or "127.0.0.1", registry=gateway.metrics.registry)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"gateway: gRPC {listen.rpartition(':')[0]}:{port} -> {upstream}; audit {gateway.audit.path}"
          + (f"; metrics {metrics}" if metrics else ""), flush=True)
    # large messages leave freed heap behind: handed back to the OS, during a burst and after it
    trimmer = asyncio.create_task(memory.trim_periodically(lambda: gateway.admission.calls == 0))
    await stop.wait()
    trimmer.cancel()
    await gateway.stop()


def main(argv: list[str] | None = None) -> int:
    bind = os.environ.get("BIND_ADDRESS", "127.0.0.1")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--listen", default=f"{bind}:{os.environ.get('GRPC_PORT', '8001')}")
    ap.add_argument("--upstream", default=f"127.0.0.1:{os.environ.get('TRITON_GRPC_PORT', '8011')}")
    ap.add_argument("--metrics", default=f"127.0.0.1:{os.environ.get('GATEWAY_METRICS_PORT', '8003')}",
                    help="host:port for the gateway's Prometheus metrics; empty to disable")
    ap.add_argument("--triton-metrics",
                    default=f"http://127.0.0.1:{os.environ.get('METRICS_PORT', '8002')}/metrics",
                    help="Triton's Prometheus endpoint: the lists state the `moderation.lists` health service reports")
    args = ap.parse_args(argv)
    memory.tune_allocator()  # large messages on their own mappings: memory goes back after a burst
    asyncio.run(serve(args.listen, args.upstream, args.metrics or None, args.triton_metrics or None))
    return 0
