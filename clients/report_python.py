"""The previous audit report, kept only as the baseline of perf/report_bench.py (and of its agreement test):
it reads every row into Python dicts (moderation.core.audit.read_rows) and counts them with Counters and numpy.
The report itself is clients/report.py (DuckDB SQL over the JSONL files, no rows in Python).

    .venv/bin/python -m clients.report_python build/audit/audit.jsonl [--plot report.png] [--bucket minute|hour]
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from moderation.core.audit import read_rows

OPERATOR_STAGES = ("admin", "feedback", "watchdog")


def moderation_rows(rows: list[dict]) -> list[dict]:
    """Request rows (successes and failures), without operators' actions and reviewers' feedback."""
    return [r for r in rows if r.get("stage") not in OPERATOR_STAGES]


def _bucket(ts: float, size: str) -> str:
    dt = datetime.fromtimestamp(ts, tz=UTC)
    return dt.strftime("%Y-%m-%d %H:00" if size == "hour" else "%Y-%m-%d %H:%M")


def summarize(rows: list[dict], bucket: str = "hour") -> dict:
    reqs = moderation_rows(rows)
    ok = [r for r in reqs if not r.get("error") and r.get("route")]
    lat = np.array([r["latency_ms"]["total"] for r in ok if "total" in r.get("latency_ms", {})] or [np.nan])
    ab: dict[str, list[dict]] = defaultdict(list)
    for r in ok:
        if r.get("route") == "vlm":
            ab[r.get("model_versions", {}).get("language_decoder", "?")].append(r)
    trends: dict[str, Counter] = defaultdict(Counter)
    for r in ok:
        b = _bucket(r["ts"], bucket)
        trends[b][f"route:{r['route']}"] += 1
        trends[b][f"action:{r.get('action', '-')}"] += 1
        for lab in r.get("labels", []):
            trends[b][f"label:{lab['name']}"] += 1
    return {
        "requests": len(reqs), "succeeded": len(ok), "failed": len(reqs) - len(ok),
        "routes": dict(Counter(r["route"] for r in ok)),
        "actions": dict(Counter(r.get("action", "-") for r in ok)),
        "decided_by": dict(Counter(r.get("decided_by", "-") for r in ok)),
        "errors": dict(Counter(r["error"]["code"] for r in reqs if r.get("error"))),
        "labels": dict(Counter(lab["name"] for r in ok for lab in r.get("labels", []))),
        "violation_rate": float(np.mean([r["violation"] for r in ok])) if ok else None,
        "latency_ms": {"p50": float(np.nanpercentile(lat, 50)), "p99": float(np.nanpercentile(lat, 99))},
        "ab_by_decoder_version": {
            v: {"posts": len(rs), "violation_rate": float(np.mean([r["violation"] for r in rs])),
                "mean_violation_score": float(np.mean([r["scores"].get("violation", 0.0) for r in rs])),
                "p50_latency_ms": float(np.percentile([r["latency_ms"]["total"] for r in rs], 50))}
            for v, rs in sorted(ab.items())},
        "trends": {b: dict(c) for b, c in sorted(trends.items())},
    }


def plot(rows: list[dict], out: Path, bucket: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in moderation_rows(rows) if not r.get("error")]
    s = summarize(rows, bucket)
    buckets = list(s["trends"])
    fig, axes = plt.subplots(3, 1, figsize=(10, 10))
    for key in sorted({k for c in s["trends"].values() for k in c if k.startswith("route:")}):
        axes[0].plot(buckets, [s["trends"][b].get(key, 0) for b in buckets], marker="o", label=key[6:])
    axes[0].set_title(f"routes per {bucket}")
    for key in sorted({k for c in s["trends"].values() for k in c if k.startswith("label:")}):
        axes[1].plot(buckets, [s["trends"][b].get(key, 0) for b in buckets], marker=".", label=key[6:])
    axes[1].set_title(f"labels per {bucket}")
    t0 = min((r["ts"] for r in ok), default=0)
    axes[2].scatter([r["ts"] - t0 for r in ok], [r["latency_ms"].get("total", 0) for r in ok], s=6,
                    c=["tab:red" if r["route"] == "vlm" else "tab:blue" for r in ok])
    axes[2].set_title("server-side latency (ms) over time (s); red = escalated to the VLM")
    for ax in axes[:2]:
        ax.legend(fontsize=7, ncol=4)
        ax.tick_params(axis="x", labelrotation=30, labelsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="clients.report_python", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("audit_log", type=Path)
    ap.add_argument("--plot", type=Path, default=None)
    ap.add_argument("--bucket", choices=["minute", "hour"], default="hour")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = ap.parse_args(argv)
    if not args.audit_log.exists():
        print(f"error: {args.audit_log} does not exist", file=sys.stderr)
        return 2
    rows = read_rows(args.audit_log)
    s = summarize(rows, args.bucket)
    if args.json:
        print(json.dumps(s, indent=2, ensure_ascii=False))
    else:
        print(f"requests {s['requests']}  succeeded {s['succeeded']}  failed {s['failed']}  "
              f"violation rate {s['violation_rate'] if s['violation_rate'] is None else round(s['violation_rate'], 3)}")
        print(f"actions {s['actions']}\ndecided {s['decided_by']}\nroutes  {s['routes']}\nerrors  {s['errors']}\n"
              f"labels  {s['labels']}")
        print(f"latency p50 {s['latency_ms']['p50']:.1f} ms  p99 {s['latency_ms']['p99']:.1f} ms")
        print(f"\nlabel trends by {args.bucket} (UTC; posts per label, then per route)")
        for b, counts in s["trends"].items():
            labels = " ".join(f"{k[6:]}={v}" for k, v in sorted(counts.items()) if k.startswith("label:")) or "-"
            routes = " ".join(f"{k[6:]}={v}" for k, v in sorted(counts.items()) if k.startswith("route:"))
            actions = " ".join(f"{k[7:]}={v}" for k, v in sorted(counts.items()) if k.startswith("action:"))
            print(f"{b:<17}  labels {labels}  routes {routes}  actions {actions}")
        print("\nA/B by language_decoder version (escalated posts)")
        print(f"{'version':<8} {'posts':>6} {'violation':>10} {'mean score':>11} {'p50 ms':>8}")
        for v, a in s["ab_by_decoder_version"].items():
            print(f"{v:<8} {a['posts']:>6} {a['violation_rate']:>10.3f} {a['mean_violation_score']:>11.3f} "
                  f"{a['p50_latency_ms']:>8.1f}")
    if args.plot:
        plot(rows, args.plot, args.bucket)
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
