"""Per-version artifact records: where each model version came from and the sha256 of every file.
A model refuses to load when a file no longer matches its record."""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..core.errors import ArtifactMismatch
from ..core.hashing import file_sha256

RECORD = "artifact.json"
_SKIP = {RECORD, "model.py", "__pycache__"}


def _files(version_dir: Path) -> list[Path]:
    out = []
    for root, dirs, files in os.walk(version_dir, followlinks=True):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP)
        out += [Path(root) / f for f in sorted(files) if f not in _SKIP and not f.endswith(".pyc")]
    return out


def write_artifact_record(version_dir: Path, *, source: str, untrained: bool, export: dict | None = None,
                          extra: dict | None = None) -> dict:
    version_dir = Path(version_dir)
    record = {
        "model": version_dir.parent.name,
        "version": version_dir.name,
        "source": source,
        "untrained": untrained,
        "export": export or {},
        "files": {str(p.relative_to(version_dir)): file_sha256(p) for p in _files(version_dir)},
        **(extra or {}),
    }
    (version_dir / RECORD).write_text(json.dumps(record, indent=2, sort_keys=True), encoding="utf-8")
    return record


def read_artifact_record(version_dir: Path, verify: bool = True) -> dict:
    """Load `artifact.json`; with verify, re-hash every listed file and raise ArtifactMismatch naming it."""
    version_dir = Path(version_dir)
    path = version_dir / RECORD
    if not path.exists():
        raise ArtifactMismatch(f"{path} is missing: export this model version with export.export_models")
    record = json.loads(path.read_text(encoding="utf-8"))
    if verify:
        for rel, digest in record.get("files", {}).items():
            f = version_dir / rel
            if not f.exists():
                raise ArtifactMismatch(f"{f} is listed in {RECORD} but missing")
            got = file_sha256(f)
            if got != digest:
                raise ArtifactMismatch(f"{f} does not match {RECORD}: sha256 {got[:12]}… != {digest[:12]}…")
    return record


def signal_of(model_dir: Path) -> str:
    """'trained' / 'untrained' from the artifact record of a model's newest exported version."""
    versions = sorted((d for d in Path(model_dir).glob("[0-9]*") if (d / RECORD).exists()),
                      key=lambda d: int(d.name) if d.name.isdigit() else -1)
    if not versions:
        return "untrained"  # no record: nothing says it is trained
    return "untrained" if read_artifact_record(versions[-1], verify=False).get("untrained", True) else "trained"
