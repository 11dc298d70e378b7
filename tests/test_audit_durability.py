"""The audit log stays readable and honest when things go wrong: ASCII rows, a reader that splits on b"\\n" only
and marks torn lines, size and age rotation whose deletions are counted and announced, and a defined failure mode
(fail_closed refuses the request with `audit_unavailable`; fail_open serves it and spools the row) checked on a
real, tiny filesystem (a 256 KiB tmpfs filled up with a filler file) and against a real server."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import subprocess
import time
import types
import urllib.request
import uuid
from pathlib import Path

import pytest

from moderation.core.audit import (
    DELETED_METRIC,
    DROPPED_METRIC,
    FAILURES_METRIC,
    AuditLog,
    iter_file,
    iter_rows,
    read_rows,
)
from moderation.core.errors import AuditUnavailable, classify_failure

from .conftest import ADMIN_KEY, REPO
from .test_stages import pb  # noqa: F401 - the pb_utils test double fixture

BIG = "x" * 6000  # a row over one 4 KiB page: it cannot fit in the tail of a page the log already holds


# a real tiny filesystem ----------------------------------------------------------------------------------------
class TinyFs:
    """A mounted tmpfs: fill() takes every free byte with a filler file (writes then fail with ENOSPC), free()
    deletes it."""

    def __init__(self, root: Path):
        self.root = root
        self.filler = root / "filler.bin"

    def fill(self) -> None:
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            for size in (1 << 16, 4096, 512, 64, 1):
                with contextlib.suppress(OSError):
                    while True:
                        os.write(fd, b"\0" * size)
        finally:
            os.close(fd)
        assert os.statvfs(self.root).f_bavail == 0

    def exhaust(self, log_path: Path) -> None:
        """Also the free tail of the log file's last page (tmpfs counts pages): small test rows until none fits."""
        probe = AuditLog(log_path, mode="fail_closed")
        with contextlib.suppress(AuditUnavailable):
            for i in range(10_000):
                probe.write({"stage": "test", "event": "disk_fill", "n": i})

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)


@contextlib.contextmanager
def mounted_tmpfs(where: Path, size: str = "256k"):
    where.mkdir(parents=True, exist_ok=True)
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True,
                       text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root, as on this machine and in CI): {p.stderr.strip()}")
    try:
        yield TinyFs(where)
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


@pytest.fixture
def tiny_fs(tmp_path):
    with mounted_tmpfs(tmp_path / "fs") as fs:
        yield fs


def _counter():
    counts: dict[str, int] = {}

    def on_count(name: str, n: int) -> None:
        counts[name] = counts.get(name, 0) + n

    return counts, on_count


# rows readers can always read ----------------------------------------------------------------------------------
def test_rows_are_ascii_and_read_back_equal(tmp_path):
    path = tmp_path / "audit.jsonl"
    odd = "赌博 \u2028 line \u2029 sep \u0085 nel \x1c fs \x1d \x1e \u00e9 🚀"
    AuditLog(path).write({"request_id": odd, "stage": "test"})
    raw = path.read_bytes()
    assert raw.isascii() and raw.count(b"\n") == 1 and raw.endswith(b"\n")
    assert "\\u2028" in raw.decode() and "\\u0085" in raw.decode()
    (row,) = read_rows(path)
    assert row["request_id"] == odd and row["stage"] == "test"


def test_reader_splits_on_newline_only_and_marks_a_torn_line(tmp_path):
    path = tmp_path / "audit.jsonl"
    odd = ["a\u2028b", "c\u0085d", "e\x1cf", "g\u2029h\x1d\x1e\x0b\x0ci"]
    lines = [json.dumps({"request_id": s, "n": i}, ensure_ascii=False).encode() for i, s in enumerate(odd)]
    torn = b'{"request_id": "torn", "stage": "mod'
    path.write_bytes(b"\n".join(lines) + b"\n\n" + torn)  # raw non-ASCII as an older writer left it; a blank line
    rows = iter_rows(path)
    assert isinstance(rows, types.GeneratorType)  # streamed, line by line
    rows = list(rows)
    assert [r.get("request_id") for r in rows[:4]] == odd
    assert rows[4] == {"unparsable_line": hashlib.sha256(torn).hexdigest(), "file": "audit.jsonl", "line": 6,
                       "bytes": len(torn)}
    # the next row starts on a line of its own: the torn line stays one (marked) line, the new row parses
    AuditLog(path).write({"request_id": "after"})
    rows = read_rows(path)
    assert rows[4]["unparsable_line"] == hashlib.sha256(torn).hexdigest() and rows[5]["request_id"] == "after"
    assert len(rows) == 6


