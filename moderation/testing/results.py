"""The one writer of measured results (perf/results/*.json, and the figures a test run reports): every record says
which commit and which machine produced it, with what settings, how many runs, the spread of repeated timings and
how many calls failed, counted rather than asserted."""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def git_commit() -> str:
    """HEAD of the checkout, with `+dirty` when tracked files other than the results differ from it (a run of several
    scenarios writes perf/results/ as it goes; the code it measures is what must match HEAD); `unknown` outside a git
    checkout."""
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)perf/results"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return rev.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> dict[str, Any]:
    """CPU, cores, memory, platform and the versions that set the speed of the stages; the load average at the
    start says how busy the shared machine was."""
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 2**20:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    import onnxruntime
    import torch

    return {"cpu": cpu, "cores": os.cpu_count(), "memory": mem, "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "triton": "2.51.0 (nvidia-pytriton wheel, CPU only)",
            "gpu": None, "load_average_at_start": list(os.getloadavg())}


def spread(xs: Iterable[float]) -> dict[str, Any]:
    """One figure over runs: how many, median, min, max and the values."""
    values = list(xs)
    return {"runs": len(values), "median": statistics.median(values), "min": min(values), "max": max(values),
            "values": [round(x, 4) for x in values]}


def plain_settings(settings: argparse.Namespace | Mapping[str, Any]) -> dict[str, Any]:
    """A scenario's arguments as JSON values (paths as strings)."""
    items = vars(settings) if isinstance(settings, argparse.Namespace) else dict(settings)
    return {k: str(v) if isinstance(v, Path) else v for k, v in items.items()}


def write_result(path: Path, data: Mapping[str, Any], *, settings: argparse.Namespace | Mapping[str, Any] | None = None,
                 runs: int | None = None, timings: Mapping[str, Iterable[float]] | None = None,
                 failed: int | None = None) -> dict[str, Any]:
    """Write one result JSON and return what was written. `commit` and `machine` are added unless the data already
    has them (a summary recomputed from a committed file keeps the measurement's own); `settings`: the arguments
    it ran with; `runs`: how many times it repeated; `timings`: name -> repeated values, recorded as their spread;
    `failed`: calls that failed, counted by the caller."""
    record = dict(data)
    record.setdefault("commit", git_commit())
    record.setdefault("machine", machine())
    if settings is not None:
        record.setdefault("settings", plain_settings(settings))
    if runs is not None:
        record["runs"] = runs
    if timings is not None:
        record["spread"] = {name: spread(values) for name, values in timings.items()}
    if failed is not None:
        record["failed"] = failed
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, ensure_ascii=False, default=str) + "\n")
    return record
