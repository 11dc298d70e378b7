"""Custom Prometheus metrics from the python models, exported on Triton's own /metrics endpoint
(python-backend MetricFamily). One family per fact; models label their series."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

from .pb import pb

_FAMILIES: dict[str, object] = {}

# name -> {kind: COUNTER | GAUGE, help}: the catalogue of custom metrics, data beside this module
SPECS = {name: (spec["kind"], spec["help"]) for name, spec in
         json.loads((Path(__file__).with_name("metrics.json")).read_text(encoding="utf-8")).items()}


def family(name: str):
    fam = _FAMILIES.get(name)
    if fam is None:
        u = pb()
        kind, desc = SPECS[name]
        fam = _FAMILIES[name] = u.MetricFamily(name=name, description=desc, kind=getattr(u.MetricFamily, kind))
    return fam


class Counter:
    """Label-keyed series of one family, created on first use."""

    def __init__(self, name: str):
        self.name = name
        self._series: dict[tuple, object] = {}

    def _metric(self, labels: dict[str, str]):
        key = tuple(sorted(labels.items()))
        m = self._series.get(key)
        if m is None:
            m = self._series[key] = family(self.name).Metric(labels=dict(key))
        return m

    def inc(self, value: float = 1.0, **labels: str) -> None:
        with contextlib.suppress(Exception):  # metrics must never fail a request
            self._metric(labels).increment(value)

    def set(self, value: float, **labels: str) -> None:
        with contextlib.suppress(Exception):
            self._metric(labels).set(value)


class CountByName:
    """count(family, **labels): one increment of a series, the Counter made on first use (GateRouter's count)."""

    def __init__(self):
        self._counters: dict[str, Counter] = {}

    def __call__(self, name: str, **labels: str) -> None:
        counter = self._counters.get(name)
        if counter is None:
            counter = self._counters[name] = Counter(name)
        counter.inc(1.0, **labels)