def test_invalid_failure_mode_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("MODERATION_AUDIT_ON_FAILURE", "fail_sideways")
    with pytest.raises(ValueError, match="fail_closed, fail_open"):
        AuditLog(tmp_path / "a.jsonl")


# retention -----------------------------------------------------------------------------------------------------
def test_size_rotation_counts_and_announces_every_deleted_row(tmp_path):
    path = tmp_path / "audit.jsonl"
    counts, on_count = _counter()
    log = AuditLog(path, max_bytes=2000, backups=2, on_count=on_count)
    written = 120
    for i in range(written):
        log.write({"request_id": f"r{i}", "stage": "test", "payload": "y" * 100})
    files = sorted(tmp_path.glob("audit.jsonl*"))
    assert {f.name for f in files} == {"audit.jsonl", "audit.jsonl.1", "audit.jsonl.2", "audit.jsonl.lock"}
    assert all(f.stat().st_size <= 2000 for f in files)
    rows = read_rows(path)
    deletions = [r for r in rows if r.get("event") == "retention_deleted"]
    assert deletions, "rotation should have deleted the oldest backup"
    for d in deletions:
        assert d["stage"] == "audit" and d["file"] == "audit.jsonl.2" and d["reason"] == "size"
        assert d["rows"] > 0 and d["bytes"] > 0 and d["first_ts"] <= d["last_ts"]
    # each retention row is the first line of the file it was written into
    assert all(next(iter_file(f)).get("event") == "retention_deleted" for f in (path, tmp_path / "audit.jsonl.1"))
    # nothing left silently: every line ever written is present or counted as deleted
    assert len(rows) + log.rows_deleted == written + log.files_deleted
    assert counts[DELETED_METRIC] == log.rows_deleted
    kept = [r["request_id"] for r in rows if r.get("stage") == "test"]
    assert kept == [f"r{i}" for i in range(written - len(kept), written)]  # the newest rows, in order


def test_a_deleted_backup_is_counted_exactly(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, max_bytes=1100, backups=1)
    first = [f"a{i}" for i in range(5)]
    for rid in first:
        log.write({"request_id": rid, "payload": "z" * 150})  # ~210 bytes a row: 5 fit in 1100
    assert not (tmp_path / "audit.jsonl.1").exists()
    for i in range(5):
        log.write({"request_id": f"b{i}", "payload": "z" * 150})  # rotates once: audit.jsonl.1 = the a-rows
    a_rows = list(iter_file(tmp_path / "audit.jsonl.1"))
    assert [r["request_id"] for r in a_rows] == first
    a_bytes = (tmp_path / "audit.jsonl.1").stat().st_size
    log.write({"request_id": "c0", "payload": "z" * 900})  # rotates again: the a-file is deleted
    head = next(iter_file(path))
    assert head == {"ts": head["ts"], "stage": "audit", "event": "retention_deleted", "file": "audit.jsonl.1",
                    "rows": 5, "bytes": a_bytes, "first_ts": a_rows[0]["ts"], "last_ts": a_rows[-1]["ts"],
                    "reason": "size"}
    assert log.rows_deleted == 5


def test_age_rotation(tmp_path, monkeypatch):
    path = tmp_path / "audit.jsonl"
    monkeypatch.setenv("MODERATION_AUDIT_MAX_AGE_S", "60")
    log = AuditLog(path)
    assert log.max_age_s == 60
    log.write({"request_id": "old", "ts": time.time() - 61})
    log.write({"request_id": "new"})  # the file's first row is over 60 s old: rotate first
    assert [r["request_id"] for r in iter_file(tmp_path / "audit.jsonl.1")] == ["old"]
    assert [r["request_id"] for r in iter_file(path)] == ["new"]
    log.write({"request_id": "newer"})  # the fresh file is young: no rotation
    assert [r["request_id"] for r in iter_file(path)] == ["new", "newer"]
    assert [r["request_id"] for r in read_rows(path)] == ["old", "new", "newer"]
    # no age rule by default
    monkeypatch.delenv("MODERATION_AUDIT_MAX_AGE_S")
    other = AuditLog(tmp_path / "b.jsonl")
    other.write({"request_id": "old", "ts": time.time() - 10 ** 6})
    other.write({"request_id": "new"})
    assert not (tmp_path / "b.jsonl.1").exists()


