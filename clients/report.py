"""Turn an audit log into trends and an A/B comparison: SQL (DuckDB) over the JSONL files, no row in Python.

    .venv/bin/python -m clients.report build/audit/audit.jsonl [more.jsonl …] [--plot report.png]
                                       [--bucket minute|hour] [--json] [--memory-limit 2GB]

Each path is read with its rotated backups (audit.jsonl.1 … audit.jsonl.N). Prints totals by route (the path), gate
band, action and who decided it (rows of the old gate_allow / gate_block routes read as route gate with that band),
the evidence it was decided on (an image- or term-list hit, a cached verdict, a model signal, the policy's
rule; list hits by kind, term hits by variant; verdict cache hits), error code and label, latency percentiles (the
total and every stage of `latency_ms`), label (route, action) trends per hour or minute, and an A/B table by
language_decoder version with 95 % confidence intervals (Wilson for the violation rate, normal for the mean violation
score, Newcombe for the difference to the first version); with --plot draws routes, labels and latency over time (PNG).

Rows: the `moderate` rows (core/result.py) are the judged posts; rows of every other stage but the operators'
(gateway refusals, a model's own error rows) are requests that failed; `admin`, `feedback`, `watchdog` and `audit`
rows are counted apart and never read as requests; the log's own `audit` rows also say how many rows retention deleted
or a full spool dropped (`audit_events`). A line that is not a JSON object is skipped and counted
(`unreadable_lines`). DuckDB reads only the columns below: other fields, or a field of another type in a row of
another stage, cost nothing and break nothing (a field of the wrong type reads as NULL)."""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from moderation.core.audit import log_files  # the log and its rotated backups, oldest first

from .evidence import IMAGE_LIST, POLICY_RULES, TERMS

__all__ = ["OPERATOR_STAGES", "Report", "log_files", "main", "newcombe", "summarize_files", "summary", "wilson"]

OPERATOR_STAGES = ("admin", "feedback", "watchdog", "audit")
BUCKETS = {"minute": 60, "hour": 3600}
Z95 = 1.959963984540054
# Rows are bounded (hashes, never content; the gateway caps its request summaries): a line past this is unreadable.
MAX_OBJECT_BYTES = 16 * 2**20

# The only fields the report reads, with their types (DuckDB's JSON reader skips every other field of a row).
COLUMNS = {
    "ts": "DOUBLE", "stage": "VARCHAR", "route": "VARCHAR", "gate_band": "VARCHAR", "action": "VARCHAR",
    "decided_by": "VARCHAR",
    "violation": "BOOLEAN", "labels": "STRUCT(name VARCHAR)[]", "scores": "STRUCT(violation DOUBLE)",
    "latency_ms": "MAP(VARCHAR, DOUBLE)", "model_versions": "STRUCT(language_decoder VARCHAR)",
    "ab": "STRUCT(arm VARCHAR)", "error": "JSON",
    # evidence: the operators' list entries a post matched, and the verdict cache's answer (clients/evidence.py)
    "list_hits": "STRUCT(kind VARCHAR, list VARCHAR, variant VARCHAR, field VARCHAR)[]", "cache": "STRUCT(hit BOOLEAN)",
    "event": "VARCHAR", "rows": "BIGINT", "dropped": "BIGINT",  # the audit log's own rows (stage "audit")
}


def _sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _reader(files: list[Path]) -> str:
    cols = ", ".join(f"{json.dumps(k)}: {_sql_str(v)}" for k, v in COLUMNS.items())
    paths = ", ".join(_sql_str(str(f)) for f in files)
    return (f"read_json([{paths}], format='newline_delimited', ignore_errors=true, "
            f"maximum_object_size={MAX_OBJECT_BYTES}, columns={{{cols}}})")


def connect(memory_limit: str | None = None, threads: int | None = None, temp_dir: Path | None = None):
    import duckdb

    con = duckdb.connect(":memory:")
    con.execute("SET preserve_insertion_order = false")  # aggregates only: lets scans stream in any order
    if memory_limit:
        con.execute(f"SET memory_limit = {_sql_str(memory_limit)}")
    if threads:
        con.execute(f"SET threads = {int(threads)}")
    if temp_dir:
        con.execute(f"SET temp_directory = {_sql_str(str(temp_dir))}")
    return con


