"""Operate the model repository of a running server (restricted APIs; needs the admin key from
$MODERATION_ADMIN_KEY or the file named by $MODERATION_ADMIN_KEY_FILE).

    .venv/bin/python -m clients.admin --url 127.0.0.1:8001 status
    .venv/bin/python -m clients.admin --url 127.0.0.1:8001 swap --model language_decoder --version 2
    .venv/bin/python -m clients.admin --url 127.0.0.1:8001 rollback --model language_decoder
    .venv/bin/python -m clients.admin --url 127.0.0.1:8001 load --model vlm [--versions 1,2]
    .venv/bin/python -m clients.admin --url 127.0.0.1:8001 unload --model vlm
    .venv/bin/python -m clients.admin --url 127.0.0.1:8001 purge-caches   # empty every verdict cache (privacy)
    .venv/bin/python -m clients.admin --url 127.0.0.1:8001 lists show --policy default
    .venv/bin/python -m clients.admin --url 127.0.0.1:8001 lists add-image --policy default --list block \
        --image meme.jpg [--label scam] [--note "..."]
    .venv/bin/python -m clients.admin --url 127.0.0.1:8001 lists add-term --policy default --list review \
        --term "click the link in bio" [--label scam]
    .venv/bin/python -m clients.admin --url 127.0.0.1:8001 lists remove-image --policy default --id img-…
    .venv/bin/python -m clients.admin --url 127.0.0.1:8001 lists export --policy default > default.lists.json
    .venv/bin/python -m clients.admin --url 127.0.0.1:8001 lists import --policy default default.lists.json
    .venv/bin/python -m clients.admin --url 127.0.0.1:8001 feedback REQUEST_ID --verdict violation [--label L]
    .venv/bin/python -m clients.admin client-token --id shop-a     # a signed client id for fair shares

With MODERATION_REDIS_URL on the servers (a cluster), `swap` and `rollback` set the version every replica should
serve once, through the gateway at --url; each replica's follower swaps its own Triton within seconds (`--wait S`
waits until every replica reports it), and `status` adds the desired versions and each replica's live versions and
whether it has converged (docs/operations.md). Without Redis they act on the one server at --url.

`lists` and `feedback` keep no local state: they call the gateway's admin service at --url, which checks the key,
applies the edit to the lists the server reads (an image is sent as its bytes; the server hashes it) or writes the
reviewer's row, and records each into the service's own audit log. A refused call prints `error: [code] message`
(docs/errors.md) and exits 1. Every action is an audit row.
"""
from __future__ import annotations

import argparse
import base64
import getpass
import json
import re
import socket
import sys
import time
from pathlib import Path

import grpc

from moderation.core import admin_rpc
from moderation.core.audit import AuditLog
from moderation.core.auth import GRPC_ADMIN_HEADER, admin_key
from moderation.core.caller import CLIENT_KEY_FILE_ENV, client_key, client_value
from moderation.ops.admin import AdminError, RepositoryAdmin

from .client import DEFAULT_URL

_CODED = re.compile(r"^\[([a-z][a-z0-9_]*)\] (.*)$", re.S)


class ServiceError(AdminError):
    """The admin service refused or failed a call: its code and message (docs/errors.md)."""

    def __init__(self, code: str, message: str, no_service: bool = False):
        super().__init__(f"[{code}] {message}")
        self.code, self.message = code, message
        self.no_service = no_service  # the server has no admin service at all (Triton without its gateway)


