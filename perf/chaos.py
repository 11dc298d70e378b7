"""A fault schedule under load: steady mixed traffic through the public port while faults are injected, and an
account of every request.

Faults, in order, spread over the run: a python stub killed (the watchdog reloads its model), the audit disk filled
and freed (a tmpfs this run mounts; the server's audit mode is fail_closed), hostile calls (an oversized message,
deeply nested OPTIONS, garbage bytes, direct calls to internal models through the gateway, a forged
preprocess/postprocess call on Triton's own port without the key), and the gateway restarted.

The report counts sent, answered, coded errors by code and audit rows, and checks:
  lost = sent - answered - coded errors = 0   (an `internal` error or an uncoded failure counts as lost);
  every audit file parses; every answered post has exactly one `stage: moderate` row; no forged row exists.
Writes perf/results/chaos.json (`make chaos`); tests/test_chaos.py runs a short schedule.

    .venv/bin/python -m perf chaos [--seconds 120] [--threads 3]
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from clients.client import ModerationClient, ModerationFailed
from moderation.core.audit import AuditLog, read_rows
from moderation.core.errors import classify_failure
from moderation.ops.watchdog import StubWatchdog, stubs
from moderation.testing.faults import fill, tmpfs
from moderation.testing.samples import sample_posts
from moderation.testing.server import running_server
from perf.common import BUILD, REPO, RESULTS, dump_json, git_commit, machine, perf_policy_dir
from perf.front_door import INFER, oversized_message

KEY = "chaos-admin-key"
POLICIES = ("default", "allow_all")


class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.sent = 0
        self.answered: list[str] = []
        self.coded: Counter = Counter()
        self.coded_ids: dict[str, list[str]] = {}
        self.lost: list[dict] = []

    def outcome(self, rid: str, code: str | None, message: str = "") -> None:
        with self.lock:
            self.sent += 1
            if code is None:
                self.answered.append(rid)
            elif code == "internal" or not code:
                self.lost.append({"request_id": rid, "code": code, "message": message[:200]})
            else:
                self.coded[code] += 1
                self.coded_ids.setdefault(code, []).append(rid)


def traffic(url: str, stop: threading.Event, tally: Tally, worker: int) -> None:
    posts = sample_posts()
    with ModerationClient(url, timeout_s=30, retries=0) as c:
        i = 0
        while not stop.is_set():
            post, policy = posts[i % len(posts)], POLICIES[i % len(POLICIES)]
            rid = f"chaos-{worker}-{i}-{uuid.uuid4().hex[:6]}"
            i += 1
            try:
                result = c.moderate(post.image_bytes(), post.text, policy=policy, request_id=rid)
                tally.outcome(rid, None if result.get("error") is None else result["error"]["code"])
            except ModerationFailed as e:
                tally.outcome(rid, e.code, e.message)
                time.sleep(0.25 if e.code == "unavailable" else 0.05)  # a client's backoff while the port is down


def _hostile_inputs(rid: str, options: bytes | None = None):
    post = sample_posts()[0]
    ins = []
    for name, v in (("IMAGE", post.image_bytes()), ("TEXT", post.text.encode()),
                    ("OPTIONS", options if options is not None else f'{{"request_id": "{rid}"}}'.encode())):
        t = grpcclient.InferInput(name, [1, 1], "BYTES")
        t.set_data_from_numpy(np.array([[v]], dtype=np.object_))
        ins.append(t)
    return ins


def hostile(srv, tally: Tally) -> dict:
    """Each hostile call once; its outcome goes into the tally like any request."""
    url, seen = srv.grpc_url, {}

    def call(name: str, fn):
        rid = f"forged-{name}-{uuid.uuid4().hex[:6]}" if name.startswith("forge") else f"hostile-{name}"
        try:
            fn(rid)
            tally.outcome(rid, None)
            seen[name] = "answered"
        except InferenceServerException as e:
            code = classify_failure(e.message() or "", e.status() or "")[0]
            tally.outcome(rid, code, e.message() or "")
            seen[name] = code
        except grpc.RpcError as e:
            code = classify_failure(e.details() or "", e.code().name)[0]
            tally.outcome(rid, code, e.details() or "")
            seen[name] = code

    gw = grpcclient.InferenceServerClient(url)
    direct = grpcclient.InferenceServerClient(srv.triton_grpc_url)
    big = oversized_message(200 * 1024 * 1024)
    with grpc.insecure_channel(url, options=[("grpc.max_send_message_length", 2**31 - 1)]) as ch:
        raw = ch.unary_unary(INFER)
        call("oversized", lambda rid: raw(big, timeout=30))
        call("garbage", lambda rid: raw(b"\xff\x00garbage", timeout=30))
    call("nested_options", lambda rid: gw.infer("moderate", _hostile_inputs(rid, b"[" * 5000 + b"]" * 5000),
                                                request_id=rid, client_timeout=30))
    for model in ("preprocess", "postprocess", "language_decoder"):
        call(f"internal_{model}", lambda rid, m=model: gw.infer(m, _hostile_inputs(rid), client_timeout=30))
    for model in ("preprocess", "postprocess"):
        call(f"forge_{model}", lambda rid, m=model: direct.infer(m, _hostile_inputs(rid), client_timeout=30))
    return seen


def audit_account(audit: Path, tally: Tally) -> dict:
    """Every audit file parses; answered posts have one `stage: moderate` row each; no forged row."""
    try:
        rows = read_rows(audit)
    except Exception as e:  # noqa: BLE001 - the report says which file did not parse
        return {"parse_error": f"{type(e).__name__}: {e}"[:300]}
    by_id: dict[str, list[str]] = {}
    for r in rows:
        if isinstance(r.get("request_id"), str):
            by_id.setdefault(r["request_id"], []).append(r.get("stage"))
    answered_rows = Counter(by_id.get(rid, []).count("moderate") for rid in tally.answered)
    forged = [r for r in rows if str(r.get("request_id", "")).startswith("forged-") and r.get("stage") != "gateway"]
    coded_without_row = {code: sum(1 for rid in ids if rid not in by_id) for code, ids in tally.coded_ids.items()}
    return {"rows": len(rows), "parse_error": None,
            "answered_with_exactly_one_row": answered_rows.get(1, 0),
            "answered_without_row": answered_rows.get(0, 0),
            "answered_with_several_rows": sum(v for k, v in answered_rows.items() if k > 1),
            # expected without a row: `unavailable` (the gateway was down: nothing reached the service),
            # `audit_unavailable` (refused because the full disk could not take its row), and hostile calls that
            # carry no request id (their rows are the gateway's, by hash)
            "coded_errors_without_row": {k: v for k, v in coded_without_row.items() if v},
            "forged_rows": len(forged), "stages": dict(Counter(r.get("stage") for r in rows))}


def run(seconds: float, threads: int, log_dir: Path) -> dict:
    log_dir.mkdir(parents=True, exist_ok=True)
    events: list[dict] = []
    t0 = time.monotonic()

    def event(name: str, **info):
        events.append({"t_s": round(time.monotonic() - t0, 2), "event": name, **info})
        print(f"chaos {events[-1]}", flush=True)

    with tmpfs() as (audit_dir, mounted):
        audit = audit_dir / "audit.jsonl"
        env = {"MODERATION_POLICY_DIR": str(perf_policy_dir()), "MODERATION_AUDIT_LOG": str(audit),
               "MODERATION_AUDIT_ON_FAILURE": "fail_closed"}
        with running_server(repository=REPO, env=env, log_path=log_dir / "chaos_triton.log", key=KEY) as srv:
            dog = StubWatchdog(srv.process.proc.pid, srv.grpc_url, KEY, interval=0.25, audit=AuditLog(audit))
            dog.start()
            tally, stop = Tally(), threading.Event()
            workers = [threading.Thread(target=traffic, args=(srv.grpc_url, stop, tally, w)) for w in range(threads)]
            for w in workers:
                w.start()
            step = seconds / 5
            try:
                time.sleep(step)
                victim = next(s for s in stubs(srv.process.proc.pid).values() if s.model == "clip_gate")
                os.kill(victim.pid, signal.SIGKILL)
                event("killed_stub", model="clip_gate", pid=victim.pid)
                time.sleep(step)
                if mounted:
                    filler = fill(audit_dir)
                    event("audit_disk_full")
                    time.sleep(min(3.0, step / 2))
                    filler.unlink()
                    event("audit_disk_freed")
                else:
                    event("audit_disk_skipped", reason="tmpfs mount refused (not root?)")
                time.sleep(step / 2)
                event("hostile_calls", outcomes=hostile(srv, tally))
                time.sleep(step / 2)
                event("gateway_stopping")
                srv.gateway.stop()
                srv.gateway.start().wait_ready(60)
                event("gateway_restarted")
                time.sleep(step)
            finally:
                stop.set()
                for w in workers:
                    w.join(60)
                dog.halt()
        account = audit_account(audit, tally)
    coded = sum(tally.coded.values())
    return {"what": __doc__.split("\n\n")[0], "machine": machine(), "commit": git_commit(), "seconds": seconds,
            "threads": threads, "events": events, "sent": tally.sent, "answered": len(tally.answered),
            "coded_errors": dict(tally.coded), "coded_errors_total": coded,
            "lost": tally.sent - len(tally.answered) - coded, "lost_requests": tally.lost[:20], "audit": account}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--threads", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS / "chaos.json")
    args = ap.parse_args(argv)
    report = run(args.seconds, args.threads, BUILD / "chaos")
    dump_json(args.out, report, settings=args)
    print({k: report[k] for k in ("sent", "answered", "coded_errors", "lost")}, report["audit"])
    print(f"wrote {args.out}")
    a = report["audit"]
    ok = (report["lost"] == 0 and a.get("parse_error") is None and a.get("forged_rows") == 0
          and a.get("answered_without_row") == 0 and a.get("answered_with_several_rows") == 0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
