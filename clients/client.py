"""Python client for the moderation service over gRPC (sync and asyncio), returning schema-validated
RESULT dicts. Per-request deadlines; idempotent retries with backoff when the server is UNAVAILABLE."""
from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
from tritonclient.utils import InferenceServerException

from moderation.core.caller import CLIENT_METADATA
from moderation.core.errors import classify_failure
from moderation.core.result import validate_result

DEFAULT_URL = "127.0.0.1:8001"
RETRYABLE = ("StatusCode.UNAVAILABLE",)


class ModerationFailed(Exception):
    """The service answered with an error (bad input, overload, ...) or could not be reached."""

    def __init__(self, code: str, message: str, status: str | None = None):
        super().__init__(f"[{code}] {message}")
        self.code, self.message, self.status = code, message, status


Image = bytes | str | Path  # an image's bytes or the path of its file


def _image_bytes(image: Image | list[Image] | tuple[Image, ...]) -> bytes | list[bytes]:
    """One image's bytes, or a post's images' bytes (a list or tuple of images)."""
    if isinstance(image, (list, tuple)):
        return [_image_bytes(x) for x in image]
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    return Path(image).read_bytes()


def build_batch_inputs(module, posts: list[tuple[bytes | list[bytes], str | bytes, dict | None]]):
    """Tensors of one request carrying every post (one row each); OPTIONS is sent when any post has options. IMAGE is
    [posts, N] with N the most images any post has: a post of fewer pads its row with empty elements."""
    images = [p[0] if isinstance(p[0], list) else [p[0]] for p in posts]
    width = max(1, max(len(x) for x in images))
    rows = {"IMAGE": [x + [b""] * (width - len(x)) for x in images],
            "TEXT": [[p[1].encode("utf-8") if isinstance(p[1], str) else p[1]] for p in posts]}
    if any(p[2] for p in posts):
        rows["OPTIONS"] = [[json.dumps(p[2] or {}, ensure_ascii=False).encode("utf-8")] for p in posts]
    inputs = []
    for name, values in rows.items():
        t = module.InferInput(name, [len(values), len(values[0])], "BYTES")
        t.set_data_from_numpy(np.array(values, dtype=np.object_))
        inputs.append(t)
    outputs = [module.InferRequestedOutput(n) for n in ("RESULT", "VERDICT", "SCORES", "EMBEDDING")]
    return inputs, outputs


def build_inputs(module, image: bytes, text: str | bytes, options: dict | None):
    return build_batch_inputs(module, [(image, text, options)])


def _options(describe=False, request_id=None, policy=None, lang=None, return_embedding=False, forget=False,
             escalate=False) -> dict:
    opts = {"describe": bool(describe)}
    if forget:  # privacy: the verdict cache keeps nothing from this post and drops what it matches
        opts["forget"] = True
    if escalate:  # to the VLM whatever the gate decides (reported posts, appeals, spot checks)
        opts["escalate"] = True
    if request_id:
        opts["request_id"] = request_id
    if policy:
        opts["policy"] = policy
    if lang:
        opts["lang"] = lang
    if return_embedding:
        opts["return_embedding"] = True
    return opts


def parse_results(resp) -> list[dict]:
    """Every RESULT row of a response, schema-validated, with its EMBEDDING when it has one."""
    results = [json.loads(r) for r in resp.as_numpy("RESULT").reshape(-1)]
    emb = resp.as_numpy("EMBEDDING")
    for i, result in enumerate(results):
        validate_result(result)
        if emb is not None and emb.size and result["error"] is None and result.get("action") is not None:
            row = emb.reshape(len(results), -1)[i]
            if np.any(row):
                result["embedding"] = row.tolist()
    return results


def parse_response(resp) -> dict:
    return parse_results(resp)[0]


def _to_failure(e: InferenceServerException) -> ModerationFailed:
    """Coded failure from a server or transport error (codes: docs/errors.md; core.errors.classify_failure)."""
    status = e.status() or ""
    code, message = classify_failure(e.message() or str(e), status)
    return ModerationFailed(code, message, status or None)


def _retryable(e: InferenceServerException) -> bool:
    """Idempotent retries: the server was unreachable or shed load (UNAVAILABLE), or a model's stub process had
    died and is being reloaded (Triton answers INTERNAL "... is not healthy" until then)."""
    return (e.status() or "") in RETRYABLE or _to_failure(e).code == "model_unavailable"