# failure modes on a real full filesystem -----------------------------------------------------------------------
def test_fail_closed_raises_audit_unavailable_without_os_text(tiny_fs):
    path = tiny_fs.root / "audit.jsonl"
    counts, on_count = _counter()
    log = AuditLog(path, mode="fail_closed", on_count=on_count)
    assert log.writable() and not path.exists()  # the probe creates nothing
    log.write({"request_id": "before"})
    size = path.stat().st_size
    tiny_fs.fill()
    assert not log.writable()
    with pytest.raises(AuditUnavailable) as info:
        log.write({"request_id": "during", "payload": BIG})
    e = info.value
    assert e.code == "audit_unavailable"
    assert str(e) == "[audit_unavailable] the audit log cannot be written; the request was not served"
    for os_text in ("Errno", "No space", "ENOSPC", str(tiny_fs.root), "audit.jsonl"):
        assert os_text not in str(e)
    assert e.__cause__ is None and e.__context__ is None  # no OS error chained either
    assert classify_failure(str(e)) == ("audit_unavailable", e.message)  # a model's code the parser knows
    assert path.stat().st_size == size  # the half-written row was cut back: no torn line
    assert log.failures == 1 and counts[FAILURES_METRIC] == 1 and log.last_error == "ENOSPC"
    with pytest.raises(AuditUnavailable):  # rows of one request: all or none
        log.write_many([{"request_id": "p1"}, {"request_id": "p2", "payload": BIG}])
    assert path.stat().st_size == size
    tiny_fs.free()
    assert log.writable()
    log.write({"request_id": "after"})
    assert [r["request_id"] for r in read_rows(path)] == ["before", "after"]  # refused rows are not spooled
    assert log.spooled == 0


def test_fail_closed_on_a_read_only_filesystem(tiny_fs):
    path = tiny_fs.root / "audit.jsonl"
    log = AuditLog(path, mode="fail_closed")
    log.write({"request_id": "before"})
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_fs.root)], check=True)
    try:
        assert not log.writable()
        assert not AuditLog(tiny_fs.root / "other.jsonl").writable()  # no file yet: its directory is read-only
        with pytest.raises(AuditUnavailable) as info:
            log.write({"request_id": "during"})
        assert "Read-only" not in str(info.value) and log.last_error == errno.errorcode[errno.EROFS]
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(tiny_fs.root)], check=True)
    log.write({"request_id": "after"})
    assert [r["request_id"] for r in read_rows(path)] == ["before", "after"]


def test_fail_open_spools_flushes_in_order_and_announces_drops(tiny_fs, monkeypatch):
    monkeypatch.setenv("MODERATION_AUDIT_ON_FAILURE", "fail_open")
    monkeypatch.setenv("MODERATION_AUDIT_SPOOL_ROWS", "3")
    path = tiny_fs.root / "audit.jsonl"
    counts, on_count = _counter()
    log = AuditLog(path, on_count=on_count)
    assert log.mode == "fail_open" and log.spool_rows == 3
    log.write({"request_id": "before"})
    tiny_fs.fill()
    sent = []
    for i in range(5):
        sent.append(time.time())
        log.write({"request_id": f"out{i}", "payload": BIG})  # served: never raises
    assert log.failures == 5 and counts[FAILURES_METRIC] == 5
    assert log.spooled == 3 and log.dropped == 2 and counts[DROPPED_METRIC] == 2
    assert log.flush() == 3  # still full: nothing written, nothing lost from the spool
    assert [r["request_id"] for r in read_rows(path)] == ["before"]
    tiny_fs.free()
    log.write({"request_id": "after"})
    rows = read_rows(path)
    assert [r.get("request_id") for r in rows] == ["before", None, "out2", "out3", "out4", "after"]
    marker = rows[1]
    assert marker["stage"] == "audit" and marker["event"] == "spool_dropped" and marker["dropped"] == 2
    assert sent[0] - 1 < marker["first_ts"] <= marker["last_ts"] < sent[2]  # the ts of out0 and out1
    assert [r["ts"] for r in rows[2:5]] == sorted(r["ts"] for r in rows[2:5])  # each row keeps its own time
    assert log.spooled == 0 and log.dropped == 2


def test_fail_open_flush_writes_the_spool_without_a_new_row(tiny_fs):
    path = tiny_fs.root / "audit.jsonl"
    log = AuditLog(path, mode="fail_open")
    tiny_fs.fill()
    log.write({"request_id": "a", "payload": BIG})
    log.write_many([{"request_id": "b"}, {"request_id": "c", "payload": BIG}])
    assert log.spooled == 3 and log.dropped == 0
    tiny_fs.free()
    assert log.flush() == 0
    assert [r["request_id"] for r in read_rows(path)] == ["a", "b", "c"]  # no spool_dropped row: none dropped


