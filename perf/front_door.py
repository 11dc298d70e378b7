"""The public port under hostile load: memory and fairness, measured against a real server through the gateway.

  oversized  8 concurrent 200 MB ModelInfer messages while a normal client keeps sending posts: how long each
             oversized call takes to be refused, the gateway's peak RSS (VmHWM), and the normal client's answers;
  fairness   a polite client (concurrency 1, its own connection) alone, then beside a greedy client
             (concurrency 32 on one connection, a separate process): the polite client's p50/p99 and how many of
             its requests failed; the greedy client's answered and shed counts.

Both use the gate path (policy allow_all): the cheapest real request, most production traffic. Writes
perf/results/front_door.json (raw latencies, summary, machine, commit).

    .venv/bin/python -m perf front_door [--polite-n 200] [--greedy 32]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException

from moderation.core.audit import read_rows
from moderation.core.errors import classify_failure
from moderation.testing.samples import sample_posts
from perf.common import BUILD, REPO, RESULTS, dump_json, git_commit, machine
from perf.harness import infer, options, pct, serve

INFER = "/inference.GRPCInferenceService/ModelInfer"


def oversized_message(nbytes: int) -> bytes:
    """A serialised ModelInferRequest for `moderate` whose IMAGE element is `nbytes` long."""
    req = service_pb2.ModelInferRequest(model_name="moderate", id="oversized")
    req.inputs.add(name="IMAGE", datatype="BYTES", shape=[1, 1])
    req.raw_input_contents.append(nbytes.to_bytes(4, "little") + b"\0" * nbytes)  # one serialised BYTES element
    return req.SerializeToString()


def gateway_rss_peak_kb(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0])


def _post_job(i: int, tag: str) -> tuple:
    post = sample_posts()[i % len(sample_posts())]
    return ("moderate", post.image_bytes(), post.text.encode(), options("allow_all", f"{tag}-{i}"))


def polite(url: str, n: int, tag: str) -> dict:
    """Sequential posts on a connection of its own: latencies (ms) of the answered ones and the failures' codes."""
    client = grpcclient.InferenceServerClient(url, channel_args=[("grpc.primary_user_agent", f"polite-{tag}")])
    lat, errors = [], {}
    for i in range(n):
        try:
            lat.append(infer(client, *_post_job(i, tag)))
        except InferenceServerException as e:
            code = classify_failure(e.message() or "", e.status() or "")[0]
            errors[code] = errors.get(code, 0) + 1
    client.close()
    return {"n": n, "answered": len(lat), "errors": errors, "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99),
            "latencies_ms": [round(x, 3) for x in lat]}


def greedy(url: str, concurrency: int, seconds: float) -> dict:
    """`concurrency` threads on ONE connection sending posts back to back for `seconds`."""
    client = grpcclient.InferenceServerClient(url, channel_args=[("grpc.primary_user_agent", "greedy")])
    stop = time.monotonic() + seconds
    counts: dict[str, int] = {}
    lock = threading.Lock()

    def worker(w: int):
        i = 0
        while time.monotonic() < stop:
            try:
                infer(client, *_post_job(i, f"greedy-{w}"))
                code = "ok"
            except InferenceServerException as e:
                code = classify_failure(e.message() or "", e.status() or "")[0]
            with lock:
                counts[code] = counts.get(code, 0) + 1
            i += 1

    with ThreadPoolExecutor(concurrency) as ex:
        list(ex.map(worker, range(concurrency)))
    return {"concurrency": concurrency, "seconds": seconds, "answers": counts}


def fairness(url: str, polite_n: int, concurrency: int) -> dict:
    """The polite client alone, then with the greedy client (its own process) running throughout."""
    polite(url, 5, "warm")
    alone = polite(url, polite_n, "alone")
    seconds = max(20.0, alone["p50_ms"] / 1e3 * polite_n * 4 + 10)
    proc = subprocess.Popen([sys.executable, "-m", "perf.front_door", "greedy", "--url", url,
                             "--greedy", str(concurrency), "--seconds", str(seconds)],
                            stdout=subprocess.PIPE, text=True)
    time.sleep(3)  # the greedy client's threads are all sending
    loaded = polite(url, polite_n, "loaded")
    out, _ = proc.communicate(timeout=seconds + 120)
    return {"alone": alone, "with_greedy": loaded, "greedy": json.loads(out.strip().splitlines()[-1]),
            "p99_ratio": round(loaded["p99_ms"] / alone["p99_ms"], 3),
            "p50_ratio": round(loaded["p50_ms"] / alone["p50_ms"], 3)}


