"""The public port as a hostile caller finds it: only the entry model is served, Triton's own port takes no
inference without the key (so no caller can write a model's audit row), every refused call has exactly one coded
row however odd its bytes, a bad message never ends a stream, oversized messages are refused unread, and a greedy
client cannot starve a polite one. Against the real server (the session's `triton`), plus the gateway's admission
and summary logic on their own."""
from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import re
import threading
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException

from clients.client import build_inputs
from moderation.core.audit import read_rows
from moderation.core.errors import classify_failure
from moderation.core.hashing import sha256_hex
from moderation.core.limits import MAX_REQUEST_BYTES, PUBLIC_MODELS
from moderation.gateway.admission import Admission, AdmissionLimits, Shed
from moderation.gateway.summary import refusal, request_summary
from moderation.repository.render import ALL_MODELS
from moderation.testing.calls import infer, options
from moderation.testing.samples import sample_posts
from perf import front_door

POST = sample_posts()[0]
INFER = "/inference.GRPCInferenceService/ModelInfer"
STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"
INTERNAL = [m for m in ALL_MODELS if m not in PUBLIC_MODELS]
GREEDY_CALLS = 60  # one client's calls at once: 2 running and 58 waiting, within its queue of 64
HANG_GUARD_S = 120  # only a hang ends a wait this long


def _rows(audit_log, rid: str) -> list[dict]:
    return [r for r in read_rows(audit_log) if r.get("request_id") == rid]


def _good_inputs(rid: str):
    return build_inputs(grpcclient, POST.image_bytes(), POST.text, {"request_id": rid, "policy": "allow_all"})


def _message(inputs, model="moderate", rid="", version="", outputs=()) -> bytes:
    req = service_pb2.ModelInferRequest(model_name=model, id=rid, model_version=version)
    for t in inputs:
        req.inputs.append(t._get_tensor())
        req.raw_input_contents.append(t._get_content())
    for o in outputs:
        req.outputs.append(o._get_tensor())
    return req.SerializeToString()


def _wrong_dtype_with_options(options: bytes):
    x = grpcclient.InferInput("IMAGE", [1, 1], "FP32")
    x.set_data_from_numpy(np.zeros((1, 1), np.float32))
    o = grpcclient.InferInput("OPTIONS", [1, 1], "BYTES")
    o.set_data_from_numpy(np.array([[options]], dtype=np.object_))
    return [x, o]


def _code(row: dict) -> str | None:
    return row["error"].get("code") if isinstance(row.get("error"), dict) else None


def _raw_call(url: str, body: bytes) -> tuple[str, str]:
    with grpc.insecure_channel(url) as ch:
        try:
            ch.unary_unary(INFER)(body, timeout=60)
            return "OK", ""
        except grpc.RpcError as e:
            return e.code().name, e.details() or ""


# ---- only the entry model; no row can be forged --------------------------------------------------------------

def test_internal_models_are_not_served_and_each_call_is_audited(triton, audit_log):
    c = grpcclient.InferenceServerClient(triton.grpc_url)
    for model in INTERNAL:
        rid = f"internal-{model}-{uuid.uuid4().hex[:6]}"
        inputs, _ = _good_inputs(rid)
        with pytest.raises(InferenceServerException) as e:
            c.infer(model, inputs, client_timeout=30)
        assert e.value.status() == "StatusCode.NOT_FOUND" and e.value.message().startswith("[model_not_found]")
        rows = _rows(audit_log, rid)
        assert len(rows) == 1 and rows[0]["stage"] == "gateway" and rows[0]["model"] == model, rows
        assert rows[0]["error"]["code"] == "model_not_found"
    assert c.is_model_ready("moderate")  # metadata and health still pass


