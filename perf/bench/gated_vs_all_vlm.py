"""Part c: gated vs every post to the VLM, at 20 % escalation, under the A10-like cost profile. Every post to the VLM
is the entry model under escalate_all: the gate's stages still run (preprocess decodes once and reads the image's
text, which the VLM's prompt carries), then every post is escalated."""
from __future__ import annotations

import statistics

from perf.harness import UniquePosts, infer, load, options, spread


def bench_c(srv, posts: UniquePosts, runs: int, n_vlm: int, n_gated: int, conc: int, rate: float = 0.2) -> dict:
    import tritonclient.grpc as g

    every = round(1 / rate)
    per_run = []
    client = g.InferenceServerClient(srv.grpc_url)
    for image, text in posts.batch(2):  # warm-up both paths
        infer(client, "moderate", image, text, options("escalate_all"))
        infer(client, "moderate", image, text, options("allow_all", return_embedding=True))
    client.close()
    for r in range(runs):
        gate_only = load(srv.grpc_url, [("moderate", im, tx, options("allow_all", return_embedding=True))
                                        for im, tx in posts.batch(n_gated)], conc)
        allvlm = load(srv.grpc_url, [("moderate", im, tx, options("escalate_all")) for im, tx in posts.batch(n_vlm)],
                      conc)
        jobs = [("moderate", im, tx, options("escalate_all" if i % every == 0 else "allow_all", return_embedding=True))
                for i, (im, tx) in enumerate(posts.batch(n_gated))]
        gated = load(srv.grpc_url, jobs, conc)
        R = gate_only["throughput"] / allvlm["throughput"]
        per_run.append({"gate_only": gate_only, "all_to_vlm": allvlm, "gated": gated,
                        "ratio": gated["throughput"] / allvlm["throughput"], "R_measured": R,
                        "ratio_expected_from_R": R / (1 + rate * R)})
        print(f"[bench] c run {r + 1}: gate-only {gate_only['throughput']:.1f}/s, all-to-VLM "
              f"{allvlm['throughput']:.2f}/s, gated@{rate:.0%} {gated['throughput']:.2f}/s -> "
              f"{per_run[-1]['ratio']:.2f}x (R={R:.1f})", flush=True)
    ratios = [x["ratio"] for x in per_run]
    return {"escalation_rate": rate, "escalated_per_run": len(range(0, n_gated, every)), "concurrency": conc,
            "requests": {"all_to_vlm": n_vlm, "gated": n_gated, "gate_only": n_gated},
            "ratio": spread(ratios), "R_measured": spread([x["R_measured"] for x in per_run]),
            "ratio_expected_from_R": spread([x["ratio_expected_from_R"] for x in per_run]),
            "goal_met": statistics.median(ratios) >= 4, "per_run": per_run}