def _refusal_rows(audit: Path) -> list[dict]:
    """The gateway's rows for calls refused as too large, oldest first."""
    return [r for r in read_rows(audit) if r.get("stage") == "gateway"
            and (r.get("error") or {}).get("code") == "request_too_large"] if audit.exists() else []


def oversized(url: str, gateway_pid: int, audit: Path, copies: int = 8, nbytes: int = 200 * 1024 * 1024) -> dict:
    """`copies` concurrent oversized calls (one prebuilt message, so the client holds it once) beside a normal
    client; per call the client's time to its answer and the status; the gateway's time from each call's start to
    its refusal (its audit row); the gateway's peak RSS before and after; the normal client's latencies.

    The client's time includes its own cost of handing gRPC 200 MB (grpcio copies the message, holding the GIL:
    `client_alone_seconds` is one such call with nothing else running), so the gateway's own answer time is read
    from its audit rows."""
    body = oversized_message(nbytes)
    rss_before = gateway_rss_peak_kb(gateway_pid)
    rows_before = len(_refusal_rows(audit))
    lat: list[float] = []
    errors: dict[str, int] = {}
    done = threading.Event()

    def normal_traffic():
        client = grpcclient.InferenceServerClient(url, channel_args=[("grpc.primary_user_agent", "normal")])
        i = 0
        while not done.is_set():
            try:
                lat.append(infer(client, *_post_job(i, "normal")))
            except InferenceServerException as e:
                code = classify_failure(e.message() or "", e.status() or "")[0]
                errors[code] = errors.get(code, 0) + 1
            i += 1
        client.close()

    def one(i: int):
        channel = grpc.insecure_channel(url, options=[("grpc.max_send_message_length", 2**31 - 1),
                                                      ("grpc.primary_user_agent", f"oversized-{i}")])
        t = time.perf_counter()
        try:
            channel.unary_unary(INFER)(body, timeout=60)
            status, details = "OK", ""
        except grpc.RpcError as e:
            status, details = e.code().name, e.details()
        finally:
            channel.close()
        return {"seconds": round(time.perf_counter() - t, 3), "status": status, "details": (details or "")[:160]}

    alone = one(-1)
    traffic = threading.Thread(target=normal_traffic)
    traffic.start()
    time.sleep(1)
    with ThreadPoolExecutor(copies) as ex:
        calls = list(ex.map(one, range(copies)))
    time.sleep(1)
    done.set()
    traffic.join(120)
    time.sleep(0.5)  # the last refusal's row is written after the caller has its answer
    server_ms = [r["latency_ms"]["total"] for r in _refusal_rows(audit)[rows_before + 1:]]
    return {"copies": copies, "bytes_each": nbytes, "calls": calls, "max_seconds": max(c["seconds"] for c in calls),
            "client_alone_seconds": alone["seconds"], "gateway_refusal_ms": server_ms,
            "gateway_refusal_max_ms": max(server_ms, default=None),
            "gateway_peak_rss_mb_before": round(rss_before / 1024, 1),
            "gateway_peak_rss_mb_after": round(gateway_rss_peak_kb(gateway_pid) / 1024, 1),
            "normal": {"sent": len(lat) + sum(errors.values()), "answered": len(lat), "errors": errors,
                       "p50_ms": pct(lat, 50), "max_ms": max(lat, default=None),
                       "latencies_ms": [round(x, 3) for x in lat]}}


def run(polite_n: int, concurrency: int) -> dict:
    out = {"what": __doc__.split("\n\n")[0], "machine": machine(), "commit": git_commit()}
    with serve(REPO, audit=BUILD / "front_door_audit.jsonl", log=BUILD / "front_door.log") as srv:
        out["oversized"] = oversized(srv.grpc_url, srv.gateway.proc.pid, BUILD / "front_door_audit.jsonl")
        print(json.dumps({k: v for k, v in out["oversized"].items() if k != "calls"}), flush=True)
        out["fairness"] = fairness(srv.grpc_url, polite_n, concurrency)
        f = out["fairness"]
        print(json.dumps({"alone_p99": f["alone"]["p99_ms"], "loaded_p99": f["with_greedy"]["p99_ms"],
                          "p99_ratio": f["p99_ratio"], "polite_errors": f["with_greedy"]["errors"],
                          "greedy": f["greedy"]}), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", nargs="?", default="run", choices=["run", "greedy"])
    ap.add_argument("--url")
    ap.add_argument("--greedy", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--polite-n", type=int, default=200)
    args = ap.parse_args(argv)
    if args.mode == "greedy":
        print(json.dumps(greedy(args.url, args.greedy, args.seconds)), flush=True)
        return 0
    result = run(args.polite_n, args.greedy)
    dump_json(RESULTS / "front_door.json", result, settings=args)
    print(f"wrote {RESULTS / 'front_door.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

