"""`make bench`: the design's claims as ratios measured side by side in one run, with the number of runs
and the spread, on this machine (CPU only, tiny random-initialised models unless stated).

  a. Triton ensemble vs the same pipeline in-process (perf/inprocess.py), p50/p99 overhead;
  b. verdict from one prefill (VerdictDecoder.score) vs the seed's path: generate(max_new_tokens=200) then
     parse the text, on the same decoder (tiny, and the A10-profile decoder);
  c. gated vs every post to the VLM (the entry model under escalate_all), at 20 % escalation, under the A10-like
     cost profile (perf/a10_profile.py);
  d. dynamic batching vs none at concurrency 16 (a repository copy without dynamic_batching), on the gate path
     and the VLM path (escalate_all);
  e. exact-duplicate request: Triton response cache hit vs miss (top-level `moderate` cache in a copy; the
     committed deep caches on the ONNX models).

Every request carries a unique image (a sample photo with a few pixels stamped, re-encoded), so no arm is
served from a cache unless (e) asks for it. Writes perf/results/bench.json (raw per-request numbers),
bench.csv (the summary table) and bench.png.

    .venv/bin/python -m perf bench [--runs 3]
"""
from __future__ import annotations

from perf.bench.batching import bench_d_arm
from perf.bench.cache_hits import bench_e
from perf.bench.gated_vs_all_vlm import bench_c
from perf.bench.prefill_vs_generate import SEED_PROMPT, bench_b, parse_seed_answer
from perf.bench.report import plot, summary_rows
from perf.bench.servers import ADMIN_KEY, HEADERS, LOADAVG, server
from perf.bench.triton_vs_inprocess import bench_a
from perf.harness import UniquePosts, infer, load, options, pct, spread

__all__ = ["ADMIN_KEY", "HEADERS", "LOADAVG", "SEED_PROMPT", "UniquePosts", "bench_a", "bench_b", "bench_c",
           "bench_d_arm", "bench_e", "infer", "load", "options", "parse_seed_answer", "pct", "plot", "server",
           "spread", "summary_rows"]
