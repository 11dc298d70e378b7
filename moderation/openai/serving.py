"""/v1/moderations served by this service: each OpenAI input becomes one post (an image and its caption) sent to
`moderate` over gRPC through the audit gateway, so every call is audited like any other; RESULT is reported in
OpenAI's shape with the policy's category mapping (policy `openai.categories`).

Images come inline as `data:` URLs. A remote http(s) URL is fetched only from a host on the operator's allow-list
(MODERATION_OPENAI_IMAGE_HOSTS, exact host names; no redirects, the image byte limit, a short timeout); by default
none is, so the service never fetches a URL a caller names (SSRF)."""
from __future__ import annotations

import asyncio
import base64
import binascii
import json
import os
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from tritonclient.grpc import aio as grpcaio
from tritonclient.utils import InferenceServerException

from ..core.caller import CLIENT_METADATA, client_key, client_value
from ..core.errors import ModerationError, classify_failure
from ..core.hashing import sha256_hex
from ..core.limits import MAX_IMAGE_BYTES
from ..core.policy import OPENAI_CATEGORIES, Policy, load_policy
from ..core.result_contract import FailedResult, JudgedResult, ResultError, parse_result
from .protocol import (
    FailedExtension,
    ImagePart,
    JudgedExtension,
    ModerationRequest,
    ModerationResponse,
    ModerationResult,
    OpenAIError,
    TextPart,
)

DEFAULT_MODEL = "omni-moderation-latest"
# What each of our codes is in HTTP and OpenAI's error types: the openai client retries 429 and 5xx itself.
_HTTP = {"overloaded": (429, "rate_limit_error"), "unavailable": (503, "server_error"),
         "model_unavailable": (503, "server_error"), "audit_unavailable": (503, "server_error"),
         "deadline_exceeded": (504, "server_error"), "internal": (500, "server_error"),
         "image_too_large": (413, "invalid_request_error"), "request_too_large": (413, "invalid_request_error")}


def image_hosts() -> frozenset[str]:
    return frozenset(h.strip().lower() for h in os.environ.get("MODERATION_OPENAI_IMAGE_HOSTS", "").split(",")
                     if h.strip())


def decode_data_url(url: str) -> bytes:
    head, sep, data = url.partition(",")
    if not sep or not head.startswith("data:") or ";base64" not in head:
        raise OpenAIError(400, "image_url must be a data: URL with base64 content (data:image/png;base64,...)",
                          "invalid_image_url", param="input")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise OpenAIError(400, f"image_url's base64 content does not decode: {e}", "invalid_image_url",
                          param="input") from e
    if len(raw) > MAX_IMAGE_BYTES:
        raise OpenAIError(413, f"the image is {len(raw)} bytes; the limit is {MAX_IMAGE_BYTES}", "image_too_large",
                          param="input")
    return raw


class ImageFetcher:
    """Remote images, only from allow-listed hosts."""

    def __init__(self, hosts: frozenset[str] | None = None, timeout_s: float = 10.0):
        self.hosts = image_hosts() if hosts is None else hosts
        self.timeout_s = timeout_s

    async def __call__(self, url: str) -> bytes:
        if url.startswith("data:"):
            return decode_data_url(url)
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise OpenAIError(400, f"image_url scheme {parts.scheme!r} is not supported; send a data: URL",
                              "invalid_image_url", param="input")
        if (parts.hostname or "").lower() not in self.hosts:
            raise OpenAIError(400, "remote image URLs are not fetched by this service (no server-side fetch of a URL "
                              "a caller names); send the image inline as a data: URL, or ask the operator to "
                              "allow-list the host (MODERATION_OPENAI_IMAGE_HOSTS)", "image_url_not_allowed",
                              param="input")
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as session, \
                session.get(url, allow_redirects=False) as resp:
            if resp.status != 200:
                raise OpenAIError(400, f"fetching the image answered HTTP {resp.status}", "image_fetch_failed",
                                  param="input")
            body = bytearray()
            async for chunk in resp.content.iter_chunked(1 << 16):  # to the end, never past the limit
                body += chunk
                if len(body) > MAX_IMAGE_BYTES:
                    break
        if len(body) > MAX_IMAGE_BYTES:
            raise OpenAIError(413, f"the image is over {MAX_IMAGE_BYTES} bytes", "image_too_large", param="input")
        return bytes(body)


