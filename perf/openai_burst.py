"""/v1/moderations under a burst of large legal posts: memory of the OpenAI front end and of the gateway, and what
was refused, measured against a real server (Triton + gateway + front end on loopback).

  burst   64 concurrent posts, each a ~20 MB PNG (random pixels, so it does not compress) as a data: URL in a
          ~27 MB JSON body, sent once: how many were answered, refused (by status and code) or cut off;
  retry   the same 64, each retried after Retry-After until answered (or the deadline): all of them get judged
          while the bounds hold memory down.

For each phase: the front end's and the gateway's RSS before (idle), at the peak (sampled every 20 ms) and after
(idle again, a few seconds later). A client stops sending its body as soon as an answer arrives (as curl does),
so a refusal before the body is read costs the server no body bytes. Writes perf/results/openai_burst.json.

    .venv/bin/python -m perf openai_burst [--posts 64] [--side 2600]
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import random
import select
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

from moderation.core.limits import MAX_IMAGE_BYTES
from moderation.testing.server import running_server
from perf.common import BUILD, REPO, RESULTS, dump_json, git_commit, machine, perf_policy_dir

CHUNK = 1 << 20
DEADLINE_S = 150.0


def large_png(side: int, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG", compress_level=1)
    data = out.getvalue()
    if len(data) > MAX_IMAGE_BYTES:
        raise ValueError(f"a {side}x{side} PNG is {len(data)} bytes, over the {MAX_IMAGE_BYTES}-byte image limit")
    return data


class Body:
    """One post's JSON body as three pieces: the base64 image is shared by every post (the client holds it once)."""

    def __init__(self, b64: bytes):
        self.b64 = b64

    def pieces(self, i: int) -> list[bytes]:
        head = json.dumps({"model": "omni-moderation-latest", "input": [
            {"type": "text", "text": f"burst post {i} {random.random()}"},
            {"type": "image_url", "image_url": {"url": "@"}}]}).encode()
        before, after = head.split(b"@")
        return [before + b"data:image/png;base64,", self.b64, after]


def _read_answer(sock: socket.socket) -> tuple[int, dict, dict]:
    buf = b""
    while b"\r\n\r\n" not in buf:
        got = sock.recv(65536)
        if not got:
            raise ConnectionError("closed before an answer")
        buf += got
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    n = int(headers.get("content-length", 0))
    while len(rest) < n:
        got = sock.recv(65536)
        if not got:
            break
        rest += got
    try:
        body = json.loads(rest[:n])
    except ValueError:
        body = {}
    return status, headers, body


def post_once(port: int, pieces: list[bytes]) -> dict:
    """One POST; the body stops as soon as the server answers (refused before it was read)."""
    length = sum(len(p) for p in pieces)
    t = time.perf_counter()
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_S) as sock:
        try:
            sock.sendall(b"POST /v1/moderations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Connection: close\r\nContent-Length: %d\r\n\r\n" % length)
            for piece in pieces:
                view = memoryview(piece)
                for off in range(0, len(view), CHUNK):
                    if select.select([sock], [], [], 0)[0]:
                        raise StopIteration
                    sock.sendall(view[off:off + CHUNK])
                    sent += len(view[off:off + CHUNK])
        except StopIteration:
            pass
        except OSError:
            pass  # the server closed while we sent: read what it answered
        try:
            status, headers, body = _read_answer(sock)
        except OSError as e:
            return {"status": "cut_off", "error": type(e).__name__, "sent": sent,
                    "seconds": round(time.perf_counter() - t, 3)}
    code = (body.get("error") or {}).get("code") if status != 200 else None
    return {"status": status, "code": code, "retry_after": headers.get("retry-after"), "sent": sent,
            "body_bytes": length, "seconds": round(time.perf_counter() - t, 3)}


def post_until_answered(port: int, pieces: list[bytes], deadline: float) -> dict:
    attempts = []
    while True:
        r = post_once(port, pieces)
        attempts.append(r["status"])
        if r["status"] not in (429, 503) or time.monotonic() > deadline:
            return {**r, "attempts": len(attempts), "refusals": attempts.count(429) + attempts.count(503)}
        time.sleep(float(r.get("retry_after") or 1) * (1 + random.random()))


