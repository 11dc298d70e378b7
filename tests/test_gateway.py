"""The audit gateway (moderation/gateway/) in front of the real server: it forwards every call unchanged,
audits exactly the failures no model audited (one row each, never content), resists a request id forged to
look like a model's coded failure, covers the streaming API, counts what it audited on its own /metrics, and
audits what it cannot deliver when Triton is down."""
from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from clients.client import build_inputs
from moderation.core.audit import read_rows
from moderation.core.errors import classify_failure, coded_by_model
from moderation.gateway.proxy import needs_row, request_summary
from moderation.testing.samples import sample_posts
from moderation.testing.server import free_port

POST = sample_posts()[0]


def _rows(audit_log, rid: str) -> list[dict]:
    return [r for r in read_rows(audit_log) if r.get("request_id") == rid]


def _wrong_dtype():
    x = grpcclient.InferInput("IMAGE", [1, 1], "FP32")
    x.set_data_from_numpy(np.zeros((1, 1), np.float32))
    return [x]


def _good(rid: str, policy: str = "allow_all"):
    inputs, outputs = build_inputs(grpcclient, POST.image_bytes(), POST.text, {"request_id": rid, "policy": policy})
    return inputs, outputs


# ---- library: what the gateway keeps and when it writes -------------------------------------------------

def _serialised(inputs, model="moderate", rid="") -> bytes:
    from tritonclient.grpc import service_pb2

    req = service_pb2.ModelInferRequest(model_name=model, id=rid)
    for t in inputs:
        req.inputs.append(t._get_tensor())
        req.raw_input_contents.append(t._get_content())
    return req.SerializeToString()


def test_request_summary_hashes_each_input_and_keeps_no_content():
    inputs, _ = _good("sum-1")
    s = request_summary(_serialised(inputs, rid="t-1"))
    assert s["request_id"] == "sum-1" and s["triton_request_id"] == "t-1" and s["model"] == "moderate"
    assert [i["name"] for i in s["inputs"]] == ["IMAGE", "TEXT", "OPTIONS"]
    from moderation.core.hashing import sha256_hex
    assert s["image_sha256"] == sha256_hex(POST.image_bytes()) == s["inputs"][0]["sha256"][0]
    assert POST.text not in json.dumps(s, ensure_ascii=False)
    # wrong dtype: one hash of the raw tensor; the Triton request id stands in for the missing OPTIONS id
    s2 = request_summary(_serialised(_wrong_dtype(), rid="t-2"))
    assert s2["inputs"][0]["datatype"] == "FP32" and isinstance(s2["inputs"][0]["sha256"], str)
    assert s2["request_id"] == "t-2"
    # not even a protobuf: audited by the body's hash
    assert request_summary(b"\xff\x00garbage")["request_sha256"]


def test_model_codes_are_trusted_only_at_the_head_of_the_message():
    assert coded_by_model("[bad_image] image is empty (0 bytes)")
    assert coded_by_model("in ensemble 'moderate', [request id: r1] [overloaded] queue full")
    assert not coded_by_model("[request id: x] unexpected inference input '[bad_image]' for model 'moderate'")
    assert not coded_by_model("Request for unknown model: 'no_such_model' is not found")
    assert not coded_by_model("[not_a_code_of_ours] x")
    forged = {"triton_request_id": "x] [bad_image", "model": "moderate"}
    assert needs_row("[request id: x] [bad_image] inference input 'IMAGE' data-type is 'FP32'", forged)
    assert not needs_row("[bad_image] image is empty", {"triton_request_id": "ok", "model": "moderate"})
    assert classify_failure("Exceeds maximum queue size", "RESOURCE_EXHAUSTED")[0] == "overloaded"
    assert classify_failure("x is not found", "NOT_FOUND")[0] == "model_not_found"
    # a caller-chosen name that looks like a code names nothing: Triton refused the request itself
    quoted = "[request id: x] unexpected inference input '[bad_image]' for model 'moderate'"
    assert classify_failure(quoted, "StatusCode.INVALID_ARGUMENT") == ("bad_request", quoted)
    assert classify_failure("in ensemble 'moderate', [bad_text] caption is not UTF-8", "") == \
        ("bad_text", "caption is not UTF-8")


