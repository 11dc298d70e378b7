"""Part a: the Triton ensemble vs the same pipeline in-process (perf/inprocess.py), p50/p99 overhead."""
from __future__ import annotations

import os
import time

from perf.common import BUILD, REPO, perf_policy_dir
from perf.harness import UniquePosts, infer, options, pct, spread


def bench_a(srv, posts: UniquePosts, runs: int, n_gate: int, n_vlm: int) -> dict:
    import tritonclient.grpc as g

    from perf.inprocess import InProcessPipeline

    os.environ["MODERATION_POLICY_DIR"] = str(perf_policy_dir())
    pipe = InProcessPipeline(REPO, BUILD / "bench-inprocess.jsonl")
    client = g.InferenceServerClient(srv.grpc_url)
    out = {}
    for path, policy, n in (("gate_path", "allow_all", n_gate), ("vlm_path", "escalate_all", n_vlm)):
        for image, text in posts.batch(2):  # warm-up: concept bank, prefix KV, first-call allocations
            infer(client, "moderate", image, text, options(policy))
            pipe.moderate(image, text, options(policy))
        tri, inp, per_run = [], [], []
        for r in range(runs):
            batch = posts.batch(n)
            t = [infer(client, "moderate", im, tx, options(policy)) for im, tx in batch]
            p = []
            for im, tx in batch:
                t0 = time.perf_counter()
                res = pipe.moderate(im, tx, options(policy))
                p.append((time.perf_counter() - t0) * 1e3)
                assert res["route"] == ("gate" if policy == "allow_all" else "vlm"), res["route"]
            tri += t
            inp += p
            per_run.append({"triton_p50": pct(t, 50), "inprocess_p50": pct(p, 50),
                            "overhead_ms": pct(t, 50) - pct(p, 50)})
            print(f"[bench] a {path} run {r + 1}: triton p50 {pct(t, 50):.1f} ms, in-process {pct(p, 50):.1f} ms",
                  flush=True)
        p50t, p50i, p99t, p99i = pct(tri, 50), pct(inp, 50), pct(tri, 99), pct(inp, 99)
        out[path] = {"policy": policy, "requests_per_run": n, "triton_p50_ms": p50t, "inprocess_p50_ms": p50i,
                     "triton_p99_ms": p99t, "inprocess_p99_ms": p99i, "overhead_p50_ms": p50t - p50i,
                     "overhead_p50_pct": 100 * (p50t - p50i) / p50i, "overhead_p99_ms": p99t - p99i,
                     "goal_p50_ms": 0.05 * p50i + 1.0, "goal_met": (p50t - p50i) <= 0.05 * p50i + 1.0,
                     "overhead_ms_spread": spread([x["overhead_ms"] for x in per_run]), "per_run": per_run,
                     "triton_latencies_ms": tri, "inprocess_latencies_ms": inp}
    client.close()
    del pipe
    return out
