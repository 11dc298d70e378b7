"""Part d: dynamic batching vs none at concurrency 16: the same load on the committed repository and on a copy
without dynamic_batching, one server after the other."""
from __future__ import annotations

from pathlib import Path

from perf.common import BUILD, stats, stats_delta
from perf.harness import UniquePosts, load, options, spread
from perf.variants import copy_repository, without_dynamic_batching

from .servers import HEADERS

CONCURRENCY = 16
REQUESTS = {"gate_path": 64, "vlm": 48}


def bench_d_arm(srv, posts: UniquePosts, runs: int, n: int, n_vlm: int, conc: int = CONCURRENCY) -> dict:
    out = {"gate_path": [], "vlm": [], "stages": []}
    warm = posts.batch(conc)
    load(srv.grpc_url, [("moderate", im, tx, options("allow_all")) for im, tx in warm], conc)
    for _r in range(runs):
        before = stats(srv.http_url, HEADERS)
        out["gate_path"].append(load(srv.grpc_url, [("moderate", im, tx, options("allow_all"))
                                                    for im, tx in posts.batch(n)], conc))
        # the VLM path: the entry model under escalate_all (the vlm ensemble takes preprocess's frames, not uploads)
        out["vlm"].append(load(srv.grpc_url, [("moderate", im, tx, options("escalate_all"))
                                              for im, tx in posts.batch(n_vlm)], conc))
        out["stages"].append(stats_delta(before, stats(srv.http_url, HEADERS)))
    return out


def unbatched_repository() -> tuple[Path, list[str]]:
    """A copy of the committed repository with dynamic_batching removed from every model that has it, and those
    models."""
    repo = copy_repository(BUILD.parent / "bench" / "repo-no-batching")
    batched = [p.name for p in repo.iterdir()
               if (p / "config.pbtxt").exists() and "dynamic_batching" in (p / "config.pbtxt").read_text()]
    return without_dynamic_batching(repo, batched), batched


def batching_result(batched: dict, unbatched: dict) -> dict:
    """Both arms and the throughput ratio batched / unbatched per run, for the gate path and the vlm ensemble."""
    ratios = {}
    for p_ in ("gate_path", "vlm"):
        rs = [b["throughput"] / u["throughput"] for b, u in zip(batched[p_], unbatched[p_], strict=True)]
        ratios[p_] = spread(rs)
    print(f"[bench] d: gate path {ratios['gate_path']['median']:.2f}x, vlm {ratios['vlm']['median']:.2f}x", flush=True)
    return {"concurrency": CONCURRENCY, "requests": dict(REQUESTS), "batched": batched, "unbatched": unbatched,
            "ratios": ratios,
            "note": "arms on two servers one after the other (same repository but for dynamic_batching)"}
