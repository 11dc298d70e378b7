"""Custom Prometheus metrics from the python models, exported on Triton's own /metrics endpoint
(python-backend MetricFamily). One family per fact; models label their series."""
from __future__ import annotations

import contextlib

from .pb import pb

_FAMILIES: dict[str, object] = {}

SPECS = {
    "moderation_requests_total": ("COUNTER", "Posts finished by postprocess, by route (the path: gate, list, vlm, "
                                  "cache), the gate's band (allow, block, escalate) and verdict; error for a failed "
                                  "post"),
    "moderation_actions_total": ("COUNTER", "Posts answered, by action (allow/review/block, or error) and the "
                                 "signal that decided it (decided_by; the error code for a failed post)"),
    "moderation_escalations_total": ("COUNTER", "Posts the gate sent to the VLM, by decoder arm"),
    "moderation_errors_total": ("COUNTER", "Requests failed with a coded error, by stage and code"),
    "moderation_cache_total": ("COUNTER", "Verdict-cache lookups by result (hit/miss)"),
    "moderation_cache_backend_errors_total": ("COUNTER", "Shared (Redis) verdict-cache calls that failed (kind "
                                              "error) or were skipped while its circuit breaker was open (kind "
                                              "skipped), by operation: each one a cache miss or a skipped write"),
    "moderation_cache_rejected_total": ("COUNTER", "Shared verdict-cache entries refused at lookup, never served: "
                                        "reason mac (not signed with this service's key) or schema (malformed)"),
    "moderation_decoder_fallback_total": ("COUNTER", "Escalations sent to the INT8 fallback decoder"),
    "moderation_decoder_batch_size": ("GAUGE", "Posts in the language decoder's last batch"),
    "moderation_lists_stale": ("GAUGE", "1 while a policy's last good lists stay in force because the newest cannot be "
                               "read (the lists store, Redis, unreachable or emptied; a lists file that fails to "
                               "parse): alert on it; 0 when the lists in force are the store's; by policy"),
    "moderation_lists_revision": ("GAUGE", "The revision of the lists in force, by policy (every replica should "
                                  "agree within the lists' poll interval)"),
    "moderation_audit_failures_total": ("COUNTER", "Audit writes that failed (disk full, I/O error, read-only), "
                                        "by stage"),
    "moderation_audit_spool_dropped_total": ("COUNTER", "Audit rows dropped from the fail_open spool when it was full, "
                                             "by stage"),
    "moderation_audit_rows_deleted_total": ("COUNTER", "Audit rows deleted with the oldest backup by retention, "
                                            "by stage"),
}


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
