"""The replay: two real Triton servers up at once, caches off and on, every trace post sent to both; the VLM's
work per server from Triton's statistics API."""
from __future__ import annotations

import contextlib
import random
import time
from collections import Counter
from pathlib import Path

from moderation.testing.traces import unique_image
from perf.common import REPO, ROOT, counts_delta, stats, stats_delta
from perf.harness import send, serve

WORK = ROOT / "build" / "cache_savings"
ADMIN_KEY = "cache-savings-bench"
MODELS = ("language_decoder", "vision_encoder", "vlm_preprocess", "clip_image", "clip_text", "nsfw_image",
          "clip_gate", "moderate")


def replay_policies(directory: Path) -> Path:
    """The fixed-route policies (cache off) plus `escalate_cached`: every post goes to the VLM, cache on."""
    from moderation.testing.policies import derive_policy, write_fixed_route_policies

    write_fixed_route_policies(directory)
    derive_policy(directory, "escalate_cached", gate={"allow_below": 0.0, "block_at": 1.01}, cache={"enabled": True})
    return directory


def repo_without_response_cache(dst: Path, src: Path = REPO) -> Path:
    """A copy of `src` at `dst` with Triton's response cache off on every model that has it."""
    from moderation.repository.render import RESPONSE_CACHE
    from perf.variants import copy_repository, without_response_cache

    return without_response_cache(copy_repository(dst, src), RESPONSE_CACHE)


def replay(trace: list[dict], setups: dict[str, tuple[Path, str]], policy_dir: Path) -> dict:
    """Both servers up at once, every trace post sent to each in turn (order alternating post by post), so the
    two configurations share the machine's load; statistics deltas per server over the replay."""
    import tritonclient.grpc as grpcclient

    from moderation.core.auth import admin_headers
    from moderation.testing.samples import sample_posts

    WORK.mkdir(parents=True, exist_ok=True)
    hdr = admin_headers(ADMIN_KEY, "http")
    with contextlib.ExitStack() as stack:
        srv, cli = {}, {}
        for name, (repo, _policy) in setups.items():
            srv[name] = stack.enter_context(serve(repo, audit=WORK / f"audit-{name}.jsonl",
                                                  log=WORK / f"triton-{name}.log", key=ADMIN_KEY,
                                                  policy_dir=policy_dir))
            cli[name] = grpcclient.InferenceServerClient(srv[name].grpc_url)
            stack.callback(cli[name].close)

        def to(name: str, post: dict, rid: str) -> dict:
            return send(cli[name], post["image"], post["text"], {"request_id": rid, "policy": setups[name][1]})

        rng = random.Random(99)
        warm = [{"image": unique_image(s.image_bytes(), rng), "text": f"warm-up {i}"}
                for i, s in enumerate(sample_posts()[-2:])]  # posts outside the trace (own crops and captions)
        for name in setups:
            for i, w in enumerate(warm):
                to(name, w, f"{name}-warm-{i}")
        before = {n: stats(s.http_url, hdr) for n, s in srv.items()}
        routes = {n: [] for n in setups}
        wall = dict.fromkeys(setups, 0.0)
        names = list(setups)
        for i, post in enumerate(trace):
            for name in (names if i % 2 == 0 else names[::-1]):
                t = time.perf_counter()
                r = to(name, post, f"{name}-{i}")
                wall[name] += time.perf_counter() - t
                routes[name].append({"kind": post["kind"], "route": r["route"],
                                     "hit": bool(r.get("cache", {}).get("hit"))})
        after = {n: stats(s.http_url, hdr) for n, s in srv.items()}
    out = {}
    for name, (repo, policy) in setups.items():
        b, a = before[name], after[name]
        delta = counts_delta(b, a)
        rs = routes[name]
        out[name] = {
            "policy": policy, "repository": str(Path(repo).resolve().relative_to(ROOT)), "client_wall_s": wall[name],
            "routes": dict(Counter(r["route"] for r in rs)),
            "hits_by_kind": {k: sum(r["hit"] for r in rs if r["kind"] == k) for k in sorted({r["kind"] for r in rs})},
            "raw_delta": {m: delta[m] for m in MODELS if m in delta},
            "per_model": stats_delta(b, a),
        }
    return out


def vlm_work(run: dict) -> dict:
    """The VLM's work in one server's replay: decoder and vision-encoder invocations, cache hits, compute time."""
    d = run["raw_delta"]
    dec, vis = d["language_decoder"], d["vision_encoder"]
    return {"decoder_invocations": dec["count"], "decoder_executions": dec["executions"],
            "decoder_compute_infer_ms": dec["compute_infer_ns"] / 1e6,
            "vision_encoder_invocations": vis["count"], "vision_encoder_cache_hits": vis["cache_hit_n"],
            "vision_encoder_compute_infer_ms": vis["compute_infer_ns"] / 1e6,
            "clip_image_cache_hits": d["clip_image"]["cache_hit_n"]}
