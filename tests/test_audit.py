"""The audit log: concurrent appends from several processes lose and tear no line; size rotation keeps
every row readable; raw content stays out unless configured."""
import json
import multiprocessing as mp

from moderation.core.audit import AuditLog, read_rows


def _writer(path, n, who, max_bytes):
    log = AuditLog(path, max_bytes=max_bytes, backups=50)
    for i in range(n):
        log.write({"request_id": f"{who}-{i}", "stage": "test", "payload": "x" * 200})


def test_concurrent_processes_and_rotation(tmp_path):
    path = tmp_path / "audit.jsonl"
    procs = [mp.Process(target=_writer, args=(path, 150, w, 20_000)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        assert p.exitcode == 0
    rotated = sorted(tmp_path.glob("audit.jsonl.*[0-9]"))
    assert rotated, "the log should have rotated at 20 kB"
    assert all(f.stat().st_size <= 20_000 for f in rotated + [path])
    rows = read_rows(path)
    ids = [r["request_id"] for r in rows]
    assert len(ids) == 600 and len(set(ids)) == 600
    for f in rotated + [path]:
        for line in f.read_text().splitlines():
            json.loads(line)  # no torn lines


def test_rows_are_timestamped_and_ordered_per_writer(tmp_path):
    log = AuditLog(tmp_path / "a.jsonl")
    for i in range(5):
        log.write({"request_id": str(i)})
    rows = read_rows(tmp_path / "a.jsonl")
    assert [r["request_id"] for r in rows] == ["0", "1", "2", "3", "4"]
    assert all(rows[i]["ts"] <= rows[i + 1]["ts"] for i in range(4))
