"""/v1/moderations is bounded before it reads (moderation/openai/bounds.py, router.py), on a real front end in front
of the session's server: a declared length over the limit and a request past the requests or bytes in flight are
refused from the headers alone, a slow body is answered 408, deep nesting and lone surrogates get OpenAI-shaped
400s (a surrogate in one input costs only that input's result), and every refusal has an audit row."""
from __future__ import annotations

import dataclasses
import http.client
import json
import os
import select
import time
from unittest import mock

import pytest

from moderation.core.audit import read_rows
from moderation.launch.processes import OpenAIProcess
from moderation.openai.bounds import MAX_BODY_BYTES
from moderation.testing.server import free_port

MAX_REQUESTS = 3
MAX_BYTES = 3_000_000
BODY_TIMEOUT_S = 2  # slow_front's: the 408 its test waits for
HANG_GUARD_S = 120  # a socket timeout that only a hung server reaches; `front`'s body timeout too, so a body a test
# holds back is never timed out while it decides which request is refused (that would race the clock)


def _front(triton, audit_log, policy_dir, log_dir, body_timeout_s: float):
    """A front end of its own (small bounds) calling the session server's gateway."""
    config = dataclasses.replace(triton.config, openai_port=free_port())
    env = {"MODERATION_OPENAI_MAX_REQUESTS": str(MAX_REQUESTS), "MODERATION_OPENAI_MAX_BYTES": str(MAX_BYTES),
           "MODERATION_OPENAI_BODY_TIMEOUT_S": str(body_timeout_s), "MODERATION_AUDIT_LOG": str(audit_log),
           "MODERATION_POLICY_DIR": str(policy_dir)}
    with mock.patch.dict(os.environ, env):
        proc = OpenAIProcess(config, log_dir / "openai.log")
    proc.start().wait_ready(60)
    proc.port, proc.audit = config.openai_port, audit_log
    return proc


@pytest.fixture(scope="module")
def front(triton, audit_log, policy_dir, tmp_path_factory):
    proc = _front(triton, audit_log, policy_dir, tmp_path_factory.mktemp("openai_bounds"), HANG_GUARD_S)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def slow_front(triton, audit_log, policy_dir, tmp_path_factory):
    proc = _front(triton, audit_log, policy_dir, tmp_path_factory.mktemp("openai_slow_body"), BODY_TIMEOUT_S)
    yield proc
    proc.stop()


def _open(front, declared: int | None, first: bytes = b"", chunked: bool = False) -> http.client.HTTPConnection:
    """Headers sent (and `first` bytes of the body), the rest held back."""
    conn = http.client.HTTPConnection("127.0.0.1", front.port, timeout=HANG_GUARD_S)
    conn.putrequest("POST", "/v1/moderations")
    conn.putheader("Content-Type", "application/json")
    if chunked:
        conn.putheader("Transfer-Encoding", "chunked")
    else:
        conn.putheader("Content-Length", str(declared))
    conn.endheaders()
    if first:
        conn.send(first)
    return conn


def _answer(conn: http.client.HTTPConnection) -> tuple[int, dict, dict]:
    resp = conn.getresponse()
    body = json.loads(resp.read())
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body


def _refused_while_the_others_wait(held: list[tuple[http.client.HTTPConnection, int]], rest: bytes):
    """Held requests (headers and the start of a body sent): the one answered from its headers alone, while the
    others hold their slots with no answer; then each other one gets `rest`, padded with JSON whitespace to its
    declared length, and is answered. Returns the refused one's answer and the others' statuses."""
    hang_guard = time.monotonic() + HANG_GUARD_S
    ready: list = []
    while not ready:
        assert time.monotonic() < hang_guard, "no held request was refused"
        ready, _, _ = select.select([c.sock for c, _ in held], [], [], 0.5)
    assert len(ready) == 1, ready
    refused = next(c for c, _ in held if c.sock is ready[0])
    answer = _answer(refused)
    statuses = []
    for c, left in held:
        if c is not refused:
            c.send(rest.ljust(left))
            statuses.append(_answer(c)[0])
    return answer, statuses


def _post(front, body: bytes) -> tuple[int, dict, dict]:
    conn = _open(front, len(body), body)
    try:
        return _answer(conn)
    finally:
        conn.close()


def _row(front, request_id: str) -> dict:
    rows = [r for r in read_rows(front.audit) if r.get("request_id") == request_id]
    assert len(rows) == 1, rows
    return rows[0]


def _openai_error(body: dict, code: str) -> dict:
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code, body
    return err


