"""`python -m perf bench`: every part in one run, the servers one after the other (the package doc says what
each part measures)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import perf.bench
from perf.common import BUILD, REPO, RESULTS, dump_json, git_commit, machine
from perf.harness import UniquePosts

from .batching import REQUESTS, batching_result, bench_d_arm, unbatched_repository
from .cache_hits import bench_e
from .gated_vs_all_vlm import bench_c
from .prefill_vs_generate import bench_b
from .report import plot, print_table, summary_rows, write_csv
from .servers import LOADAVG, a10_repository, server
from .triton_vs_inprocess import bench_a


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=perf.bench.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)

    t_start = time.time()
    BUILD.mkdir(parents=True, exist_ok=True)
    posts = UniquePosts()
    res = {"commit": git_commit(), "machine": machine(), "runs": args.runs,
           "note": "random-initialised (untrained) CLIP and Qwen3-VL; nsfw_image has trained weights. Timings "
                   "are ratios measured side by side in this one run on a shared 2-core CPU."}
    a10_repo, res["a10_profile"] = a10_repository()

    with server(REPO, "committed") as srv:
        res["a_triton_vs_inprocess"] = bench_a(srv, posts, args.runs, n_gate=20, n_vlm=8)
        batched = bench_d_arm(srv, posts, args.runs, n=REQUESTS["gate_path"], n_vlm=REQUESTS["vlm"])
    nb, unbatched_models = unbatched_repository()
    res["d_models_unbatched"] = sorted(unbatched_models)
    with server(nb, "no-batching") as srv:
        unbatched = bench_d_arm(srv, posts, args.runs, n=REQUESTS["gate_path"], n_vlm=REQUESTS["vlm"])
    res["d_batching"] = batching_result(batched, unbatched)

    res["b_prefill_vs_generate"] = [
        bench_b(REPO / "language_decoder" / "1" / "checkpoint", REPO, posts, args.runs, "tiny"),
        bench_b(a10_repo / "language_decoder" / "1" / "checkpoint", a10_repo, posts, args.runs, "A10 profile")]

    with server(a10_repo, "a10-profile") as srv:
        res["c_gated_vs_all_vlm"] = bench_c(srv, posts, args.runs, n_vlm=8, n_gated=40, conc=4)
        res["e_response_cache"] = bench_e(srv, posts, n_posts=4, hits_per_post=5)

    res["wall_s"] = time.time() - t_start
    res["load_average_at_server_start"] = LOADAVG
    rows = summary_rows(res)
    res["summary"] = rows
    args.out.mkdir(parents=True, exist_ok=True)
    dump_json(args.out / "bench.json", res, settings=args, runs=args.runs)
    write_csv(rows, args.out / "bench.csv")
    plot(res, args.out / "bench.png")
    print_table(rows)
    print(f"[bench] {res['wall_s']:.0f} s; results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
