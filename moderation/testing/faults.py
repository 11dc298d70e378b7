"""Faults a test or the chaos run injects on purpose: a small filesystem to fill, and filling it."""
from __future__ import annotations

import contextlib
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def tmpfs(size: str = "8m") -> Iterator[tuple[Path, bool]]:
    """A small filesystem this run can fill: a tmpfs mounted for the run (needs root, as here and in CI). Yields
    (its path, whether the mount worked)."""
    path = Path(tempfile.mkdtemp(prefix="chaos-audit-"))
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True).returncode == 0
    try:
        yield path, mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], check=False)
        with contextlib.suppress(OSError):
            path.rmdir()


def fill(directory: Path) -> Path:
    """Fill the filesystem until a write fails with ENOSPC; the filler file is returned (delete it to free)."""
    filler = directory / "filler"
    # unbuffered, inside the suppress: a buffered file's close would flush the bytes the failing write left in its
    # buffer and raise ENOSPC again, outside the suppress (how full the disk was decided whether it did)
    with contextlib.suppress(OSError), open(filler, "wb", buffering=0) as f:
        while True:
            f.write(b"\0" * 65536)
    return filler
