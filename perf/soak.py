"""Bounded soak: N requests (default 2000) of mixed good posts, the bad-input catalogue and the requests Triton
refuses itself (raw tritonclient: wrong dtype/shape, unknown model, ...) against a real server through the audit
gateway, from a few concurrent clients; samples every python-backend stub's and the gateway's RSS (psutil) as it
goes, and checks that no process grew beyond a stated bound after warm-up, that every answer was the expected
one (a result for good posts, each bad case's documented code) and that the audit log has a row for every
request (the gateway's rows: exactly one per refused request). Writes the raw samples and the verdict as JSON.

    make soak                                      # own server on free ports; writes perf/results/soak/last.json
    .venv/bin/python -m perf soak --requests 500 --out /tmp/soak.json
"""
from __future__ import annotations

import argparse
import contextlib
import json
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil

from clients.client import ModerationClient, ModerationFailed, _to_failure
from moderation.ops.watchdog import stubs
from moderation.testing.bad_inputs import OK, TRITON_REJECTS, cases, triton_reject_request
from moderation.testing.samples import sample_posts
from perf.common import dump_json

WARMUP = 200  # requests before the RSS baseline: first-use allocations (policy banks, caches, arenas) settle
RSS_GROWTH_BOUND_MB = 64.0  # per stub, baseline (after warm-up) to end
BAD_FRACTION = 0.3


def rss_by_model(server_pid: int, gateway_pid: int | None = None) -> dict[str, float]:
    pids = {s.model: s.pid for s in stubs(server_pid).values()}
    if gateway_pid:
        pids["gateway"] = gateway_pid
    out = {}
    for name, pid in pids.items():
        with contextlib.suppress(psutil.NoSuchProcess):
            out[name] = round(psutil.Process(pid).memory_info().rss / 2**20, 1)
    return out


def plan(n: int, seed: int) -> list[tuple[str, object]]:
    """('good', (post, policy)), ('bad', Case) or ('reject', kind of TRITON_REJECTS), deterministic for a seed.
    The several-MB caption is sent a handful of times only (it is the one case that costs transfer time)."""
    rng = random.Random(seed)
    posts, bad = sample_posts(), [c for c in cases() if c.client_ok] + list(TRITON_REJECTS)
    items = []
    for _i in range(n):
        if rng.random() < BAD_FRACTION:
            c = rng.choice(bad)
            if isinstance(c, str):
                items.append(("reject", c))
                continue
            if c.name == "caption_5mb" and rng.random() > 0.1:
                c = bad[0]
            items.append(("bad", c))
        else:
            items.append(("good", (rng.choice(posts), rng.choice(["default", "allow_all", "escalate_all"]))))
    return items


