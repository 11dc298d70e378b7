"""Python client for the moderation service over gRPC (sync and asyncio), returning schema-validated
RESULT dicts. Per-request deadlines; idempotent retries with backoff when the server is UNAVAILABLE."""
from __future__ import annotations

import asyncio
import json
import random
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
from tritonclient.utils import InferenceServerException

from moderation.core.errors import classify_failure
from moderation.core.result import validate_result

DEFAULT_URL = "127.0.0.1:8001"
RETRYABLE = ("StatusCode.UNAVAILABLE",)


class ModerationFailed(Exception):
    """The service answered with an error (bad input, overload, ...) or could not be reached."""

    def __init__(self, code: str, message: str, status: str | None = None):
        super().__init__(f"[{code}] {message}")
        self.code, self.message, self.status = code, message, status


def _image_bytes(image: bytes | str | Path) -> bytes:
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    return Path(image).read_bytes()


def build_inputs(module, image: bytes, text: str | bytes, options: dict | None):
    text_b = text.encode("utf-8") if isinstance(text, str) else text
    tensors = [("IMAGE", image), ("TEXT", text_b)]
    if options:
        tensors.append(("OPTIONS", json.dumps(options, ensure_ascii=False).encode("utf-8")))
    inputs = []
    for name, value in tensors:
        t = module.InferInput(name, [1, 1], "BYTES")
        t.set_data_from_numpy(np.array([[value]], dtype=np.object_))
        inputs.append(t)
    outputs = [module.InferRequestedOutput(n) for n in ("RESULT", "VERDICT", "SCORES", "EMBEDDING")]
    return inputs, outputs


def _options(describe, request_id, policy, lang, return_embedding, forget=False) -> dict:
    opts = {"describe": bool(describe)}
    if forget:  # privacy: the verdict cache keeps nothing from this post and drops what it matches
        opts["forget"] = True
    if request_id:
        opts["request_id"] = request_id
    if policy:
        opts["policy"] = policy
    if lang:
        opts["lang"] = lang
    if return_embedding:
        opts["return_embedding"] = True
    return opts


def parse_response(resp) -> dict:
    result = json.loads(resp.as_numpy("RESULT").reshape(-1)[0])
    validate_result(result)
    emb = resp.as_numpy("EMBEDDING")
    if emb is not None and emb.size:
        result["embedding"] = emb.reshape(-1).tolist()
    return result


def _to_failure(e: InferenceServerException) -> ModerationFailed:
    """Coded failure from a server or transport error (codes: docs/errors.md; moderation.errors.classify_failure)."""
    status = e.status() or ""
    code, message = classify_failure(e.message() or str(e), status)
    return ModerationFailed(code, message, status or None)


def _retryable(e: InferenceServerException) -> bool:
    """Idempotent retries: the server was unreachable or shed load (UNAVAILABLE), or a model's stub process had
    died and is being reloaded (Triton answers INTERNAL "... is not healthy" until then)."""
    return (e.status() or "") in RETRYABLE or _to_failure(e).code == "model_unavailable"


def _retry_pause(e: InferenceServerException, attempt: int, retries: int, backoff_s: float,
                 deadline: float) -> float | None:
    """Seconds to wait before the next try (exponential backoff with jitter), or None to give up: not
    retryable, out of tries, or the pause would pass the call's deadline."""
    if attempt >= retries or not _retryable(e):
        return None
    pause = backoff_s * (2 ** attempt) * (1 + random.random())
    return pause if time.monotonic() + pause < deadline else None


class ModerationClient:
    def __init__(self, url: str = DEFAULT_URL, model: str = "moderate", timeout_s: float = 30.0,
                 retries: int = 3, backoff_s: float = 0.2):
        self.url, self.model, self.timeout_s, self.retries, self.backoff_s = url, model, timeout_s, retries, backoff_s
        self.client = grpcclient.InferenceServerClient(url=url)

    def moderate(self, image: bytes | str | Path, text: str | bytes, *, describe: bool = False,
                 request_id: str | None = None, policy: str | None = None, lang: str | None = None,
                 return_embedding: bool = False, forget: bool = False) -> dict:
        inputs, outputs = build_inputs(grpcclient, _image_bytes(image), text,
                                       _options(describe, request_id, policy, lang, return_embedding, forget))
        deadline = time.monotonic() + self.timeout_s  # one deadline for the call, retries included
        for attempt in range(self.retries + 1):
            try:
                resp = self.client.infer(self.model, inputs, outputs=outputs,
                                         client_timeout=max(0.001, deadline - time.monotonic()))
                return parse_response(resp)
            except InferenceServerException as e:
                pause = _retry_pause(e, attempt, self.retries, self.backoff_s, deadline)
                if pause is None:
                    raise _to_failure(e) from None
                time.sleep(pause)
        raise AssertionError("unreachable")

    def close(self) -> None:
        self.client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AsyncModerationClient:
    def __init__(self, url: str = DEFAULT_URL, model: str = "moderate", timeout_s: float = 30.0,
                 retries: int = 3, backoff_s: float = 0.2):
        self.url, self.model, self.timeout_s, self.retries, self.backoff_s = url, model, timeout_s, retries, backoff_s
        self.client = grpcaio.InferenceServerClient(url=url)

    async def moderate(self, image: bytes | str | Path, text: str | bytes, *, describe: bool = False,
                       request_id: str | None = None, policy: str | None = None, lang: str | None = None,
                       return_embedding: bool = False, forget: bool = False) -> dict:
        inputs, outputs = build_inputs(grpcaio, _image_bytes(image), text,
                                       _options(describe, request_id, policy, lang, return_embedding, forget))
        deadline = time.monotonic() + self.timeout_s  # one deadline for the call, retries included
        for attempt in range(self.retries + 1):
            try:
                resp = await self.client.infer(self.model, inputs, outputs=outputs,
                                         client_timeout=max(0.001, deadline - time.monotonic()))
                return parse_response(resp)
            except InferenceServerException as e:
                pause = _retry_pause(e, attempt, self.retries, self.backoff_s, deadline)
                if pause is None:
                    raise _to_failure(e) from None
                await asyncio.sleep(pause)
        raise AssertionError("unreachable")

    async def close(self) -> None:
        await self.client.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()