def test_triton_port_takes_no_inference_without_the_key_so_no_model_row_can_be_forged(triton, audit_log):
    """The forging route that was found: preprocess then postprocess with edited tensors on Triton's own port.
    Without the key Triton runs no model, so no `stage: moderate` row with a caller-chosen id appears."""
    rid = f"forged-{uuid.uuid4().hex[:6]}"
    direct = grpcclient.InferenceServerClient(triton.triton_grpc_url)
    inputs, outputs = _good_inputs(rid)
    for model in ("preprocess", "postprocess", "language_decoder", "moderate"):
        with pytest.raises(InferenceServerException, match="restricted"):
            direct.infer(model, inputs, client_timeout=30)
    assert _rows(audit_log, rid) == []
    ok = triton.direct_client().infer("moderate", inputs, outputs=outputs, client_timeout=60)  # operators: the key
    assert json.loads(ok.as_numpy("RESULT").reshape(-1)[0])["request_id"] == rid


# ---- every call one truthful row ------------------------------------------------------------------------------

def test_deep_garbage_and_absurd_requests_get_one_coded_row_each(triton, audit_log):
    url = triton.grpc_url
    nested = b"[" * 5000 + b"]" * 5000
    cases = {  # triton request id -> (body, status, code)
        "deep": (_message(_wrong_dtype_with_options(nested), rid="deep"), "INVALID_ARGUMENT", "bad_request"),
        "version": (_message(_good_inputs("v")[0], rid="version", version="1 [bad_image] x"), "INVALID_ARGUMENT",
                    "bad_request"),
    }
    zero = grpcclient.InferInput("IMAGE", [0, 1], "BYTES")
    zero.set_data_from_numpy(np.zeros((0, 1), np.object_))
    cases["zero-batch"] = (_message([zero], rid="zero-batch"), "INVALID_ARGUMENT", "bad_request")
    tiny = []
    for i in range(50_000):
        t = grpcclient.InferInput(f"X{i}", [1], "INT8")
        t.set_data_from_numpy(np.zeros(1, np.int8))
        tiny.append(t)
    cases["many-inputs"] = (_message(tiny, rid="many-inputs"), "INVALID_ARGUMENT", "bad_request")
    odd = "odd\u2028id\u0085" + "x" * 300
    cases[odd] = (_message(_wrong_dtype_with_options(b"{}"), rid=odd), "INVALID_ARGUMENT", "bad_request")
    for rid, (body, status, code) in cases.items():
        got_status, details = _raw_call(url, body)
        assert got_status == status and classify_failure(details, got_status)[0] == code, (rid[:20], details)
        assert "Traceback" not in details and "Unexpected <class" not in details
    rows = read_rows(audit_log)  # splits on \n only: U+2028 / U+0085 in a row never break it
    by_tid = {(r.get("triton_request_id") or "")[:40]: r for r in rows if r.get("stage") == "gateway"}
    for rid in cases:
        row = by_tid[rid[:40]]
        assert row["error"]["code"] == "bad_request", row
        assert len(json.dumps(row)) < 8192, (rid[:20], len(json.dumps(row)))
    assert len(by_tid[odd[:40]]["triton_request_id"]) < 160  # capped
    assert by_tid["many-inputs"]["more_inputs"]["count"] == 50_000 - 8
    # not even a protobuf: refused, and kept by its hash
    garbage = b"\xff\x00garbage"
    status, details = _raw_call(url, garbage)
    assert status == "INVALID_ARGUMENT" and details.startswith("[bad_request]"), details
    assert any(r.get("request_sha256") == sha256_hex(garbage) for r in read_rows(audit_log))
    inputs, outputs = _good_inputs(f"after-{uuid.uuid4().hex[:6]}")  # the server is still up
    grpcclient.InferenceServerClient(url).infer("moderate", inputs, outputs=outputs, client_timeout=60)