def load(con, files: list[Path], bucket: str) -> None:
    """One pass over the files into `r`: a slim, columnar projection (a dozen columns, dictionary-compressed strings;
    DuckDB spills it to the temp directory past its memory limit). Every aggregate reads `r`, never the JSON."""
    size = BUCKETS[bucket]
    truthy_error = "error IS NOT NULL AND error::VARCHAR NOT IN ('{}', '[]', '\"\"', 'false', '0', 'null')"
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE r AS
        SELECT ts, stage, {_route_sql()} AS route, {_gate_band_sql()} AS gate_band, action, decided_by, violation,
               list_transform(labels, lambda x: x.name) AS labels,
               scores.violation AS violation_score,
               latency_ms AS latency,
               latency_ms['total'] AS total_ms,
               model_versions.language_decoder AS decoder,
               ab.arm AS arm,
               list_transform(list_hits, lambda h: coalesce(h.kind, '?') || ':' || coalesce(h.list, '?')) AS hits,
               list_transform(list_filter(list_hits, lambda h: h.kind = 'term'),
                              lambda h: coalesce(h.variant, '?') || '@' || coalesce(h.field, '?')) AS term_hits,
               cache.hit AS cache_hit,
               {_evidence_sql()} AS evidence,
               ({truthy_error}) AS failed_row,
               CASE WHEN {truthy_error}
                    THEN coalesce(json_extract_string(error, '$.code'), '?') END AS error_code,
               ts IS NULL AND stage IS NULL AS unreadable,
               CASE WHEN stage = 'audit' THEN event END AS audit_event,
               CASE WHEN stage = 'audit' THEN coalesce(rows, dropped) END AS audit_rows,
               CAST(floor(round(ts * 1e6) / {size * 1_000_000}) AS BIGINT) * {size} AS bucket_s
        FROM {_reader(files)}""")
    op = ", ".join(_sql_str(s) for s in OPERATOR_STAGES)
    con.execute(f"""
        CREATE OR REPLACE TEMP VIEW req AS
        SELECT * FROM r WHERE NOT unreadable AND (stage IS NULL OR stage NOT IN ({op}))""")
    con.execute("""
        CREATE OR REPLACE TEMP VIEW ok AS
        SELECT * FROM req WHERE NOT failed_row AND route IS NOT NULL AND route <> ''""")


# Rows written before `route` named only the path: gate_allow / gate_block were the gate's path with its band.
OLD_GATE_ROUTES = {"gate_allow": "allow", "gate_block": "block"}


def _route_sql() -> str:
    old = ", ".join(_sql_str(r) for r in OLD_GATE_ROUTES)
    return f"CASE WHEN route IN ({old}) THEN 'gate' ELSE route END"


def _gate_band_sql() -> str:
    old = " ".join(f"WHEN {_sql_str(r)} THEN {_sql_str(b)}" for r, b in OLD_GATE_ROUTES.items())
    return f"coalesce(gate_band, CASE route {old} END)"


def _evidence_sql() -> str:
    """clients/evidence.kind_of in SQL: what kind of evidence decided a post."""
    rules = ", ".join(_sql_str(r) for r in POLICY_RULES)
    return f"""CASE WHEN decided_by IS NULL OR decided_by = '' THEN '-'
                    WHEN decided_by IN ({_sql_str(IMAGE_LIST)}, {_sql_str(TERMS)}) THEN decided_by
                    WHEN route = 'cache' OR coalesce(cache.hit, false) THEN 'cache'
                    WHEN decided_by IN ({rules}) THEN 'policy' ELSE 'model' END"""


def _bucket_name(seconds: int, bucket: str) -> str:
    dt = datetime.fromtimestamp(seconds, tz=UTC)
    return dt.strftime("%Y-%m-%d %H:00" if bucket == "hour" else "%Y-%m-%d %H:%M")


def _counts(con, sql: str) -> dict:
    return {k: int(n) for k, n in con.execute(sql).fetchall()}


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """Wilson score interval of the proportion k/n (None for n = 0)."""
    if n <= 0:
        return None
    p = k / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def newcombe(k1: int, n1: int, k2: int, n2: int, z: float = Z95) -> tuple[float, float] | None:
    """Newcombe's hybrid score interval (method 10) of p2 - p1 from the two Wilson intervals."""
    a, b = wilson(k1, n1, z), wilson(k2, n2, z)
    if a is None or b is None:
        return None
    p1, p2 = k1 / n1, k2 / n2
    d = p2 - p1
    return (d - math.sqrt((p2 - b[0]) ** 2 + (a[1] - p1) ** 2), d + math.sqrt((b[1] - p2) ** 2 + (p1 - a[0]) ** 2))