# ---- against the running server ------------------------------------------------------------------------

def test_forged_request_id_cannot_skip_the_audit(triton, audit_log):
    rid = f"x] [bad_image-{uuid.uuid4().hex[:6]}"
    c = grpcclient.InferenceServerClient(triton.grpc_url)
    with pytest.raises(InferenceServerException):
        c.infer("moderate", _wrong_dtype(), request_id=rid, client_timeout=30)
    rows = _rows(audit_log, rid)
    assert len(rows) == 1 and rows[0]["stage"] == "gateway" and rows[0]["error"]["code"] == "bad_request"


def test_stream_infer_is_forwarded_and_its_rejections_audited(triton, audit_log):
    good_id, bad_id = f"stream-good-{uuid.uuid4().hex[:6]}", f"stream-bad-{uuid.uuid4().hex[:6]}"
    answers: queue.Queue = queue.Queue()
    c = grpcclient.InferenceServerClient(triton.grpc_url)
    c.start_stream(callback=lambda result, error: answers.put((result, error)), stream_timeout=60)
    try:
        inputs, outputs = _good(good_id)
        c.async_stream_infer("moderate", inputs, outputs=outputs, request_id=good_id)
        c.async_stream_infer("moderate", _wrong_dtype(), request_id=bad_id)
        got = [answers.get(timeout=60) for _ in range(2)]
    finally:
        c.stop_stream()
    results = [r for r, e in got if e is None]
    errors = [e for r, e in got if e is not None]
    assert len(results) == 1 and len(errors) == 1, got
    assert json.loads(results[0].as_numpy("RESULT").reshape(-1)[0])["request_id"] == good_id
    assert "FP32" in errors[0].message()
    bad = _rows(audit_log, bad_id)
    assert len(bad) == 1 and bad[0]["stage"] == "gateway" and bad[0]["error"]["code"] == "bad_request", bad
    good = _rows(audit_log, good_id)
    assert len(good) == 1 and good[0]["stage"] == "moderate", good  # the model's row; nothing from the gateway