def test_a_bad_message_does_not_end_a_stream(triton, audit_log):
    ids = [f"s{i}-{uuid.uuid4().hex[:6]}" for i in range(2)]
    good = [_message(_good_inputs(rid)[0], rid=rid, outputs=_good_inputs(rid)[1]) for rid in ids]
    bad_internal = _message(_good_inputs("x")[0], model="language_decoder", rid=f"bad-{ids[0]}")
    deep = _message(_wrong_dtype_with_options(b"[" * 5000 + b"]" * 5000), rid=f"deep-{ids[0]}")
    answers: queue.Queue = queue.Queue()
    with grpc.insecure_channel(triton.grpc_url) as ch:
        responses = ch.stream_stream(STREAM)(iter([good[0], b"\xff\x00garbage", bad_internal, deep, good[1]]),
                                             timeout=120)
        for raw in responses:
            answers.put(service_pb2.ModelStreamInferResponse.FromString(raw))
    got = [answers.get_nowait() for _ in range(answers.qsize())]
    assert len(got) == 5, got
    errors = sorted(classify_failure(r.error_message, "INVALID_ARGUMENT")[0] for r in got if r.error_message)
    assert errors == ["bad_request", "bad_request", "model_not_found"], [r.error_message for r in got]
    answered = {r.infer_response.id for r in got if not r.error_message}
    assert answered == set(ids)
    for rid in ids:
        assert [r["stage"] for r in _rows(audit_log, rid)] == ["moderate"]


def test_summaries_are_bounded_and_never_raise():
    nested = b"[" * 100_000 + b"]" * 100_000
    s = request_summary(_message(_wrong_dtype_with_options(nested), rid="r"))
    assert s["request_id"] == "r" and s["inputs"][1]["bytes"] == len(nested) + 4
    elements = grpcclient.InferInput("TEXT", [40_000, 1], "BYTES")
    elements.set_data_from_numpy(np.array([[b"t"]] * 40_000, dtype=np.object_))
    s = request_summary(_message([elements]))
    assert len(s["inputs"][0]["sha256"]) == 16 and s["inputs"][0]["elements"] == 40_000
    assert len(json.dumps(s)) < 4096
    for body in (b"", b"\x0a\xff\xff\xff\xff\x0f", b"\x0a" * 10_000, bytes(range(256)) * 100):
        request_summary(body)  # total: any bytes give a summary
    assert refusal(None)[0] == "bad_request"
    assert refusal(service_pb2.ModelInferRequest(model_name="clip_gate"))[0] == "model_not_found"
    assert MAX_REQUEST_BYTES < 200 * 1024 * 1024


# ---- memory and fairness -------------------------------------------------------------------------------------

def test_oversized_messages_are_refused_unread_and_audited_while_normal_traffic_is_served(triton, audit_log):
    before = sum(_code(r) == "request_too_large" for r in read_rows(audit_log))
    # the peak RSS from here on: what earlier tests made the gateway hold (a burst of 64 clients) is not this test's
    Path(f"/proc/{triton.gateway.proc.pid}/clear_refs").write_text("5")
    r = front_door.oversized(triton.grpc_url, triton.gateway.proc.pid, audit_log, copies=8)
    print(json.dumps({k: v for k, v in r.items() if k not in ("calls", "normal")}))
    assert all(c["status"] == "RESOURCE_EXHAUSTED" for c in r["calls"]), r["calls"]
    assert len(r["gateway_refusal_ms"]) == 8, r  # the gateway's own row for each
    assert r["gateway_peak_rss_mb_after"] < 512, r  # refused from the length prefix: 8 x 200 MB never buffered
    assert r["normal"]["answered"] == r["normal"]["sent"] >= 1 and not r["normal"]["errors"], r["normal"]
    after = sum(_code(r) == "request_too_large" for r in read_rows(audit_log))
    assert after - before == 9  # one alone, then 8 together


def _gateway_calls_in_flight(url: str) -> int:
    text = urllib.request.urlopen(url, timeout=30).read().decode()
    return int(float(re.search(r'^moderation_gateway_in_flight\{what="calls"\} (\S+)$', text, re.M).group(1)))