# Wilson's interval in SQL from the group's own aggregates (k violations of n posts).
_WILSON_SQL = """
    ((k / n + {z2} / (2 * n)) - {z} * sqrt((k / n) * (1 - k / n) / n + {z2} / (4 * n * n))) / (1 + {z2} / n) AS lo,
    ((k / n + {z2} / (2 * n)) + {z} * sqrt((k / n) * (1 - k / n) / n + {z2} / (4 * n * n))) / (1 + {z2} / n) AS hi
""".format(z=Z95, z2=Z95 * Z95)


def _f(x) -> float | None:
    return None if x is None else float(x)


def summary(con, bucket: str = "hour") -> dict:
    """Every aggregate of the report from the loaded table (see load())."""
    head = con.execute("""
        SELECT (SELECT count(*) FROM req), (SELECT count(*) FROM ok),
               (SELECT avg(violation::DOUBLE) FROM ok),
               (SELECT quantile_cont(total_ms, [0.5, 0.99]) FROM ok WHERE total_ms IS NOT NULL),
               (SELECT count(*) FROM r WHERE unreadable)""").fetchone()
    requests, succeeded, vrate, lat, unreadable = head
    lat = lat or [math.nan, math.nan]
    by_stage = {k: {"n": int(n), "p50": float(q[0]), "p90": float(q[1]), "p99": float(q[2]), "mean": float(m)}
                for k, n, q, m in con.execute("""
        SELECT e.key, count(*), quantile_cont(e.value, [0.5, 0.9, 0.99]), avg(e.value)
        FROM (SELECT unnest(map_entries(latency)) AS e FROM ok) WHERE e.value IS NOT NULL
        GROUP BY e.key ORDER BY e.key""").fetchall()}
    ab = {}
    for v, n, k, rate, score, sd, q, arms, lo, hi in con.execute(f"""
        SELECT v, n, k, k / n, mean_score, sd_score, q, arms, {_WILSON_SQL}
        FROM (SELECT coalesce(decoder, '?') AS v, count(*)::DOUBLE AS n, sum(violation::INT)::DOUBLE AS k,
                     avg(coalesce(violation_score, 0.0)) AS mean_score,
                     stddev_samp(coalesce(violation_score, 0.0)) AS sd_score,
                     quantile_cont(total_ms, [0.5, 0.99]) AS q,
                     list_sort(list_distinct(list(arm) FILTER (WHERE arm IS NOT NULL))) AS arms
              FROM ok WHERE route = 'vlm' GROUP BY 1)
        ORDER BY v""").fetchall():
        half = Z95 * sd / math.sqrt(n) if sd is not None else None
        ab[v] = {"posts": int(n), "violation_rate": float(rate), "mean_violation_score": float(score),
                 "p50_latency_ms": _f(q[0]), "p99_latency_ms": _f(q[1]), "violations": int(k),
                 "violation_rate_ci95": [max(0.0, lo), min(1.0, hi)],
                 "mean_violation_score_ci95": [score - half, score + half] if half is not None else None,
                 "arms": arms}
    versions = list(ab)
    comparison = {}
    if len(versions) > 1:
        ref = versions[0]
        for v in versions[1:]:
            a, b = ab[ref], ab[v]
            ci = newcombe(a["violations"], a["posts"], b["violations"], b["posts"])
            comparison[f"{v} vs {ref}"] = {
                "violation_rate_diff": b["violation_rate"] - a["violation_rate"], "violation_rate_diff_ci95": list(ci),
                "significant": not (ci[0] <= 0.0 <= ci[1]),
                "p50_latency_ms_diff": (b["p50_latency_ms"] or 0.0) - (a["p50_latency_ms"] or 0.0)}
    trends: dict[str, dict[str, int]] = {}
    for b, key, n in con.execute("""
        SELECT bucket_s, key, count(*) FROM (
            SELECT bucket_s, 'route:' || route AS key FROM ok
            UNION ALL SELECT bucket_s, 'action:' || coalesce(action, '-') FROM ok
            UNION ALL SELECT bucket_s, 'label:' || unnest(labels) FROM ok)
        WHERE bucket_s IS NOT NULL GROUP BY ALL ORDER BY bucket_s, key""").fetchall():
        trends.setdefault(_bucket_name(int(b), bucket), {})[key] = int(n)
    decided = {}
    for action, who, n in con.execute("""
        SELECT coalesce(action, '-'), coalesce(decided_by, '-'), count(*) FROM ok
        GROUP BY ALL ORDER BY ALL""").fetchall():
        decided.setdefault(action, {})[who] = int(n)
    errors_by_stage = {}
    for stage, code, n in con.execute("""
        SELECT coalesce(stage, '-'), error_code, count(*) FROM req WHERE failed_row
        GROUP BY ALL ORDER BY ALL""").fetchall():
        errors_by_stage.setdefault(stage, {})[code] = int(n)
    by_evidence = {}
    for action, kind, n in con.execute("""
        SELECT coalesce(action, '-'), evidence, count(*) FROM ok GROUP BY ALL ORDER BY ALL""").fetchall():
        by_evidence.setdefault(action, {})[kind] = int(n)
    cache_lookups, cache_hits = con.execute("""
        SELECT count(cache_hit), count(*) FILTER (WHERE cache_hit) FROM ok""").fetchone()
    op = ", ".join(_sql_str(s) for s in OPERATOR_STAGES)
    audit = {e: {"events": int(n), "rows": int(k or 0)} for e, n, k in con.execute("""
        SELECT coalesce(audit_event, '-'), count(*), sum(audit_rows) FROM r WHERE stage = 'audit'
        GROUP BY 1 ORDER BY 1""").fetchall()}
    return {
        "requests": int(requests), "succeeded": int(succeeded), "failed": int(requests - succeeded),
        "routes": _counts(con, "SELECT route, count(*) FROM ok GROUP BY 1 ORDER BY 2 DESC"),
        # what the gate's thresholds said, whatever the route (a row without it: '-')
        "gate_bands": _counts(con, "SELECT coalesce(gate_band, '-'), count(*) FROM ok GROUP BY 1 ORDER BY 2 DESC"),
        "actions": _counts(con, "SELECT coalesce(action, '-'), count(*) FROM ok GROUP BY 1 ORDER BY 2 DESC"),
        "decided_by": _counts(con, "SELECT coalesce(decided_by, '-'), count(*) FROM ok GROUP BY 1 ORDER BY 2 DESC"),
        "action_by_decided_by": decided,
        # evidence: the kind that decided (image_list, terms, cache, model, policy), every list hit by kind:list
        # (image:block, term:review, ...), term hits by variant@field, and the verdict cache's lookups and hits
        "evidence": _counts(con, "SELECT evidence, count(*) FROM ok GROUP BY 1 ORDER BY 2 DESC, 1"),
        "action_by_evidence": by_evidence,
        "list_hits": _counts(con, """SELECT h, count(*) FROM (SELECT unnest(hits) AS h FROM ok) GROUP BY 1
                                     ORDER BY 2 DESC, 1"""),
        "term_hits": _counts(con, """SELECT h, count(*) FROM (SELECT unnest(term_hits) AS h FROM ok) GROUP BY 1
                                     ORDER BY 2 DESC, 1"""),
        "cache": {"lookups": int(cache_lookups), "hits": int(cache_hits)},
        "errors": _counts(con, "SELECT error_code, count(*) FROM req WHERE failed_row GROUP BY 1 ORDER BY 2 DESC"),
        "errors_by_stage": errors_by_stage,
        "labels": _counts(con, """SELECT l, count(*) FROM (SELECT unnest(labels) AS l FROM ok) GROUP BY 1
                                  ORDER BY 2 DESC"""),
        "violation_rate": _f(vrate),
        "latency_ms": {"p50": float(lat[0]), "p99": float(lat[1])},
        "latency_by_stage_ms": by_stage,
        "ab_by_decoder_version": ab,
        "ab_comparison": comparison,
        "trends": trends,
        "other_stages": _counts(con, f"SELECT stage, count(*) FROM r WHERE stage IN ({op}) GROUP BY 1 ORDER BY 1"),
        "unreadable_lines": int(unreadable),
        # rows the log itself lost and announced: retention_deleted (a rotation deleted the oldest backup unread),
        # spool_dropped (fail_open spool overflow); their rows are not in any count above
        "audit_events": audit,
    }


