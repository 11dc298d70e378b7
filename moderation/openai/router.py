"""The HTTP routes of the OpenAI-compatible front end (aiohttp): POST /v1/moderations, GET /health. Every failure
is answered in OpenAI's error shape; nothing a caller sends is echoed into logs.

Bounded before it reads (bounds.py): a declared length over the per-request limit is refused with 413, and a
request past the requests or bytes in flight with 429 + Retry-After, from the headers alone, with the connection
closed after the answer; a body that has not arrived within MODERATION_OPENAI_BODY_TIMEOUT_S is answered 408. The
body is read into one buffer and parsed once (nesting deeper than MAX_JSON_DEPTH refused), then dropped. Every
refusal the front end answers itself gets one audit row (`stage: "openai"`); a call the gateway or a model
refused was audited there."""
from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from pydantic import ValidationError

from ..core import memory
from ..core.audit import AuditLog
from .bounds import MAX_BODY_BYTES, MAX_JSON_DEPTH, RETRY_AFTER_S, Busy, FrontEndLimits, InFlight, Reservation
from .protocol import ModerationRequest, OpenAIError
from .serving import ModerationService

__all__ = ["MAX_BODY_BYTES", "build_app"]

SERVICE_KEY = web.AppKey("service", ModerationService)
class FrontEnd:
    """The front end's shared state: its bounds, what is in flight, its audit log."""

    def __init__(self, limits: FrontEndLimits, audit: AuditLog | None):
        self.limits, self.audit = limits, audit
        self.in_flight = InFlight(limits)

    async def write(self, row: dict) -> None:
        if self.audit is None:
            return
        try:  # shielded: a caller that hangs up still leaves its row
            await asyncio.shield(asyncio.to_thread(self.audit.write, row))
        except Exception as e:  # noqa: BLE001 - the refusal stands whether or not its row could be written
            print(f"openai: audit write failed: {type(e).__name__}", file=sys.stderr, flush=True)

    async def trim_memory(self, app_) -> AsyncIterator[None]:
        """Freed body buffers go back to the OS, during a burst and after it."""
        task = asyncio.create_task(memory.trim_periodically(lambda: self.in_flight.requests == 0))
        yield
        task.cancel()


FRONT_KEY = web.AppKey("front", FrontEnd)


def _error(err: OpenAIError, rid: str, close: bool) -> web.Response:
    headers = {"x-request-id": rid}
    if err.retry_after is not None:
        headers["Retry-After"] = str(err.retry_after)
    resp = web.json_response(err.body(), status=err.status, headers=headers)
    if close:  # the body was not read: the connection ends after this answer (unread bytes are discarded)
        resp.force_close()
    return resp


async def read_body(request: web.Request, reservation: Reservation, limits: FrontEndLimits) -> bytearray:
    """The whole body in one buffer, within the body timeout; a chunked body reserves its bytes as they come."""
    declared = request.content_length
    buf = bytearray(declared) if declared else bytearray()
    got = 0
    try:
        async with asyncio.timeout(limits.body_timeout_s):
            while chunk := await request.content.readany():
                n = len(chunk)
                if declared is None:
                    if got + n > limits.max_body_bytes:
                        raise OpenAIError(413, f"the request body is over {limits.max_body_bytes} bytes",
                                          "request_too_large")
                    try:
                        reservation.grow(n)
                    except Busy as e:
                        raise OpenAIError(429, f"{e}; retry after {RETRY_AFTER_S} s", "overloaded",
                                          "rate_limit_error", retry_after=RETRY_AFTER_S) from e
                    buf += chunk
                else:
                    buf[got:got + n] = chunk
                got += n
    except TimeoutError as e:
        raise OpenAIError(408, f"the request body did not arrive within {limits.body_timeout_s:g} s "
                          f"({got} bytes came)", "request_timeout") from e
    except (aiohttp.ClientError, ConnectionError) as e:
        raise OpenAIError(400, f"the request body ended early ({got} bytes came)", "incomplete_body") from e
    if declared is not None and got != declared:
        raise OpenAIError(400, f"the request body ended early ({got} of {declared} bytes)", "incomplete_body")
    return buf


def too_deep(value, limit: int = MAX_JSON_DEPTH) -> bool:
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if depth > limit:
            return True
        children = v.values() if isinstance(v, dict) else v
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return False


