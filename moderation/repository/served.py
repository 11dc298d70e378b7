"""Which version of a model Triton serves, and the identity of the served CLIP (the policies' gate.calibrated_for
must name it for a trained CLIP to decide: moderation/gate/calibration.py)."""
from __future__ import annotations

import json
from pathlib import Path

from ..core.policy import ClipIdentity
from .artifacts import RECORD, read_artifact_record

LIVE_VERSIONS = ".live_versions.json"  # moderation/ops/admin.py STATE_FILE: the versions `clients.admin swap` made live


def served_version(model_dir: Path) -> Path | None:
    """The version directory Triton serves for a model: the one `clients.admin swap` recorded live, else the newest
    with an artifact record (the rendered configs' `latest` version policy)."""
    model_dir = Path(model_dir)
    state = model_dir.parent / LIVE_VERSIONS
    if state.exists():
        live = json.loads(state.read_text(encoding="utf-8")).get(model_dir.name, {}).get("live")
        if live and (model_dir / str(live) / RECORD).exists():
            return model_dir / str(live)
    versions = [d for d in model_dir.glob("[0-9]*") if d.name.isdigit() and (d / RECORD).exists()]
    return max(versions, key=lambda d: int(d.name)) if versions else None


def served_clip_identity(repository: Path) -> ClipIdentity | None:
    """The served CLIP's identity from its encoders' artifact records; None when either has no record."""
    digests, source = {}, ""
    for model in ("clip_image", "clip_text"):
        vdir = served_version(Path(repository) / model)
        if vdir is None:
            return None
        record = read_artifact_record(vdir, verify=False)
        digest = record.get("files", {}).get("model.onnx")
        if not digest:
            return None
        digests[model], source = digest, source or str(record.get("source", ""))
    return ClipIdentity(**digests, name=source)


def served_version_dirs(repository: Path, models: tuple[str, ...]) -> dict[str, Path]:
    """{model: its served version directory}; ValueError naming the models with no exported version."""
    dirs = {m: served_version(Path(repository) / m) for m in models}
    found = {m: d for m, d in dirs.items() if d is not None}
    if len(found) < len(dirs):
        raise ValueError(f"{repository} has no exported version of {', '.join(m for m in dirs if m not in found)}")
    return found
