"""Audit gateway: the public gRPC endpoint, a thin proxy in front of Triton's own (loopback) gRPC port.

Why it exists: Triton 2.51 refuses some requests before any model runs — a wrong dtype or shape, a batch over
max_batch_size, an unknown input name, an unknown model or version, a full queue at the ensemble's first step,
a dead python stub. No model sees those, and Triton neither logs nor counts them, so without this nothing would
audit them. Every call passes through byte for byte (no protobuf re-serialisation on the way); a failed
inference whose error carries no code of ours (so no model wrote its row) gets one audit row here: the request
id, hashes and shapes of every input, the code and message the caller got, the latency. Everything else (health,
metadata, statistics, the restricted admin protocols with their key header) is forwarded untouched, so Triton
still enforces the admin key.

    python -m moderation.gateway --listen 127.0.0.1:8001 --upstream 127.0.0.1:8011 [--metrics 127.0.0.1:8003]

Environment: MODERATION_AUDIT_LOG (the same file the models append to; rows are flock-serialised).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import struct
import sys
import time

import grpc
from grpc import aio
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from tritonclient.grpc import service_pb2
from tritonclient.utils import deserialize_bytes_tensor

from ..core.audit import AuditLog
from ..core.errors import classify_failure, coded_by_model
from ..core.hashing import sha256_hex

SERVICE = "inference.GRPCInferenceService"
INFER = f"/{SERVICE}/ModelInfer"
# Triton's own gRPC message limit (INT32_MAX): the gateway refuses nothing Triton would take.
MAX_MESSAGE_BYTES = 2**31 - 1
CHANNEL_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
# Transport headers grpc sets itself on the upstream call; everything else (the admin key) is forwarded.
_TRANSPORT_HEADERS = ("user-agent", "content-type", "te", "grpc-accept-encoding", "grpc-encoding", "grpc-timeout")


def _metadata(context) -> tuple[tuple[str, str | bytes], ...]:
    return tuple((k, v) for k, v in (context.invocation_metadata() or ())
                 if not k.startswith(":") and k not in _TRANSPORT_HEADERS)


def _bytes_elements(raw: bytes) -> list[bytes] | None:
    """Elements of a serialised BYTES tensor, None if the bytes are not one."""
    try:
        return list(deserialize_bytes_tensor(raw))
    except struct.error:
        return None


def request_summary(raw: bytes) -> dict:
    """What the audit row keeps of a request: ids, model, and per input its name, dtype, shape, size and sha256
    (one per element for BYTES tensors, so image_sha256/text_sha256 join with the models' rows). Never content."""
    try:
        req = service_pb2.ModelInferRequest.FromString(raw)
    except Exception as e:  # noqa: BLE001 - an unparsable body is still audited, by its hash
        return {"model": None, "request_sha256": sha256_hex(raw), "parse_error": type(e).__name__}
    row: dict = {"model": req.model_name, "model_version": req.model_version or None,
                 "triton_request_id": req.id or None, "inputs": []}
    for i, t in enumerate(req.inputs):
        raw_t = req.raw_input_contents[i] if i < len(req.raw_input_contents) else b""
        elements = _bytes_elements(raw_t) if t.datatype == "BYTES" and raw_t else None
        if elements is None and not raw_t and t.datatype == "BYTES":
            elements = list(t.contents.bytes_contents)
        data = raw_t or t.contents.SerializeToString()
        entry = {"name": t.name, "datatype": t.datatype, "shape": list(t.shape), "bytes": len(data)}
        entry["sha256"] = [sha256_hex(e) for e in elements] if elements is not None else sha256_hex(data)
        row["inputs"].append(entry)
        if elements is not None and len(elements) == 1:
            if t.name == "IMAGE":
                row["image_sha256"] = entry["sha256"][0]
            elif t.name == "TEXT":
                row["text_sha256"] = entry["sha256"][0]
            elif t.name == "OPTIONS":
                row["request_id"] = _options_request_id(elements[0])
    # The id the models would log (OPTIONS' request_id), else the caller's Triton request id.
    row["request_id"] = row.get("request_id") or row["triton_request_id"]
    return row


def _options_request_id(options: bytes) -> str | None:
    try:
        rid = json.loads(options.decode("utf-8")).get("request_id")
    except (ValueError, AttributeError):
        return None
    return rid if isinstance(rid, str) and len(rid) <= 128 else None


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
        self.seconds = Histogram("moderation_gateway_call_seconds", "Call latency seen by the gateway (upstream "
                                 "included)", ["method"], registry=self.registry,
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))