class Report:
    """A connection with the log loaded: `summary()`, and the plot's series, from SQL."""

    def __init__(self, paths: list[Path], bucket: str = "hour", memory_limit: str | None = None,
                 threads: int | None = None):
        self.files = [f for p in paths for f in log_files(Path(p))]
        self.bucket = bucket
        self._tmp = Path(tempfile.mkdtemp(prefix="report-duckdb-"))
        self.con = connect(memory_limit, threads, self._tmp)
        if self.files:
            load(self.con, self.files, bucket)

    def summary(self) -> dict:
        return summary(self.con, self.bucket)

    def latency_sample(self, n: int = 20_000) -> list[tuple[float, float, str]]:
        """(ts, total ms, route) of at most n successful posts (a reservoir sample: the scatter of the plot)."""
        return self.con.execute(f"""
            SELECT ts, total_ms, route FROM (SELECT ts, coalesce(total_ms, 0) AS total_ms, route FROM ok
                                             WHERE ts IS NOT NULL) USING SAMPLE reservoir({int(n)} ROWS) REPEATABLE (1)
            ORDER BY ts""").fetchall()

    def close(self) -> None:
        self.con.close()
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> Report:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def summarize_files(paths: list[Path], bucket: str = "hour", memory_limit: str | None = None) -> dict:
    with Report(paths, bucket, memory_limit) as rep:
        return rep.summary() if rep.files else summary_of_nothing()


