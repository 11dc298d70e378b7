"""One replica's follower of the cluster's desired model versions (core/version_store.py).

Every VERSIONS_POLL_S it reads the desired versions from Redis and, for each model this server serves whose live
version differs, swaps it through the restricted model-repository API (ops/admin.py: the new version loads beside the
old one, which serves until the new one is ready). Each attempt is an audit row (`stage: watchdog, action: converge`).
Then it publishes what the server serves (its heartbeat, renewed every poll, gone after HEARTBEAT_TTL_S).

A swap that fails (the version directory is missing on this pod, the load fails) leaves the old version serving; the
replica reports the error and tries that version again only after RETRY_AFTER_S, doubling up to RETRY_MAX_S, or at
once when the desired version changes or is set again. While Redis cannot be reached the server keeps what it serves
and the follower tries again every poll (the report expires, so `status` no longer lists the replica).

The launcher (moderation/launch/serve.py) runs it beside the stub watchdog; a pod whose Triton runs on its own runs it
as a process next to Triton, with the pod's Redis settings:
    python -m moderation.ops.versions --url 127.0.0.1:8011 --replica "$POD_NAME" --ready-file /run/versions/ready
    (the admin key from MODERATION_ADMIN_KEY or MODERATION_ADMIN_KEY_FILE)
`--ready-file` is written once the first check is done (Triton answered; the desired versions applied, or Redis found
unreachable, or a failed swap reported): a readiness probe on it keeps a new pod out of traffic until then."""
from __future__ import annotations

import argparse
import contextlib
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping

from ..core.audit import AuditLog
from ..core.auth import admin_key
from ..core.errors import AuditUnavailable
from ..core.version_store import HEARTBEAT_TTL_S, VERSIONS_POLL_S, VersionStore, VersionsUnavailable, converged
from .admin import AdminError, RepositoryAdmin

REPLICA_ID_ENV = "MODERATION_REPLICA_ID"
RETRY_AFTER_S = 30.0
RETRY_MAX_S = 600.0
SWAP_TIMEOUT_S = 300.0


def replica_id(port: int, env: Mapping[str, str] | None = None) -> str:
    """MODERATION_REPLICA_ID, else host name and public port (a pod's name in a cluster)."""
    env = os.environ if env is None else env
    return (env.get(REPLICA_ID_ENV) or "").strip() or f"{socket.gethostname()}:{port}"