def parse_body(body: bytearray):
    """The JSON value of the body, which is emptied once decoded."""
    try:
        text = body.decode("utf-8")  # strict: UTF-8-encoded surrogates are not UTF-8
    except UnicodeDecodeError as e:
        raise OpenAIError(400, f"the request body is not UTF-8 (byte {e.start})", "invalid_json") from e
    body.clear()  # the text is the one copy from here: the parse holds two at most, never three
    try:
        value = json.loads(text)
    except RecursionError as e:
        raise OpenAIError(400, f"the request body nests deeper than {MAX_JSON_DEPTH} levels", "json_too_deep") from e
    except ValueError as e:
        raise OpenAIError(400, "the request body is not JSON", "invalid_json") from e
    if too_deep(value) if isinstance(value, (dict, list)) else False:
        raise OpenAIError(400, f"the request body nests deeper than {MAX_JSON_DEPTH} levels", "json_too_deep")
    return value


def validate(value) -> ModerationRequest:
    try:
        req = ModerationRequest.model_validate(value)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first.get("loc", ()))
        raise OpenAIError(400, f"invalid request: {where}: {first.get('msg')}", "invalid_request",
                          param=where.split(".")[0] or None) from e
    try:
        req.model.encode("utf-8")
    except UnicodeEncodeError as e:
        raise OpenAIError(400, "model holds a lone surrogate (not Unicode text)", "invalid_unicode",
                          param="model") from e
    return req


async def moderations(request: web.Request) -> web.Response:
    front: FrontEnd = request.app[FRONT_KEY]
    limits = front.limits
    rid = f"modr-{uuid.uuid4().hex}"
    started = time.perf_counter()
    declared = request.content_length
    reservation, body_read = None, False
    try:
        try:
            if declared is not None and declared > limits.max_body_bytes:
                raise OpenAIError(413, f"the request body is {declared} bytes; the limit is "
                                  f"{limits.max_body_bytes}", "request_too_large")
            try:
                reservation = front.in_flight.admit(declared)
            except Busy as e:
                raise OpenAIError(429, f"{e}; retry after {RETRY_AFTER_S} s", "overloaded", "rate_limit_error",
                                  retry_after=RETRY_AFTER_S) from e
            body = await read_body(request, reservation, limits)
            body_read = True
            value = parse_body(body)
            del body
            req = validate(value)
            del value
            service = request.app[SERVICE_KEY]
            result = await service.moderate(req, request.remote or "unknown", rid, audit=front.write)
            return web.json_response(result, headers={"x-request-id": rid})
        except OpenAIError:
            raise
        except Exception as e:  # anything else is this service's fault: 500, in OpenAI's shape
            print(f"openai: {rid}: {type(e).__name__}", file=sys.stderr, flush=True)
            raise OpenAIError(500, f"internal error ({type(e).__name__}); the request id is {rid}", "internal",
                              "server_error") from e
    except OpenAIError as e:
        if not e.audited:
            await front.write(refusal_row(rid, e, request, declared, started))
        return _error(e, rid, close=not body_read)
    finally:
        if reservation is not None:
            reservation.release()


def refusal_row(rid: str, err: OpenAIError, request: web.Request, declared: int | None, started: float) -> dict:
    return {"request_id": rid, "stage": "openai", "http_status": err.status,
            "error": {"code": err.code, "message": err.message[:512]}, "content_length": declared,
            "peer": (request.remote or "unknown")[:200], **err.inputs,
            "latency_ms": {"total": round((time.perf_counter() - started) * 1e3, 3)}}


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def expect_continue(request: web.Request) -> None:
    """`Expect: 100-continue`: invite the body only if the headers would be admitted; otherwise the handler
    answers the refusal and the client never sends it."""
    front: FrontEnd = request.app[FRONT_KEY]
    declared, flight = request.content_length, front.in_flight
    if request.version == aiohttp.HttpVersion11 and request.headers.get("Expect", "").lower() == "100-continue" \
            and (declared is None or declared <= front.limits.max_body_bytes) \
            and flight.requests < front.limits.max_requests \
            and flight.bytes + (declared or 0) <= front.limits.max_bytes:
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the answer proper has not started


def build_app(service: ModerationService, limits: FrontEndLimits | None = None,
              audit: AuditLog | None = None) -> web.Application:
    limits = limits or FrontEndLimits.from_env()
    # the handler reads the body itself (read_body), within the limits above
    app = web.Application(client_max_size=limits.max_body_bytes)
    app[SERVICE_KEY] = service
    app[FRONT_KEY] = front = FrontEnd(limits, audit)
    app.cleanup_ctx.append(front.trim_memory)
    app.router.add_post("/v1/moderations", moderations, expect_handler=expect_continue)
    app.router.add_get("/health", health)

    async def close(app_):
        await service.close()

    app.on_cleanup.append(close)
    return app