def test_a_greedy_client_does_not_starve_a_polite_one(triton, audit_log):
    """A greedy client's backlog waits behind itself: a polite client's call, sent while GREEDY_CALLS calls of one
    greedy caller are admitted and most of them still wait, gets a running slot at once, so it is answered
    before most of that backlog; no call of either client is shed. Order and counts only: the polite client's
    latency beside a greedy one is perf/front_door.py's measurement (perf/results/front_door.json)."""
    tag = uuid.uuid4().hex[:6]
    greedy = grpcclient.InferenceServerClient(triton.grpc_url)  # one client object: one caller at the gateway
    start, lock, done, codes = threading.Barrier(GREEDY_CALLS), threading.Lock(), [], {}

    def greedy_call(i: int):
        start.wait()
        try:
            infer(greedy, "moderate", POST.image_bytes(), POST.text.encode(), options("allow_all", f"greedy-{tag}-{i}"))
            code = "ok"
        except InferenceServerException as e:
            code = classify_failure(e.message() or "", e.status() or "")[0]
        with lock:
            codes[code] = codes.get(code, 0) + 1
            done.append(i)

    with ThreadPoolExecutor(GREEDY_CALLS) as pool:
        calls = [pool.submit(greedy_call, i) for i in range(GREEDY_CALLS)]
        hang_guard = time.monotonic() + HANG_GUARD_S
        while True:  # every greedy call admitted (in flight at the gateway or answered), most still in flight
            in_flight = _gateway_calls_in_flight(triton.gateway_metrics_url)
            if in_flight + len(done) == GREEDY_CALLS and in_flight >= GREEDY_CALLS // 2:
                break
            assert len(done) < GREEDY_CALLS // 2, "the greedy backlog drained before it was all admitted"
            assert time.monotonic() < hang_guard, (in_flight, len(done))
        polite = front_door.polite(triton.grpc_url, 5, f"polite-{tag}")  # a client object (caller) of its own
        for call in calls:
            call.result()
    greedy.close()
    assert polite["answered"] == 5 and polite["errors"] == {}, polite
    assert codes == {"ok": GREEDY_CALLS}, codes  # the greedy client's excess waited behind itself, none shed
    order = [r["request_id"] for r in read_rows(audit_log) if tag in str(r.get("request_id"))]
    greedy_after = sum(rid.startswith("greedy-") for rid in order[order.index(f"polite-{tag}-0"):])
    # first come, first served across clients, the polite call would have come after every waiting greedy call
    waiting = in_flight - AdmissionLimits().per_client
    print(json.dumps({"greedy_waiting": waiting, "greedy_answered_after_the_polite_call": greedy_after}))
    assert greedy_after >= waiting // 2, (greedy_after, in_flight, order)


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock moves only when the test advances it: timers (the admission's linger wake-up) fire
    in order of virtual time, never by racing the machine's. The test awaits no positive sleep."""

    def __init__(self):
        super().__init__()
        self.now = 0.0

    def time(self) -> float:
        return self.now

    def run(self, scenario) -> None:
        try:
            self.run_until_complete(scenario(self))
        finally:  # a failed scenario leaves calls holding slots: end them before the loop closes
            pending = asyncio.all_tasks(self)
            for task in pending:
                task.cancel()
            if pending:
                self.run_until_complete(asyncio.wait(pending))
            self.close()


async def _settle() -> None:
    """Let every ready task run until each waits for something (a slot, a release, or the clock)."""
    for _ in range(20):
        await asyncio.sleep(0)


class Calls:
    """Calls through an Admission that hold their running slot until the test releases them."""

    def __init__(self, admission: Admission):
        self.admission = admission
        self.running: dict[str, set[str]] = {}
        self.started: list[str] = []
        self._release: dict[str, asyncio.Event] = {}
        self.tasks: dict[str, asyncio.Task] = {}

    def send(self, client: str, name: str, size: int = 1) -> None:
        ticket = self.admission.admit(client, size)  # raises Shed at once, before any waiting
        self._release[name] = asyncio.Event()
        self.tasks[name] = asyncio.create_task(self._run(ticket, client, name))

    async def _run(self, ticket, client: str, name: str) -> None:
        async with ticket:
            self.running.setdefault(client, set()).add(name)
            self.started.append(name)
            await self._release[name].wait()
            self.running[client].discard(name)

    async def end(self, *names: str) -> None:
        for name in names:
            self._release[name].set()
            await _settle()
            assert self.tasks[name].done(), f"{name} did not end"
            self.tasks[name].result()

    def count(self, client: str) -> int:
        return len(self.running.get(client, ()))


def test_admission_sheds_at_its_bounds_and_queues_a_client_behind_itself():
    async def scenario(loop):
        adm = Admission(AdmissionLimits(max_calls=10, max_bytes=1000, per_client=2, per_client_queue=1),
                        clock=loop.time)
        calls = Calls(adm)
        for i in range(3):  # 2 running + 1 waiting
            calls.send("greedy", f"g{i}", 10)
        await _settle()
        assert calls.started == ["g0", "g1"]
        with pytest.raises(Shed, match="this client"):
            adm.admit("greedy", 10)
        calls.send("polite", "p0", 10)  # its own slots: not behind the greedy client
        await _settle()
        assert calls.started == ["g0", "g1", "p0"]
        with pytest.raises(Shed, match="bytes in flight"):
            adm.admit("other", 970)
        one_call = Admission(AdmissionLimits(max_calls=1), clock=loop.time)
        one_call.admit("a", 1)
        with pytest.raises(Shed, match="calls in flight"):
            one_call.admit("b", 1)
        await calls.end("p0", "g0", "g1")
        assert calls.started[-1] == "g2"
        await calls.end("g2")
        assert adm.in_flight() == {"calls": 0, "bytes": 0, "clients": 0}
        # a call cancelled while it waits for a slot (its deadline passed) leaves nothing counted
        loop.now += 2 * adm.limits.linger_s  # greedy and polite are gone: client c alone has both slots
        for name in ("c0", "c1", "c2"):
            calls.send("c", name)
        await _settle()
        assert calls.started[-2:] == ["c0", "c1"]
        calls.tasks["c2"].cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await calls.tasks["c2"]
        await calls.end("c0", "c1")
        assert "c2" not in calls.started and adm.in_flight() == {"calls": 0, "bytes": 0, "clients": 0}

    VirtualTimeLoop().run(scenario)


def test_active_clients_share_the_running_slots_evenly_and_a_lone_client_gets_them_back():
    async def scenario(loop):
        adm = Admission(AdmissionLimits(per_client=2, linger_s=1.0), clock=loop.time)
        calls = Calls(adm)
        for i in range(4):
            calls.send("greedy", f"g{i}")
        await _settle()
        assert calls.count("greedy") == 2  # alone: all of per_client; g2 and g3 wait behind their own client
        calls.send("polite", "p0")
        await _settle()
        assert calls.count("polite") == 1 and calls.started[-1] == "p0"  # a slot at once, ahead of g2 and g3
        await calls.end("g0")
        assert calls.count("greedy") == 1  # two active clients: an even share, one each; g2 still waits
        await calls.end("g1")
        assert calls.count("greedy") == 1 and calls.started[-1] == "g2"
        await calls.end("p0")
        loop.now += 0.5  # within the polite client's linger: the greedy client does not take its share back
        await calls.end("g2")
        assert calls.count("greedy") == 1 and calls.started[-1] == "g3"
        calls.send("greedy", "g4")
        calls.send("polite", "p1")  # one call after another: active in the gap too, a slot at once again
        await _settle()
        assert calls.count("polite") == 1 and calls.count("greedy") == 1 and "g4" not in calls.started
        await calls.end("p1")
        loop.now += 0.9  # 0.9 s after the polite client's last call: it still lingers
        await _settle()
        assert calls.count("greedy") == 1 and "g4" not in calls.started
        loop.now += 1.2  # its linger is over: a lone client gets both slots back, with no call ending to notice
        await _settle()
        assert calls.count("greedy") == 2 and calls.started[-1] == "g4"
        await calls.end("g3", "g4")
        assert adm.in_flight() == {"calls": 0, "bytes": 0, "clients": 0}

    VirtualTimeLoop().run(scenario)