MAX_INPUTS = 32


def posts_of(request: ModerationRequest) -> list[list[TextPart | ImagePart]]:
    """One post per result, as OpenAI counts them: a string, each string of a list, or one list of parts (its
    text parts are the caption, its image_url parts the post's images)."""
    if isinstance(request.input, str):
        return [[TextPart(type="text", text=request.input)]]
    if not request.input:
        raise OpenAIError(400, "input is empty", "invalid_request", param="input")
    if isinstance(request.input[0], str):
        if len(request.input) > MAX_INPUTS:
            raise OpenAIError(400, f"{len(request.input)} inputs; at most {MAX_INPUTS} per request", "too_many_inputs",
                              param="input")
        return [[TextPart(type="text", text=t)] for t in request.input]
    return [list(request.input)]  # its image_url parts are the post's images, in order (media.max_images bounds them)


def openai_result(policy: Policy, result: JudgedResult, input_types: list[str]) -> ModerationResult:
    """RESULT in OpenAI's shape: categories from the policy's mapping, every OpenAI category present."""
    mapping = policy.openai.categories
    categories, category_scores, applied = {}, {}, {}
    for c in OPENAI_CATEGORIES:
        labels = mapping.get(c, [])
        category_scores[c] = round(max((float(result.scores.get(lab, 0.0)) for lab in labels), default=0.0), 6)
        categories[c] = any(result.severity.get(lab, 0) >= 1 for lab in labels)
        applied[c] = list(input_types) if labels else []
    extension = JudgedExtension.of(result, [c for c in OPENAI_CATEGORIES if c not in mapping])
    return ModerationResult(flagged=result.action != "allow", categories=categories,
                            category_scores=category_scores, category_applied_input_types=applied,
                            moderation=extension)


def failed_result(err: OpenAIError) -> ModerationResult:
    """A post that could not be judged, in a request of several: flagged (hold it; nothing cleared it), no
    category, and the error under the extension key. The other posts' results stand."""
    return ModerationResult(flagged=True, categories=dict.fromkeys(OPENAI_CATEGORIES, False),
                            category_scores=dict.fromkeys(OPENAI_CATEGORIES, 0.0),
                            category_applied_input_types={c: [] for c in OPENAI_CATEGORIES},
                            moderation=FailedExtension(error=ResultError(code=err.code, message=err.message)))


