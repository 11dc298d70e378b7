"""Part e: an exact-duplicate request, Triton's response cache hit vs miss (the top-level `moderate` cache of the
A10-profile copy), and the same post under a new request_id (only the committed deep caches can hit)."""
from __future__ import annotations

import statistics
import uuid

from perf.common import stats, stats_delta
from perf.harness import UniquePosts, infer, options, spread

from .servers import HEADERS


def bench_e(srv, posts: UniquePosts, n_posts: int, hits_per_post: int) -> dict:
    import tritonclient.grpc as g

    client = g.InferenceServerClient(srv.grpc_url)
    out = {}
    for path, policy in (("gate_path", "allow_all"), ("vlm_path", "escalate_all")):
        miss, hit, deep = [], [], []
        before = stats(srv.http_url, HEADERS)
        for image, text in posts.batch(n_posts):
            rid = uuid.uuid4().hex
            opts = options(policy, rid, return_embedding=True)  # EMBEDDING non-empty: the response is cacheable
            miss.append(infer(client, "moderate", image, text, opts))
            hit += [infer(client, "moderate", image, text, opts) for _ in range(hits_per_post)]
            # same post, new request_id: top-level miss, hits in the committed ONNX-model caches
            deep.append(infer(client, "moderate", image, text, options(policy, return_embedding=True)))
        d = stats_delta(before, stats(srv.http_url, HEADERS))
        m = d.get("moderate", {})
        out[path] = {"policy": policy, "posts": n_posts, "miss_ms": spread(miss), "hit_ms": spread(hit),
                     "deep_cache_ms": spread(deep), "speedup": statistics.median(miss) / statistics.median(hit),
                     "deep_speedup": statistics.median(miss) / statistics.median(deep),
                     "goal_met": statistics.median(miss) / statistics.median(hit) >= 50,
                     "server_cache": {k: {"hits": v["cache_hits"], "misses": v["cache_misses"]}
                                      for k, v in d.items() if v["cache_hits"] or v["cache_misses"]},
                     "moderate_hits_expected": n_posts * hits_per_post, "moderate_hits": m.get("cache_hits", 0)}
        print(f"[bench] e {path}: miss {statistics.median(miss):.1f} ms, hit {statistics.median(hit):.2f} ms, "
              f"deep-cache {statistics.median(deep):.1f} ms", flush=True)
    client.close()
    return out