class ServiceAdmin:
    """The gateway's admin service (moderation/core/admin_rpc.py): the server applies lists edits and records
    feedback, checks the key and audits both; nothing is read or written on this machine."""

    def __init__(self, url: str, key: str, timeout_s: float = 180.0):
        self.url, self.key, self.timeout_s = url, key, timeout_s
        self.channel = grpc.insecure_channel(url, options=[("grpc.max_receive_message_length", 64 * 2**20),
                                                           ("grpc.max_send_message_length", 64 * 2**20)])

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> ServiceAdmin:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def call(self, method: str, request: dict) -> dict:
        try:
            raw = self.channel.unary_unary(method)(admin_rpc.encode(request), timeout=self.timeout_s,
                                                   metadata=((GRPC_ADMIN_HEADER, self.key),))
        except grpc.RpcError as e:
            status, details = e.code(), e.details() or ""
            if m := _CODED.match(details):
                raise ServiceError(m.group(1), m.group(2)) from None
            if status == grpc.StatusCode.UNIMPLEMENTED:
                raise ServiceError("unavailable", f"the server at {self.url} has no admin service: it is Triton "
                                   "without its audit gateway (MODERATION_GATEWAY=0), or an older gateway",
                                   no_service=True) from None
            if status == grpc.StatusCode.UNAVAILABLE:
                raise ServiceError("unavailable", f"cannot reach {self.url}: {details}") from None
            if status == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise ServiceError("deadline_exceeded", f"no answer from {self.url} within {self.timeout_s:.0f} s") \
                    from None
            raise ServiceError("internal", f"{status.name}: {details}") from None
        return admin_rpc.decode(raw)

    def lists(self, action: str, policy: str, **fields) -> dict:
        return self.call(admin_rpc.LISTS, {"action": action, "policy": policy,
                                           **{k: v for k, v in fields.items() if v is not None}})

    def show(self, policy: str) -> dict:
        return self.lists("show", policy)

    def add_image(self, policy: str, list_name: str, image: bytes, label: str | None = None, note: str = "") -> dict:
        return self.lists("add-image", policy, list=list_name, label=label, note=note or None,
                          image_b64=base64.b64encode(image).decode("ascii"))

    def add_term(self, policy: str, list_name: str, term: str, label: str | None = None, note: str = "") -> dict:
        return self.lists("add-term", policy, list=list_name, term=term, label=label, note=note or None)

    def remove(self, policy: str, kind: str, entry_id: str) -> dict:
        return self.lists(f"remove-{kind}", policy, id=entry_id)

    def export(self, policy: str) -> dict:
        return self.lists("export", policy)

    def import_lists(self, policy: str, document: dict) -> dict:
        return self.lists("import", policy, lists=document)

    def versions(self, action: str, **fields) -> dict:
        return self.call(admin_rpc.VERSIONS, {"action": action, **{k: v for k, v in fields.items() if v is not None}})

    def feedback(self, request_id: str, verdict: str, label: str | None = None, reviewer: str | None = None) -> dict:
        return self.call(admin_rpc.FEEDBACK, {"request_id": request_id, "verdict": verdict,
                                              **({"label": label} if label else {}),
                                              **({"reviewer": reviewer} if reviewer else {})})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="clients.admin", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default=DEFAULT_URL)
    ap.add_argument("--repository", type=Path, default=Path("model_repository"),
                    help="local path of the served repository (version checks, swap history)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    status = sub.add_parser("status")
    status.add_argument("--json", action="store_true", help="print the server's and the cluster's state as JSON")
    sub.add_parser("purge-caches", help="empty the near-duplicate verdict caches (reloads clip_gate, no request fails)")
    lists = sub.add_parser("lists", help="custom block / allow / review lists of images and terms, live")
    lists.add_argument("action", choices=["show", "add-image", "remove-image", "add-term", "remove-term", "export",
                                          "import"])
    lists.add_argument("--policy", default="default")
    lists.add_argument("--list", dest="list_name", choices=["block", "allow", "review"], default=None)
    lists.add_argument("--image", type=Path, help="add-image: the image file")
    lists.add_argument("--term", help="add-term: the term (matched after case / width / spacing folding)")
    lists.add_argument("--label", default=None, help="the policy label a hit is reported under")
    lists.add_argument("--note", default="")
    lists.add_argument("--id", dest="entry_id", help="remove-*: the entry id (see `lists show`)")
    lists.add_argument("file", nargs="?", type=Path, help="import: a document `lists export` wrote (replaces them)")
    lists.__class__ = _ListsParser
    token = sub.add_parser("client-token", help="the signed `moderation-client` value of a client id (the gateway's "
                           "fair shares trust it where MODERATION_GATEWAY_CLIENT_KEY_FILE is set)")
    token.add_argument("--id", dest="client_id", required=True)
    fb = sub.add_parser("feedback", help="record a reviewer's decision on a judged post (joins its audit row)")
    fb.add_argument("request_id")
    fb.add_argument("--verdict", choices=["violation", "ok"], required=True)
    fb.add_argument("--label", default=None)
    fb.add_argument("--reviewer", default=None)
    for name in ("load", "unload", "swap", "rollback"):
        p = sub.add_parser(name)
        p.add_argument("--model", required=True)
        if name == "swap":
            p.add_argument("--version", required=True)
        if name in ("swap", "rollback"):
            p.add_argument("--wait", type=float, default=0.0, metavar="S",
                           help="in a cluster: wait up to S seconds for every replica to serve it (exit 1 if not)")
        if name == "load":
            p.add_argument("--versions", default=None, help="comma-separated versions to keep loaded")
    args = ap.parse_args(argv)
    if args.cmd == "client-token":  # needs the client key, not the admin key
        client_key_bytes = client_key()
        if not client_key_bytes:
            print(f"error: set {CLIENT_KEY_FILE_ENV} (the gateway's client key file)", file=sys.stderr)
            return 2
        print(client_value(args.client_id, client_key_bytes))
        return 0
    key = admin_key()
    if not key:
        print("error: set MODERATION_ADMIN_KEY or MODERATION_ADMIN_KEY_FILE (the server's admin key)", file=sys.stderr)
        return 2
    repo = args.repository if args.repository.is_dir() else None
    admin = RepositoryAdmin(args.url, key, repo)
    try:
        if args.cmd == "lists":
            with ServiceAdmin(args.url, key) as service:
                out = _lists(args, service)
            if args.action == "export":  # a document for review and backup: one entry a line
                print(json.dumps(out, ensure_ascii=False, indent=1))
                return 0
        elif args.cmd == "feedback":
            with ServiceAdmin(args.url, key) as service:
                out = service.feedback(args.request_id, args.verdict, args.label, args.reviewer)
        elif args.cmd == "status":
            rows = admin.status()
            cluster = _cluster(args.url, key, "status")
            if args.json:
                print(json.dumps({"server": rows, "cluster": cluster}, ensure_ascii=False))
                return 0
            for r in rows:
                print(f"{r['model']:<18} v{r['version'] or '-':<4} {r['state']:<12} ready={str(r['ready']).lower():<5} "
                      f"available={','.join(r['available_versions']) or '-'} {r['reason']}")
            if cluster is not None:
                _print_cluster(cluster)
            return 0
        elif args.cmd == "purge-caches":
            from moderation.ops.purge import purge_server_caches

            out = purge_server_caches(args.url, key)
            AuditLog().write({"stage": "admin", "action": "purge_caches", "ok": True, **out})
        elif args.cmd == "load":
            admin.load(args.model, args.versions.split(",") if args.versions else None)
            out = {"loaded": args.model, "versions": args.versions}
        elif args.cmd == "unload":
            admin.unload(args.model)
            out = {"unloaded": args.model}
        elif args.cmd in ("swap", "rollback"):
            fields = {"model": args.model, "version": getattr(args, "version", None), "operator": _operator(),
                      "serving": _serving(admin, args.model, args.url) if args.cmd == "swap" else None}
            out = _cluster(args.url, key, args.cmd, **fields)
            if out is None:  # no cluster state: this one server, as it always was
                out = admin.swap(args.model, args.version) if args.cmd == "swap" else admin.rollback(args.model)
            elif args.wait > 0:
                status = _wait_converged(args.url, key, args.model, out["revision"], args.wait)
                print(json.dumps(out, ensure_ascii=False))
                _print_cluster(status)
                return 0 if _all_converged(status, args.model) else 1
    except AdminError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - e.g. the server refused the key or is down
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(out, ensure_ascii=False))
    return 0


