"""Tensor plumbing and error handling shared by every python-backend model."""
from __future__ import annotations

import json
import os
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Literal, overload

import numpy as np

from ..core.audit import FAIL_OPEN, AuditLog
from ..core.contracts import PostError
from ..core.errors import AuditUnavailable, BadRequest, ModerationError, failed_call
from .metrics import Counter
from .pb import pb


def model_id(args: dict) -> tuple[str, str]:
    return args["model_name"], str(args["model_version"])


def version_dir(args: dict) -> Path:
    return Path(args["model_repository"]) / str(args["model_version"])


def parameters(args: dict) -> dict[str, str]:
    cfg = json.loads(args["model_config"])
    return {k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}


@overload
def rows(request, name: str, optional: Literal[False] = False) -> np.ndarray: ...
@overload
def rows(request, name: str, optional: bool) -> np.ndarray | None: ...
def rows(request, name: str, optional: bool = False) -> np.ndarray | None:
    """The input as a numpy array (batch dimension first), or None for an absent optional input."""
    t = pb().get_input_tensor_by_name(request, name)
    if t is None:
        if optional:
            return None
        raise BadRequest(f"missing required input {name}")
    return t.as_numpy()


def _as_bytes(x) -> bytes:
    return x if isinstance(x, bytes) else (x.encode() if isinstance(x, str) else bytes(x))


def bytes_rows(request, name: str, optional: bool = False) -> list[bytes]:
    """A BYTES input's elements, flattened ([] for an absent optional input)."""
    arr = rows(request, name, optional)
    if arr is None:
        return []
    return [_as_bytes(x) for x in arr.reshape(-1)]


def image_rows(request, name: str = "IMAGE", optional: bool = False) -> list[list[bytes]]:
    """IMAGE [batch, N]: each post's elements (a post of fewer images pads with empty ones: core/post.py
    post_images reads them)."""
    arr = rows(request, name, optional)
    if arr is None:
        return []
    return [[_as_bytes(x) for x in row] for row in arr.reshape(arr.shape[0], -1)]


def infer_blocking(model: str, name_in: str, x: np.ndarray, name_out: str) -> np.ndarray:
    """One float32 input to `model` by BLS, its one output back: a blocking call, made from inside a model's own
    execute (read_text's OCR models, preprocess's open_nsfw on further images). A failed call raises its code."""
    u = pb()
    resp = u.InferenceRequest(model_name=model, requested_output_names=[name_out],
                              inputs=[u.Tensor(name_in, np.ascontiguousarray(x, dtype=np.float32))]).exec()
    if resp.has_error():
        raise failed_call(model, resp.error().message())
    return u.get_output_tensor_by_name(resp, name_out).as_numpy()


def string_tensor(name: str, values: Sequence[str | bytes]):
    data = np.array([[v.encode("utf-8") if isinstance(v, str) else v] for v in values], dtype=np.object_)
    return pb().Tensor(name, data)


def tensor(name: str, array: np.ndarray):
    return pb().Tensor(name, np.ascontiguousarray(array))


# Codes answered with gRPC UNAVAILABLE: the caller may retry later (docs/errors.md).
RETRY_LATER = ("model_unavailable", "overloaded", "audit_unavailable")


def error_response(err: Exception):
    u = pb()
    if isinstance(err, ModerationError):
        code = getattr(u.TritonError, "INVALID_ARG", None)
        code = getattr(u.TritonError, "UNAVAILABLE", code) if err.code in RETRY_LATER else code
        msg = str(err)
    else:
        code = getattr(u.TritonError, "INTERNAL", None)
        msg = f"[internal] {type(err).__name__}: {err}"
    try:
        e = u.TritonError(msg, code) if code is not None else u.TritonError(msg)
    except TypeError:
        e = u.TritonError(msg)
    return u.InferenceResponse(output_tensors=[], error=e)


