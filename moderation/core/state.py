"""State the server's processes share and a restart keeps (today: the last good copy of each policy's lists).

It lives in $MODERATION_STATE_DIR: the launcher sets <checkout>/build/state, the images a volume. Unset, a per-user
cache directory: never the package, which may be read-only or shared by several servers."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

STATE_DIR_ENV = "MODERATION_STATE_DIR"


def state_dir() -> Path:
    """Read at each call: the environment a process was started with decides, not the one it imported under."""
    configured = os.environ.get(STATE_DIR_ENV, "").strip()
    if configured:
        return Path(configured)
    try:
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    except RuntimeError:  # no HOME and no passwd entry (an arbitrary container uid)
        cache = Path(tempfile.gettempdir()) / f"moderation-{os.getuid()}"
    return cache / "moderation" / "state"


def read_state(path: Path) -> bytes | None:
    """The bytes of a state file, None when it is absent or unreadable."""
    try:
        return path.read_bytes()
    except OSError:
        return None


def write_state(path: Path, data: bytes) -> bool:
    """Replace a state file atomically (temp file + os.replace: a reader sees the old or the new bytes, never a part)
    unless it already holds `data`. False when it cannot be written (read-only or full disk): state is a fallback,
    its absence never fails the caller."""
    if read_state(path) == data:
        return True
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return True
    except OSError:
        if tmp:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        return False