class AuditGateway:
    def __init__(self, listen: str, upstream: str, audit: AuditLog | None = None, grace_s: float = 30.0):
        self.listen, self.upstream, self.grace_s = listen, upstream, grace_s
        self.audit = audit or AuditLog()
        self.metrics = Metrics()
        self.channel: aio.Channel | None = None
        self.server: aio.Server | None = None

    async def start(self) -> int:
        self.channel = aio.insecure_channel(self.upstream, options=CHANNEL_OPTIONS)
        self.server = aio.server(options=CHANNEL_OPTIONS)
        self.server.add_generic_rpc_handlers((_Router(self),))
        port = self.server.add_insecure_port(self.listen)
        if not port:
            raise OSError(f"cannot listen on {self.listen}")
        await self.server.start()
        return port

    async def stop(self) -> None:
        if self.server:
            await self.server.stop(self.grace_s)  # in-flight calls finish (Triton drains its own too)
        if self.channel:
            await self.channel.close()

    async def _record(self, raw: bytes, status: grpc.StatusCode, message: str, started: float) -> None:
        summary = request_summary(raw)
        if not needs_row(message, summary):
            return
        code, message = classify_failure(message, status.name)
        row = {"request_id": summary.pop("request_id"), "stage": "gateway", **summary,
               "grpc_status": status.name, "error": {"code": code, "message": message},
               "latency_ms": {"total": round((time.perf_counter() - started) * 1e3, 3)}}
        self.metrics.audited.labels(code=code).inc()
        try:  # flock + fsync: off the event loop, and before the caller hears the answer
            await asyncio.to_thread(self.audit.write, row)
        except OSError as e:
            print(f"gateway: audit write failed: {e}", file=sys.stderr, flush=True)

    def unary(self, method: str):
        call = self.channel.unary_unary(method)  # no (de)serialisers: bytes in, bytes out
        name = method.rsplit("/", 1)[1]
        audited = method == INFER

        async def handler(request: bytes, context) -> bytes:
            started = time.perf_counter()
            try:
                response = await call(request, metadata=_metadata(context), timeout=context.time_remaining())
                status = grpc.StatusCode.OK
            except aio.AioRpcError as e:
                status = e.code()
                if audited:
                    await self._record(request, status, e.details() or "", started)
                self._observe(name, status, started)
                await context.abort(status, e.details() or "")
            self._observe(name, status, started)
            return response

        return grpc.unary_unary_rpc_method_handler(handler)

    def stream(self, method: str):
        call = self.channel.stream_stream(method)

        async def handler(requests, context):
            started = time.perf_counter()
            pending: dict[str, list[tuple[bytes, float]]] = {}  # request id -> requests waiting for an answer

            async def forward():
                async for raw in requests:
                    try:
                        rid = service_pb2.ModelInferRequest.FromString(raw).id
                    except Exception:  # noqa: BLE001 - Triton answers it; the row keeps the body's hash
                        rid = ""
                    pending.setdefault(rid, []).append((raw, time.perf_counter()))
                    yield raw

            upstream = call(forward(), metadata=_metadata(context), timeout=context.time_remaining())
            try:
                async for raw in upstream:
                    resp = service_pb2.ModelStreamInferResponse.FromString(raw)
                    waiting = pending.get(resp.infer_response.id) or next((v for v in pending.values() if v), [])
                    if waiting:
                        request, t0 = waiting.pop(0)
                        if resp.error_message:  # a stream answers errors in-band, without a status
                            status = (grpc.StatusCode.NOT_FOUND if "not found" in resp.error_message
                                      else grpc.StatusCode.INVALID_ARGUMENT)
                            await self._record(request, status, resp.error_message, t0)
                    yield raw
            except aio.AioRpcError as e:
                for waiting in pending.values():  # the stream broke: everything unanswered is audited
                    for request, t0 in waiting:
                        await self._record(request, e.code(), e.details() or "", t0)
                self._observe("ModelStreamInfer", e.code(), started)
                await context.abort(e.code(), e.details() or "")
            self._observe("ModelStreamInfer", grpc.StatusCode.OK, started)

        return grpc.stream_stream_rpc_method_handler(handler)

    def _observe(self, method: str, status: grpc.StatusCode, started: float) -> None:
        self.metrics.calls.labels(method=method, status=status.name).inc()
        self.metrics.seconds.labels(method=method).observe(time.perf_counter() - started)


class _Router(grpc.GenericRpcHandler):
    """Every method of Triton's GRPCInferenceService, built once; anything else is UNIMPLEMENTED."""

    def __init__(self, gateway: AuditGateway):
        methods = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods
        self.handlers = {}
        for m in methods:
            path = f"/{SERVICE}/{m.name}"
            self.handlers[path] = gateway.stream(path) if m.client_streaming else gateway.unary(path)

    def service(self, handler_call_details):
        return self.handlers.get(handler_call_details.method)


async def serve(listen: str, upstream: str, metrics: str | None) -> None:
    gateway = AuditGateway(listen, upstream)
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
    await stop.wait()
    await gateway.stop()


def main(argv: list[str] | None = None) -> int:
    bind = os.environ.get("BIND_ADDRESS", "127.0.0.1")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--listen", default=f"{bind}:{os.environ.get('GRPC_PORT', '8001')}")
    ap.add_argument("--upstream", default=f"127.0.0.1:{os.environ.get('TRITON_GRPC_PORT', '8011')}")
    ap.add_argument("--metrics", default=f"127.0.0.1:{os.environ.get('GATEWAY_METRICS_PORT', '8003')}",
                    help="host:port for the gateway's Prometheus metrics; empty to disable")
    args = ap.parse_args(argv)
    asyncio.run(serve(args.listen, args.upstream, args.metrics or None))
    return 0
