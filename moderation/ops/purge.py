"""Empty every clip_gate instance's verdict cache on a running server (privacy: `clients.admin purge-caches`)."""
from __future__ import annotations

import json
import time

from ..core.auth import admin_headers

PURGE_PARAMETER = "verdict_cache_epoch"


def purge_server_caches(url: str, key: str, model: str = "clip_gate") -> dict:
    """Reload clip_gate through the restricted model-repository API (admin key) with its live config plus a new
    `verdict_cache_epoch` parameter. Triton loads the new instances, then retires the old ones after their
    in-flight requests, so no request fails and the old caches die with their processes. The python backend has
    no other way in from outside."""
    import tritonclient.grpc as grpcclient

    headers = admin_headers(key, "grpc")
    c = grpcclient.InferenceServerClient(url)
    try:
        cfg = c.get_model_config(model, headers=headers, as_json=True)["config"]
        epoch = str(time.time_ns())
        cfg.setdefault("parameters", {})[PURGE_PARAMETER] = {"string_value": epoch}
        t = time.perf_counter()
        c.load_model(model, headers=headers, config=json.dumps(cfg))
        return {"purged": model, "epoch": epoch, "reload_ms": round((time.perf_counter() - t) * 1e3, 1)}
    finally:
        c.close()
