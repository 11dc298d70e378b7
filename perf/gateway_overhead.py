"""What the audit gateway (moderation/gateway.py) costs: the same requests to Triton's own gRPC port and to the
gateway in front of it, side by side in one run on one server, arms interleaved so machine noise hits both.

  ready      ServerReady (no model runs): the proxy's own cost per call;
  gate_path  `moderate` with policy allow_all (the cheapest real request, ~all traffic in production);
  rejected   a wrong-dtype request Triton refuses before any model runs: direct it is not audited, through the
             gateway it gets its audit row (flock + fsync) before the answer;
  gate_c8    the gate path at concurrency 8 (throughput, p50/p99).

Writes perf/results/gateway_overhead.json (raw per-request seconds, summary, machine, commit).

    .venv/bin/python -m perf gateway_overhead [--runs 3] [--n 60]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from clients.client import build_inputs
from moderation.testing.samples import sample_posts
from perf.common import BUILD, REPO, RESULTS, dump_json, git_commit, machine
from perf.harness import pct, serve


def _gate_request(client, i: int, tag: str):
    post = sample_posts()[i % len(sample_posts())]
    inputs, outputs = build_inputs(grpcclient, post.image_bytes(), post.text,
                                   {"request_id": f"gw-{tag}-{i}", "policy": "allow_all"})
    client.infer("moderate", inputs, outputs=outputs, client_timeout=120)


def _rejected_request(client, i: int, tag: str):
    x = grpcclient.InferInput("IMAGE", [1, 1], "FP32")
    x.set_data_from_numpy(np.zeros((1, 1), np.float32))
    try:
        client.infer("moderate", [x], request_id=f"gw-{tag}-{i}", client_timeout=60)
    except InferenceServerException:
        return
    raise RuntimeError("a wrong-dtype request was accepted")


CALLS = {"ready": lambda c, i, tag: c.is_server_ready(), "gate_path": _gate_request, "rejected": _rejected_request}


def _timed(fn, *args) -> float:
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


def _summary(xs: list[float]) -> dict:
    return {"n": len(xs), "p50_ms": round(pct(xs, 50) * 1e3, 3), "p99_ms": round(pct(xs, 99) * 1e3, 3),
            "mean_ms": round(float(np.mean(xs)) * 1e3, 3)}


def run(runs: int, n: int) -> dict:
    out: dict = {"what": __doc__.split("\n\n")[0], "runs": runs, "requests_per_arm_per_run": n,
                 "machine": machine(), "commit": git_commit(), "raw_s": {}, "summary": {}}
    with serve(REPO, audit=BUILD / "gateway_audit.jsonl", log=BUILD / "gateway_overhead.log") as srv:
        clients = {"direct": srv.direct_client(), "gateway": grpcclient.InferenceServerClient(srv.grpc_url)}
        arms = list(clients)
        for name, fn in CALLS.items():
            for arm, c in clients.items():  # warm-up, not recorded
                for i in range(5):
                    fn(c, i, f"warm-{arm}")
            raw = {arm: [] for arm in arms}
            for r in range(runs):
                for i in range(n):
                    order = list(arms) if (i + r) % 2 == 0 else list(arms)[::-1]
                    for arm in order:
                        raw[arm].append(_timed(fn, clients[arm], i, f"{name}-{arm}-{r}"))
            out["raw_s"][name] = raw
            p50 = {arm: statistics.median(v) for arm, v in raw.items()}
            out["summary"][name] = {**{arm: _summary(v) for arm, v in raw.items()},
                                    "added_p50_ms": round((p50["gateway"] - p50["direct"]) * 1e3, 3),
                                    "ratio_p50": round(p50["gateway"] / p50["direct"], 3)}
            print(name, json.dumps(out["summary"][name]), flush=True)
        # concurrency 8 on the gate path: throughput and tail, one arm after the other, alternating per run
        raw_c8: dict = {arm: {"latency": [], "rps": []} for arm in arms}
        for r in range(runs):
            for arm in (list(arms) if r % 2 == 0 else list(arms)[::-1]):
                cs = [srv.direct_client() if arm == "direct" else grpcclient.InferenceServerClient(srv.grpc_url)
                      for _ in range(8)]
                t0 = time.perf_counter()
                tag = f"c8-{arm}-{r}"
                with ThreadPoolExecutor(8) as pool:
                    lat = list(pool.map(lambda i, cs=cs, tag=tag: _timed(_gate_request, cs[i % 8], i, tag),
                                        range(n * 2)))
                raw_c8[arm]["rps"].append(round(n * 2 / (time.perf_counter() - t0), 3))
                raw_c8[arm]["latency"] += lat
        out["raw_s"]["gate_c8"] = raw_c8
        out["summary"]["gate_c8"] = {arm: {**_summary(v["latency"]), "rps_per_run": v["rps"],
                                           "rps_median": statistics.median(v["rps"])} for arm, v in raw_c8.items()}
        out["summary"]["gate_c8"]["throughput_ratio"] = round(
            out["summary"]["gate_c8"]["gateway"]["rps_median"] / out["summary"]["gate_c8"]["direct"]["rps_median"], 3)
        print("gate_c8", json.dumps(out["summary"]["gate_c8"]), flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--n", type=int, default=60)
    args = ap.parse_args(argv)
    BUILD.mkdir(parents=True, exist_ok=True)
    result = run(args.runs, args.n)
    dump_json(RESULTS / "gateway_overhead.json", result, settings=args, runs=args.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