def _refused_and_audited(front, status: int, headers: dict, body: dict, want_status: int, code: str) -> dict:
    assert status == want_status and headers["content-type"].startswith("application/json")
    _openai_error(body, code)
    row = _row(front, headers["x-request-id"])
    assert row["stage"] == "openai" and row["http_status"] == want_status and row["error"]["code"] == code
    return row


def test_a_declared_length_over_the_limit_is_refused_before_the_body_is_sent(front):
    conn = _open(front, MAX_BODY_BYTES + 1)  # headers only: the answer must come without a byte of body
    try:
        status, headers, body = _answer(conn)
    finally:
        conn.close()
    row = _refused_and_audited(front, status, headers, body, 413, "request_too_large")
    assert row["content_length"] == MAX_BODY_BYTES + 1
    assert headers["connection"].lower() == "close"


def test_past_the_body_bytes_in_flight_a_request_is_refused_with_retry_after(front):
    declared = MAX_BYTES * 2 // 3  # two of these do not fit
    first = b'{"input": "'
    held = [(_open(front, declared, first), declared - len(first)) for _ in range(2)]
    try:
        (status, headers, body), admitted = _refused_while_the_others_wait(held, b'a nice day"}')
    finally:
        for c, _ in held:
            c.close()
    assert admitted == [200]  # the one that fitted waited for its body and was judged
    assert body["error"]["type"] == "rate_limit_error" and int(headers["retry-after"]) >= 1
    _refused_and_audited(front, status, headers, body, 429, "overloaded")


def test_past_the_requests_in_progress_a_request_is_refused_with_retry_after(front):
    held = [(_open(front, 100, b"{"), 99) for _ in range(MAX_REQUESTS + 1)]
    try:
        (status, headers, body), admitted = _refused_while_the_others_wait(held, b'"input": "a nice day"}')
    finally:
        for c, _ in held:
            c.close()
    assert admitted == [200] * MAX_REQUESTS
    assert "requests in progress" in body["error"]["message"] and headers["retry-after"]
    _refused_and_audited(front, status, headers, body, 429, "overloaded")


def test_a_slow_body_is_answered_408_and_the_connection_closed(slow_front):
    front = slow_front
    conn = _open(front, 1000, b'{"input": "a slow')
    try:
        status, headers, body = _answer(conn)
        assert conn.sock is None or conn.sock.recv(1) == b""  # closed after the answer: nothing more is read
    finally:
        conn.close()
    row = _refused_and_audited(front, status, headers, body, 408, "request_timeout")
    assert row["content_length"] == 1000


def test_a_chunked_body_is_counted_as_it_arrives(front):
    conn = _open(front, None, chunked=True)  # no length to check: bytes are reserved as they come
    try:
        piece = b"x" * (1 << 20)
        for _ in range(MAX_BYTES // len(piece) + 1):
            conn.send(b"%x\r\n%s\r\n" % (len(piece), piece))
        status, headers, body = _answer(conn)
    finally:
        conn.close()
    _refused_and_audited(front, status, headers, body, 429, "overloaded")
    assert _row(front, headers["x-request-id"])["content_length"] is None


def test_nesting_past_the_depth_limit_is_an_openai_shaped_400(front):
    for depth in (40, 1000, 100_000):
        status, headers, body = _post(front, b'{"input": ' + b"[" * depth + b"]" * depth + b"}")
        _refused_and_audited(front, status, headers, body, 400, "json_too_deep")


def test_a_lone_surrogate_fails_only_its_own_input(front):
    status, headers, body = _post(front, b'{"input": ["a nice day", "bad \\ud800 text", "you fucking idiot"]}')
    assert status == 200, body
    rid = body["id"]
    results = [r["moderation"] for r in body["results"]]
    assert results[1]["error"]["code"] == "invalid_unicode" and body["results"][1]["flagged"] is True
    assert results[0]["action"] and results[2]["action"] and "error" not in results[0]
    assert [results[0]["request_id"], results[2]["request_id"]] == [f"{rid}-0", f"{rid}-2"]
    row = _row(front, f"{rid}-1")
    assert row["stage"] == "openai" and row["error"]["code"] == "invalid_unicode" and row["text_sha256"]
    assert _row(front, f"{rid}-0")["stage"] == _row(front, f"{rid}-2")["stage"] == "moderate"
    # one input alone: the request is the input; UTF-8-encoded surrogate bytes are not UTF-8 at all
    status, headers, body = _post(front, b'{"input": "\\udfff"}')
    _refused_and_audited(front, status, headers, body, 400, "invalid_unicode")
    status, headers, body = _post(front, b'{"input": "\xed\xa0\x80"}')
    _refused_and_audited(front, status, headers, body, 400, "invalid_json")
