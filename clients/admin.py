"""Operate the model repository of a running server (restricted APIs; needs the admin key from
$MODERATION_ADMIN_KEY or the file named by $MODERATION_ADMIN_KEY_FILE).

    .venv/bin/python -m clients.admin --url 127.0.0.1:8001 status
    .venv/bin/python -m clients.admin --url 127.0.0.1:8001 swap --model language_decoder --version 2
    .venv/bin/python -m clients.admin --url 127.0.0.1:8001 rollback --model language_decoder
    .venv/bin/python -m clients.admin --url 127.0.0.1:8001 load --model vlm [--versions 1,2]
    .venv/bin/python -m clients.admin --url 127.0.0.1:8001 unload --model vlm
    .venv/bin/python -m clients.admin --url 127.0.0.1:8001 purge-caches   # empty every verdict cache (privacy)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from moderation.core.auth import admin_key
from moderation.ops.admin import AdminError, RepositoryAdmin

from .client import DEFAULT_URL


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="clients.admin", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default=DEFAULT_URL)
    ap.add_argument("--repository", type=Path, default=Path("model_repository"),
                    help="local path of the served repository (version checks, swap history)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("status")
    sub.add_parser("purge-caches", help="empty the near-duplicate verdict caches (reloads clip_gate, no request fails)")
    for name in ("load", "unload", "swap", "rollback"):
        p = sub.add_parser(name)
        p.add_argument("--model", required=True)
        if name == "swap":
            p.add_argument("--version", required=True)
        if name == "load":
            p.add_argument("--versions", default=None, help="comma-separated versions to keep loaded")
    args = ap.parse_args(argv)
    key = admin_key()
    if not key:
        print("error: set MODERATION_ADMIN_KEY or MODERATION_ADMIN_KEY_FILE (the server's admin key)", file=sys.stderr)
        return 2
    repo = args.repository if args.repository.is_dir() else None
    admin = RepositoryAdmin(args.url, key, repo)
    try:
        if args.cmd == "status":
            rows = admin.status()
            for r in rows:
                print(f"{r['model']:<18} v{r['version'] or '-':<4} {r['state']:<12} ready={str(r['ready']).lower():<5} "
                      f"available={','.join(r['available_versions']) or '-'} {r['reason']}")
            return 0
        if args.cmd == "purge-caches":
            from moderation.core.audit import AuditLog
            from moderation.ops.purge import purge_server_caches

            out = purge_server_caches(args.url, key)
            AuditLog().write({"stage": "admin", "action": "purge_caches", "ok": True, **out})
        elif args.cmd == "load":
            admin.load(args.model, args.versions.split(",") if args.versions else None)
            out = {"loaded": args.model, "versions": args.versions}
        elif args.cmd == "unload":
            admin.unload(args.model)
            out = {"unloaded": args.model}
        elif args.cmd == "swap":
            out = admin.swap(args.model, args.version)
        else:
            out = admin.rollback(args.model)
    except AdminError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - e.g. the server refused the key or is down
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