class RssSampler:
    def __init__(self, pids: dict[str, int], every_s: float = 0.02):
        self.procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.every_s = every_s
        self.peak = dict.fromkeys(pids, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def now_mb(self) -> dict[str, float]:
        return {name: round(p.memory_info().rss / 2**20, 1) for name, p in self.procs.items()}

    def _run(self):
        while not self._stop.is_set():
            for name, p in self.procs.items():
                self.peak[name] = max(self.peak[name], p.memory_info().rss)
            time.sleep(self.every_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def peak_mb(self) -> dict[str, float]:
        return {name: round(v / 2**20, 1) for name, v in self.peak.items()}


def _tally(results: list[dict]) -> dict:
    out: dict[str, int] = {}
    for r in results:
        key = str(r["status"]) + (f" {r['code']}" if r.get("code") else "")
        out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items()))


def phase(name: str, port: int, pids: dict[str, int], bodies: list[list[bytes]], retry: bool,
          idle_s: float) -> dict:
    sampler = RssSampler(pids)
    before = sampler.now_mb()
    t = time.perf_counter()
    deadline = time.monotonic() + DEADLINE_S
    with sampler, ThreadPoolExecutor(len(bodies)) as ex:
        if retry:
            results = list(ex.map(lambda b: post_until_answered(port, b, deadline), bodies))
        else:
            results = list(ex.map(lambda b: post_once(port, b), bodies))
        seconds = round(time.perf_counter() - t, 1)
        time.sleep(idle_s)
    after = sampler.now_mb()
    refused = [r for r in results if r["status"] in (413, 429, 503)]
    out = {"phase": name, "posts": len(bodies), "seconds": seconds, "answers": _tally(results),
           "refused_body_bytes_sent_max": max((r["sent"] for r in refused), default=None),
           "rss_mb": {p: {"before": before[p], "peak": sampler.peak_mb()[p], "after": after[p]} for p in pids},
           "idle_s_before_after": idle_s}
    if retry:
        out["attempts_total"] = sum(r["attempts"] for r in results)
    return out


def run(posts: int, side: int, idle_s: float) -> dict:
    png = large_png(side)
    b64 = base64.b64encode(png)
    body = Body(b64)
    audit = BUILD / "openai_burst_audit.jsonl"
    out = {"what": __doc__.split("\n\n")[0], "machine": machine(), "commit": git_commit(),
           "image_bytes": len(png), "body_bytes": sum(len(p) for p in body.pieces(0)), "posts": posts,
           "front_end_limits": {k: os.environ.get(k) for k in ("MODERATION_OPENAI_MAX_REQUESTS",
                                                               "MODERATION_OPENAI_MAX_BYTES",
                                                               "MODERATION_OPENAI_BODY_TIMEOUT_S")}}
    env = {"MODERATION_POLICY_DIR": str(perf_policy_dir()), "MODERATION_AUDIT_LOG": str(audit)}
    with running_server(repository=REPO, env=env, log_path=BUILD / "openai_burst.log", openai=True) as srv:
        port = srv.config.openai_port
        pids = {"front_end": srv.openai.proc.pid, "gateway": srv.gateway.proc.pid}
        small = Body(base64.b64encode(large_png(64)))
        warm = post_once(port, small.pieces(-1))
        assert warm["status"] == 200, warm
        time.sleep(idle_s)
        out["baseline_rss_mb"] = RssSampler(pids).now_mb()
        for name, retry in (("burst", False), ("retry", True)):
            result = phase(name, port, pids, [body.pieces(i) for i in range(posts)], retry, idle_s)
            print(json.dumps(result), flush=True)
            out[name] = result
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--posts", type=int, default=64)
    ap.add_argument("--side", type=int, default=2600, help="the PNG's width and height (random pixels)")
    ap.add_argument("--idle-s", type=float, default=5.0, help="idle time before the 'after' RSS is read")
    ap.add_argument("--out", default=str(RESULTS / "openai_burst.json"))
    args = ap.parse_args(argv)
    result = run(args.posts, args.side, args.idle_s)
    dump_json(Path(args.out), result, settings=args)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