def test_retention_row_survives_a_failed_write(tmp_path, monkeypatch):
    """A rotation that deleted a backup owes its retention row even in fail_closed mode: when that row cannot be
    written it waits for the next write that succeeds (the deletion itself freed space, so a real full disk
    rarely shows this: the failure is injected)."""
    from moderation.core import audit

    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, max_bytes=3000, backups=1, mode="fail_closed")
    for i in range(3):
        log.write({"request_id": f"a{i}", "payload": "q" * 900})
    log.write({"request_id": "b0", "payload": "q" * 900})  # rotates: audit.jsonl.1 holds a0..a2
    assert len(list(iter_file(tmp_path / "audit.jsonl.1"))) == 3
    real = audit._append_durably

    def disk_full(fd, size, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(audit, "_append_durably", disk_full)
    with pytest.raises(AuditUnavailable):  # rotation deletes the a-file, then no write succeeds
        log.write({"request_id": "c0", "payload": "q" * 2500})
    assert log.rows_deleted == 3 and log.spooled == 1  # the retention row waits
    assert [r["request_id"] for r in iter_file(tmp_path / "audit.jsonl.1")] == ["b0"]
    monkeypatch.setattr(audit, "_append_durably", real)
    log.write({"request_id": "d0"})
    head = list(iter_file(path))
    assert head[0]["event"] == "retention_deleted" and head[0]["rows"] == 3 and head[1]["request_id"] == "d0"
    assert "c0" not in [r.get("request_id") for r in read_rows(path)]  # refused: fail_closed spools no request


# the models answer audit_unavailable --------------------------------------------------------------------------
def test_stage_fail_answers_audit_unavailable_when_its_row_cannot_be_written(tiny_fs, monkeypatch):
    from moderation.core.errors import BadImage
    from moderation.serving.triton_io import Stage

    from . import pb_utils_double

    u = pb_utils_double.install()
    monkeypatch.setenv("MODERATION_AUDIT_LOG", str(tiny_fs.root / "audit.jsonl"))
    stage = Stage({"model_name": "preprocess", "model_version": "1"})
    tiny_fs.fill()
    tiny_fs.exhaust(tiny_fs.root / "audit.jsonl")
    resp = stage.fail(BadImage("the image is truncated"), {"request_id": "x" * 3000})
    assert resp.error().message() == "[audit_unavailable] the audit log cannot be written; the request was not served"
    assert resp.error().code == u.TritonError.UNAVAILABLE
    fam = u.MetricFamily.families["moderation_audit_failures_total"]
    assert sum(m.value for m in fam.metrics) >= 1 and fam.metrics[0].labels == {"stage": "preprocess"}
    tiny_fs.free()
    resp = stage.fail(BadImage("the image is truncated"), {"request_id": "y"})
    assert resp.error().message().startswith("[bad_image] ") and resp.error().code == u.TritonError.INVALID_ARG


def test_postprocess_refuses_a_request_of_several_posts_whose_rows_cannot_be_written(pb, tmp_path):  # noqa: F811
    """All the posts' rows together or none: a log that cannot take them turns the whole answer into
    [audit_unavailable] (UNAVAILABLE), and no verdict leaves; the same model serves once the log takes rows."""
    import numpy as np

    from moderation.serving.postprocess_model import PostprocessModel
    from moderation.testing.records import request_record

    from .test_stages import D, _args, _decisions, _gate, _gate_request, _run

    recs = [request_record(request_id=f"multi-{i}", policy_name="allow_all") for i in range(3)]
    gates = _decisions(pb, _run(_gate(pb), _gate_request(pb, recs)))
    post = PostprocessModel()
    post.initialize(_args("postprocess"))
    (tmp_path / "not-a-dir").write_text("")
    good = post.stage.audit
    post.stage.audit = AuditLog(tmp_path / "not-a-dir" / "audit.jsonl", mode="fail_closed")  # ENOTDIR

    def request():
        return pb.Request(REQUEST=np.array([[r.to_json()] for r in recs], dtype=np.object_),
                          GATE=np.array([[g.to_json()] for g in gates], dtype=np.object_),
                          IMAGE_EMBEDS=np.ones((3, D), np.float32), TEXT_EMBEDS=np.zeros((3, D), np.float32))

    resp = post.execute([request()])[0]
    assert resp.has_error() and resp.error().code == pb.TritonError.UNAVAILABLE
    assert resp.error().message().startswith("[audit_unavailable] ") and "Errno" not in resp.error().message()
    assert not resp.output_tensors()
    assert not post.actions._series and not post.finished._series  # nothing counted as answered
    post.stage.audit = good
    resp = post.execute([request()])[0]
    assert not resp.has_error(), resp.error().message()
    ids = [r.get("request_id") for r in read_rows(pb.audit_path) if r.get("stage") == "moderate"]
    assert ids == ["multi-0", "multi-1", "multi-2"]


def test_finalize_writes_the_rows_spooled_while_the_log_was_unavailable(pb, tmp_path, monkeypatch):  # noqa: F811
    """fail_open: rows a model spooled while its log could not take them are written when Triton unloads the model
    (finalize), not lost with the stub process; its flusher thread stops. The flusher's timer is an hour here, so
    only finalize can have written them."""
    import threading

    import numpy as np

    from moderation.serving.postprocess_model import PostprocessModel
    from moderation.testing.records import request_record

    from .test_stages import D, _args, _decisions, _gate, _gate_request, _run

    recs = [request_record(request_id=f"spooled-{i}", policy_name="allow_all") for i in range(3)]
    gates = _decisions(pb, _run(_gate(pb), _gate_request(pb, recs)))
    blocked = tmp_path / "audit-dir"
    blocked.write_text("")  # a file where the log's directory should be: every write fails (ENOTDIR)
    log = blocked / "spool-finalize.jsonl"
    monkeypatch.setenv("MODERATION_AUDIT_LOG", str(log))
    monkeypatch.setenv("MODERATION_AUDIT_ON_FAILURE", "fail_open")
    monkeypatch.setenv("MODERATION_AUDIT_FLUSH_S", "3600")
    post = PostprocessModel()
    post.initialize(_args("postprocess"))

    def flushers():
        return [t for t in threading.enumerate() if t.name == f"audit-flusher-{log.name}"]

    assert len(flushers()) == 1
    for rec, gate in zip(recs, gates, strict=True):
        resp = post.execute([pb.Request(REQUEST=np.array([[rec.to_json()]], dtype=np.object_),
                                        GATE=np.array([[gate.to_json()]], dtype=np.object_),
                                        IMAGE_EMBEDS=np.ones((1, D), np.float32),
                                        TEXT_EMBEDS=np.zeros((1, D), np.float32))])[0]
        assert not resp.has_error(), resp.error().message()  # served: fail_open
    assert post.stage.audit.spooled == 3 and post.stage.audit.failures == 3
    blocked.unlink()
    blocked.mkdir()  # the log takes rows again; nothing writes them until the model is unloaded
    assert not log.exists()
    post.finalize()
    assert [r["request_id"] for r in read_rows(log)] == ["spooled-0", "spooled-1", "spooled-2"]
    assert post.stage.audit.spooled == 0 and flushers() == []


def test_finalize_logs_the_rows_it_could_not_write(pb, tmp_path, monkeypatch):  # noqa: F811
    from moderation.core.errors import BadImage
    from moderation.serving.triton_io import Stage

    (tmp_path / "audit-dir").write_text("")
    monkeypatch.setenv("MODERATION_AUDIT_LOG", str(tmp_path / "audit-dir" / "audit.jsonl"))
    monkeypatch.setenv("MODERATION_AUDIT_ON_FAILURE", "fail_open")
    stage = Stage({"model_name": "preprocess", "model_version": "1"})
    stage.fail(BadImage("the image is truncated"), {"request_id": "lost"})
    pb.Logger.lines.clear()
    stage.finalize()
    assert stage.audit.spooled == 1
    assert any("1 spooled audit rows could not be written at unload" in line and "ENOTDIR" in line
               for _level, line in pb.Logger.lines), pb.Logger.lines


# against a real server -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(request, tmp_path_factory, policy_dir):
    """One real server per failure mode, its audit log on a 512 KiB tmpfs of its own."""
    from moderation.testing.server import running_server

    mode = request.param
    root = tmp_path_factory.mktemp(f"audit-{mode}")
    with mounted_tmpfs(root / "fs", size="512k") as fs:
        audit = fs.root / "audit.jsonl"
        # fail_open's timer flushes once an hour here: rows reach the file only with the next row a model writes, or
        # when Triton unloads the model (finalize)
        env = {"MODERATION_POLICY_DIR": str(policy_dir), "MODERATION_AUDIT_LOG": str(audit),
               "MODERATION_AUDIT_ON_FAILURE": mode, "MODERATION_AUDIT_FLUSH_S": "3600"}
        try:
            with running_server(repository=REPO, env=env, log_path=root / "triton.log", key=ADMIN_KEY) as srv:
                srv.audit, srv.fs = audit, fs
                yield srv
        finally:
            fs.free()


def _moderate(srv, rid: str):
    from clients.client import ModerationClient
    from moderation.testing.samples import sample_posts

    post = sample_posts()[0]
    with ModerationClient(srv.grpc_url, timeout_s=60, retries=0) as c:
        return c.moderate(post.image_bytes(), post.text, policy="allow_all", request_id=rid)


def _ids(srv) -> list:
    return [r.get("request_id") for r in read_rows(srv.audit)]


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("server", ["fail_closed"], indirect=True)
def test_server_fail_closed_refuses_with_audit_unavailable_and_recovers(server):
    from clients.client import ModerationFailed

    tag = uuid.uuid4().hex[:8]
    assert _moderate(server, f"closed-{tag}-0")["request_id"] == f"closed-{tag}-0"
    server.fs.fill()
    server.fs.exhaust(server.audit)
    try:
        with pytest.raises(ModerationFailed) as info:
            _moderate(server, f"closed-{tag}-1")
        e = info.value
        assert e.code == "audit_unavailable" and e.status == "StatusCode.UNAVAILABLE", (e.code, e.status, e.message)
        for os_text in ("Errno", "No space", "ENOSPC", str(server.fs.root), "audit.jsonl"):
            assert os_text not in e.message, e.message
    finally:
        server.fs.free()
    assert _moderate(server, f"closed-{tag}-2")["action"] is not None
    ids = _ids(server)
    assert f"closed-{tag}-0" in ids and f"closed-{tag}-2" in ids
    assert f"closed-{tag}-1" not in ids  # refused, never served: no verdict row for it


def _audit_failures(srv) -> float:
    text = urllib.request.urlopen(srv.metrics_url, timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("moderation_audit_failures_total{"))


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("server", ["fail_open"], indirect=True)
def test_server_fail_open_serves_counts_and_writes_the_outage_rows_later(server):
    tag = uuid.uuid4().hex[:8]
    _moderate(server, f"open-{tag}-0")
    before = _audit_failures(server)
    server.fs.fill()
    server.fs.exhaust(server.audit)
    outage = [f"open-{tag}-out{i}" for i in range(3)]
    try:
        for rid in outage:
            assert _moderate(server, rid)["request_id"] == rid  # served while the log cannot take rows
        assert _audit_failures(server) > before
        assert not set(outage) & set(_ids(server))
    finally:
        server.fs.free()
    _moderate(server, f"open-{tag}-after")
    # the next row flushes the spool of the instance that writes it (postprocess has one; 120 s: a hang guard)
    hang_guard = time.monotonic() + 120
    while time.monotonic() < hang_guard and not set(outage + [f"open-{tag}-after"]) <= set(_ids(server)):
        time.sleep(0.5)
    ids = _ids(server)
    assert set(outage + [f"open-{tag}-after"]) <= set(ids), ids[-10:]
    assert all(ids.count(rid) == 1 for rid in outage)


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("server", ["fail_open"], indirect=True)
def test_server_unload_writes_the_spooled_rows(server):
    """Rows postprocess spooled while the log was full are written when the model is unloaded through the admin API
    (finalize), with no later request to carry them and the flush timer an hour away. Last in this module: it
    leaves postprocess unloaded."""
    tag = uuid.uuid4().hex[:8]
    _moderate(server, f"unload-{tag}-0")
    server.fs.fill()
    server.fs.exhaust(server.audit)
    outage = [f"unload-{tag}-out{i}" for i in range(3)]
    try:
        for rid in outage:
            assert _moderate(server, rid)["request_id"] == rid
        assert not set(outage) & set(_ids(server))
    finally:
        server.fs.free()
    assert not set(outage) & set(_ids(server))  # nothing written them yet: they wait in postprocess's spool
    server.direct_client().unload_model("postprocess")
    hang_guard = time.monotonic() + 120  # the unload returns before the stub has finalized
    while time.monotonic() < hang_guard and not set(outage) <= set(_ids(server)):
        time.sleep(0.5)
    ids = _ids(server)
    assert set(outage) <= set(ids), ids[-10:]
    assert all(ids.count(rid) == 1 for rid in outage)
