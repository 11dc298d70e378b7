"""Which model version every replica should serve, and what each one serves: cluster state in Redis.

With MODERATION_REDIS_URL set (the variable the verdict cache and the lists use), under MODERATION_VERSIONS_PREFIX
(default `moderation:versions`):
    <prefix>:v1:desired            hash: `revision` (bumped by every change) and one field per model, the JSON
                                   {version, revision, by, peer, at, history}: `history` the earlier desired versions,
                                   newest last, what `rollback` returns to
    <prefix>:v1:audit              the newest AUDIT_KEEP changes (JSON, newest first): who set what, when
    <prefix>:v1:replica:<id>       one replica's report (JSON, expires after HEARTBEAT_TTL_S unless renewed):
                                   {replica, at, revision, live: {model: [versions]}, errors: {model: {...}},
                                   swapping: {model: version}}
    <prefix>:v1:replicas           sorted set: replica ids by the time of their last report (where `status` looks,
                                   instead of scanning a keyspace the verdict cache fills; pruned after an hour)
`clients.admin swap` / `rollback` set the desired version once, through a gateway (gateway/admin.py); every replica's
follower (ops/versions.py) reads it at most every VERSIONS_POLL_S and swaps its own Triton when it differs.
Without Redis there is no cluster state: a swap acts on the one server it reaches (ops/admin.py)."""
from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping

from .errors import ModerationError
from .redis_link import redis_client, redis_errors, redis_url

VERSIONS_PREFIX_ENV = "MODERATION_VERSIONS_PREFIX"
DEFAULT_VERSIONS_PREFIX = "moderation:versions"
# How often a replica reads the desired versions, at most: a change starts on every replica within this.
VERSIONS_POLL_S = 2.0
# A replica that has not reported for this long is gone (or cannot reach Redis) and drops out of `status`.
HEARTBEAT_TTL_S = 15.0
HISTORY_KEEP = 20
REPLICAS_FORGET_S = 3600.0
AUDIT_KEEP = 1_000


class VersionsUnavailable(ModerationError):
    code = "unavailable"


class NothingToRollBack(ModerationError):
    code = "bad_request"


def converged(desired: Mapping[str, dict], live: Mapping[str, list[str]]) -> dict[str, bool]:
    """Per desired model that the replica serves: whether exactly the desired version is live there."""
    return {m: live[m] == [str(e["version"])] for m, e in desired.items() if m in live}


