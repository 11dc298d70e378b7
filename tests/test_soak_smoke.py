"""`make soak` (perf/soak.py) in miniature against the session server, so the soak's own code is exercised in
`make test`: a short mixed run (good posts, the catalogue, requests Triton refuses itself) gets only expected
answers, samples the stubs' and the gateway's RSS, and the refused requests each have their gateway audit row."""
from __future__ import annotations

from moderation.core.audit import read_rows
from perf.soak import plan, run

N = 40


def test_soak_run_in_miniature(triton, audit_log):
    seed = next(s for s in range(100) if sum(k == "reject" for k, _ in plan(N, s)) >= 3)
    result = run(triton.grpc_url, triton.process.proc.pid, N, 2, seed=seed, log=lambda *_: None,
                 gateway_pid=triton.gateway.proc.pid)
    v = result["verdict"]
    assert v["answers_ok"], v["unexpected"]
    assert v["refused_requests"] >= 3 and sum(v["outcomes"].values()) == N
    assert "gateway" in v["rss_end_mb"] and len(v["rss_end_mb"]) >= 6
    refused = [i for i, (kind, _) in enumerate(plan(N, seed)) if kind == "reject"]
    rows = read_rows(audit_log)
    for i in refused:
        mine = [r for r in rows if r.get("request_id") == f"soak-reject-{i}"]
        assert len(mine) == 1 and mine[0]["stage"] == "gateway", mine
