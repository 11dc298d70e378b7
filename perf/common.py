"""Shared plumbing for the perf scenarios: paths, the perf policies, perf_analyzer's environment, server statistics
(restricted API: needs the admin key), and the one result writer (moderation/testing/results.py: commit, machine,
settings, runs, spread, failures) under the name the scenarios use, dump_json."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from moderation.testing.results import git_commit as git_commit
from moderation.testing.results import machine as machine
from moderation.testing.results import write_result

ROOT = Path(__file__).resolve().parents[1]
PERF = ROOT / "perf"
BUILD = ROOT / "build" / "perf"
RESULTS = PERF / "results"
REPO = ROOT / "model_repository"
VENV_BIN = Path(sys.executable).parent

# every scenario writes its result through this one writer
dump_json = write_result


def perf_policy_dir(directory: Path = BUILD / "policies") -> Path:
    """Shipped policies + `allow_all` (the gate settles every post: the gate path) and `escalate_all`
    (every post goes to the VLM), verdict cache off: the models are measured, not the cache (the caches have
    their own benchmarks: bench part e and perf/cache_savings/)."""
    from moderation.testing.policies import write_fixed_route_policies

    return write_fixed_route_policies(directory)


def perf_analyzer_path() -> Path:
    return VENV_BIN / "perf_analyzer"


def perf_analyzer_env() -> dict[str, str]:
    """perf_analyzer (tritonclient 2.51 wheel) links libcudart.so.12 even for CPU-only use: take it from
    the nvidia-cuda-runtime-cu12 wheel. It also needs Debian's libb64-0d (`make setup` installs it)."""
    import nvidia.cuda_runtime

    lib = Path(list(nvidia.cuda_runtime.__path__)[0]) / "lib"
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = ":".join(p for p in (str(lib), env.get("LD_LIBRARY_PATH", "")) if p)
    return env


def stats(http_url: str, headers: dict | None) -> dict[str, dict]:
    """Per-model cumulative statistics (restricted `statistics` protocol: pass the admin-key header)."""
    import tritonclient.http as httpclient

    c = httpclient.InferenceServerClient(http_url)
    try:
        s = c.get_inference_statistics(headers=headers or {})
    finally:
        c.close()
    out = {}
    for m in s.get("model_stats", []):
        inf = m.get("inference_stats", {})
        row = {"count": int(m.get("inference_count", 0)), "executions": int(m.get("execution_count", 0))}
        for k in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output",
                  "cache_hit", "cache_miss"):
            v = inf.get(k, {})
            row[f"{k}_n"] = int(v.get("count", 0))
            row[f"{k}_ns"] = int(v.get("ns", 0))
        out[f"{m['name']}"] = row
    return out


def counts_delta(before: dict, after: dict) -> dict[str, dict]:
    """Per-model difference of every cumulative statistic between two snapshots of stats()."""
    return {name: {k: a[k] - before.get(name, {}).get(k, 0) for k in a} for name, a in after.items()}


def stats_delta(before: dict, after: dict) -> dict[str, dict]:
    """Per-model per-request mean time in each stage between two snapshots (ms), plus counts."""
    out = {}
    for name, d in counts_delta(before, after).items():
        n = d["success_n"]
        if n <= 0 and d["cache_hit_n"] <= 0:
            continue
        row = {"requests": n, "executions": d["executions"], "inferences": d["count"],
               "cache_hits": d["cache_hit_n"], "cache_misses": d["cache_miss_n"]}
        for k in ("queue", "compute_input", "compute_infer", "compute_output"):
            cnt = d[f"{k}_n"]
            row[f"{k}_ms"] = d[f"{k}_ns"] / cnt / 1e6 if cnt else 0.0
        row["success_ms"] = d["success_ns"] / n / 1e6 if n else 0.0
        row["avg_batch"] = d["count"] / d["executions"] if d["executions"] else 0.0
        out[name] = row
    return out