class Stage:
    """Per-model context: audit log and a uniform way to fail one request without failing the batch. The audit
    log's failures, dropped spool rows and retention deletions are this model's moderation_audit_* series."""

    def __init__(self, args: dict):
        self.name, self.version = model_id(args)
        counters: dict[str, Counter] = {}

        def count(metric: str, n: int) -> None:
            counters.setdefault(metric, Counter(metric)).inc(float(n), stage=self.name)

        self.audit = AuditLog(on_count=count)
        if self.audit.mode == FAIL_OPEN:
            self.audit.start_flusher(float(os.environ.get("MODERATION_AUDIT_FLUSH_S", "") or 5.0))
        self.logger = pb().Logger
        self.errors = Counter("moderation_errors_total")

    def answer(self, requests: list, handle: Callable[[Any, dict, float], Any]) -> list:
        """One response per request, in order: handle(request, meta, started) answers one request and fills meta
        (request_id, hashes, policy: the keys of its error row) as it learns them; any failure becomes that
        request's coded error and audit row, never its batch's."""
        return [self.answer_one(r, handle) for r in requests]

    def answer_one(self, request, handle: Callable[[Any, dict, float], Any]):
        started, meta = time.perf_counter(), dict[str, Any]()
        try:
            return handle(request, meta, started)
        except Exception as e:  # noqa: BLE001 - every failure becomes a coded error for this request only
            return self.fail(e, meta, started)

    async def answer_async(self, request, handle: Callable[[Any, dict, float], Awaitable[Any]]):
        """answer_one for a coroutine handler (a model whose execute awaits BLS calls)."""
        started, meta = time.perf_counter(), dict[str, Any]()
        try:
            return await handle(request, meta, started)
        except Exception as e:  # noqa: BLE001 - every failure becomes a coded error for this request only
            return self.fail(e, meta, started)

    def finalize(self) -> None:
        """The model is unloaded (a swap, an unload, the server's exit): stop the audit flusher and write the rows
        spooled while the log could not take them (fail_open), which would otherwise go with the stub process."""
        left = self.audit.close()
        if left:
            self.logger.log_error(f"{self.name}: {left} spooled audit rows could not be written at unload and are "
                                  f"lost ({self.audit.last_error})")

    def fail(self, err: Exception, meta: dict | None = None, started: float | None = None):
        if not isinstance(err, ModerationError):
            self.logger.log_error(f"{self.name}: {traceback.format_exc()}")
        failure = PostError.of(err)
        code, message = failure.code, failure.message
        row = {"request_id": (meta or {}).get("request_id"), "stage": self.name,
               "model_versions": {self.name: self.version}, "error": {"code": code, "message": message},
               **{k: v for k, v in (meta or {}).items() if k in ("image_sha256", "text_sha256", "policy")}}
        if started is not None:
            row["latency_ms"] = {"total": round((time.perf_counter() - started) * 1e3, 3)}
        try:
            self.audit.write(row)  # fail_open: spooled when it cannot be written; fail_closed: raises
        except AuditUnavailable as e:  # the refusal itself cannot be audited: answer audit_unavailable instead
            self.audit_failed(e)
            err, code = e, e.code
        self.errors.inc(stage=self.name, code=code)
        return error_response(err)

    def audit_failed(self, err: AuditUnavailable) -> None:
        """Log (server-side only, with the OS's reason) an audit write that refused a request."""
        self.logger.log_error(f"{self.name}: audit write failed ({self.audit.last_error}): request refused "
                              f"with [{err.code}]")


class StageModel:
    """Base of the python models: execute() answers each request on its own with respond(request, meta, started)
    (Stage.answer); a model that batches its requests overrides execute. finalize(), which Triton calls when it
    unloads the model, writes the audit rows still spooled and stops the flusher (Stage.finalize)."""

    stage: Stage

    def execute(self, requests):
        return self.stage.answer(requests, self.respond)

    def respond(self, request, meta: dict, started: float):
        raise NotImplementedError(f"{type(self).__name__} answers its requests in execute")

    def finalize(self):
        self.stage.finalize()
