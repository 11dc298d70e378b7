"""`make perf`: run the perf_analyzer config of every target (perf/targets.yaml) against a Triton server,
check each result against its budget (perf/budgets.yaml), print a table, and write the raw perf_analyzer
CSVs, one JSON with everything, and PNG plots under perf/results/. Exit 1 when a budget is broken.

    .venv/bin/python -m perf run_perf                          # starts its own server (CPU, tiny models)
    .venv/bin/python -m perf run_perf --grpc-url 127.0.0.1:8001 --url 127.0.0.1:8000 --key $MODERATION_ADMIN_KEY \
        --budget a10

`moderate` targets run perf_analyzer `-i grpc` on the public port (the gateway), with no key; the internal models'
targets run `-i http` on Triton's HTTP port with the admin key, which also reads the per-stage breakdown from
Triton's statistics API. With --url the server must have the policies `allow_all` and `escalate_all`
(perf/common.py writes them; tests/conftest.py has the same) for the gate and moderate_vlm targets.

Budgets: p50 and p99 are checked at concurrency 1 (latency of one request on an idle server), throughput
is the best over the concurrency sweep.
"""
from __future__ import annotations

import argparse
import csv
import io
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path

import yaml

from perf.common import (
    BUILD,
    PERF,
    REPO,
    RESULTS,
    dump_json,
    git_commit,
    machine,
    perf_analyzer_env,
    perf_analyzer_path,
    stats,
    stats_delta,
)


def load_targets(path: Path = PERF / "targets.yaml") -> tuple[dict, dict]:
    cfg = yaml.safe_load(path.read_text())
    return cfg["defaults"], cfg["targets"]


def load_budgets(path: Path = PERF / "budgets.yaml") -> dict:
    return yaml.safe_load(path.read_text())


def pa_command(target: dict, defaults: dict, url: str, key: str, inputs: Path, csv_path: Path,
               overrides: dict | None = None, grpc_url: str | None = None) -> list[str]:
    """`url`: Triton's HTTP (internal models, with `key`); `grpc_url`: the public gRPC port (no key)."""
    s = {**defaults, **target, **(overrides or {})}
    conc = s["concurrency"]
    grpc = s["protocol"] == "grpc"
    if grpc and not grpc_url:
        raise ValueError(f"target {s['model']} runs over gRPC: give the public port's grpc_url")
    cmd = [str(perf_analyzer_path()), "-m", s["model"], "-u", grpc_url if grpc else url, "-i", s["protocol"],
           "-b", str(s["batch_size"]), "--input-data", str(inputs), f"--percentile={s['percentile']}",
           "-f", str(csv_path), "--verbose-csv", "--concurrency-range", str(conc[0])]
    if s["mode"] == "count":
        # a fixed sample; at least 4 requests per concurrent slot so every slot is exercised
        cmd += ["--request-count", str(max(int(s["request_count"]), 4 * conc[0]))]
    else:
        cmd += ["--measurement-mode=time_windows", "-p", str(s["measurement_interval_ms"]),
                "-s", str(s["stability_percentage"]), "-r", str(s["max_trials"])]
    if key and not grpc:
        cmd += ["-H", f"admin-key:{key}"]
    return cmd


def parse_csv(text: str) -> list[dict]:
    rows = []
    for r in csv.DictReader(io.StringIO(text)):
        rows.append({"concurrency": int(r["Concurrency"]), "throughput": float(r["Inferences/Second"]),
                     "p50_ms": float(r["p50 latency"]) / 1e3, "p90_ms": float(r["p90 latency"]) / 1e3,
                     "p95_ms": float(r["p95 latency"]) / 1e3, "p99_ms": float(r["p99 latency"]) / 1e3,
                     "server_queue_ms": float(r["Server Queue"]) / 1e3,
                     "server_compute_ms": (float(r["Server Compute Input"]) + float(r["Server Compute Infer"])
                                           + float(r["Server Compute Output"])) / 1e3,
                     "client_send_recv_ms": (float(r["Client Send"]) + float(r["Client Recv"])) / 1e3})
    return rows


