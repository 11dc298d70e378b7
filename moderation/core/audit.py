"""Audit log: one JSON line per request, failures included, safe to append from several Triton stub
processes at once (an exclusive flock around each append and rotation). Raw image bytes and caption
text are never written: sha256 hashes identify content."""
from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path

DEFAULT_MAX_BYTES = 50 * 1024 * 1024
DEFAULT_BACKUPS = 5


def audit_path() -> Path:
    return Path(os.environ.get("MODERATION_AUDIT_LOG", "build/audit/audit.jsonl"))


class AuditLog:
    def __init__(self, path: Path | None = None, max_bytes: int | None = None, backups: int | None = None):
        self.path = Path(path or audit_path())
        self.max_bytes = int(max_bytes or os.environ.get("MODERATION_AUDIT_MAX_BYTES", DEFAULT_MAX_BYTES))
        self.backups = int(backups or os.environ.get("MODERATION_AUDIT_BACKUPS", DEFAULT_BACKUPS))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_path = self.path.with_suffix(self.path.suffix + ".lock")

    def write(self, row: dict) -> None:
        row = {"ts": round(time.time(), 6), **row}
        line = (json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
        with open(self._lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if self.path.exists() and self.path.stat().st_size + len(line) > self.max_bytes:
                    self._rotate()
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
                try:
                    os.write(fd, line)
                    os.fsync(fd)  # a stopped server loses no row it acknowledged
                finally:
                    os.close(fd)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _rotate(self) -> None:
        for i in range(self.backups - 1, 0, -1):
            src = self.path.with_name(f"{self.path.name}.{i}")
            if src.exists():
                src.rename(self.path.with_name(f"{self.path.name}.{i + 1}"))
        self.path.rename(self.path.with_name(f"{self.path.name}.1"))


def read_rows(path: Path) -> list[dict]:
    """Rows of the log and its rotated backups, oldest first."""
    path = Path(path)
    files = sorted(path.parent.glob(path.name + ".*[0-9]"), key=lambda p: -int(p.suffix[1:])) + [path]
    rows = []
    for f in files:
        if f.exists():
            rows += [json.loads(line) for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
    return rows
