"""Prometheus text-format metrics, hand-written: a few counters, one gauge and two histograms do not
justify a dependency. Every update takes a lock, because the batching thread and the event loop both
write."""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence


class _Metric:
    kind = ""

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()):
        self.name, self.help_text, self.labels = name, help_text, tuple(labels)
        self._lock = threading.Lock()

    def _label_text(self, values: tuple, extra: str = "") -> str:
        pairs = [f'{k}="{_escape(str(v))}"' for k, v in zip(self.labels, values)] + ([extra] if extra else [])
        return "{" + ",".join(pairs) + "}" if pairs else ""

    def render(self) -> list[str]:
        return [f"# HELP {self.name} {self.help_text}", f"# TYPE {self.name} {self.kind}", *self._samples()]

    def _samples(self) -> list[str]:
        raise NotImplementedError


class Counter(_Metric):
    kind = "counter"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._values: dict[tuple, float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(labels[k] for k in self.labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        with self._lock:
            return self._values.get(tuple(labels[k] for k in self.labels), 0.0)

    def _samples(self) -> list[str]:
        with self._lock:
            values = self._values or ({} if self.labels else {(): 0.0})  # a counter without labels starts at 0
            return [f"{self.name}{self._label_text(k)} {_number(v)}" for k, v in sorted(values.items())]


class Gauge(_Metric):
    kind = "gauge"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._value = 0.0

    def add(self, amount: float) -> None:
        with self._lock:
            self._value += amount

    @property
    def value(self) -> float:
        return self._value

    def _samples(self) -> list[str]:
        return [f"{self.name} {_number(self._value)}"]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help_text: str, buckets: Sequence[float]):
        super().__init__(name, help_text)
        self.buckets = tuple(sorted(buckets))
        self._counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
        self._sum = 0.0

    def observe(self, value: float) -> None:
        with self._lock:
            index = next((i for i, bound in enumerate(self.buckets) if value <= bound), len(self.buckets))
            self._counts[index] += 1
            self._sum += value

    def snapshot(self) -> tuple[dict[float, int], float]:
        """(observations per bucket upper bound, math.inf last; their sum), for benchmarks and tests."""
        with self._lock:
            return dict(zip((*self.buckets, math.inf), self._counts)), self._sum

    def _samples(self) -> list[str]:
        with self._lock:
            lines, cumulative = [], 0
            for bound, count in zip((*self.buckets, math.inf), self._counts):
                cumulative += count
                le = "+Inf" if bound == math.inf else _number(bound)
                lines.append(f'{self.name}_bucket{{le="{le}"}} {cumulative}')
            return [*lines, f"{self.name}_sum {_number(self._sum)}", f"{self.name}_count {cumulative}"]


class Metrics:
    """What ``/metrics`` reports for one server."""

    def __init__(self):
        self.requests = Counter("alignx_requests_total", "HTTP requests by endpoint and status code", ("endpoint", "status"))
        self.prompt_tokens = Counter("alignx_prompt_tokens_total", "prompt tokens of accepted completion requests")
        self.generated_tokens = Counter("alignx_generated_tokens_total", "completion tokens generated")
        self.cancelled_requests = Counter("alignx_cancelled_requests_total",
                                          "requests dropped, queued or mid-decode, because their client went away")
        self.wasted_steps = Counter("alignx_wasted_decode_steps_total", "decode steps that began after a row's client "
                                    "had gone, beyond the first (which may have begun as it left)")
        self.queue_depth = Gauge("alignx_queue_depth", "requests waiting for a batch")
        self.batch_size = Histogram("alignx_batch_size", "requests decoded together in one generate call",
                                    (1, 2, 4, 8, 16, 32, 64))
        self.latency = Histogram("alignx_request_latency_seconds", "completion request latency, to the last byte",
                                 (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))

    def render(self) -> str:
        metrics = (self.requests, self.prompt_tokens, self.generated_tokens, self.cancelled_requests, self.wasted_steps,
                   self.queue_depth, self.batch_size, self.latency)
        return "\n".join(line for metric in metrics for line in metric.render()) + "\n"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