def from_profile(path: Path) -> dict:
    """Client-side latency percentiles and throughput from perf_analyzer's per-request timestamps.
    With --request-count, perf_analyzer's own throughput divides by a window rounded to whole seconds
    (30 requests in 0.6 s were reported as 30/s); the timestamps give the exact span."""
    import numpy as np

    # The export echoes raw input bytes (images) unescaped, so it is not always valid JSON: read only the
    # per-request timestamps, which perf_analyzer writes as {"timestamp":N,...,"response_timestamps":[N,...]}.
    raw = path.read_bytes()
    start = [int(x) for x in re.findall(rb'"timestamp":\s*(\d+)', raw)]
    resp = [x.strip() for x in re.findall(rb'"response_timestamps":\s*\[([\d,\s]*)\]', raw)]
    if not start or len(start) != len(resp):
        raise ValueError(f"{path}: {len(start)} request and {len(resp)} response timestamp lists")
    pairs = [(s_, int(r.split(b",")[-1])) for s_, r in zip(start, resp, strict=True) if r]
    if len(pairs) != len(start):  # a request never answered: the run lost it, its figures are not a result
        raise ValueError(f"{path}: {len(start) - len(pairs)} of {len(start)} requests have no response")
    start, end = (np.array(x, dtype=np.int64) for x in zip(*pairs, strict=False))
    reqs = start
    lat = (end - start) / 1e6
    span_s = (end.max() - start.min()) / 1e9
    return {"requests": len(reqs), "span_s": span_s, "throughput": len(reqs) / span_s if span_s > 0 else 0.0,
            **{f"p{q}_ms": float(np.percentile(lat, q)) for q in (50, 90, 95, 99)},
            "mean_ms": float(lat.mean()), "max_ms": float(lat.max())}


def run_target(name: str, target: dict, defaults: dict, url: str, key: str, inputs_dir: Path, out: Path,
               overrides: dict | None = None, grpc_url: str | None = None) -> dict:
    """Run perf_analyzer once per concurrency level of the sweep and merge the rows."""
    s = {**defaults, **target, **(overrides or {})}
    inputs = inputs_dir / target["inputs"]
    headers = {"admin-key": key} if key else None
    before = stats(url, headers)
    rows, runs, t0 = [], [], time.monotonic()
    for c in s["concurrency"]:
        csv_path = out / f"perf_{name}_c{c}.csv"
        profile = BUILD / "profiles" / f"{name}_c{c}.json"  # per-request timestamps: large, not committed
        profile.parent.mkdir(parents=True, exist_ok=True)
        profile.unlink(missing_ok=True)
        cmd = pa_command(target, defaults, url, key, inputs, csv_path, {**(overrides or {}), "concurrency": [c]},
                         grpc_url)
        cmd += ["--profile-export-file", str(profile)]
        p = subprocess.run(cmd, env=perf_analyzer_env(), capture_output=True, text=True)
        runs.append({"concurrency": c, "rc": p.returncode, "command": " ".join(cmd[1:]).replace(key, "<key>")
                     if key else " ".join(cmd[1:]), "tail": (p.stdout + p.stderr)[-1500:]})
        if p.returncode == 0 and csv_path.exists():
            row = parse_csv(csv_path.read_text())[0]
            if s["mode"] == "count" and profile.exists():
                try:
                    exact = from_profile(profile)
                    row["perf_analyzer_reported"] = {k: row[k] for k in ("throughput", "p50_ms", "p99_ms")}
                    row.update(exact)
                except ValueError as e:  # missing responses: perf_analyzer's figures are kept, the row fails
                    row["profile_error"] = str(e)
            row["failed"] = "profile_error" in row
            rows.append(row)
    after = stats(url, headers)
    return {"target": name, "model": s["model"], "what": s.get("what", ""), "rows": rows, "runs": runs,
            "ok": all(r["rc"] == 0 for r in runs) and len(rows) == len(s["concurrency"])
            and not any(r["failed"] for r in rows),
            "failed_rows": sum(r["failed"] for r in rows),
            "wall_s": time.monotonic() - t0, "stages": stats_delta(before, after),
            "settings": {k: s[k] for k in ("protocol", "percentile", "mode", "request_count", "measurement_interval_ms",
                                           "stability_percentage", "max_trials", "batch_size", "concurrency")}}