class VersionFollower(threading.Thread):
    def __init__(self, admin: RepositoryAdmin, store: VersionStore, replica: str, interval: float = VERSIONS_POLL_S,
                 audit: AuditLog | None = None, log: Callable[[str], None] = print, clock=time.monotonic):
        super().__init__(daemon=True, name="version-follower")
        self.admin, self.store, self.replica, self.interval = admin, store, replica, interval
        self.audit = audit or admin.audit
        self.log, self.clock = log, clock
        self.errors: dict[str, dict] = {}  # model -> the failed attempt: version, revision, error, attempts, retry_at
        self.fault: str | None = None       # why the last check could not read Redis
        self._halt = threading.Event()

    def halt(self) -> None:
        self._halt.set()

    def stop(self) -> None:
        self.halt()
        self.join(timeout=SWAP_TIMEOUT_S + 30)

    def live(self) -> dict[str, list[str]]:
        """The READY versions of every model that has one (one repository-index call)."""
        index = self.admin.client.get_model_repository_index(headers=self.admin.headers, as_json=True)
        out: dict[str, list[str]] = {}
        for m in index.get("models", []):
            if m.get("state") == "READY" and m.get("version"):
                out.setdefault(m["name"], []).append(m["version"])
        return {m: sorted(v, key=int) for m, v in out.items()}

    def check_once(self) -> list[dict]:
        """Swap every model that differs from its desired version (unless it waits for a retry), then report."""
        try:
            revision, desired = self.store.desired()
        except VersionsUnavailable as e:
            if self.fault is None:
                self.log(f"versions: {e}; this server keeps the versions it serves")
            self.fault = str(e)
            return []
        if self.fault is not None:
            self.log("versions: Redis reached again")
            self.fault = None
        live = self.live()
        done = []
        for model, entry in sorted(desired.items()):
            version = str(entry["version"])
            if model not in live or live[model] == [version]:
                self.errors.pop(model, None)
                continue
            failed = self.errors.get(model)
            same_target = failed is not None and (failed["version"], failed["revision"]) == (version, entry["revision"])
            if failed is not None and same_target and self.clock() < failed["retry_at"]:
                continue
            done.append(self._swap(model, version, entry, live[model], failed if same_target else None, revision,
                                   live))
            live = self.live()
        self._publish(revision, desired, live)
        return done

    def _swap(self, model: str, version: str, entry: dict, before: list[str], failed: dict | None, revision: int,
              live: dict[str, list[str]]) -> dict:
        # a swap may take minutes (a large model loading): the report says so and outlives it
        self._publish(revision, {}, live, swapping={model: version}, ttl_s=SWAP_TIMEOUT_S + HEARTBEAT_TTL_S)
        row = {"stage": "watchdog", "action": "converge", "replica": self.replica, "model": model,
               "from_versions": before, "to_version": version, "desired_revision": entry["revision"]}
        try:
            result = self.admin.swap(model, version, timeout=SWAP_TIMEOUT_S, _record=False)
        except AdminError as e:
            attempts = (failed or {}).get("attempts", 0) + 1
            wait = min(RETRY_MAX_S, RETRY_AFTER_S * 2 ** (attempts - 1))
            self.errors[model] = {"version": version, "revision": entry["revision"], "error": str(e),
                                  "attempts": attempts, "retry_at": self.clock() + wait, "retry_in_s": wait}
            row.update(ok=False, error=str(e), attempts=attempts, retry_in_s=wait)
            self.log(f"versions: {model} stays on {before}: {e}; next try in {wait:.0f} s")
        else:
            self.errors.pop(model, None)
            row.update(ok=True, duration_ms=round(result["ms"], 1))
            self.log(f"versions: {model} {before} -> {version} (desired revision {entry['revision']})")
        with contextlib.suppress(AuditUnavailable):  # the swap happened (or not) either way; the log counts it
            self.audit.write(row)
        return row

    def _publish(self, revision: int, desired: dict, live: dict[str, list[str]], swapping: dict | None = None,
                 ttl_s: float = HEARTBEAT_TTL_S) -> None:
        errors = {m: {k: e[k] for k in ("version", "revision", "error", "attempts", "retry_in_s")}
                  for m, e in self.errors.items()}
        report = {"revision": revision, "live": live, "errors": errors, "swapping": swapping or {},
                  "converged": all(converged(desired, live).values()) and not swapping}
        try:
            self.store.publish(self.replica, report, ttl_s)
        except VersionsUnavailable as e:
            self.fault = str(e)

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            self.run_checked(once=True)

    def run_checked(self, once: bool = False) -> None:
        """One check (or, `once` false, one every interval until halted) that logs what fails instead of raising."""
        while True:
            try:
                self.check_once()
            except Exception as e:  # noqa: BLE001 - the follower must not die (e.g. Triton restarting)
                self.log(f"versions: {type(e).__name__}: {e}")
            if once or self._halt.wait(self.interval):
                return


def main(argv: list[str] | None = None) -> int:
    from pathlib import Path

    from ..core.version_store import version_store

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="127.0.0.1:8011", help="this replica's Triton gRPC (restricted APIs)")
    ap.add_argument("--replica", default=None, help=f"this replica's id (default ${REPLICA_ID_ENV}, else host name)")
    ap.add_argument("--repository", type=Path, default=None, help="the served repository, when it is a directory here")
    ap.add_argument("--interval", type=float, default=VERSIONS_POLL_S)
    ap.add_argument("--ready-file", type=Path, default=None, help="written once the first check is done")
    args = ap.parse_args(argv)
    key = admin_key()
    if not key:
        print("error: set MODERATION_ADMIN_KEY (or MODERATION_ADMIN_KEY_FILE)", file=sys.stderr)
        return 2
    store = version_store(os.environ)
    if store is None:
        print("error: set MODERATION_REDIS_URL: without Redis there is no cluster state to follow", file=sys.stderr)
        return 2
    repository = args.repository if args.repository and args.repository.is_dir() else None
    follower = VersionFollower(RepositoryAdmin(args.url, key, repository), store,
                               args.replica or os.environ.get(REPLICA_ID_ENV) or socket.gethostname(), args.interval,
                               log=lambda m: print(m, flush=True))
    print(f"following the desired versions as replica {follower.replica}", flush=True)
    waiting = None
    while True:  # Triton may still be starting (a download, a large load): the first check waits for it
        try:
            follower.check_once()
            break
        except Exception as e:  # noqa: BLE001 - reported once, then tried every interval
            if waiting is None:
                waiting = f"{type(e).__name__}: {e}"
                print(f"versions: waiting for Triton at {args.url} ({waiting})", flush=True)
            time.sleep(args.interval)
    if args.ready_file:
        args.ready_file.write_text(f"{follower.replica}\n", encoding="utf-8")
    follower.run_checked()
    return 0


if __name__ == "__main__":
    sys.exit(main())
