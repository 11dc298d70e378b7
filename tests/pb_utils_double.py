"""A test double of `triton_python_backend_utils` (the module Triton's python backend gives a model), enough to
run our python models' adapters without a server, as TensorRT-LLM backend's all_models/tests do. BLS calls go
to handlers a test registers per model."""
from __future__ import annotations

import sys
import types
from collections.abc import Callable

import numpy as np


class Tensor:
    def __init__(self, name: str, array: np.ndarray):
        self._name, self._array = name, np.asarray(array)

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array


class TritonError:
    UNKNOWN, INTERNAL, NOT_FOUND, INVALID_ARG, UNAVAILABLE = range(5)

    def __init__(self, message: str, code: int | None = None):
        self._message, self.code = message, code

    def message(self) -> str:
        return self._message


class InferenceResponse:
    def __init__(self, output_tensors=(), error: TritonError | None = None):
        self._outputs, self._error = list(output_tensors), error

    def has_error(self) -> bool:
        return self._error is not None

    def error(self) -> TritonError | None:
        return self._error

    def output_tensors(self) -> list[Tensor]:
        return self._outputs


class Request:
    """What Triton hands `execute`: a request with input tensors."""

    def __init__(self, **inputs: np.ndarray):
        self.inputs = [Tensor(k, v) for k, v in inputs.items()]


class InferenceRequest:
    calls: list[dict] = []  # every BLS call, in order: model, version, inputs
    handlers: dict[str, Callable[[dict[str, np.ndarray], int], dict[str, np.ndarray] | str]] = {}

    def __init__(self, model_name: str, inputs: list[Tensor], requested_output_names: list[str],
                 model_version: int = -1):
        self.model_name, self.model_version = model_name, model_version
        self.inputs, self.outputs = inputs, requested_output_names

    async def async_exec(self) -> InferenceResponse:
        return self.exec()

    def exec(self) -> InferenceResponse:
        feed = {t.name(): t.as_numpy() for t in self.inputs}
        InferenceRequest.calls.append({"model": self.model_name, "version": self.model_version, "inputs": feed})
        handler = InferenceRequest.handlers.get(self.model_name)
        if handler is None:
            return InferenceResponse(error=TritonError(f"Request for unknown model: '{self.model_name}'"))
        out = handler(feed, self.model_version)
        if isinstance(out, str):  # a handler returns an error text to fail the call
            return InferenceResponse(error=TritonError(out))
        return InferenceResponse([Tensor(k, v) for k, v in out.items()])


class Logger:
    lines: list[tuple[str, str]] = []

    @classmethod
    def log_info(cls, msg: str) -> None:
        cls.lines.append(("info", msg))

    @classmethod
    def log_warn(cls, msg: str) -> None:
        cls.lines.append(("warn", msg))

    @classmethod
    def log_error(cls, msg: str) -> None:
        cls.lines.append(("error", msg))


class _Metric:
    def __init__(self, family: MetricFamily, labels: dict[str, str]):
        self.family, self.labels, self.value = family, labels, 0.0

    def increment(self, value: float) -> None:
        self.value += value

    def set(self, value: float) -> None:
        self.value = value


class MetricFamily:
    COUNTER, GAUGE = "COUNTER", "GAUGE"
    families: dict[str, MetricFamily] = {}

    def __init__(self, name: str, description: str, kind: str):
        self.name, self.description, self.kind = name, description, kind
        self.metrics: list[_Metric] = []
        MetricFamily.families[name] = self

    def Metric(self, labels: dict[str, str]) -> _Metric:
        m = _Metric(self, labels)
        self.metrics.append(m)
        return m


def get_input_tensor_by_name(request: Request, name: str) -> Tensor | None:
    return next((t for t in request.inputs if t.name() == name), None)


def get_output_tensor_by_name(response: InferenceResponse, name: str) -> Tensor | None:
    return next((t for t in response.output_tensors() if t.name() == name), None)


ready_models: set[tuple[str, str]] = set()


def is_model_ready(model_name: str, model_version: str = "") -> bool:
    return (model_name, str(model_version)) in ready_models


def install() -> types.ModuleType:
    """Put this module in sys.modules as triton_python_backend_utils, with a fresh call log."""
    InferenceRequest.calls, InferenceRequest.handlers, Logger.lines = [], {}, []
    ready_models.clear()
    sys.modules["triton_python_backend_utils"] = sys.modules[__name__]
    return sys.modules[__name__]
