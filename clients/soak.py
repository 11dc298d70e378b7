"""Bounded soak: N requests (default 2000) of mixed good posts and the bad-input catalogue against a real
server, from a few concurrent clients; samples every python-backend stub's RSS (psutil) as it goes, and
checks that no stub grew beyond a stated bound after warm-up and that every answer was the expected one
(a result for good posts, each bad case's documented code). Writes the raw samples and the verdict as JSON.

    make soak                                      # starts its own server on free ports, writes perf/results/soak/last.json
    .venv/bin/python -m clients.soak --requests 500 --out /tmp/soak.json
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil

from clients.bad_inputs import OK, cases
from clients.client import ModerationClient, ModerationFailed
from moderation.samples import sample_posts
from moderation.watchdog import stubs

WARMUP = 200  # requests before the RSS baseline: first-use allocations (policy banks, caches, arenas) settle
RSS_GROWTH_BOUND_MB = 64.0  # per stub, baseline (after warm-up) to end
BAD_FRACTION = 0.3


def rss_by_model(server_pid: int) -> dict[str, float]:
    out = {}
    for s in stubs(server_pid).values():
        try:
            out[s.model] = round(psutil.Process(s.pid).memory_info().rss / 2**20, 1)
        except psutil.NoSuchProcess:
            pass
    return out


def plan(n: int, seed: int) -> list[tuple[str, object]]:
    """('good', (post, policy)) or ('bad', Case), deterministic for a seed. The several-MB caption is sent a
    handful of times only (it is the one case that costs transfer time)."""
    rng = random.Random(seed)
    posts, bad = sample_posts(), [c for c in cases() if c.client_ok]
    items = []
    for i in range(n):
        if rng.random() < BAD_FRACTION:
            c = rng.choice(bad)
            if c.name == "caption_5mb" and rng.random() > 0.1:
                c = bad[0]
            items.append(("bad", c))
        else:
            items.append(("good", (rng.choice(posts), rng.choice(["default", "allow_all", "escalate_all"]))))
    return items


def run(url: str, server_pid: int, n: int, concurrency: int, seed: int = 7, log=print) -> dict:
    items = plan(n, seed)
    samples, outcomes, unexpected = [], Counter(), []
    lock, done = threading.Lock(), [0]
    clients = threading.local()

    def one(item):
        kind, payload = item
        c = getattr(clients, "c", None) or ModerationClient(url, timeout_s=120, retries=2)
        clients.c = c
        if kind == "good":
            post, policy = payload
            image, text, opts, expect = post.image_bytes(), post.text, {"policy": policy}, OK
        else:
            image, text, opts, expect = payload.image, payload.text, dict(payload.options or {}), payload.expect
        t = time.perf_counter()
        try:
            c.moderate(image, text, **opts)
            got = OK
        except ModerationFailed as e:
            got = e.code
        ms = (time.perf_counter() - t) * 1e3
        with lock:
            outcomes[(kind if kind == "good" else payload.name, got)] += 1
            if got != expect:
                unexpected.append({"item": kind if kind == "good" else payload.name, "expected": expect, "got": got})
            done[0] += 1
            k = done[0]
        if k == 1 or k % 100 == 0 or k == WARMUP:
            samples.append({"requests": k, "t": round(time.time(), 3), "rss_mb": rss_by_model(server_pid),
                            "last_ms": round(ms, 1)})
            log(f"{k}/{n} requests, stub RSS MB: {samples[-1]['rss_mb']}")

    t0 = time.time()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, items))
    wall = time.time() - t0
    samples.append({"requests": n, "t": round(time.time(), 3), "rss_mb": rss_by_model(server_pid)})
    base = next(s for s in samples if s["requests"] >= WARMUP)["rss_mb"]
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
    verdict["passed"] = verdict["memory_ok"] and verdict["answers_ok"] and len(growth) >= 5
    return {"verdict": verdict, "samples": samples}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--out", type=Path, default=Path("perf/results/soak/last.json"))
    args = ap.parse_args(argv)

    from moderation.policy import write_fixed_route_policies
    from moderation.server import running_server

    tmp = Path(tempfile.mkdtemp(prefix="soak-"))
    # the same forced-route policies the tests use (verdict cache off: repeated posts are judged every time)
    policies = write_fixed_route_policies(tmp / "policies")
    env = {"MODERATION_POLICY_DIR": str(policies), "MODERATION_AUDIT_LOG": str(tmp / "audit.jsonl")}
    with running_server(env=env, log_path=tmp / "triton.log") as srv:
        result = run(srv.grpc_url, srv.process.proc.pid, args.requests, args.concurrency)
        import tritonclient.grpc as grpcclient

        result["verdict"]["server_ready_after"] = grpcclient.InferenceServerClient(srv.grpc_url).is_server_ready()
    audit_rows = sum(1 for _ in open(tmp / "audit.jsonl", encoding="utf-8"))
    v = result["verdict"]
    v["audit_rows"] = audit_rows
    v["audit_ok"] = audit_rows >= args.requests  # every request, good or bad, leaves at least one row
    v["passed"] = v["passed"] and v["server_ready_after"] and v["audit_ok"]
    result["machine"] = {"cpus": psutil.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                         "note": "untrained tiny models on a 2-core CPU shared with other work"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps(v, indent=2))
    print(f"wrote {args.out}; {'PASSED' if v['passed'] else 'FAILED'}")
    return 0 if v["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
