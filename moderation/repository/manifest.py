"""The repository manifest: sha256 of every committed file that defines the served models (each
config.pbtxt and versioned model.py) and of every policy, plus — with --full — each exported version's
artifact record (source checkpoint, export settings, sha256 of every artifact).

    .venv/bin/python -m moderation.repository.manifest --check     # CI: committed files match MANIFEST.json
    .venv/bin/python -m moderation.repository.manifest --write     # after changing a config, model.py or policy
    .venv/bin/python -m moderation.repository.manifest --full      # print the full manifest with artifact records
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..core.hashing import file_sha256
from ..core.policy import PACKAGE_POLICY_DIR, load_policy
from .artifacts import RECORD, read_artifact_record

MANIFEST = "MANIFEST.json"


def committed_manifest(repo: Path) -> dict:
    models = {}
    for d in sorted(p for p in Path(repo).iterdir() if (p / "config.pbtxt").exists()):
        versions = {}
        for v in sorted((v for v in d.iterdir() if v.is_dir() and v.name.isdigit()), key=lambda v: int(v.name)):
            if (v / "model.py").exists():
                versions[v.name] = {"model.py": file_sha256(v / "model.py")}
        models[d.name] = {"config.pbtxt": file_sha256(d / "config.pbtxt"), "versions": versions}
    policies = {p.stem: {"version": load_policy(p.stem, PACKAGE_POLICY_DIR).version, "sha256": file_sha256(p)}
                for p in sorted(PACKAGE_POLICY_DIR.glob("*.yaml"))}
    return {"models": models, "policies": policies}


def full_manifest(repo: Path) -> dict:
    m = committed_manifest(repo)
    for name, entry in m["models"].items():
        for vdir in sorted(Path(repo, name).glob("[0-9]*")):
            if (vdir / RECORD).exists():
                entry["versions"].setdefault(vdir.name, {})["artifact"] = read_artifact_record(vdir, verify=True)
    return m


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repository", type=Path, default=Path("model_repository"))
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--check", action="store_true")
    g.add_argument("--write", action="store_true")
    g.add_argument("--full", action="store_true")
    args = ap.parse_args(argv)
    path = args.repository / MANIFEST
    if args.full:
        print(json.dumps(full_manifest(args.repository), indent=2, sort_keys=True))
        return 0
    current = committed_manifest(args.repository)
    if args.write:
        path.write_text(json.dumps(current, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        print(f"wrote {path}")
        return 0
    recorded = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    if recorded != current:
        changed = sorted({f"{k}" for k in set(current["models"]) | set(recorded.get("models", {}))
                          if current["models"].get(k) != recorded.get("models", {}).get(k)} |
                         {f"policy:{k}" for k in set(current["policies"]) | set(recorded.get("policies", {}))
                          if current["policies"].get(k) != recorded.get("policies", {}).get(k)})
        print(f"error: {path} does not match the committed files: {', '.join(changed)}; "
              "review the change, then run `make manifest`", file=sys.stderr)
        return 1
    print(f"{path}: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