def _operator() -> str:
    """Who sets a version, as the audit and the desired state record it."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _serving(admin: RepositoryAdmin, model: str, url: str) -> str | None:
    """The one version of `model` the server at --url serves, if one (a first cluster rollback returns to it). A model
    that server does not have is refused here, before a cluster would record it as desired."""
    rows = admin.status()
    if not any(r["model"] == model for r in rows):
        raise AdminError(f"the server at {url} has no model {model!r}")
    live = [r["version"] for r in rows if r["model"] == model and r["state"] == "READY"]
    return live[0] if len(live) == 1 else None


def _cluster(url: str, key: str, action: str, **fields) -> dict | None:
    """The gateway's answer to a versions call; None where the servers keep no cluster state (no Redis, or Triton
    without its gateway)."""
    with ServiceAdmin(url, key) as service:
        try:
            return service.versions(action, **fields)
        except ServiceError as e:
            if e.code == "not_clustered" or e.no_service:
                return None
            raise


def _all_converged(status: dict, model: str) -> bool:
    replicas = status.get("replicas", [])
    return bool(replicas) and all(r["converged_models"].get(model, True) and not r.get("swapping") for r in replicas)


def _wait_converged(url: str, key: str, model: str, revision: int, limit_s: float) -> dict:
    """Poll the cluster's status until every replica reports `model` converged on a revision >= `revision`."""
    deadline = time.monotonic() + limit_s
    while True:
        status = _cluster(url, key, "status") or {}
        fresh = all(r.get("revision", 0) >= revision for r in status.get("replicas", []))
        if (fresh and _all_converged(status, model)) or time.monotonic() >= deadline:
            return status
        time.sleep(1.0)


