"""The HTTP routes of the OpenAI-compatible front end (aiohttp): POST /v1/moderations, GET /health. Every failure
is answered in OpenAI's error shape; nothing a caller sends is echoed into logs."""
from __future__ import annotations

import json

from aiohttp import web
from pydantic import ValidationError

from ..core.limits import MAX_IMAGE_BYTES, MAX_OPTIONS_BYTES, MAX_TEXT_BYTES
from .protocol import ModerationRequest, OpenAIError
from .serving import ModerationService

# One post's worth of JSON: the image base64-encoded (4/3) plus its caption and framing.
MAX_BODY_BYTES = MAX_IMAGE_BYTES * 4 // 3 + MAX_TEXT_BYTES * 6 + MAX_OPTIONS_BYTES + 64 * 1024
SERVICE_KEY = web.AppKey("service", ModerationService)


def _error(err: OpenAIError) -> web.Response:
    return web.json_response(err.body(), status=err.status)


async def moderations(request: web.Request) -> web.Response:
    try:
        try:
            body = await request.json(loads=json.loads)
        except web.HTTPRequestEntityTooLarge as e:
            raise OpenAIError(413, f"the request body is over {MAX_BODY_BYTES} bytes", "request_too_large") from e
        except (ValueError, UnicodeDecodeError) as e:
            raise OpenAIError(400, "the request body is not JSON", "invalid_json") from e
        try:
            req = ModerationRequest.model_validate(body)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(x) for x in first.get("loc", ()))
            raise OpenAIError(400, f"invalid request: {where}: {first.get('msg')}", "invalid_request",
                              param=where.split(".")[0] or None) from e
        service = request.app[SERVICE_KEY]
        return web.json_response(await service.moderate(req, request.remote or "unknown"))
    except OpenAIError as e:
        return _error(e)


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def build_app(service: ModerationService) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app[SERVICE_KEY] = service
    app.router.add_post("/v1/moderations", moderations)
    app.router.add_get("/health", health)

    async def close(app_):
        await service.close()

    app.on_cleanup.append(close)
    return app
