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

from moderation.errors import parse_error_text
from moderation.result import validate_result

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


def _options(describe, request_id, policy, lang, return_embedding) -> dict:
    opts = {"describe": bool(describe)}
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
    code, message = parse_error_text(e.message() or str(e))
    status = e.status()
    if code == "internal" and status and "UNAVAILABLE" in status:
        code = "unavailable"
    if code == "internal" and status and "DEADLINE_EXCEEDED" in status:
        code = "deadline_exceeded"
    return ModerationFailed(code, message, status)


class ModerationClient:
    def __init__(self, url: str = DEFAULT_URL, model: str = "moderate", timeout_s: float = 30.0,
                 retries: int = 3, backoff_s: float = 0.2):
        self.url, self.model, self.timeout_s, self.retries, self.backoff_s = url, model, timeout_s, retries, backoff_s
        self.client = grpcclient.InferenceServerClient(url=url)

    def moderate(self, image: bytes | str | Path, text: str | bytes, *, describe: bool = False,
                 request_id: str | None = None, policy: str | None = None, lang: str | None = None,
                 return_embedding: bool = False) -> dict:
        inputs, outputs = build_inputs(grpcclient, _image_bytes(image), text,
                                       _options(describe, request_id, policy, lang, return_embedding))
        for attempt in range(self.retries + 1):
            try:
                resp = self.client.infer(self.model, inputs, outputs=outputs, client_timeout=self.timeout_s)
                return parse_response(resp)
            except InferenceServerException as e:
                if attempt < self.retries and (e.status() or "") in RETRYABLE:
                    time.sleep(self.backoff_s * (2 ** attempt) * (1 + random.random()))
                    continue
                raise _to_failure(e) from None
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
                       return_embedding: bool = False) -> dict:
        inputs, outputs = build_inputs(grpcaio, _image_bytes(image), text,
                                       _options(describe, request_id, policy, lang, return_embedding))
        for attempt in range(self.retries + 1):
            try:
                resp = await self.client.infer(self.model, inputs, outputs=outputs, client_timeout=self.timeout_s)
                return parse_response(resp)
            except InferenceServerException as e:
                if attempt < self.retries and (e.status() or "") in RETRYABLE:
                    await asyncio.sleep(self.backoff_s * (2 ** attempt) * (1 + random.random()))
                    continue
                raise _to_failure(e) from None
        raise AssertionError("unreachable")

    async def close(self) -> None:
        await self.client.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()
