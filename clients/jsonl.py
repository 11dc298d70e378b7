"""JSON Lines input files for the CLIs: every non-blank line parsed, errors naming file and line."""
from __future__ import annotations

import json
from pathlib import Path


def read_jsonl(path: Path) -> list[tuple[int, object]]:
    """(line number, value) for every non-blank line; ValueError "path:line: not JSON (...)" otherwise."""
    rows = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((n, json.loads(line)))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
    return rows