def summary_of_nothing() -> dict:
    return {"requests": 0, "succeeded": 0, "failed": 0, "routes": {}, "gate_bands": {}, "actions": {},
            "decided_by": {},
            "action_by_decided_by": {}, "evidence": {}, "action_by_evidence": {}, "list_hits": {}, "term_hits": {},
            "cache": {"lookups": 0, "hits": 0}, "errors": {}, "errors_by_stage": {}, "labels": {},
            "violation_rate": None,
            "latency_ms": {"p50": math.nan, "p99": math.nan}, "latency_by_stage_ms": {}, "ab_by_decoder_version": {},
            "ab_comparison": {}, "trends": {}, "other_stages": {}, "unreadable_lines": 0, "audit_events": {}}


def plot(rep: Report, s: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bucket = rep.bucket
    buckets = list(s["trends"])
    fig, axes = plt.subplots(3, 1, figsize=(10, 10))
    for key in sorted({k for c in s["trends"].values() for k in c if k.startswith("route:")}):
        axes[0].plot(buckets, [s["trends"][b].get(key, 0) for b in buckets], marker="o", label=key[6:])
    axes[0].set_title(f"routes per {bucket}")
    for key in sorted({k for c in s["trends"].values() for k in c if k.startswith("label:")}):
        axes[1].plot(buckets, [s["trends"][b].get(key, 0) for b in buckets], marker=".", label=key[6:])
    axes[1].set_title(f"labels per {bucket}")
    sample = rep.latency_sample()
    t0 = sample[0][0] if sample else 0
    axes[2].scatter([t - t0 for t, _, _ in sample], [ms for _, ms, _ in sample], s=6,
                    c=["tab:red" if route == "vlm" else "tab:blue" for _, _, route in sample])
    axes[2].set_title(f"server-side latency (ms) over time (s), {len(sample)} of {s['succeeded']} posts; "
                      "red = escalated to the VLM")
    for ax in axes[:2]:
        ax.legend(fontsize=7, ncol=4)
        ax.tick_params(axis="x", labelrotation=30, labelsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _ci(x) -> str:
    return f"[{x[0]:.3f}, {x[1]:.3f}]" if x else "-"


def _ms(x) -> str:
    return "-" if x is None else f"{x:.1f}"


def print_text(s: dict, bucket: str) -> None:
    vr = s["violation_rate"]
    print(f"requests {s['requests']}  succeeded {s['succeeded']}  failed {s['failed']}  "
          f"violation rate {vr if vr is None else round(vr, 3)}")
    print(f"actions {s['actions']}\ndecided {s['decided_by']}\nroutes  {s['routes']}  gate bands {s['gate_bands']}\n"
          f"errors  {s['errors']}\nlabels  {s['labels']}")
    print(f"evidence {s['evidence']}  list hits {s['list_hits'] or '-'}  term hits {s['term_hits'] or '-'}  "
          f"cache hits {s['cache']['hits']} of {s['cache']['lookups']} lookups")
    if s["other_stages"] or s["unreadable_lines"]:
        print(f"other rows {s['other_stages']}  unreadable lines {s['unreadable_lines']}")
    for event, a in s["audit_events"].items():
        print(f"audit log: {a['events']} {event} row(s), {a['rows']} rows not in this report")
    print(f"latency p50 {s['latency_ms']['p50']:.1f} ms  p99 {s['latency_ms']['p99']:.1f} ms")
    for stage, q in s["latency_by_stage_ms"].items():
        print(f"  {stage:<18} n {q['n']:>9}  p50 {q['p50']:9.1f}  p90 {q['p90']:9.1f}  p99 {q['p99']:9.1f} ms")
    print(f"\nlabel trends by {bucket} (UTC; posts per label, then per route)")
    for b, counts in s["trends"].items():
        labels = " ".join(f"{k[6:]}={v}" for k, v in sorted(counts.items()) if k.startswith("label:")) or "-"
        routes = " ".join(f"{k[6:]}={v}" for k, v in sorted(counts.items()) if k.startswith("route:"))
        actions = " ".join(f"{k[7:]}={v}" for k, v in sorted(counts.items()) if k.startswith("action:"))
        print(f"{b:<17}  labels {labels}  routes {routes}  actions {actions}")
    print("\nA/B by language_decoder version (escalated posts; 95 % CI)")
    print(f"{'version':<8} {'posts':>8} {'violation':>10} {'CI':>16} {'mean score':>11} {'CI':>16} {'p50 ms':>8} "
          f"{'p99 ms':>8}")
    for v, a in s["ab_by_decoder_version"].items():
        print(f"{v:<8} {a['posts']:>8} {a['violation_rate']:>10.3f} {_ci(a['violation_rate_ci95']):>16} "
              f"{a['mean_violation_score']:>11.3f} {_ci(a['mean_violation_score_ci95']):>16} "
              f"{_ms(a['p50_latency_ms']):>8} {_ms(a['p99_latency_ms']):>8}")
    for name, c in s["ab_comparison"].items():
        print(f"{name}: violation rate {c['violation_rate_diff']:+.4f} {_ci(c['violation_rate_diff_ci95'])}"
              f"{' (significant)' if c['significant'] else ''}, p50 {c['p50_latency_ms_diff']:+.1f} ms")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="clients.report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("audit_log", type=Path, nargs="+", help="audit.jsonl (its rotated backups are read too)")
    ap.add_argument("--plot", type=Path, default=None)
    ap.add_argument("--bucket", choices=list(BUCKETS), default="hour")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    ap.add_argument("--memory-limit", default=None, help="DuckDB's memory limit (e.g. 2GB; default 80%% of RAM): "
                                                         "past it the loaded columns spill to a temp directory")
    ap.add_argument("--threads", type=int, default=None, help="DuckDB threads (default: every core)")
    args = ap.parse_args(argv)
    missing = [p for p in args.audit_log if not log_files(p)]
    if missing:
        print(f"error: {missing[0]} does not exist", file=sys.stderr)
        return 2
    with Report(args.audit_log, args.bucket, args.memory_limit, args.threads) as rep:
        s = rep.summary()
        if args.json:
            print(json.dumps(s, indent=2, ensure_ascii=False))
        else:
            print_text(s, args.bucket)
        if args.plot:
            plot(rep, s, args.plot)
            print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
