"""Audit log: one JSON line per request, failures included, safe to append from several Triton stub
processes (and the gateway's threads) at once: an exclusive flock around each append and rotation. Raw image
bytes and caption text are never written: sha256 hashes identify content.

Rows are ASCII (`json.dumps(..., ensure_ascii=True)`): U+2028, U+2029, U+0085 and every other non-ASCII
character in a value is a `\\u` escape, so any line splitter reads one row per line; readers here split on
b"\\n" only anyway (`iter_rows`).

When a row cannot be written (ENOSPC, EIO, EROFS, ...) the log does what MODERATION_AUDIT_ON_FAILURE says:

- `fail_closed` (default): `write` raises `AuditUnavailable` (code `audit_unavailable`, a message without any
  OS text); the models answer the request with it (gRPC UNAVAILABLE) instead of serving a verdict nobody audited.
- `fail_open`: the request is served; the row waits in a bounded in-memory spool (MODERATION_AUDIT_SPOOL_ROWS,
  oldest dropped first and counted) and is written, in order, before the next row that can be written (or by
  `flush()`); rows that were dropped are announced by one `{"stage": "audit", "event": "spool_dropped", ...}` row.

Either way the failure is counted (`failures`, and the `on_count` hook with `moderation_audit_failures_total`).
A write that fails half-way is cut back to where it started, so an outage leaves no torn line behind.

Retention: the file rotates by size (MODERATION_AUDIT_MAX_BYTES) and by age (MODERATION_AUDIT_MAX_AGE_S: when its
first row is older than that; 0 = no age rule), keeping MODERATION_AUDIT_BACKUPS files (`audit.jsonl.1` newest).
A rotation that deletes the oldest backup first counts its rows and writes a `{"stage": "audit", "event":
"retention_deleted", "file", "rows", "bytes", "first_ts", "last_ts", "reason"}` row at the head of the fresh
file (`moderation_audit_rows_deleted_total`). Rows leave the machine through a collector tailing `audit.jsonl*`
(docs/operations.md): backups x max_bytes must exceed its worst lag."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from .errors import AuditUnavailable

DEFAULT_MAX_BYTES = 50 * 1024 * 1024
DEFAULT_BACKUPS = 5
DEFAULT_SPOOL_ROWS = 10_000
DEFAULT_MARGIN_BYTES = 64 * 1024
FAIL_CLOSED, FAIL_OPEN = "fail_closed", "fail_open"
MODES = (FAIL_CLOSED, FAIL_OPEN)
# Names the on_count hook is called with (Prometheus counter names: the models and the gateway export them).
FAILURES_METRIC = "moderation_audit_failures_total"
DROPPED_METRIC = "moderation_audit_spool_dropped_total"
DELETED_METRIC = "moderation_audit_rows_deleted_total"
_HEAD_BYTES = 64 * 1024  # how much of a file's head is read for its first row's ts


def audit_path() -> Path:
    return Path(os.environ.get("MODERATION_AUDIT_LOG", "build/audit/audit.jsonl"))


def failure_mode() -> str:
    """MODERATION_AUDIT_ON_FAILURE: fail_closed (default) or fail_open."""
    return os.environ.get("MODERATION_AUDIT_ON_FAILURE", "").strip() or FAIL_CLOSED


def encode_row(row: dict) -> bytes:
    """One row as written: compact, ASCII only (no raw U+2028 / U+0085 / ... in a line), newline-terminated."""
    return (json.dumps(row, ensure_ascii=True, separators=(",", ":")) + "\n").encode("ascii")


class _Entry:
    """What one write appends: one or more lines that go in (or stay out) together."""

    __slots__ = ("data", "rows", "first_ts", "last_ts", "kind")

    def __init__(self, data: bytes, rows: int, first_ts: float, last_ts: float, kind: str = "rows"):
        self.data, self.rows, self.first_ts, self.last_ts, self.kind = data, rows, first_ts, last_ts, kind


class AuditLog:
    """Append-only JSONL audit log with size/age rotation, counted retention and a defined failure mode.

    AuditLog(path, max_bytes, backups) as before; the keyword-only knobs default to the environment:
    max_age_s (MODERATION_AUDIT_MAX_AGE_S), mode (MODERATION_AUDIT_ON_FAILURE), spool_rows
    (MODERATION_AUDIT_SPOOL_ROWS), margin_bytes (the free space `writable` asks for) and on_count, a
    callable(metric_name, n) called for every failed write (FAILURES_METRIC), spooled rows dropped (DROPPED_METRIC)
    and rows deleted by retention (DELETED_METRIC). The same counts are attributes: failures, dropped,
    rows_deleted (and files_deleted); `spooled` is the number of rows waiting; `last_error` the errno name of the
    last failure (for logs only: callers never see OS text)."""

    def __init__(self, path: Path | None = None, max_bytes: int | None = None, backups: int | None = None, *,
                 max_age_s: float | None = None, mode: str | None = None, spool_rows: int | None = None,
                 on_count: Callable[[str, int], None] | None = None, margin_bytes: int = DEFAULT_MARGIN_BYTES):
        self.path = Path(path or audit_path())
        self.max_bytes = int(max_bytes or os.environ.get("MODERATION_AUDIT_MAX_BYTES", "") or DEFAULT_MAX_BYTES)
        self.backups = int(backups if backups is not None
                           else os.environ.get("MODERATION_AUDIT_BACKUPS", DEFAULT_BACKUPS))
        self.max_age_s = float(max_age_s if max_age_s is not None
                               else os.environ.get("MODERATION_AUDIT_MAX_AGE_S", "") or 0)
        self.mode = mode or failure_mode()
        if self.mode not in MODES:
            raise ValueError(f"MODERATION_AUDIT_ON_FAILURE must be one of {', '.join(MODES)}, not {self.mode!r}")
        self.spool_rows = int(spool_rows if spool_rows is not None
                              else os.environ.get("MODERATION_AUDIT_SPOOL_ROWS", "") or DEFAULT_SPOOL_ROWS)
        self.on_count = on_count
        self.margin_bytes = margin_bytes
        self.failures = self.dropped = self.rows_deleted = self.files_deleted = 0
        self.last_error: str | None = None
        self._lock_path = self.path.with_suffix(self.path.suffix + ".lock")
        self._mutex = threading.Lock()  # the spool, and one append at a time per process (flock is per open file)
        self._spool: deque[_Entry] = deque()
        self._drops: list = [0, None, None]  # dropped rows not yet announced: count, first_ts, last_ts
        self._first_ts: tuple[tuple[int, int], float | None] | None = None  # (dev, ino) -> its first row's ts
        self._stop_flusher = threading.Event()
        self._flusher: threading.Thread | None = None
        with contextlib.suppress(OSError):  # a directory that cannot be made fails the writes, per mode
            self.path.parent.mkdir(parents=True, exist_ok=True)

    # writing -----------------------------------------------------------------------------------------------
    def write(self, row: dict) -> None:
        """Append one row (a `ts` is added). fail_closed: raises AuditUnavailable when it cannot be written."""
        self.write_many([row])

    def write_many(self, rows: Iterable[dict]) -> None:
        """Append rows together, all or none (one request's posts): raises AuditUnavailable in fail_closed mode
        when they cannot be written; in fail_open mode they are spooled instead."""
        now = round(time.time(), 6)
        rows = [{"ts": now, **row} for row in rows]
        if not rows:
            return
        entry = _Entry(b"".join(encode_row(r) for r in rows), len(rows), _ts(rows[0], now), _ts(rows[-1], now))
        with self._mutex:
            self._spool.append(entry)
            if self._drain_spool():
                return
            if self.mode == FAIL_CLOSED:  # the new rows are the spool's last entry, unwritten
                self._spool.pop()
                raise AuditUnavailable()
            self._bound_spool()

    def flush(self) -> int:
        """Write what the spool holds (call it periodically in fail_open mode); never raises. Rows still spooled."""
        with self._mutex:
            if self._spool or self._drops[0]:
                self._drain_spool()
            return self.spooled

    def start_flusher(self, interval_s: float = 5.0) -> threading.Thread:
        """A daemon thread that calls flush() every interval_s while rows are spooled (a process that writes rarely
        still empties its spool once the disk takes rows again), until close()."""
        stop = self._stop_flusher

        def loop() -> None:
            while not stop.wait(interval_s):
                if self._spool or self._drops[0]:
                    self.flush()

        t = threading.Thread(target=loop, name=f"audit-flusher-{self.path.name}", daemon=True)
        t.start()
        self._flusher = t
        return t

    def close(self, timeout_s: float = 10.0) -> int:
        """Stop the flusher thread (waiting up to timeout_s for a flush in progress) and write what the spool holds:
        a model's finalize() or a process's exit, so spooled rows are not lost with the process. Never raises;
        returns the rows still spooled (the log could not take them: they are lost when the process ends)."""
        self._stop_flusher.set()
        if self._flusher is not None and self._flusher is not threading.current_thread():
            self._flusher.join(timeout_s)
        self._flusher = None
        return self.flush()

    @property
    def spooled(self) -> int:
        return sum(e.rows for e in self._spool)

    def writable(self) -> bool:
        """A cheap probe for readiness: the log's filesystem has `margin_bytes` free and the file opens for
        append (or, before the first row, its directory takes new files). Creates nothing; never raises."""
        try:
            st = os.statvfs(self.path.parent)
            if st.f_bavail * st.f_frsize < self.margin_bytes:
                return False
            try:
                os.close(os.open(self.path, os.O_WRONLY | os.O_APPEND))
            except FileNotFoundError:
                return os.access(self.path.parent, os.W_OK | os.X_OK)  # False on a read-only filesystem
            return True
        except OSError:
            return False

    def _drain_spool(self) -> bool:
        """Append the spool, oldest first, True when all of it is durable. When rows were dropped, a spool_dropped
        row goes first, in one piece with the oldest spooled entry (both or neither). Under the mutex."""
        replaced = combined = None
        if self._drops[0]:
            n, first, last = self._drops
            row = {"ts": round(time.time(), 6), "stage": "audit", "event": "spool_dropped", "dropped": n,
                   "first_ts": first, "last_ts": last}
            marker = encode_row(row)
            replaced = self._spool.popleft() if self._spool else _Entry(b"", 0, row["ts"], row["ts"], "internal")
            combined = _Entry(marker + replaced.data, replaced.rows + 1, replaced.first_ts, replaced.last_ts,
                              replaced.kind)
            self._spool.appendleft(combined)
        try:
            self._append(self._spool)
            ok = True
        except OSError as e:
            self.last_error = errno.errorcode.get(e.errno or 0, type(e).__name__)
            self.failures += 1
            self._count(FAILURES_METRIC, 1)
            ok = False
        if combined is not None and replaced is not None:  # set together
            if self._spool and self._spool[0] is combined:  # not written: made again, with the counts then
                self._spool.popleft()
                if replaced.rows:
                    self._spool.appendleft(replaced)
            else:
                self._drops = [0, None, None]
        return ok

    def _bound_spool(self) -> None:
        """Keep at most spool_rows request rows waiting: drop the oldest, counted (retention rows always stay)."""
        spooled = self.spooled
        while spooled > self.spool_rows:
            victim = next((e for e in self._spool if e.kind == "rows"), None)
            if victim is None:
                return
            self._spool.remove(victim)
            spooled -= victim.rows
            n, first, last = self._drops
            self._drops = [n + victim.rows, victim.first_ts if first is None else first, victim.last_ts]
            self.dropped += victim.rows
            self._count(DROPPED_METRIC, victim.rows)

    def _count(self, name: str, n: int) -> None:
        if self.on_count is not None and n:
            with contextlib.suppress(Exception):  # a metric never fails a write
                self.on_count(name, n)

    def _append(self, queue: deque[_Entry]) -> None:
        """Append the queue's entries in order under the flock, popping each once it is fsynced; rotate between
        entries. Raises OSError with the unwritten entries still in the queue (a half-written one cut back)."""
        try:
            lock = open(self._lock_path, "a")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            lock = open(self._lock_path, "a")  # noqa: SIM115
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o640)
                try:
                    rotated_for = None  # an entry over max_bytes rotates once, then goes into the fresh file
                    while queue:
                        st = os.fstat(fd)
                        reason = self._rotation_due(st, len(queue[0].data)) if queue[0] is not rotated_for else None
                        if reason:
                            rotated_for = queue[0]
                            os.close(fd)
                            fd = -1
                            self._rotate(reason, queue)
                            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o640)
                            st = os.fstat(fd)
                        _append_durably(fd, st.st_size, queue[0].data)
                        queue.popleft()
                finally:
                    if fd >= 0:
                        os.close(fd)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    # retention ---------------------------------------------------------------------------------------------
    def _rotation_due(self, st: os.stat_result, incoming: int) -> str | None:
        if st.st_size == 0:
            return None
        if st.st_size + incoming > self.max_bytes:
            return "size"
        if self.max_age_s > 0:
            first = self._file_first_ts(st)
            if first is not None and time.time() - first >= self.max_age_s:
                return "age"
        return None

    def _file_first_ts(self, st: os.stat_result) -> float | None:
        key = (st.st_dev, st.st_ino)
        if self._first_ts is None or self._first_ts[0] != key or self._first_ts[1] is None:
            self._first_ts = (key, _first_ts(self.path))
        return self._first_ts[1]

    def _backup(self, i: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{i}")

    def _rotate(self, reason: str, queue: deque[_Entry]) -> None:
        """Shift the backups (under the flock); the file that falls off the end is counted first and its
        retention_deleted row goes to the head of the queue (the first row of the fresh file), as soon as the file
        is gone."""
        oldest = self._backup(self.backups) if self.backups > 0 else self.path
        if oldest.exists():
            summary = summarize_file(oldest)
            oldest.unlink()
            now = round(time.time(), 6)
            row = {"ts": now, "stage": "audit", "event": "retention_deleted", "file": oldest.name, **summary,
                   "reason": reason}
            queue.appendleft(_Entry(encode_row(row), 1, now, now, kind="internal"))
            self.rows_deleted += summary["rows"]
            self.files_deleted += 1
            self._count(DELETED_METRIC, summary["rows"])
        for i in range(self.backups - 1, 0, -1):
            src = self._backup(i)
            if src.exists():
                src.rename(self._backup(i + 1))
        if self.backups > 0 and self.path.exists():
            self.path.rename(self._backup(1))


def _ts(row: dict, default: float) -> float:
    ts = row.get("ts")
    return ts if isinstance(ts, (int, float)) else default


def _append_durably(fd: int, size_before: int, data: bytes) -> None:
    """Write data at the end of the file and fsync it; on failure cut the file back to size_before (no torn
    line left behind) and re-raise. A file whose last line lacks its newline (a writer killed mid-line) gets one
    first, so the torn line stays a line of its own."""
    if size_before and os.pread(fd, 1, size_before - 1) != b"\n":
        data = b"\n" + data
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)  # a stopped server loses no row it acknowledged
    except OSError:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, size_before)
        raise


# reading -----------------------------------------------------------------------------------------------------
def log_files(path: Path) -> list[Path]:
    """The log's files, oldest first: audit.jsonl.N ... audit.jsonl.1, then audit.jsonl (those that exist)."""
    path = Path(path)
    pattern = re.compile(re.escape(path.name) + r"\.(\d+)")
    backups = [(int(m.group(1)), p) for p in path.parent.glob(path.name + ".*")
               if (m := pattern.fullmatch(p.name))]
    files = [p for _, p in sorted(backups, key=lambda t: -t[0])]
    return files + ([path] if path.exists() else [])


def _parse(line: bytes, name: str, number: int) -> dict:
    try:
        row = json.loads(line)
    except ValueError:  # a torn or foreign line (UnicodeDecodeError is a ValueError)
        row = None
    if isinstance(row, dict):
        return row
    return {"unparsable_line": hashlib.sha256(line).hexdigest(), "file": name, "line": number, "bytes": len(line)}


def iter_rows(path: Path) -> Iterator[dict]:
    """Rows of the log and its rotated backups, oldest file first, read line by line (never a whole file).

    Lines are split on b"\\n" only (never str.splitlines, which also splits on U+2028, U+0085, \\x1c, ...). Blank
    lines are skipped. A line that is not a JSON object (a writer killed mid-line, a foreign line) does not raise:
    it is yielded as `{"unparsable_line": <sha256 of its bytes>, "file": <file name>, "line": <1-based line
    number>, "bytes": <length>}`, so a reader can count and locate it without the log stopping every report.
    The file list is taken once: a rotation while reading can make a reader miss or repeat one file's rows."""
    for f in log_files(path):
        yield from iter_file(f)


def iter_file(path: Path) -> Iterator[dict]:
    """Rows of one file of the log (not its backups), as iter_rows reads them; nothing when it is gone."""
    path = Path(path)
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:  # rotated away since the listing
        return
    with fh:
        for number, raw in enumerate(fh, 1):
            line = raw.rstrip(b"\r\n")
            if line.strip():
                yield _parse(line, path.name, number)


def read_rows(path: Path) -> list[dict]:
    """Every row of `iter_rows(path)`, oldest first, as a list."""
    return list(iter_rows(path))


def _first_ts(path: Path) -> float | None:
    """The ts of the first parsable row in the file's first 64 KiB, or None."""
    try:
        with open(path, "rb") as f:
            head = f.read(_HEAD_BYTES)
    except OSError:
        return None
    for line in head.split(b"\n"):
        ts = _line_ts(line)
        if ts is not None:
            return ts
    return None


def _line_ts(line: bytes) -> float | None:
    if not line.strip():
        return None
    try:
        row = json.loads(line)
    except ValueError:
        return None
    ts = row.get("ts") if isinstance(row, dict) else None
    return float(ts) if isinstance(ts, (int, float)) else None


def summarize_file(path: Path) -> dict:
    """rows (non-blank lines), bytes, and the ts of its first and last rows that parse, of one file, read line by
    line."""
    rows, size, first_ts = 0, 0, None
    last: deque[bytes] = deque(maxlen=2)  # a torn last line: the one before has the ts
    with open(path, "rb") as f:
        for line in f:
            size += len(line)
            if not line.strip():
                continue
            rows += 1
            if first_ts is None:
                first_ts = _line_ts(line)
            last.append(line)
    last_ts = next((t for t in map(_line_ts, reversed(last)) if t is not None), None)
    return {"rows": rows, "bytes": size, "first_ts": first_ts, "last_ts": last_ts}