def _refused(url: str, kind: str, i: int) -> str:
    """A request Triton refuses before any model runs, sent raw (the client library cannot build it)."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    post = sample_posts()[i % len(sample_posts())]
    model, inputs, version = triton_reject_request(grpcclient, kind, post.image_bytes(), post.text.encode(),
                                                   f"soak-reject-{i}")
    try:
        grpcclient.InferenceServerClient(url).infer(model, inputs, model_version=version,
                                                    request_id=f"soak-reject-{i}", client_timeout=60)
    except InferenceServerException as e:
        return _to_failure(e).code
    return OK


def run(url: str, server_pid: int, n: int, concurrency: int, seed: int = 7, log=print,
        gateway_pid: int | None = None) -> dict:
    items = list(enumerate(plan(n, seed)))
    samples, outcomes, unexpected = [], Counter(), []
    lock, done = threading.Lock(), [0]
    clients = threading.local()

    def one(numbered):
        i, (kind, payload) = numbered
        c = getattr(clients, "c", None) or ModerationClient(url, timeout_s=120, retries=2)
        clients.c = c
        t = time.perf_counter()
        if kind == "reject":
            name, expect = f"triton_{payload}", TRITON_REJECTS[payload][1]
            got = _refused(url, payload, i)
        else:
            if kind == "good":
                post, policy = payload
                name, image, text, opts, expect = "good", post.image_bytes(), post.text, {"policy": policy}, OK
            else:
                name, image, text = payload.name, payload.image, payload.text
                opts, expect = dict(payload.options or {}), payload.expect
            try:
                c.moderate(image, text, **opts)
                got = OK
            except ModerationFailed as e:
                got = e.code
        ms = (time.perf_counter() - t) * 1e3
        with lock:
            outcomes[(name, got)] += 1
            if got != expect:
                unexpected.append({"item": name, "expected": expect, "got": got})
            done[0] += 1
            k = done[0]
        if k == 1 or k % 100 == 0 or k == WARMUP:
            samples.append({"requests": k, "t": round(time.time(), 3),
                            "rss_mb": rss_by_model(server_pid, gateway_pid), "last_ms": round(ms, 1)})
            log(f"{k}/{n} requests, stub RSS MB: {samples[-1]['rss_mb']}")

    t0 = time.time()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, items))
    wall = time.time() - t0
    samples.append({"requests": n, "t": round(time.time(), 3), "rss_mb": rss_by_model(server_pid, gateway_pid)})
    base = next((s for s in samples if s["requests"] >= WARMUP), samples[0])["rss_mb"]  # short runs: the first
    end = samples[-1]["rss_mb"]
    growth = {m: round(end[m] - base[m], 1) for m in end if m in base}
    verdict = {
        "requests": n, "concurrency": concurrency, "wall_s": round(wall, 1), "rps": round(n / wall, 2),
        "bad_fraction": BAD_FRACTION, "warmup_requests": WARMUP, "rss_growth_bound_mb": RSS_GROWTH_BOUND_MB,
        "rss_baseline_mb": base, "rss_end_mb": end, "rss_growth_mb": growth,
        "max_growth_mb": max(growth.values()) if growth else None,
        "unexpected": unexpected[:50], "unexpected_count": len(unexpected),
        "outcomes": {f"{k[0]} -> {k[1]}": v for k, v in sorted(outcomes.items())},
        "memory_ok": all(g <= RSS_GROWTH_BOUND_MB for g in growth.values()),
        "answers_ok": not unexpected,
    }
    verdict["refused_requests"] = sum(1 for _, (kind, _) in items if kind == "reject")
    verdict["passed"] = verdict["memory_ok"] and verdict["answers_ok"] and len(growth) >= 5
    return {"verdict": verdict, "samples": samples}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--out", type=Path, default=Path("perf/results/soak/last.json"))
    args = ap.parse_args(argv)

    from moderation.testing.policies import write_fixed_route_policies
    from moderation.testing.server import running_server

    tmp = Path(tempfile.mkdtemp(prefix="soak-"))
    # the same forced-route policies the tests use (verdict cache off: repeated posts are judged every time)
    policies = write_fixed_route_policies(tmp / "policies")
    env = {"MODERATION_POLICY_DIR": str(policies), "MODERATION_AUDIT_LOG": str(tmp / "audit.jsonl")}
    with running_server(env=env, log_path=tmp / "triton.log") as srv:
        result = run(srv.grpc_url, srv.process.proc.pid, args.requests, args.concurrency,
                     gateway_pid=srv.gateway.proc.pid if srv.gateway else None)
        import tritonclient.grpc as grpcclient

        result["verdict"]["server_ready_after"] = grpcclient.InferenceServerClient(srv.grpc_url).is_server_ready()
    from moderation.core.audit import read_rows

    rows = read_rows(tmp / "audit.jsonl")
    v = result["verdict"]
    v["audit_rows"] = len(rows)
    refused = Counter(r["request_id"] for r in rows if str(r.get("request_id")).startswith("soak-reject-"))
    v["gateway_rows"] = sum(1 for r in rows if r.get("stage") == "gateway")
    # every request leaves at least one row (a retried one may leave one per try); a refused one exactly one
    v["audit_ok"] = (len(rows) >= args.requests and len(refused) == v["refused_requests"]
                     and set(refused.values()) <= {1})
    v["passed"] = v["passed"] and v["server_ready_after"] and v["audit_ok"]
    result["note"] = "untrained tiny models on a 2-core CPU shared with other work"
    # a wrong answer is a failed request: counted, beside the verdict that fails on it
    dump_json(args.out, result, settings=args, runs=1, failed=v["unexpected_count"])
    print(json.dumps(v, indent=2))
    print(f"wrote {args.out}; {'PASSED' if v['passed'] else 'FAILED'}")
    return 0 if v["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