def _scrape(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(moderation_gateway_\S+) (\S+)$", text, re.M)}


def test_gateway_metrics_count_calls_and_audited_failures(triton):
    before = _scrape(triton.gateway_metrics_url)
    c = grpcclient.InferenceServerClient(triton.grpc_url)
    with pytest.raises(InferenceServerException):
        c.infer("no_such_model", _wrong_dtype(), client_timeout=30)
    inputs, outputs = _good(f"metrics-{uuid.uuid4().hex[:6]}")
    c.infer("moderate", inputs, outputs=outputs, client_timeout=60)
    after = _scrape(triton.gateway_metrics_url)
    key = 'moderation_gateway_audited_failures_total{code="model_not_found"}'
    assert after[key] - before.get(key, 0) == 1
    ok = 'moderation_gateway_calls_total{method="ModelInfer",status="OK"}'
    assert after[ok] - before.get(ok, 0) >= 1


def test_gateway_answers_as_triton_does(triton):
    """The same post through the gateway and on Triton's own port: the same output tensors and the same judgement.
    What the extra hop costs is measured by perf/gateway_overhead.py (perf/results/gateway_overhead.json)."""
    answers = {}
    for name, c in (("direct", triton.direct_client()), ("gateway", grpcclient.InferenceServerClient(triton.grpc_url))):
        inputs, outputs = _good(f"same-{name}-{uuid.uuid4().hex[:6]}")
        answers[name] = c.infer("moderate", inputs, outputs=outputs, client_timeout=60).get_response()
    direct, gateway = answers["direct"], answers["gateway"]
    assert [(o.name, o.datatype, list(o.shape)) for o in gateway.outputs] == \
        [(o.name, o.datatype, list(o.shape)) for o in direct.outputs]
    results = {k: json.loads(grpcclient.InferResult(v).as_numpy("RESULT").reshape(-1)[0]) for k, v in answers.items()}
    judged = ("action", "decided_by", "route", "violation", "labels", "scores", "model_versions", "error")
    assert {k: results["gateway"][k] for k in judged} == {k: results["direct"][k] for k in judged}, results


def test_triton_down_is_answered_unavailable_and_audited(tmp_path):
    """A gateway whose Triton is gone still answers (UNAVAILABLE, retryable) and audits what it could not deliver."""
    audit = tmp_path / "audit.jsonl"
    port = free_port()
    env = {**os.environ, "MODERATION_AUDIT_LOG": str(audit)}
    proc = subprocess.Popen([sys.executable, "-m", "moderation.gateway", "--listen", f"127.0.0.1:{port}",
                             "--upstream", f"127.0.0.1:{free_port()}", "--metrics", ""], env=env)
    try:
        c = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
        rid = "down-1"
        inputs, outputs = _good(rid)
        hang_guard = time.monotonic() + 120  # the gateway starting; only a hang takes this long
        while True:
            try:
                c.infer("moderate", inputs, outputs=outputs, client_timeout=10)
                raise AssertionError("a request succeeded with no Triton behind the gateway")
            except InferenceServerException as e:
                if "UNAVAILABLE" in (e.status() or "") and audit.exists():
                    break
                assert time.monotonic() < hang_guard, (e.status(), e.message())
                time.sleep(0.2)
        rows = _rows(audit, rid)
        assert rows and rows[-1]["stage"] == "gateway" and rows[-1]["error"]["code"] == "unavailable", rows
        assert rows[-1]["image_sha256"]
    finally:
        proc.terminate()
        assert proc.wait(30) == 0


def test_make_serve_supervises_the_pair(tmp_path):
    """`python -m moderation.launch` (make serve) runs Triton and the gateway as a pair: ready means both answer;
    if the gateway dies, Triton is stopped too and the command fails, so a supervisor restarts the pair."""
    ports = {k: str(free_port()) for k in ("GRPC_PORT", "HTTP_PORT", "METRICS_PORT", "TRITON_GRPC_PORT",
                                            "GATEWAY_METRICS_PORT")}
    env = {**os.environ, **ports, "MODERATION_AUDIT_LOG": str(tmp_path / "audit.jsonl"), "MODERATION_WATCHDOG": "0"}
    with open(tmp_path / "serve.log", "wb") as log:  # the child writes through its own copy of the descriptor
        proc = subprocess.Popen([sys.executable, "-m", "moderation.launch"], env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while b"ready:" not in (tmp_path / "serve.log").read_bytes():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-2000:]
            time.sleep(1)
        c = grpcclient.InferenceServerClient(f"127.0.0.1:{ports['GRPC_PORT']}")
        assert c.is_server_ready()
        gateway = subprocess.run(["pgrep", "-f", f"moderation.gateway --listen 127.0.0.1:{ports['GRPC_PORT']}"],
                                 capture_output=True, text=True).stdout.split()
        assert len(gateway) == 1
        os.kill(int(gateway[0]), signal.SIGKILL)
        assert proc.wait(90) == 1
        assert "gateway exited" in (tmp_path / "serve.log").read_text()
        with pytest.raises(InferenceServerException):  # Triton went down with it
            grpcclient.InferenceServerClient(f"127.0.0.1:{ports['TRITON_GRPC_PORT']}").is_server_ready(client_timeout=5)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_sigterm_drains_the_calls_in_flight_and_refuses_new_ones(triton, audit_log):
    """SIGTERM with calls in flight: they are answered and audited, a call after it is refused, the gateway exits 0.
    The calls are held in flight by stopping Triton (SIGSTOP) until the gateway has stopped taking calls, so the
    order is fixed without timing: admitted, SIGTERM, refused, Triton resumed, answered, exit."""
    from .conftest import ADMIN_KEY

    n = 4
    port, metrics_port = free_port(), free_port()
    env = {**os.environ, "MODERATION_AUDIT_LOG": str(audit_log), "MODERATION_ADMIN_KEY": ADMIN_KEY,
           "MODERATION_GATEWAY_PER_CLIENT": str(n)}  # all n admitted at once, none waiting in the client queue
    gw = subprocess.Popen([sys.executable, "-m", "moderation.gateway", "--listen", f"127.0.0.1:{port}",
                           "--upstream", triton.triton_grpc_url, "--metrics", f"127.0.0.1:{metrics_port}",
                           "--triton-metrics", ""], env=env)
    url, triton_pid, stopped = f"127.0.0.1:{port}", triton.process.proc.pid, False
    tag = uuid.uuid4().hex[:8]
    rids = [f"drain-{tag}-{i}" for i in range(n)]
    answers: queue.Queue = queue.Queue()
    refused = ("StatusCode.UNAVAILABLE", "StatusCode.CANCELLED")  # a stopping gRPC server cancels or rejects

    def call(rid: str) -> None:
        inputs, outputs = _good(rid)
        try:
            r = grpcclient.InferenceServerClient(url).infer("moderate", inputs, outputs=outputs, client_timeout=180)
            answers.put((rid, json.loads(r.as_numpy("RESULT").reshape(-1)[0])))
        except InferenceServerException as e:
            answers.put((rid, e))

    def in_flight() -> float:
        return _scrape(f"http://127.0.0.1:{metrics_port}/metrics").get(
            'moderation_gateway_in_flight{what="calls"}', 0.0)

    try:
        c = grpcclient.InferenceServerClient(url)
        hang_guard = time.monotonic() + 120  # the gateway starting
        while True:
            try:
                if c.is_server_ready(client_timeout=5) and in_flight() == 0:
                    break
            except (InferenceServerException, OSError):
                pass
            assert gw.poll() is None and time.monotonic() < hang_guard, "the gateway did not come up"
            time.sleep(0.2)
        os.kill(triton_pid, signal.SIGSTOP)
        stopped = True
        threads = [threading.Thread(target=call, args=(rid,), daemon=True) for rid in rids]
        for t in threads:
            t.start()
        hang_guard = time.monotonic() + 120
        while in_flight() < n:  # every call admitted and forwarded, none can be answered
            assert time.monotonic() < hang_guard and answers.empty(), "the calls were not all admitted"
            time.sleep(0.1)
        gw.send_signal(signal.SIGTERM)
        hang_guard = time.monotonic() + 120
        while True:  # a call the gateway answers itself: refused with its own code until it stops taking calls
            try:
                c.infer("no_such_model", _wrong_dtype(), client_timeout=10)
            except InferenceServerException as e:
                if e.status() in refused:
                    break
                assert e.status() == "StatusCode.NOT_FOUND", (e.status(), e.message())
            assert time.monotonic() < hang_guard, "the gateway kept taking new calls after SIGTERM"
            time.sleep(0.1)
        late = f"drain-{tag}-late"
        inputs, outputs = _good(late)
        with pytest.raises(InferenceServerException) as info:
            c.infer("moderate", inputs, outputs=outputs, client_timeout=30)
        assert info.value.status() in refused, (info.value.status(), info.value.message())
        assert answers.empty() and gw.poll() is None  # the calls in flight are still waiting, the gateway with them
        os.kill(triton_pid, signal.SIGCONT)
        stopped = False
        got = dict(answers.get(timeout=180) for _ in rids)
        for rid in rids:
            assert isinstance(got[rid], dict), (rid, got[rid])
            assert got[rid]["request_id"] == rid and got[rid]["action"] is not None, got[rid]
        assert gw.wait(180) == 0
        for rid in rids:
            rows = _rows(audit_log, rid)
            assert [r["stage"] for r in rows] == ["moderate"], rows  # the model's row of the answered call
        assert _rows(audit_log, late) == []  # refused at the door: it reached nothing that writes a row
    finally:
        if stopped:
            os.kill(triton_pid, signal.SIGCONT)
        if gw.poll() is None:
            gw.kill()
            gw.wait()
