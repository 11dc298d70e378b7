"""Assemble a deployable model repository: configs rendered for a target by moderation.repository (never copied
from the local checkout), every exported version directory copied from a source repository and checked against
its artifact.json, and a MANIFEST.json that records what was packaged (upload it with the repository).

    .venv/bin/python deploy/package_repository.py --src model_repository --out build/repo-production
    aws s3 sync build/repo-production s3://BUCKET/moderation/repository     # or gsutil rsync / a volume

Runs with the standard library, this project's `moderation` package and what rendering imports (tritonclient's
ModelConfig protos, protobuf 4): deploy/requirements-render.txt, which the Dockerfile's repository stage installs."""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's (or the build context's) moderation

from moderation import __version__
from moderation.core.hashing import file_sha256
from moderation.repository.artifacts import RECORD, read_artifact_record
from moderation.repository.render import ALL_MODELS, ENSEMBLES, MODELS, ONNX_ACCELERATORS, render_repository

MANIFEST = "MANIFEST.json"
_SKIP = shutil.ignore_patterns("__pycache__", "*.pyc")


def package(src: Path, out: Path, target: str = "production", onnx_accelerator: str = "tensorrt",
            models: tuple[str, ...] = ALL_MODELS, force: bool = False) -> dict:
    src, out = Path(src), Path(out)
    if out.exists() and any(out.iterdir()):
        if not force:
            raise SystemExit(f"error: {out} is not empty (pass --force to replace it)")
        shutil.rmtree(out)
    render_repository(out, target, onnx_accelerator)
    for name in set(ALL_MODELS) - set(models):
        shutil.rmtree(out / name)
    manifest = {"target": target, "onnx_accelerator": onnx_accelerator if target == "production" else None,
                "moderation_version": __version__, "models": {}}
    for name in models:
        versions = sorted((d for d in (src / name).glob("*") if d.is_dir() and d.name.isdigit()),
                          key=lambda d: int(d.name))
        if not versions:
            raise SystemExit(f"error: {src / name} has no version directory: run `make models` (or export) first")
        entry = {"config_sha256": file_sha256(out / name / "config.pbtxt"), "versions": {}}
        for vdir in versions:
            backend = MODELS[name]["backend"]
            if name not in ENSEMBLES:
                # Refuse to ship a version whose files no longer match its record (or that has none).
                if backend == "onnx" or (vdir / RECORD).exists():
                    read_artifact_record(vdir, verify=True)
                needed = "model.onnx" if backend == "onnx" else "model.py"
                if not (vdir / needed).exists():
                    raise SystemExit(f"error: {vdir} has no {needed}")
            shutil.copytree(vdir, out / name / vdir.name, ignore=_SKIP)
            record = vdir / RECORD
            rec = json.loads(record.read_text()) if record.exists() else {}
            entry["versions"][vdir.name] = {
                "artifact_sha256": file_sha256(record) if record.exists() else None,
                "untrained": rec.get("untrained"), "source": rec.get("source"),
                "files": len(rec.get("files", {})),
            }
        manifest["models"][name] = entry
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return manifest


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", type=Path, default=Path("model_repository"), help="exported repository (make models)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--target", choices=["local", "production"], default="production")
    ap.add_argument("--onnx-accelerator", choices=ONNX_ACCELERATORS, default="tensorrt")
    ap.add_argument("--models", default=",".join(ALL_MODELS), help="comma-separated subset")
    ap.add_argument("--force", action="store_true", help="replace a non-empty --out")
    args = ap.parse_args(argv)
    models = tuple(m for m in args.models.split(",") if m)
    unknown = set(models) - set(ALL_MODELS)
    if unknown:
        ap.error(f"unknown models: {sorted(unknown)}")
    m = package(args.src, args.out, args.target, args.onnx_accelerator, models, args.force)
    print(f"packaged {len(m['models'])} models for {args.target} into {args.out} ({MANIFEST} written)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