def check(result: dict, budget: dict | None) -> list[str]:
    """Broken budget lines (empty when within budget)."""
    if not result["ok"]:
        lost = [f"c{r['concurrency']}: {r['profile_error']}" for r in result["rows"] if r.get("profile_error")]
        return ["perf_analyzer did not complete: " + "; ".join(
            [r["tail"].strip().splitlines()[-1] if r["tail"].strip() else f"rc {r['rc']}"
             for r in result["runs"] if r["rc"] != 0] + lost)]
    if budget is None:
        return []
    broken = []
    c1 = min(result["rows"], key=lambda r: r["concurrency"])
    for k in ("p50_ms", "p99_ms"):
        if k in budget and c1[k] > budget[k]:
            broken.append(f"{k} {c1[k]:.1f} > {budget[k]}")
    best = max(r["throughput"] for r in result["rows"])
    if "throughput_min" in budget and best < budget["throughput_min"]:
        broken.append(f"throughput {best:.1f}/s < {budget['throughput_min']}/s")
    return broken


def table(results: list[dict], budgets: dict) -> str:
    head = f"{'target':17s} {'conc':>4s} {'thr/s':>7s} {'p50 ms':>8s} {'p99 ms':>8s}   budget (p50/p99/thr)   status"
    lines = [head, "-" * len(head)]
    for r in results:
        b = budgets.get(r["target"])
        btxt = f"{b.get('p50_ms', '-')}/{b.get('p99_ms', '-')}/{b.get('throughput_min', '-')}" if b else "none"
        status = "OK" if not r["broken"] else "BROKEN: " + "; ".join(r["broken"])
        if not r["rows"]:
            lines.append(f"{r['target']:17s} {'-':>4s} {'-':>7s} {'-':>8s} {'-':>8s}   {btxt:21s}  {status}")
        for i, row in enumerate(r["rows"]):
            lines.append(f"{r['target'] if i == 0 else '':17s} {row['concurrency']:4d} {row['throughput']:7.1f} "
                         f"{row['p50_ms']:8.1f} {row['p99_ms']:8.1f}   {btxt if i == 0 else '':21s}  "
                         f"{status if i == 0 else ''}")
    return "\n".join(lines)


