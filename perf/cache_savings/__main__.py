"""`python -m perf cache_savings [all|calibrate|resummarize|table]` (the package doc says what each part does)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import perf.cache_savings
from moderation.testing.traces import make_trace, trace_mix
from perf.common import dump_json, git_commit, machine

from .calibrate import calibrate
from .profiles import a10_projection, run_profile
from .summary import RESULTS, markdown, resummarize


def main(argv=None) -> int:
    doc = perf.cache_savings.__doc__
    ap = argparse.ArgumentParser(description=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", nargs="?", choices=["all", "calibrate", "resummarize", "table"], default="all")
    ap.add_argument("--posts", type=int, default=100)
    ap.add_argument("--dup-rate", type=float, default=0.30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--a10-projection", action="store_true",
                    help="no replay: the a10 profile's per-call costs in-process, applied to the replayed "
                         "invocation counts already in --out (a server replay of the a10 profile takes too long on "
                         "2 shared cores)")
    ap.add_argument("--prefix-posts", type=int, default=4)
    ap.add_argument("--prefix-rounds", type=int, default=2)
    ap.add_argument("--profile", choices=["tiny", "a10", "both"], default="both",
                    help="tiny: the committed repository; a10: perf.a10_profile's repository, whose decoder is "
                         "sized so an escalation costs ~27 gate-path posts on this CPU, as Qwen3-VL-8B on an A10 "
                         "(compute-bound)")
    args = ap.parse_args(argv)
    if args.what == "table":
        print(markdown(json.loads(args.out.read_text())))
        return 0
    if args.what == "resummarize":
        for name, prof in resummarize(args.out)["profiles"].items():
            print(name, json.dumps(prof["summary"], indent=1))
        return 0
    cal = calibrate()
    print(json.dumps({k: cal[k] for k in ("clip", "fingerprint", "thresholds", "near_copies_matched",
                                          "different_pairs_matched", "separates")}, indent=1))
    if args.what == "calibrate":
        return 0 if cal["separates"] else 1

    trace = make_trace(args.posts, args.dup_rate, seed=args.seed)
    mix = trace_mix(trace)
    print("trace", mix)
    profiles = ["tiny", "a10"] if args.profile == "both" else [args.profile]
    out = {"what": doc.strip().splitlines()[0], "commit": git_commit(), "machine": machine(),
           "trace": {"mix": mix, "seed": args.seed, "concurrency": 1, "interleaved": True,
                     "policy": "escalate_all (allow_below 0, block_at 1.01): every post goes to the VLM"},
           "untrained": True, "calibration": cal, "profiles": {}}
    if args.a10_projection:  # keep the replayed profiles of the results file, add the a10 projection
        out = json.loads(args.out.read_text())
        out["a10_projection"] = a10_projection(out, trace, args.prefix_posts, args.prefix_rounds)
        dump_json(args.out, out)
        print(json.dumps(out["a10_projection"]["summary"], indent=1))
        return 0
    for profile in profiles:
        out["profiles"][profile] = run_profile(profile, trace)
        print(profile, json.dumps(out["profiles"][profile]["summary"], indent=1))
        dump_json(args.out, out, settings=args)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
