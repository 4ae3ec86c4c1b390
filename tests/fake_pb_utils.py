"""A small, explicit stand-in for `triton_python_backend_utils`, to test model.py adapters without a server.

Unlike a MagicMock it records every (response, flags) pair a response sender gets, so a test can assert that each
request ends with exactly one final flag.
"""

from __future__ import annotations

import json
import sys
import threading
import types

import numpy as np

TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1


class TritonError:
    INTERNAL, INVALID_ARG, UNAVAILABLE, CANCELLED = "INTERNAL", "INVALID_ARG", "UNAVAILABLE", "CANCELLED"

    def __init__(self, message, code=INTERNAL):
        self._message, self._code = message, code

    def message(self):
        return self._message

    def code(self):
        return self._code


class TritonModelException(Exception):
    pass


class Tensor:
    def __init__(self, name, array):
        self._name, self._array = name, np.asarray(array)

    def name(self):
        return self._name

    def as_numpy(self):
        return self._array


class InferenceResponse:
    def __init__(self, output_tensors=(), error=None):
        self.output_tensors, self._error = list(output_tensors), error

    def has_error(self):
        return self._error is not None

    def error(self):
        return self._error

    def output(self, name):
        return next(t.as_numpy() for t in self.output_tensors if t.name() == name)


class ResponseSender:
    def __init__(self):
        self.sent: list[tuple[InferenceResponse | None, int]] = []
        self.cancelled = False
        self.final = threading.Event()

    def send(self, response=None, flags=0):
        self.sent.append((response, flags))
        if flags & TRITONSERVER_RESPONSE_COMPLETE_FINAL:
            self.final.set()

    def is_cancelled(self):
        return self.cancelled

    @property
    def final_flags(self) -> int:
        return sum(1 for _, flags in self.sent if flags & TRITONSERVER_RESPONSE_COMPLETE_FINAL)


class InferenceRequest:
    def __init__(self, inputs: dict[str, np.ndarray], parameters: dict | None = None, request_id: str = ""):
        self.inputs = {name: Tensor(name, value) for name, value in inputs.items()}
        self._parameters = json.dumps(parameters or {})
        self._request_id = request_id
        self.sender = ResponseSender()

    def request_id(self):
        return self._request_id

    def is_cancelled(self):
        return False

    def get_response_sender(self):
        return self.sender

    def parameters(self):
        return self._parameters


def get_input_tensor_by_name(request, name):
    return request.inputs.get(name)


def using_decoupled_model_transaction_policy(model_config):
    return model_config.get("model_transaction_policy", {}).get("decoupled", False)


class MetricFamily:
    """The backend's custom metrics; every family and its metrics by name, for tests to read."""

    COUNTER, GAUGE, HISTOGRAM = "COUNTER", "GAUGE", "HISTOGRAM"
    families: dict[str, MetricFamily] = {}

    def __init__(self, name, description, kind):
        self.name, self.description, self.kind = name, description, kind
        self.metrics: list[Metric] = []
        MetricFamily.families[name] = self

    def Metric(self, labels=None, buckets=None):  # noqa: N802 (the backend's spelling)
        if (buckets is not None) != (self.kind == MetricFamily.HISTOGRAM):
            raise ValueError("buckets are required for histograms and only for them")
        metric = Metric(self, dict(labels or {}), buckets)
        self.metrics.append(metric)
        return metric


class Metric:
    def __init__(self, family, labels, buckets):
        self.family, self.labels, self.buckets = family, labels, buckets
        self._value = 0.0
        self.observations: list[float] = []

    def increment(self, value):
        if self.family.kind == MetricFamily.COUNTER and value < 0:
            raise ValueError("a counter only goes up")
        self._value += value

    def set(self, value):
        if self.family.kind != MetricFamily.GAUGE:
            raise ValueError("only gauges can be set")
        self._value = value

    def observe(self, value):
        if self.family.kind != MetricFamily.HISTOGRAM:
            raise ValueError("only histograms observe")
        self.observations.append(value)

    def value(self):
        return self._value


class Logger:
    lines: list[str] = []

    @classmethod
    def log_info(cls, message):
        cls.lines.append(message)

    log_warn = log_error = log_verbose = log_info


def install() -> types.ModuleType:
    """Register this module as `triton_python_backend_utils` and return it."""
    module = sys.modules[__name__]
    sys.modules["triton_python_backend_utils"] = module
    return module