class ModerationService:
    """Calls `moderate` through the gateway. Each HTTP caller (its address) is a client of its own for the gateway's
    fair shares: the call names it in `moderation-client`, signed with the gateway's client key when one is
    configured (gateway/identity.py); one gRPC connection per caller address (bounded)."""

    max_channels = 64

    def __init__(self, gateway_url: str, fetcher: ImageFetcher | None = None, timeout_s: float = 60.0):
        self.gateway_url, self.timeout_s = gateway_url, timeout_s
        self.fetch = fetcher or ImageFetcher()
        self._clients: OrderedDict[str, grpcaio.InferenceServerClient] = OrderedDict()
        self.client_key = client_key()

    def _client(self, peer: str) -> grpcaio.InferenceServerClient:
        client = self._clients.pop(peer, None)
        if client is None:
            client = grpcaio.InferenceServerClient(self.gateway_url, channel_args=[("moderation.http_peer", peer)])
            if len(self._clients) >= self.max_channels:
                _, old = self._clients.popitem(last=False)
                asyncio.get_running_loop().create_task(old.close())
        self._clients[peer] = client
        return client

    async def close(self) -> None:
        for c in self._clients.values():
            await c.close()
        self._clients.clear()

    def policy_for(self, model: str) -> str:
        if model in (DEFAULT_MODEL, "omni-moderation-latest", "text-moderation-latest", "default"):
            return "default"
        try:
            load_policy(model)
        except ModerationError as e:  # unknown, or not a plain policy name
            raise OpenAIError(404, f"the model {model!r} does not exist here: use {DEFAULT_MODEL} (the default "
                              "policy) or a policy name", "model_not_found", param="model") from e
        return model

    async def moderate(self, request: ModerationRequest, peer: str, rid: str | None = None,
                       audit: Callable[[dict], Awaitable[None]] | None = None) -> dict:
        """The response body. One post: its failure is the request's (raised). Several: each failure costs only its
        own result, and a failure the front end found itself (not audited upstream) gets its own audit row."""
        policy_name = self.policy_for(request.model)
        policy = load_policy(policy_name)
        posts = posts_of(request)
        rid = rid or f"modr-{uuid.uuid4().hex}"
        rids = [f"{rid}-{i}" if len(posts) > 1 else rid for i in range(len(posts))]
        results = await asyncio.gather(*(self._post(peer, parts, post_rid, policy_name)
                                         for parts, post_rid in zip(posts, rids, strict=True)),
                                       return_exceptions=True)
        if len(posts) == 1 and isinstance(results[0], BaseException):
            raise results[0]
        rows, answers = [], []
        for i, r in enumerate(results):
            if isinstance(r, BaseException):
                if not isinstance(r, OpenAIError):
                    r = OpenAIError(500, f"internal error ({type(r).__name__})", "internal", "server_error")
                if not r.audited and audit is not None:
                    rows.append(audit({"request_id": rids[i], "stage": "openai", "http_status": r.status,
                                       "error": {"code": r.code, "message": r.message[:512]}, **r.inputs}))
                answers.append(failed_result(r))
            else:
                answers.append(openai_result(policy, *r))
        if rows:
            await asyncio.gather(*rows)
        body = ModerationResponse(id=rid, model=request.model, results=answers)
        return body.model_dump(mode="json")

    async def _post(self, peer: str, parts: list[TextPart | ImagePart], rid: str,
                    policy: str) -> tuple[JudgedResult, list[str]]:
        image_parts = [p for p in parts if isinstance(p, ImagePart)]
        text = "\n".join(p.text for p in parts if isinstance(p, TextPart))
        try:
            text_bytes = text.encode("utf-8")
        except UnicodeEncodeError as e:
            err = OpenAIError(400, f"the text holds a lone surrogate at character {e.start} (not Unicode text)",
                              "invalid_unicode", param="input")
            err.inputs = {"text_sha256": sha256_hex(text.encode("utf-8", "surrogatepass"))}
            raise err from e
        del text
        options: dict[str, Any] = {"request_id": rid, "policy": policy}
        images = []
        if not image_parts:  # text only: judged by its text signals alone (OPTIONS text_only)
            images, options["text_only"] = [b""], True
        for part in image_parts:
            try:
                images.append(await self.fetch(part.image_url.url))
            except OpenAIError as e:
                e.inputs = {"text_sha256": sha256_hex(text_bytes)}
                raise
            part.image_url.url = ""  # the base64 text is not needed again: free it now
        types = (["image"] if image_parts else []) + (["text"] if text_bytes else [])
        inputs = self._inputs(images, text_bytes, options)
        del images  # the request message holds the only copy from here
        return await self._infer(peer, inputs), types

    @staticmethod
    def _inputs(images: list[bytes], text: bytes, options: dict) -> list:
        """One post: IMAGE [1, N] (its images), TEXT and OPTIONS [1, 1]."""
        inputs = []
        for name, value in (("IMAGE", images), ("TEXT", [text]), ("OPTIONS", [json.dumps(options).encode()])):
            t = grpcaio.InferInput(name, [1, len(value)], "BYTES")
            t.set_data_from_numpy(np.array([value], dtype=np.object_))
            inputs.append(t)
        return inputs

    async def _infer(self, peer: str, inputs: list) -> JudgedResult:
        try:
            response = await self._client(peer).infer("moderate", inputs,
                                                      outputs=[grpcaio.InferRequestedOutput("RESULT")],
                                                      headers={CLIENT_METADATA: client_value(f"http:{peer}",
                                                                                             self.client_key)},
                                                      client_timeout=self.timeout_s)
        except InferenceServerException as e:
            code, message = classify_failure(e.message() or "", e.status() or "")
            status, type_ = _HTTP.get(code, (400, "invalid_request_error"))
            # the gateway or a model wrote this call's audit row
            raise OpenAIError(status, f"[{code}] {message}", code, type_, audited=True,
                              retry_after=1 if status in (429, 503) else None) from e
        result = parse_result(response.as_numpy("RESULT").reshape(-1)[0])
        if isinstance(result, FailedResult):  # a request of one post fails with it; postprocess audited it
            code = result.error.code
            status, type_ = _HTTP.get(code, (400, "invalid_request_error"))
            raise OpenAIError(status, f"[{code}] {result.error.message}", code, type_, audited=True)
        return result
