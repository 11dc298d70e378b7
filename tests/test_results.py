"""The committed benchmark results say where they come from: every JSON under perf/results/ was written through the
one result writer (moderation/testing/results.py write_result) and names the commit whose code it measured (clean:
no `+dirty`, a commit of this repository's history) and the machine. perf/results/gpu/ holds what a lent GPU
measured (perf/gpu/measure_8b.py, which cannot run here): it names its device instead."""
from __future__ import annotations

import json
import re
import subprocess

import pytest

from tests.conftest import ROOT

RESULTS = ROOT / "perf" / "results"
FILES = sorted(p for p in RESULTS.rglob("*.json") if "gpu" not in p.relative_to(RESULTS).parts)


def _in_history(commit: str) -> bool:
    shallow = subprocess.run(["git", "rev-parse", "--is-shallow-repository"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.strip() == "true"
    if shallow:  # a shallow clone cannot tell; the format check still holds
        return True
    return subprocess.run(["git", "merge-base", "--is-ancestor", commit, "HEAD"], cwd=ROOT,
                          capture_output=True).returncode == 0


def test_there_are_results_to_check():
    assert len(FILES) >= 15, FILES


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(RESULTS)))
def test_a_result_names_its_clean_commit_and_its_machine(path):
    data = json.loads(path.read_text(encoding="utf-8"))
    commit = data.get("commit", "")
    assert re.fullmatch(r"[0-9a-f]{40}", commit), f"{path.name}: commit {commit!r} (measured on changed code?)"
    assert _in_history(commit), f"{path.name}: {commit} is not in this branch's history"
    assert data.get("machine", {}).get("cores"), f"{path.name}: no machine"


def test_a_gpu_result_names_its_device():
    for path in sorted((RESULTS / "gpu").glob("*.json")):
        assert json.loads(path.read_text(encoding="utf-8")).get("device"), path.name
