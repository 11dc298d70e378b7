"""Create the next version of a model in the repository and its artifact record.

    .venv/bin/python -m export.release --model language_decoder                 # copy of the latest version
    .venv/bin/python -m export.release --model language_decoder --checkpoint /models/new-ckpt [--link]
    .venv/bin/python -m export.release --model clip_gate --from-version 1

The new version is not live until `clients.admin swap` makes it so (or the server restarts with the
default 'latest' version policy and no recorded live version)."""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from moderation.repository.artifacts import read_artifact_record, write_artifact_record


def versions(model_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def release(repository: Path, model: str, from_version: str | None = None, checkpoint: Path | None = None,
            link: bool = False, note: str = "") -> Path:
    model_dir = repository / model
    if not (model_dir / "config.pbtxt").exists():
        raise SystemExit(f"error: no model {model!r} in {repository}")
    existing = versions(model_dir)
    if not existing:
        raise SystemExit(f"error: {model} has no version to release from")
    src = model_dir / (from_version or str(existing[-1]))
    base = read_artifact_record(src)  # refuse to copy a version whose artifacts do not match its record
    dst = model_dir / str(existing[-1] + 1)
    shutil.copytree(src, dst, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    source = base["source"]
    if checkpoint is not None:
        if model != "language_decoder":
            raise SystemExit("error: --checkpoint applies to language_decoder only")
        target = dst / "checkpoint"
        if target.is_symlink() or target.is_file():
            target.unlink()
        else:
            shutil.rmtree(target)
        target.symlink_to(checkpoint.resolve()) if link else shutil.copytree(checkpoint, target)
        source = str(checkpoint)
    record = write_artifact_record(dst, source=source, untrained=(dst / "checkpoint" / "UNTRAINED.json").exists()
                                   if model == "language_decoder" else base["untrained"],
                                   export=base.get("export", {}),
                                   extra={"released_from": src.name, "note": note,
                                          **{k: base[k] for k in ("licence", "policy") if k in base}})
    print(json.dumps({"model": model, "version": dst.name, "from": src.name, "files": len(record["files"])}))
    return dst


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repository", type=Path, default=Path("model_repository"))
    ap.add_argument("--model", required=True)
    ap.add_argument("--from-version", default=None)
    ap.add_argument("--checkpoint", type=Path, default=None)
    ap.add_argument("--link", action="store_true")
    ap.add_argument("--note", default="")
    args = ap.parse_args(argv)
    release(args.repository, args.model, args.from_version, args.checkpoint, args.link, args.note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
