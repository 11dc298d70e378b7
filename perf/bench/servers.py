"""The servers of `make bench`: one admin key for the run, the load average when each server started, and the
A10-profile repository copy (parts b, c and e)."""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

from perf.common import BUILD
from perf.harness import serve
from perf.variants import with_response_cache

ADMIN_KEY = "bench-" + uuid.uuid4().hex[:12]
LOADAVG: dict[str, list[float]] = {}
HEADERS = {"admin-key": ADMIN_KEY}


def server(repo: Path, name: str):
    """A server for `repo` with the perf policies; its log and audit log are build/perf/bench-<name>.*."""
    LOADAVG[name] = list(os.getloadavg())  # the 2 cores are shared: say how busy they were
    print(f"[bench] starting server: {name} ({repo})", flush=True)
    return serve(repo, audit=BUILD / f"bench-{name}.jsonl", log=BUILD / f"bench-{name}.log", key=ADMIN_KEY)


def a10_repository() -> tuple[Path, dict]:
    """The A10-profile repository copy, with the top-level `moderate` response cache (part e) and 1 torch thread
    for its decoder, and what to record about it."""
    from perf.a10_profile import PROFILE, build_checkpoint, build_repository

    print("[bench] building the A10-profile repository copy (build/bench/)", flush=True)
    repo = build_repository()
    info = {"decoder": PROFILE, "repository": "build/bench/repo-a10-profile (not committed)",
            **json.loads((build_checkpoint() / "profile.json").read_text())}
    with_response_cache(repo, ["moderate"])  # (e): top-level cache in this copy only
    # 1 torch thread for the big decoder in this copy: with 2 on 2 shared cores its threads spin against each
    # other (escalated posts took 4-5 s and queued past the 30 s queue timeout in a first run)
    for m in ("language_decoder", "language_decoder_int8"):
        cfg = repo / m / "config.pbtxt"
        if cfg.exists():
            cfg.write_text(cfg.read_text().replace('key: "torch_threads" value: { string_value: "2" }',
                                                   'key: "torch_threads" value: { string_value: "1" }'))
    info["torch_threads"] = 1
    return repo, info
