"""perf_analyzer against the session Triton server: the `moderate` config runs for a few seconds and completes
with a row per concurrency and the per-stage breakdown. Latency budgets (perf/budgets.yaml) are checked by
`make perf`, not here: on CI's shared 2-core machine a latency bound says more about the neighbours than the
code. Plus the input-data encoding it relies on, and the budget check itself on made-up rows."""
from __future__ import annotations

import json
import struct

import pytest

from perf.make_inputs import b64_array, b64_bytes, decode_b64_bytes, post_entries
from perf.run_perf import check, load_budgets, load_targets, run_target
from tests.conftest import ADMIN_KEY


def test_bytes_encoding_has_length_prefix():
    d = b64_bytes([b"abc", "岁月静好".encode()])
    assert decode_b64_bytes(d) == [b"abc", "岁月静好".encode()]
    import base64

    raw = base64.b64decode(d["b64"])
    assert struct.unpack_from("<I", raw, 0)[0] == 3 and raw[4:7] == b"abc"


def test_numeric_encoding_is_little_endian_with_shape():
    import base64

    import numpy as np

    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    d = b64_array(a, with_shape=True)
    assert d["shape"] == [2, 3]
    assert np.frombuffer(base64.b64decode(d["b64"]), "<f4").tolist() == list(range(6))


def test_post_entries_are_real_samples():
    entries = post_entries("allow_all")
    assert len(entries) >= 10
    for e in entries:
        (image,) = decode_b64_bytes(e["IMAGE"])
        assert image[:3] == b"\xff\xd8\xff" or image[:4] in (b"\x89PNG", b"GIF8")
        assert json.loads(decode_b64_bytes(e["OPTIONS"])[0]) == {"policy": "allow_all"}


@pytest.mark.timeout(600)  # a hang guard: perf_analyzer that never finishes
def test_perf_analyzer_moderate_runs_through_the_public_port(triton, tmp_path):
    from perf.make_inputs import write
    defaults, targets = load_targets()
    inputs = tmp_path / "inputs"
    write(inputs, "moderate", post_entries("default"))
    # a short run: concurrency 1 then 2, 12 requests each (the full sweep is `make perf`)
    # `moderate` runs over gRPC on the public port (the gateway) with no key, as users benchmark the service
    result = run_target("moderate", targets["moderate"], defaults, triton.http_url, ADMIN_KEY, inputs, tmp_path,
                        overrides={"concurrency": [1, 2], "request_count": 12, "mode": "count"},
                        grpc_url=triton.grpc_url)
    assert result["ok"], result["runs"]
    assert all(f"-u {triton.grpc_url} -i grpc" in r["command"] and "admin-key" not in r["command"]
               for r in result["runs"])
    assert [r["concurrency"] for r in result["rows"]] == [1, 2]
    for row in result["rows"]:
        assert row["requests"] >= 12 and row["throughput"] > 0 and 0 < row["p50_ms"] <= row["p99_ms"]
    # the per-stage breakdown came from the restricted statistics API (admin key)
    assert result["stages"]["preprocess"]["requests"] >= 24
    assert result["stages"]["moderate"]["requests"] >= 24


def test_every_target_has_a_budget_on_each_machine():
    _, targets = load_targets()
    for machine, budgets in load_budgets().items():
        assert set(budgets) == set(targets), machine
        assert all({"p50_ms", "p99_ms", "throughput_min"} <= set(b) for b in budgets.values()), machine


def test_budget_check_fails_when_broken():
    row = {"concurrency": 1, "throughput": 5.0, "p50_ms": 50.0, "p99_ms": 90.0}
    result = {"ok": True, "rows": [row], "runs": []}
    assert check(result, {"p50_ms": 100, "p99_ms": 100, "throughput_min": 1}) == []
    assert len(check(result, {"p50_ms": 10, "p99_ms": 50, "throughput_min": 10})) == 3
    assert check({"ok": False, "rows": [], "runs": [{"rc": 1, "tail": "boom"}]}, None)


def test_a_row_with_missing_responses_fails_its_target(tmp_path):
    """perf_analyzer exited 0 but one request of eight has no response: the row is failed, never within budget."""
    from perf.run_perf import from_profile

    profile = tmp_path / "p.json"
    answered = {i: "" if i == 7 else str(i * 10 + 5) for i in range(8)}
    requests = ",".join(f'{{"timestamp":{i * 10},"response_timestamps":[{r}]}}' for i, r in answered.items())
    profile.write_text('{"experiments":[{"requests":[' + requests + ']}]}')
    with pytest.raises(ValueError, match="1 of 8 requests have no response"):
        from_profile(profile)
    row = {"concurrency": 4, "throughput": 5.0, "p50_ms": 50.0, "p99_ms": 90.0, "failed": True,
           "profile_error": "8 request and 7 response timestamp lists"}
    result = {"ok": False, "rows": [row], "runs": [{"rc": 0, "tail": ""}]}
    broken = check(result, {"p50_ms": 100, "p99_ms": 100, "throughput_min": 1})
    assert broken and "c4: 8 request and 7 response" in broken[0]


def test_every_perf_script_is_a_scenario_of_the_one_entry_point():
    """Each module under perf/ with a main(argv) is registered in perf/scenarios.py (python -m perf <name>), and
    every registered module exists and has that main."""
    import ast
    from pathlib import Path

    from perf.__main__ import main
    from perf.scenarios import SCENARIOS, listing

    root = Path(__file__).resolve().parents[1]
    with_main = set()
    for path in (root / "perf").rglob("*.py"):
        tree = ast.parse(path.read_text())
        if any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body) and path.name != "__main__.py" \
                or path.name == "__main__.py" and path.parent.name != "perf":
            with_main.add(".".join(path.relative_to(root).with_suffix("").parts))
    assert with_main == {s.module for s in SCENARIOS.values()}
    assert all(f"  {name} " in listing() for name in SCENARIOS)
    assert main(["no_such_scenario"]) == 2 and main(["--list"]) == 0