class VersionStore:
    def __init__(self, client, prefix: str = DEFAULT_VERSIONS_PREFIX, clock=time.time):
        self.client, self.clock = client, clock
        base = f"{prefix}:v1"
        self.desired_key, self.audit_key, self.replica_prefix = f"{base}:desired", f"{base}:audit", f"{base}:replica:"
        self.replicas_key = f"{base}:replicas"

    def _call(self, what: str, fn):
        try:
            return fn()
        except redis_errors() as e:
            raise VersionsUnavailable(f"Redis cannot be reached ({what}): {type(e).__name__}: {e}") from None

    # desired ---------------------------------------------------------------------------------
    def desired(self) -> tuple[int, dict[str, dict]]:
        """The desired-state revision and the entry of each model that has one."""
        raw = self._call("read the desired versions", lambda: self.client.hgetall(self.desired_key))
        fields = {k.decode(): v for k, v in raw.items()}
        revision = int(fields.pop("revision", 0))
        return revision, {m: json.loads(v) for m, v in fields.items()}

    def set_desired(self, model: str, version: str, by: str, peer: str = "", serving: str | None = None) -> dict:
        """`serving`: the version the server that took the call serves, the one a rollback returns to when the
        cluster has no desired version of `model` yet."""

        def swapped(entry: dict | None) -> tuple[str, list[str], str | None]:
            if entry is None and serving:
                entry = {"version": str(serving), "history": []}
            return str(version), _pushed(entry, str(version)), entry["version"] if entry else None

        return self._change(model, by, peer, swapped)

    def rollback(self, model: str, by: str, peer: str = "") -> dict:
        def previous(entry: dict | None) -> tuple[str, list[str], str | None]:
            history = list((entry or {}).get("history", []))
            if not entry or not history:
                raise NothingToRollBack(f"no earlier desired version of {model} is recorded; nothing to roll back to")
            return history.pop(), history, entry["version"]

        return self._change(model, by, peer, previous)

    def _change(self, model: str, by: str, peer: str, next_entry) -> dict:
        """Read the model's entry, work out the new version, its history and the version it replaces (`next_entry`),
        and write them with a bumped revision: a transaction, retried when another change lands in between (WATCH)."""
        import redis

        def attempt() -> dict:
            with self.client.pipeline() as pipe:
                while True:
                    try:
                        pipe.watch(self.desired_key)
                        old = pipe.hget(self.desired_key, model)
                        entry = json.loads(old) if old else None
                        version, history, before = next_entry(entry)
                        revision = int(pipe.hget(self.desired_key, "revision") or 0) + 1
                        new = {"version": version, "revision": revision, "by": by, "peer": peer, "at": self.clock(),
                               "history": history[-HISTORY_KEEP:], "from": before}
                        row = {"model": model, **{k: v for k, v in new.items() if k != "history"}}
                        pipe.multi()
                        pipe.hset(self.desired_key, mapping={model: json.dumps(new), "revision": revision})
                        pipe.lpush(self.audit_key, json.dumps(row))
                        pipe.ltrim(self.audit_key, 0, AUDIT_KEEP - 1)
                        pipe.execute()
                        return new
                    except redis.WatchError:
                        continue

        return self._call("set the desired version", attempt)

    def history(self, limit: int = 50) -> list[dict]:
        rows = self._call("read the history", lambda: self.client.lrange(self.audit_key, 0, limit - 1))
        return [json.loads(r) for r in rows]

    # replicas --------------------------------------------------------------------------------
    def publish(self, replica: str, report: dict, ttl_s: float = HEARTBEAT_TTL_S) -> None:
        now = self.clock()
        data = json.dumps({"replica": replica, "at": now, **report})

        def write() -> None:
            with self.client.pipeline(transaction=False) as pipe:
                pipe.set(self.replica_prefix + replica, data, px=int(ttl_s * 1e3))
                pipe.zadd(self.replicas_key, {replica: now})
                pipe.zremrangebyscore(self.replicas_key, "-inf", now - REPLICAS_FORGET_S)
                pipe.execute()

        self._call("publish this replica", write)

    def replicas(self) -> list[dict]:
        """The reports of replicas that reported within their heartbeat (an expired report is gone)."""
        def read() -> list[dict]:
            ids = sorted(i.decode() for i in self.client.zrange(self.replicas_key, 0, -1))
            values = self.client.mget([self.replica_prefix + i for i in ids]) if ids else []
            return [json.loads(v) for v in values if v]

        return self._call("read the replicas", read)

    def status(self) -> dict:
        """The desired versions and, per replica, what it serves and whether it has converged to them."""
        revision, desired = self.desired()
        replicas = []
        for r in self.replicas():
            per_model = converged(desired, r.get("live", {}))
            replicas.append({**r, "converged_models": per_model,
                             "converged": all(per_model.values()) and not r.get("swapping")})
        return {"revision": revision, "desired": desired, "replicas": replicas}


def _pushed(entry: dict | None, version: str) -> list[str]:
    """The history after `version` replaces `entry`'s (setting the same version again leaves it as it is)."""
    history = list((entry or {}).get("history", []))
    if entry and entry["version"] != version and (not history or history[-1] != entry["version"]):
        history.append(entry["version"])
    return history


def version_store(env: Mapping[str, str] | None = None, client_name: str = "moderation-versions") \
        -> VersionStore | None:
    """The cluster's store when MODERATION_REDIS_URL is set, else None (versions are the one server's business)."""
    env = os.environ if env is None else env
    url = redis_url(env)
    if not url:
        return None
    prefix = (env.get(VERSIONS_PREFIX_ENV) or "").strip() or DEFAULT_VERSIONS_PREFIX
    return VersionStore(redis_client(url, env, client_name), prefix)