class _Attempts:
    """One call's retry schedule: a deadline for the call, retries included; exponential backoff with jitter."""

    def __init__(self, timeout_s: float, retries: int, backoff_s: float):
        self.deadline, self.retries, self.backoff_s, self.attempt = time.monotonic() + timeout_s, retries, backoff_s, 0

    def remaining(self) -> float:
        return max(0.001, self.deadline - time.monotonic())

    def pause_after(self, e: InferenceServerException) -> float:
        """Seconds to wait before the next try; raises the coded failure when not retryable, out of tries, or
        when the pause would pass the deadline."""
        pause = self.backoff_s * (2 ** self.attempt) * (1 + random.random())
        if self.attempt >= self.retries or not _retryable(e) or time.monotonic() + pause >= self.deadline:
            raise _to_failure(e) from None
        self.attempt += 1
        return pause


def _posts_inputs(module, posts) -> tuple:
    return build_batch_inputs(module, [(_image_bytes(img), text, opts) for img, text, opts in posts])


def _single(results: list[dict]) -> dict:
    """A one-post request's RESULT (the server fails a bad single post as a whole, so it always has an action)."""
    r = results[0]
    if r["error"] is not None:
        raise ModerationFailed(r["error"]["code"], r["error"]["message"])
    return r


class _ClientBase:
    def __init__(self, url: str, model: str, timeout_s: float, retries: int, backoff_s: float,
                 client_id: str | None = None):
        self.url, self.model, self.timeout_s, self.retries, self.backoff_s = url, model, timeout_s, retries, backoff_s
        self.headers = {CLIENT_METADATA: client_id or f"lib-{uuid.uuid4().hex[:16]}"}

    def _attempts(self) -> _Attempts:
        return _Attempts(self.timeout_s, self.retries, self.backoff_s)


class ModerationClient(_ClientBase):
    """`client_id`: who this client is for the gateway's fair shares (`moderation-client` metadata; a signed token
    from `clients.admin client-token` where the gateway has a client key); default, a random id per client object.
    Without a valid id the gateway counts every caller of one host as one client. `channel_args`: gRPC channel
    arguments."""

    def __init__(self, url: str = DEFAULT_URL, model: str = "moderate", timeout_s: float = 30.0,
                 retries: int = 3, backoff_s: float = 0.2, channel_args: list[tuple[str, object]] | None = None,
                 client_id: str | None = None):
        super().__init__(url, model, timeout_s, retries, backoff_s, client_id)
        self.client = grpcclient.InferenceServerClient(url=url, channel_args=channel_args)

    def moderate(self, image: Image | list[Image], text: str | bytes, **options) -> dict:
        """One post's RESULT; raises ModerationFailed with the code. `image`: one image, or a list of the post's
        images (judged together: RESULT names the image of each piece of evidence). Options: describe, request_id,
        policy, lang, return_embedding, forget, escalate."""
        return _single(self.moderate_batch([(image, text, _options(**options))]))

    def moderate_batch(self, posts: list[tuple[Image | list[Image], str | bytes, dict | None]]) -> list[dict]:
        """One request carrying several posts (image, text, OPTIONS dict): one RESULT per post, in order. A bad
        post's row has `error` and no action; ModerationFailed only when the request fails as a whole."""
        inputs, outputs = _posts_inputs(grpcclient, posts)
        attempts = self._attempts()
        while True:
            try:
                return parse_results(self.client.infer(self.model, inputs, outputs=outputs, headers=self.headers,
                                                       client_timeout=attempts.remaining()))
            except InferenceServerException as e:
                time.sleep(attempts.pause_after(e))

    def close(self) -> None:
        self.client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AsyncModerationClient(_ClientBase):
    def __init__(self, url: str = DEFAULT_URL, model: str = "moderate", timeout_s: float = 30.0,
                 retries: int = 3, backoff_s: float = 0.2, channel_args: list[tuple[str, object]] | None = None,
                 client_id: str | None = None):
        super().__init__(url, model, timeout_s, retries, backoff_s, client_id)
        self.client = grpcaio.InferenceServerClient(url=url, channel_args=channel_args)

    async def moderate(self, image: Image | list[Image], text: str | bytes, **options) -> dict:
        return _single(await self.moderate_batch([(image, text, _options(**options))]))

    async def moderate_batch(self, posts: list[tuple[Image | list[Image], str | bytes, dict | None]]) -> list[dict]:
        inputs, outputs = _posts_inputs(grpcaio, posts)
        attempts = self._attempts()
        while True:
            try:
                return parse_results(await self.client.infer(self.model, inputs, outputs=outputs,
                                                             headers=self.headers,
                                                             client_timeout=attempts.remaining()))
            except InferenceServerException as e:
                await asyncio.sleep(attempts.pause_after(e))

    async def close(self) -> None:
        await self.client.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()