def plot(results: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in results if r["rows"]]
    paths = []
    if not done:
        return paths
    n = len(done)
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 3.4), squeeze=False)
    for ax, r in zip(axes[0], done, strict=False):
        thr = [x["throughput"] for x in r["rows"]]
        for key, style in (("p50_ms", "o-"), ("p99_ms", "s--")):
            ax.plot(thr, [x[key] for x in r["rows"]], style, label=key.split("_")[0])
        for x in r["rows"]:
            ax.annotate(f"c{x['concurrency']}", (x["throughput"], x["p50_ms"]), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
        ax.set_title(r["target"], fontsize=9)
        ax.set_xlabel("throughput (inferences/s)", fontsize=8)
        ax.set_ylabel("latency (ms)", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Latency vs throughput (CPU, 2 cores, tiny untrained models)", fontsize=10)
    fig.tight_layout()
    p = out / "perf_latency_throughput.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)

    # per-stage breakdown: mean ms per request in each composing model (queue + compute), from statistics
    fig, ax = plt.subplots(figsize=(9, 3.8))
    ensembles = {"moderate", "vlm"}
    labels, bottoms = [r["target"] for r in done], [0.0] * len(done)
    models = sorted({m for r in done for m in r["stages"] if m not in ensembles or len(r["stages"]) == 1})
    cmap = plt.get_cmap("tab20")
    for mi, m in enumerate(models):
        for part, hatch in (("queue_ms", "//"), ("compute", "")):
            vals = []
            for r in done:
                st = r["stages"].get(m)
                if not st or (m in ensembles and len(r["stages"]) > 1):
                    vals.append(0.0)
                elif part == "queue_ms":
                    vals.append(st["queue_ms"])
                else:
                    vals.append(st["compute_input_ms"] + st["compute_infer_ms"] + st["compute_output_ms"])
            ax.bar(labels, vals, bottom=bottoms, color=cmap(mi % 20), hatch=hatch, edgecolor="white",
                   label=f"{m} {'queue' if part == 'queue_ms' else 'compute'}")
            bottoms = [b + v for b, v in zip(bottoms, vals, strict=False)]
    ax.set_ylabel("mean ms per request (all concurrency levels)")
    ax.set_title("Per-stage latency from Triton's statistics API (hatched: queue)", fontsize=10)
    ax.legend(fontsize=6, ncol=2, bbox_to_anchor=(1.01, 1), loc="upper left")
    fig.tight_layout()
    p = out / "perf_stage_breakdown.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
    return paths


def run_all(url: str, key: str, targets: list[str] | None, budget_profile: str, out: Path,
            inputs_dir: Path, overrides: dict | None = None, repository: Path = REPO,
            grpc_url: str | None = None) -> dict:
    defaults, all_targets = load_targets()
    budgets = load_budgets()[budget_profile]
    out.mkdir(parents=True, exist_ok=True)
    if not inputs_dir.exists() or not any(inputs_dir.glob("*.json")):
        from perf.make_inputs import make_all
        make_all(inputs_dir, repository)
    names = targets or list(all_targets)
    results = []
    for name in names:
        t = all_targets[name]
        if not (inputs_dir / t["inputs"]).exists():
            if t.get("optional"):
                print(f"skip {name}: no {t['inputs']} (model not in the repository)")
                continue
            raise SystemExit(f"missing {inputs_dir / t['inputs']}; run python -m perf make_inputs")
        print(f"perf_analyzer: {name} ({t['model']}) concurrency {t['concurrency']}", flush=True)
        r = run_target(name, t, defaults, url, key, inputs_dir, out, overrides, grpc_url)
        r["budget"] = budgets.get(name)
        r["broken"] = check(r, r["budget"])
        results.append(r)
    return {"budget_profile": budget_profile, "results": results}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="Triton's HTTP host:port of a running server (default: start one)")
    ap.add_argument("--grpc-url", help="the public gRPC host:port (the gateway) of that server")
    ap.add_argument("--key", default="", help="admin key of that server (default $MODERATION_ADMIN_KEY)")
    ap.add_argument("--targets", nargs="*", help="subset of perf/targets.yaml")
    ap.add_argument("--budget", default="cpu_tiny", choices=["cpu_tiny", "a10"])
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--inputs", type=Path, default=BUILD / "inputs")
    ap.add_argument("--mode", choices=["count", "windows"], help="override perf/targets.yaml's mode")
    args = ap.parse_args(argv)
    overrides = {"mode": args.mode} if args.mode else None
    from perf.make_inputs import make_all

    make_all(args.inputs)  # always fresh: inputs depend on the exported models
    started = time.time()
    if args.url:
        import os
        key = args.key or os.environ.get("MODERATION_ADMIN_KEY", "")
        report = run_all(args.url, key, args.targets, args.budget, args.out, args.inputs, overrides,
                         grpc_url=args.grpc_url)
        server = {"url": args.url, "grpc_url": args.grpc_url, "started_by_perf": False}
    else:
        from perf.harness import serve

        key = secrets.token_hex(16)
        # perf_analyzer's whole sweep is one connection: one client to the gateway, so lift the per-client limit
        with serve(None, audit=BUILD / "audit.jsonl", log=BUILD / "perf-server.log", key=key,
                   env={"MODERATION_GATEWAY_PER_CLIENT": "64"}) as srv:
            report = run_all(srv.http_url, key, args.targets, args.budget, args.out, args.inputs, overrides,
                             grpc_url=srv.grpc_url)
        server = {"url": "embedded, free loopback ports", "started_by_perf": True,
                  "repository": str(REPO.relative_to(REPO.parent))}
    report.update(commit=git_commit(), machine=machine(), server=server, started=started,
                  wall_s=time.time() - started,
                  note="tiny random-initialised (untrained) CLIP and Qwen3-VL; nsfw_image has trained weights")
    print(table(report["results"], load_budgets()[args.budget]))
    report["plots"] = [str(p.relative_to(args.out.parent.parent)) if p.is_relative_to(args.out.parent.parent)
                       else str(p) for p in plot(report["results"], args.out)]
    dump_json(args.out / "perf.json", report, settings=args, runs=sum(len(r["runs"]) for r in report["results"]),
              failed=sum(not r["ok"] for r in report["results"]))
    broken = [r["target"] for r in report["results"] if r["broken"]]
    if broken:
        print(f"budget broken: {', '.join(broken)}", file=sys.stderr)
        return 1
    print(f"all {len(report['results'])} targets within the {args.budget} budget; results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
