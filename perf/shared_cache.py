"""The verdict cache shared across replicas (Redis, MODERATION_REDIS_URL) vs one in-process cache per replica, and
a Redis outage under load.

    .venv/bin/python -m perf shared_cache [--posts 100] [--dup-rate 0.3] [--popular 5,10] [--outage-s 15]
                                          # writes perf/results/shared_cache.json

  replay   two real servers with in-process caches, then two sharing one Redis (a redis-server started here, no
           persistence). The same traces (perf.cache_savings make_trace: `dup_rate` copies of earlier posts, 40 %
           exact, 60 % near, of `popular` popular posts: 5 = many copies of each, 10 = fewer; every cache purged
           before each trace) are sent round-robin, post i to server i % 2, one request at a time, policy
           `escalate_cached` (the gate escalates every post; cache on). Hit rate = posts answered with route
           "cache" over all posts, and over the duplicates (the most any cache can answer); a hit on a unique
           post would be a false hit (counted).
  outage   on the shared pair: 3 client threads send posts round-robin to both servers (a small set of sample
           posts, so most are hits in steady state), then the redis-server is SIGKILLed, then started again
           (empty): requests sent / failed and latency p50/p99 in each window, and the time from the restart to
           the first cache hit. While Redis is down every post is a miss, so it goes to the VLM: the outage window's
           latency is the cache-off latency, not an error path.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import random
import threading
import time
import uuid
from pathlib import Path

from moderation.testing.traces import unique_image
from perf.common import REPO, RESULTS, ROOT, dump_json, git_commit, machine, stats
from perf.harness import pct, send, serve

WORK = ROOT / "build" / "shared_cache"
ADMIN_KEY = "shared-cache-bench"
POLICY = "escalate_cached"
OUT = RESULTS / "shared_cache.json"


def _policies():
    from perf.cache_savings import replay_policies

    return replay_policies(WORK / "policies")


def _pair(tag: str, env: dict[str, str]):
    """Two servers (replicas) with the same policies and environment, up at once."""
    stack = contextlib.ExitStack()
    policies = _policies()
    servers = []
    for name in ("a", "b"):
        servers.append(stack.enter_context(serve(REPO, audit=WORK / f"audit-{tag}-{name}.jsonl",
                                                 log=WORK / f"triton-{tag}-{name}.log", key=ADMIN_KEY,
                                                 policy_dir=policies, env=env)))
    return stack, servers


def _decoder_calls(srv) -> int:
    from moderation.core.auth import admin_headers

    s = stats(srv.http_url, admin_headers(ADMIN_KEY, "http"))
    return sum(s.get(m, {}).get("count", 0) for m in ("language_decoder", "language_decoder_int8"))


def replay_round_robin(servers, trace: list[dict], tag: str) -> dict:
    import tritonclient.grpc as grpcclient

    from moderation.testing.samples import sample_posts

    clients = [grpcclient.InferenceServerClient(s.grpc_url) for s in servers]
    try:
        rng = random.Random(7)
        for i, s in enumerate(sample_posts()[-2:]):  # warm-up posts outside the trace
            for c in clients:
                send(c, unique_image(s.image_bytes(), rng), f"warm-up {tag} {i} {uuid.uuid4().hex[:6]}",
                     {"policy": POLICY, "request_id": f"warm-{tag}-{i}-{uuid.uuid4().hex[:6]}"})
        calls0 = [_decoder_calls(s) for s in servers]
        rows = []
        for i, post in enumerate(trace):
            k = i % len(servers)
            t = time.perf_counter()
            r = send(clients[k], post["image"], post["text"], {"policy": POLICY, "request_id": f"{tag}-{i}"})
            ms = (time.perf_counter() - t) * 1e3
            cache = r.get("cache") or {}
            rows.append({"i": i, "server": "ab"[k], "kind": post["kind"], "route": r["route"],
                         "hit": bool(cache.get("hit")), "ms": round(ms, 2),
                         "lookup_ms": cache.get("lookup_ms") if cache.get("hit") else None})
        calls = [_decoder_calls(s) - c0 for s, c0 in zip(servers, calls0, strict=True)]
    finally:
        for c in clients:
            c.close()
    dups = [r for r in rows if r["kind"] not in ("unique", "original")]
    hits = [r for r in rows if r["hit"]]
    lookups = [r["lookup_ms"] for r in hits if r["lookup_ms"] is not None]
    return {
        "posts": len(rows), "duplicates": len(dups), "hits": len(hits),
        "hit_rate": round(len(hits) / len(rows), 4),
        "hit_rate_of_duplicates": round(sum(r["hit"] for r in dups) / len(dups), 4) if dups else None,
        "false_hits": sum(r["hit"] for r in rows if r["kind"] in ("unique", "original")),
        "hits_by_server": {s: sum(r["hit"] for r in rows if r["server"] == s) for s in "ab"},
        "hits_by_kind": {k: sum(r["hit"] for r in dups if r["kind"] == k) for k in sorted({r["kind"] for r in dups})},
        "decoder_calls": {"a": calls[0], "b": calls[1], "total": sum(calls)},
        "hit_lookup_ms": {"p50": round(pct(lookups, 50), 3), "p99": round(pct(lookups, 99), 3)} if lookups else None,
        "latency_ms": {"p50": round(pct([r["ms"] for r in rows], 50), 1),
                       "p99": round(pct([r["ms"] for r in rows], 99), 1)},
        "rows": rows,
    }


def outage_run(servers, redis_server, before_s: float, outage_s: float, after_s: float, threads: int = 3) -> dict:
    import tritonclient.grpc as grpcclient

    from moderation.testing.samples import sample_posts

    posts = [(p.image_bytes(), f"{p.text} (outage run)") for p in sample_posts()[:6]]
    rows, lock, stop = [], threading.Lock(), threading.Event()
    t0 = time.monotonic()
    marks = {}

    def worker(w: int):
        clients = [grpcclient.InferenceServerClient(s.grpc_url) for s in servers]
        i = 0
        try:
            while not stop.is_set():
                image, text = posts[(w * 2 + i) % len(posts)]
                k = (w + i) % len(clients)
                t = time.monotonic()
                row = {"t": round(t - t0, 3), "server": "ab"[k], "ok": True}
                try:
                    r = send(clients[k], image, text, {"policy": POLICY, "request_id": f"outage-{w}-{i}"})
                    cache = r.get("cache") or {}
                    row.update(route=r["route"], hit=bool(cache.get("hit")),
                               unavailable=bool(cache.get("unavailable")))
                except Exception as e:  # noqa: BLE001 - a failed request is what this run counts
                    row.update(ok=False, error=repr(e)[:300])
                row["ms"] = round((time.monotonic() - t) * 1e3, 2)
                with lock:
                    rows.append(row)
                i += 1
        finally:
            for c in clients:
                c.close()

    ts = [threading.Thread(target=worker, args=(w,), daemon=True) for w in range(threads)]
    for t in ts:
        t.start()
    time.sleep(before_s)
    marks["killed"] = round(time.monotonic() - t0, 3)
    redis_server.kill()
    time.sleep(outage_s)
    redis_server.start()
    marks["restarted"] = round(time.monotonic() - t0, 3)
    time.sleep(after_s)
    stop.set()
    for t in ts:
        t.join(300)
    marks["end"] = round(time.monotonic() - t0, 3)

    def window(lo: float, hi: float) -> dict:
        # a request belongs to the window it started in
        w = [r for r in rows if lo <= r["t"] < hi]
        ok = [r for r in w if r["ok"]]
        ms = [r["ms"] for r in ok]
        return {"from_s": lo, "to_s": hi, "sent": len(w), "failed": len(w) - len(ok),
                "hits": sum(r.get("hit", False) for r in ok),
                "hit_rate": round(sum(r.get("hit", False) for r in ok) / len(ok), 4) if ok else None,
                "cache_unavailable": sum(r.get("unavailable", False) for r in ok),
                "latency_ms": {"p50": round(pct(ms, 50), 1), "p99": round(pct(ms, 99), 1)} if ms else None}

    first_hit = min((r["t"] for r in rows if r.get("hit") and r["t"] >= marks["restarted"]), default=None)
    return {
        "threads": threads, "marks_s": marks,
        "sent": len(rows), "failed": sum(not r["ok"] for r in rows),
        "errors": [r["error"] for r in rows if not r["ok"]][:5],
        "before": window(0.0, marks["killed"]),
        "during_outage": window(marks["killed"], marks["restarted"]),
        "after_restart": window(marks["restarted"], marks["end"] + 1),
        "first_hit_after_restart_s": None if first_hit is None else round(first_hit - marks["restarted"], 3),
        "rows": rows,
    }


def _summary(a: dict, b: dict) -> dict:
    return {
        "hit_rate": {"in_process": a["hit_rate"], "shared_redis": b["hit_rate"]},
        "hit_rate_of_duplicates": {"in_process": a["hit_rate_of_duplicates"],
                                   "shared_redis": b["hit_rate_of_duplicates"]},
        "decoder_calls": {"in_process": a["decoder_calls"]["total"], "shared_redis": b["decoder_calls"]["total"]},
        "false_hits": {"in_process": a["false_hits"], "shared_redis": b["false_hits"]},
        "hit_lookup_ms_p50": {"in_process": (a["hit_lookup_ms"] or {}).get("p50"),
                              "shared_redis": (b["hit_lookup_ms"] or {}).get("p50")},
    }


def _purge(servers) -> None:
    """Empty every verdict cache of the pair (clients.admin purge-caches on each) before the next trace."""
    from moderation.ops.purge import purge_server_caches

    for srv in servers:
        purge_server_caches(srv.grpc_url, ADMIN_KEY)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--posts", type=int, default=100)
    ap.add_argument("--dup-rate", type=float, default=0.3)
    ap.add_argument("--popular", default="5,10", help="traces: how many popular posts the copies are of")
    ap.add_argument("--outage-s", type=float, default=15.0)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)

    import redis as redis_py

    from moderation.testing.redis_server import RedisServer
    from moderation.testing.traces import make_trace, trace_mix

    WORK.mkdir(parents=True, exist_ok=True)
    traces = {f"popular{k}": make_trace(n=args.posts, dup_rate=args.dup_rate, popular=int(k), seed=0)
              for k in args.popular.split(",")}
    out = {"what": "Verdict cache shared across two replicas through Redis vs one in-process cache per replica: "
                   "hit rate on round-robin traces with a stated duplicate rate, and a Redis outage under load.",
           "commit": git_commit(), "machine": machine(),
           "traces": {name: {"mix": trace_mix(t), "seed": 0, "popular": int(name[len("popular"):])}
                      for name, t in traces.items()},
           "replay": {"routing": "round-robin, post i -> server i % 2", "policy": POLICY, "concurrency": 1,
                      "caches": "purged (clients.admin purge-caches on both servers) before each trace"}}
    with RedisServer() as rs:
        out["redis"] = {"server": redis_py.Redis.from_url(rs.url).info("server")["redis_version"],
                        "redis_py": redis_py.__version__, "persistence": "none (--save '' --appendonly no)"}
        modes = {"in_process": {}, "shared_redis": {}}
        t = time.perf_counter()
        stack, servers = _pair("local", {"MODERATION_REDIS_URL": ""})
        with stack:
            for name, trace in traces.items():
                _purge(servers)
                modes["in_process"][name] = replay_round_robin(servers, trace, f"local-{name}")
        env = {"MODERATION_REDIS_URL": rs.url, "MODERATION_REDIS_PREFIX": f"bench-{uuid.uuid4().hex[:8]}"}
        stack, servers = _pair("shared", env)
        with stack:
            for name, trace in traces.items():
                _purge(servers)
                modes["shared_redis"][name] = replay_round_robin(servers, trace, f"shared-{name}")
            out["outage"] = outage_run(servers, rs, before_s=args.outage_s, outage_s=args.outage_s,
                                       after_s=args.outage_s)
        out["modes"] = modes
        out["wall_s"] = round(time.perf_counter() - t, 1)
    o = out["outage"]
    out["summary"] = {
        **{name: _summary(modes["in_process"][name], modes["shared_redis"][name]) for name in traces},
        "outage": {"sent": o["sent"], "failed": o["failed"], "before": o["before"], "during_outage": o["during_outage"],
                   "after_restart": o["after_restart"], "first_hit_after_restart_s": o["first_hit_after_restart_s"]},
    }
    dump_json(Path(args.out), out, settings=args, failed=out["outage"]["failed"])
    print(json.dumps(out["summary"], indent=2))
    return out


if __name__ == "__main__":
    main()