def _print_cluster(status: dict) -> None:
    print(f"cluster: desired revision {status['revision']}, {len(status['replicas'])} replica(s) reporting")
    for model, e in sorted(status["desired"].items()):
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(e["at"]))
        print(f"  desired {model:<18} v{e['version']:<4} revision {e['revision']} by {e['by']} at {when}")
    for r in status["replicas"]:
        for model in sorted(status["desired"]):
            if model not in r["converged_models"]:
                continue
            live = ",".join(r["live"].get(model, [])) or "-"
            state = "converged" if r["converged_models"][model] else "NOT converged"
            if model in r.get("swapping", {}):
                state = f"swapping to v{r['swapping'][model]}"
            error = r.get("errors", {}).get(model)
            why = f" ({error['error']}; next try in {error['retry_in_s']:.0f} s)" if error else ""
            print(f"  replica {r['replica']:<28} {model:<18} v{live:<4} {state}{why}")


class _ListsParser(argparse.ArgumentParser):
    """`lists import --policy P FILE`: argparse fills a subcommand's positionals in one pass, so a FILE written after
    the options comes back unrecognised; it is the import's file."""

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        parsed, extra = super().parse_known_args(args, namespace)
        if getattr(parsed, "file", None) is None and len(extra) == 1 and not extra[0].startswith("-"):
            parsed.file, extra = Path(extra[0]), []
        return parsed, extra


def _lists(args, lists: ServiceAdmin) -> dict:
    if args.action == "show":
        return lists.show(args.policy)
    if args.action == "export":
        return lists.export(args.policy)
    if args.action == "import":
        if not args.file:
            raise AdminError("import needs the FILE `lists export` wrote")
        try:
            document = json.loads(args.file.read_text(encoding="utf-8"))
        except OSError as e:
            raise AdminError(f"cannot read {args.file}: {e.strerror}") from None
        except ValueError as e:
            raise AdminError(f"{args.file} is not JSON: {e}") from None
        if not isinstance(document, dict):
            raise AdminError(f"{args.file} is not a lists document (a JSON object)")
        return lists.import_lists(args.policy, document)
    if args.action.startswith("add-") and not args.list_name:
        raise AdminError(f"{args.action} needs --list block|allow|review")
    if args.action == "add-image":
        if not args.image:
            raise AdminError("add-image needs --image PATH")
        try:
            image = args.image.read_bytes()
        except OSError as e:
            raise AdminError(f"cannot read {args.image}: {e.strerror}") from None
        return lists.add_image(args.policy, args.list_name, image, args.label, args.note)
    if args.action == "add-term":
        if not args.term:
            raise AdminError("add-term needs --term TEXT")
        return lists.add_term(args.policy, args.list_name, args.term, args.label, args.note)
    if not args.entry_id:
        raise AdminError(f"{args.action} needs --id ENTRY_ID")
    return lists.remove(args.policy, args.action.split("-", 1)[1], args.entry_id)


if __name__ == "__main__":
    sys.exit(main())
