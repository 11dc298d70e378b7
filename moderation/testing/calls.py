"""One post sent with raw tritonclient gRPC, timed, as the benchmarks and the front-door tests send it."""
from __future__ import annotations

import json
import time
import uuid
from typing import Any

import numpy as np

from moderation.core.caller import CLIENT_METADATA


def options(policy: str, request_id: str | None = None, return_embedding: bool = False) -> bytes:
    """The OPTIONS tensor of one post; a fresh request_id unless one is given."""
    return json.dumps({"policy": policy, "request_id": request_id or uuid.uuid4().hex,
                       "return_embedding": return_embedding}).encode()


def infer(client: Any, model: str, image: bytes, text: bytes, opts: bytes, client_id: str | None = None) -> float:
    """One post to `moderate` (RESULT) or `vlm` (VLM_RESULT) on a gRPC client: milliseconds for the call. The
    answer is decoded after the clock stops (a real answer, not an error). Each client object is one caller for
    the gateway's fair shares (`client_id`, default one id per client object), as the client library's are."""
    import tritonclient.grpc as g

    ins = []
    for name, v in (("IMAGE", image), ("TEXT", text), ("OPTIONS", opts)):
        t = g.InferInput(name, [1, 1], "BYTES")
        t.set_data_from_numpy(np.array([[v]], dtype=np.object_))
        ins.append(t)
    out = "RESULT" if model == "moderate" else "VLM_RESULT"
    t0 = time.perf_counter()
    headers = {CLIENT_METADATA: client_id or f"harness-{id(client):x}"}
    r = client.infer(model, ins, outputs=[g.InferRequestedOutput(out)], headers=headers, client_timeout=300)
    ms = (time.perf_counter() - t0) * 1e3
    json.loads(r.as_numpy(out).reshape(-1)[0])
    return ms
