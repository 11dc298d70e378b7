"""The verdict cache shared across replicas (moderation/gate/shared_cache.py, MODERATION_REDIS_URL), always against a
real redis-server started here on a free port (never a mock): the same matches as the in-process cache, TTL by
Redis expiry, the per-partition size bound, partitions and schema-versioned keys, the bounded candidate scan,
forget and purge seen by every replica, and a Redis outage that degrades to misses and skipped writes. Then two
real servers sharing one Redis: a post judged on one is a hit on the other, forget and purge-caches on one act on
the other, and Redis SIGKILLed under load fails no request."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import numpy as np
import pytest

from moderation.core.policy import CacheSettings
from moderation.gate.cache import GateCache, Probe, VerdictCache, verdict_cache
from moderation.gate.shared_cache import SCHEMA, CircuitBreaker, RedisVerdictCache
from moderation.testing.waits import wait_until

from . import test_stages as stages
from .conftest import ADMIN_KEY, REPO, ROOT, redis_or_fail

S = CacheSettings(enabled=True, image_threshold=0.9, fingerprint_threshold=None, ttl_s=10, max_entries=3)
KEY = ("p", "d", "en", False, "")
HANG_GUARD_S = 60.0  # waits for an event (an expiry, a reconnect) end this long only when it never comes


def _vec(seed, d=16):
    return np.random.default_rng(seed).normal(size=d).astype(np.float32)


@pytest.fixture(scope="module")
def redis_server():
    with redis_or_fail() as srv:
        yield srv


class Counted:
    def __init__(self):
        self.calls = []

    def __call__(self, name, **labels):
        self.calls.append((name, labels))

    def n(self, **labels):
        return sum(1 for name, lab in self.calls
                   if name == "moderation_cache_backend_errors_total" and labels.items() <= lab.items())


def _shared(server, prefix=None, count=None, timeout_ms=1000, warn=None, **breaker) -> RedisVerdictCache:
    env = {"MODERATION_REDIS_URL": server.url, "MODERATION_REDIS_PREFIX": prefix or f"t{uuid.uuid4().hex[:8]}",
           "MODERATION_REDIS_TIMEOUT_MS": str(timeout_ms)}
    c = verdict_cache(environ=env, count=count or Counted(), warn=warn or (lambda m: None))
    assert isinstance(c, RedisVerdictCache)
    if breaker:
        c.breaker = CircuitBreaker(**breaker)
    return c


# unit, against a real redis-server ------------------------------------------------------------------------
def test_backend_follows_the_environment(redis_server):
    assert isinstance(verdict_cache(environ={}), VerdictCache)
    assert isinstance(verdict_cache(environ={"MODERATION_REDIS_URL": " "}), VerdictCache)
    assert isinstance(verdict_cache(environ={"MODERATION_REDIS_URL": redis_server.url}), RedisVerdictCache)
    assert GateCache(cache=_shared(redis_server)).shared and not GateCache(cache=VerdictCache()).shared


def test_same_decisions_as_the_in_process_cache(redis_server):
    """One random workload (stores, near and far copies, other captions, text-embedding and fingerprint modes,
    forgets) on both backends: every lookup answers the same entry with the same similarities."""
    rng = np.random.default_rng(7)
    for settings in (S.model_copy(update={"max_entries": 50, "fingerprint_threshold": 0.8}),
                     S.model_copy(update={"max_entries": 50, "text_threshold": 0.9})):
        local, shared = VerdictCache(), _shared(redis_server)
        originals = []
        for step in range(160):
            op = rng.integers(0, 10)
            if op < 4 or not originals:
                img, txt, fp = _vec(step), _vec(10_000 + step), _vec(20_000 + step, 192)
                cap = f"c{rng.integers(0, 3)}"
                originals.append((img, txt, fp, cap))
                for c in (local, shared):
                    c.store(KEY, settings, img, txt, cap, fp, {"step": step})
                continue
            img, txt, fp, cap = originals[rng.integers(0, len(originals))]
            noise = float(rng.choice([0.02, 0.1, 0.6]))
            q = (img + noise * _vec(50_000 + step), txt + noise * _vec(60_000 + step),
                 fp + noise * _vec(70_000 + step, 192), cap if rng.random() < 0.8 else "other")
            if op == 9:
                assert local.forget(KEY, settings, q[0], q[1], q[3], q[2]) == \
                    shared.forget(KEY, settings, q[0], q[1], q[3], q[2])
                continue
            a = local.lookup(KEY, settings, q[0], q[1], q[3], q[2])
            b = shared.lookup(KEY, settings, q[0], q[1], q[3], q[2])
            assert (a is None) == (b is None), step
            if a:
                assert a.verdict == b.verdict and a.source_route == b.source_route
                assert a.similarity == pytest.approx(b.similarity, abs=1e-6)
                for x, y in ((a.text_similarity, b.text_similarity),
                             (a.fingerprint_similarity, b.fingerprint_similarity)):
                    assert (x is None and y is None) or x == pytest.approx(y, abs=1e-6)
        assert local.counts["hit"] == shared.counts["hit"] > 10 and len(local) == len(shared)


def test_hit_drops_timings_and_reports_its_source(redis_server):
    c = _shared(redis_server)
    img = _vec(1)
    assert c.store(KEY, S, img, None, "a", None, {"violation": 0.3, "timings_ms": {"prefill": 5.0}}) is True
    hit = c.lookup(KEY, S, img + 0.05 * _vec(2), None, "a")
    assert hit.verdict == {"violation": 0.3} and hit.source_route == "vlm" and 0 <= hit.age_s <= S.ttl_s
    assert c.lookup(KEY, S, _vec(3), None, "a") is None and c.lookup(KEY, S, img, None, "b") is None


def _entry_key(r, c, verdict: dict) -> bytes:
    """The Redis key of the stored entry whose verdict is `verdict`."""
    found = [k for k in r.scan_iter(match=f"{c.root}:p:*:e:*") if json.loads(r.hget(k, "v")) == verdict]
    assert len(found) == 1, found
    return found[0]


def _stored_earlier(r, c, key: tuple, entry: bytes, seconds: float) -> None:
    """Move an entry's stored time (Redis ms, in the entry and in its partition's age index) `seconds` back: what
    the passing of that much time does to it, without waiting for it."""
    t = int(r.hget(entry, "t")) - int(seconds * 1e3)
    r.hset(entry, "t", t)
    r.zadd(f"{c._base(key)}:age", {entry.decode().rsplit(":", 1)[1]: t})


def _wait_until_gone(r, key: bytes) -> None:
    wait_until(lambda: not r.exists(key), f"{key!r} expired", HANG_GUARD_S, every_s=0.05)


def test_ttl_is_redis_expiry(redis_server):
    import redis

    r = redis.Redis.from_url(redis_server.url)
    short = S.model_copy(update={"ttl_s": 0.6})
    c = _shared(redis_server)
    c.store(KEY, short, _vec(1), None, "a", None, {"v": 1})
    entry = _entry_key(r, c, {"v": 1})
    assert 0 < r.pttl(entry) <= 600  # Redis expires the entry itself, ttl_s after the store
    _wait_until_gone(r, entry)
    assert c.lookup(KEY, short, _vec(1), None, "a") is None
    # an entry older than ttl_s that Redis still holds is a miss too (the age check on Redis's own clock)
    c.store(KEY, S, _vec(5), None, "a", None, {"v": 5})
    assert c.lookup(KEY, S, _vec(5), None, "a").verdict == {"v": 5}
    _stored_earlier(r, c, KEY, _entry_key(r, c, {"v": 5}), S.ttl_s + 1)
    assert c.lookup(KEY, S, _vec(5), None, "a") is None


def test_expired_ids_leave_the_indexes_before_the_size_bound_counts(redis_server):
    import redis

    r = redis.Redis.from_url(redis_server.url)
    c = _shared(redis_server)
    c.store(KEY, S, _vec(2), None, "a", None, {"v": 2})
    c.store(KEY, S, _vec(3), None, "a", None, {"v": 3})
    lru = list(r.scan_iter(match=f"{c.root}:p:*:lru"))
    assert r.zcard(lru[0]) == 2 and 0 < r.pttl(lru[0]) <= S.ttl_s * 1e3  # the indexes expire too
    two = _entry_key(r, c, {"v": 2})
    _stored_earlier(r, c, KEY, two, S.ttl_s + 1)  # entry 2 is past its ttl_s; Redis has expired it
    r.delete(two)
    c.store(KEY, S, _vec(4), None, "a", None, {"v": 4})  # drops 2's id before counting the bound ...
    c.store(KEY, S, _vec(5), None, "a", None, {"v": 5})  # ... so 3, the least recently used, stays within it
    assert r.zcard(lru[0]) == S.max_entries and c.counts["expired"] == 1 and c.counts["evicted"] == 0
    assert c.lookup(KEY, S, _vec(2), None, "a") is None and c.lookup(KEY, S, _vec(3), None, "a").verdict == {"v": 3}


def test_size_bound_per_partition_is_lru(redis_server):
    import redis

    c = _shared(redis_server)
    other = ("p", "d", "zh", False, "")
    imgs = [_vec(i) for i in range(6)]
    for i in range(3):
        c.store(KEY, S, imgs[i], None, "c", None, {"i": i})
    c.store(other, S, imgs[5], None, "c", None, {"i": 5})
    assert c.lookup(KEY, S, imgs[0], None, "c").verdict == {"i": 0}  # used: now the most recent
    c.store(KEY, S, imgs[3], None, "c", None, {"i": 3})  # evicts the least recently used: 1, not 0
    c.store(KEY, S, imgs[4], None, "c", None, {"i": 4})  # then 2
    assert len(c) == S.max_entries + 1 and c.counts["evicted"] == 2
    assert c.lookup(KEY, S, imgs[1], None, "c") is None and c.lookup(KEY, S, imgs[2], None, "c") is None
    assert c.lookup(KEY, S, imgs[0], None, "c").verdict == {"i": 0}
    assert c.lookup(other, S, imgs[5], None, "c").verdict == {"i": 5}  # the other partition keeps its own
    r = redis.Redis.from_url(redis_server.url)
    for k in r.scan_iter(match=f"{c.root}:p:*:lru"):
        assert r.zcard(k) <= S.max_entries


def test_partitions_and_schema_versioned_keys(redis_server):
    import redis

    c = _shared(redis_server, prefix="iso")
    img = _vec(1)
    c.store(KEY, S, img, None, "a", None, {"v": 1})
    for key in (("p", "d", "zh", False, ""), ("p", "d2", "en", False, ""), ("p", "d", "en", True, ""),
                ("p", "d", "en", False, "2"), ("q", "d", "en", False, "")):
        assert c.lookup(key, S, img, None, "a") is None, key
    assert c.lookup(KEY, S, img, None, "a") is not None
    r = redis.Redis.from_url(redis_server.url)
    keys = [k.decode() for k in r.scan_iter(match="iso:*")]
    assert keys and all(k.startswith(f"iso:v{SCHEMA}:") for k in keys)
    assert _shared(redis_server, prefix="iso2").lookup(KEY, S, img, None, "a") is None  # another namespace


def test_text_embedding_mode_and_fingerprint_check(redis_server):
    s = S.model_copy(update={"text_threshold": 0.95, "fingerprint_threshold": 0.8})
    c = _shared(redis_server)
    img, txt, fp = _vec(1), _vec(4), _vec(5, 192)
    c.store(KEY, s, img, txt, "x", fp, {"v": 1})
    hit = c.lookup(KEY, s, img, txt + 0.01 * _vec(6), "other caption", fp)  # text by embedding
    assert hit is not None and hit.text_similarity > 0.95 and hit.fingerprint_similarity > 0.99
    assert c.lookup(KEY, s, img, _vec(7), "x", fp) is None  # dissimilar caption embedding
    assert c.lookup(KEY, s, img, txt, "x", _vec(8, 192)) is None  # CLIP agrees, fingerprint does not


def test_candidate_scan_is_bounded_but_exact_copies_always_found(redis_server):
    s = S.model_copy(update={"max_entries": 100, "candidates": 4})
    c = _shared(redis_server)
    first = _vec(1)
    c.store(KEY, s, first, None, "same", None, {"i": "first"}, exact="x-first")
    for i in range(10):  # ten newer entries with the same caption key push `first` out of the scanned window
        c.store(KEY, s, _vec(100 + i), None, "same", None, {"i": i})
    assert c.lookup(KEY, s, first + 0.05 * _vec(2), None, "same") is None  # a near copy: beyond the bound
    hit = c.lookup(KEY, s, first, None, "same", exact="x-first")  # the byte-identical copy: by its exact key
    assert hit.verdict == {"i": "first"}
    assert c.lookup(KEY, s, first + 0.05 * _vec(2), None, "same").verdict == {"i": "first"}  # used: recent again


def test_stale_versions_are_skipped_not_deleted(redis_server):
    c = _shared(redis_server)
    c.store(KEY, S, _vec(1), None, "c", None, {"v": 1}, versions={"language_decoder": "1"})
    other_replica = GateCache(is_ready=lambda m, v: v == "2", cache=c)  # serves version 2 only
    assert c.lookup(KEY, S, _vec(1), None, "c", still_valid=other_replica._valid) is None
    assert c.counts["stale"] == 1 and len(c) == 1  # a replica still on version 1 keeps its entry
    assert c.lookup(KEY, S, _vec(1), None, "c", still_valid=lambda v: True).verdict == {"v": 1}


def test_forget_and_purge_reach_every_replica(redis_server):
    prefix = f"t{uuid.uuid4().hex[:8]}"
    a, b = _shared(redis_server, prefix), _shared(redis_server, prefix)
    a.store(KEY, S, _vec(1), None, "c", None, {"v": 1})
    a.store(KEY, S, _vec(2), None, "c", None, {"v": 2})
    assert b.lookup(KEY, S, _vec(1), None, "c").verdict == {"v": 1}  # stored by a, served by b
    assert b.forget(KEY, S, _vec(1) + 0.01, None, "c") == 1
    assert a.lookup(KEY, S, _vec(1), None, "c") is None and len(a) == 1
    assert b.purge() == 1 and len(a) == 0 and a.lookup(KEY, S, _vec(2), None, "c") is None


def test_purge_epoch_runs_once_and_refuses_stores_prepared_before_it(redis_server):
    prefix = f"t{uuid.uuid4().hex[:8]}"
    a, b = _shared(redis_server, prefix), _shared(redis_server, prefix)
    a.store(KEY, S, _vec(1), None, "c", None, {"v": 1})
    seen = {}
    assert a.lookup(KEY, S, _vec(9), None, "c", seen=seen) is None  # a miss on a; its VLM call is in flight
    assert b.purge_epoch("e1") == 1 and a.purge_epoch("e1") is None  # first instance of the reload purges
    assert a.store(KEY, S, _vec(9), None, "c", None, {"v": 9}, generation=seen["generation"]) is False
    assert len(a) == 0 and a.counts["refused"] == 1
    assert a.purge_epoch("e2") == 0  # a new epoch purges again
    # in-process: the same refusal after purge()
    local, seen = VerdictCache(), {}
    local.lookup(KEY, S, _vec(1), None, "c", seen=seen)
    local.purge()
    assert local.store(KEY, S, _vec(1), None, "c", None, {}, generation=seen["generation"]) is False


def test_outage_degrades_to_misses_and_skipped_writes_then_reconnects():
    from moderation.testing.redis_server import RedisServer

    count, now = Counted(), [0.0]
    with RedisServer() as srv:
        c = _shared(srv, count=count, cooldown_s=0.2, max_cooldown_s=0.4, clock=lambda: now[0])
        g = GateCache(cache=c)
        c.store(KEY, S, _vec(1), None, "c", None, {"v": 1})
        srv.kill()
        seen = {}
        assert c.lookup(KEY, S, _vec(1), None, "c", seen=seen) is None and seen == {"unavailable": True}
        assert c.store(KEY, S, _vec(2), None, "c", None, {"v": 2}) is None  # skipped: breaker open
        assert c.forget(KEY, S, _vec(1), None, "c") == -1
        # one refused connection, then the open breaker answers without touching the network
        assert count.n(kind="error") == 1 and count.n(kind="skipped") == 2 and c.breaker.is_open
        probe = Probe(KEY, S, _vec(3), None, "c", None, False, time.perf_counter())
        from moderation.core.contracts import VlmVerdict

        verdict = VlmVerdict(violation=0.1, labels={}, sentiment={}, description=None, untrained=True,
                             caption_truncated=False, model_versions={"language_decoder": "1"})
        assert g.lookup(probe) is None and g.after(probe, verdict) == {"hit": False, "stored": False,
                                                                       "unavailable": True}
        assert count.n(kind="error") == 1  # still within the cool-down: nothing tried Redis
        srv.start()  # back, empty (no persistence)

        def stored_after_a_cool_down() -> bool:
            now[0] += 0.4  # past the longest cool-down: the next call is the breaker's trial
            return c.store(KEY, S, _vec(4), None, "c", None, {"v": 4}) is True

        wait_until(stored_after_a_cool_down, "reconnect", HANG_GUARD_S)
        assert not c.breaker.is_open and c.lookup(KEY, S, _vec(4), None, "c").verdict == {"v": 4}


def test_a_purge_reload_while_redis_is_down_fails_when_fresh_and_waits_when_old():
    """The epoch parameter stays in clip_gate's live config, so the watchdog's and swaps' reloads carry it: with
    Redis down, a fresh purge (clients.admin purge-caches) fails its reload; an old epoch loads, serving and storing
    nothing until the purge has run against Redis."""
    from moderation.testing.redis_server import RedisServer

    with RedisServer() as srv:
        c = _shared(srv, cooldown_s=0.1, max_cooldown_s=0.2)
        g = GateCache(cache=c, warn=lambda m: None)
        c.store(KEY, S, _vec(1), None, "c", None, {"v": 1})
        srv.kill()
        now = time.time()
        with pytest.raises(Exception):  # noqa: B017 - whatever redis-py raises: the reload must fail
            g.purge_on_load(str(time.time_ns()), now=now)
        old = str(int((now - 3600) * 1e9))
        assert g.purge_on_load(old, now=now) is None and g.pending_epoch == old
        probe = Probe(KEY, S, _vec(1), None, "c", None, False, time.perf_counter())
        assert g.lookup(probe) is None and probe.seen == {"unavailable": True}
        srv.start()  # back (empty here; a partitioned-off Redis would still hold the entry)
        c.store(KEY, S, _vec(1), None, "c", None, {"v": 1})  # e.g. another replica stored it meanwhile
        hang_guard = time.monotonic() + HANG_GUARD_S
        while g.pending_epoch is not None:
            assert time.monotonic() < hang_guard, "the deferred purge never ran"
            probe = Probe(KEY, S, _vec(1), None, "c", None, False, time.perf_counter())
            assert g.lookup(probe) is None
            time.sleep(0.05)
        assert len(c) == 0  # the purge ran before anything was served
        c.store(KEY, S, _vec(2), None, "c", None, {"v": 2})  # and then the cache works again
        assert c.lookup(KEY, S, _vec(2), None, "c").verdict == {"v": 2}


def test_a_hung_redis_costs_one_timeout_then_the_breaker_answers():
    from moderation.testing.redis_server import RedisServer

    warnings = []
    with RedisServer() as srv:
        c = _shared(srv, timeout_ms=200, warn=warnings.append, cooldown_s=5.0, clock=lambda: 0.0)
        c.store(KEY, S, _vec(1), None, "c", None, {"v": 1})
        os.kill(srv.proc.pid, signal.SIGSTOP)  # alive but not answering
        try:
            assert c.lookup(KEY, S, _vec(1), None, "c") is None
            for _ in range(20):
                assert c.lookup(KEY, S, _vec(1), None, "c") is None
        finally:
            os.kill(srv.proc.pid, signal.SIGCONT)
        # the first lookup waited out the socket timeout; the breaker answered the other 20 without Redis
        assert c.counts["errors"] == 1 and c.counts["skipped"] == 20, c.counts
        assert [w for w in warnings if "Redis unavailable" in w and "TimeoutError" in w] != [], warnings


def test_password_from_a_file_and_a_wrong_one_degrades(tmp_path):
    from moderation.testing.redis_server import RedisServer

    secret = tmp_path / "redis_password"
    secret.write_text("s3cret-" + uuid.uuid4().hex + "\n")
    with RedisServer(password=secret.read_text().strip()) as srv:
        env = {"MODERATION_REDIS_URL": srv.url, "MODERATION_REDIS_PASSWORD_FILE": str(secret)}
        c = verdict_cache(environ=env, warn=lambda m: None)
        assert c.store(KEY, S, _vec(1), None, "c", None, {"v": 1}) is True
        assert c.lookup(KEY, S, _vec(1), None, "c").verdict == {"v": 1}
        count = Counted()
        anonymous = verdict_cache(environ={"MODERATION_REDIS_URL": srv.url}, count=count, warn=lambda m: None)
        assert anonymous.lookup(KEY, S, _vec(1), None, "c") is None and count.n(op="lookup", kind="error") == 1


def test_breaker_backs_off_and_closes_on_success():
    t = [0.0]
    b = CircuitBreaker(cooldown_s=1.0, max_cooldown_s=4.0, clock=lambda: t[0])
    assert b.allow() and b.failure() and not b.allow()
    t[0] = 1.0
    assert b.allow() and not b.allow()  # one trial at a time
    assert not b.failure()  # the trial failed: 2 s now
    t[0] = 2.5
    assert not b.allow()
    t[0] = 3.0
    assert b.allow() and b.success() and b.allow() and not b.is_open


def test_purge_parameter_names_agree():
    from moderation.ops.purge import PURGE_PARAMETER
    from moderation.serving.clip_gate_model import EPOCH_PARAMETER

    assert PURGE_PARAMETER == EPOCH_PARAMETER


# clip_gate through the pb_utils test double: two replicas on one Redis ----------------------------------------
pb = stages.pb


def test_two_gate_replicas_share_verdicts_and_a_purge_reload(pb, redis_server, monkeypatch):
    from PIL import Image

    from moderation.testing.records import local_thumbnail_b64, request_record
    from moderation.testing.samples import sample_posts

    monkeypatch.setenv("MODERATION_REDIS_URL", redis_server.url)
    monkeypatch.setenv("MODERATION_REDIS_PREFIX", f"t{uuid.uuid4().hex[:8]}")
    a, b = stages._gate(pb), stages._gate(pb)
    assert a.router.verdicts.shared and b.router.verdicts.shared
    rec = request_record(policy_name="escalate_cached", fingerprint=[1.0] + [0.0] * 191,
                         local_thumbnail=local_thumbnail_b64(Image.open(sample_posts()[0].image_path)))
    first = stages._decisions(pb, stages._run(a, stages._gate_request(pb, [rec])))[0]
    second = stages._decisions(pb, stages._run(b, stages._gate_request(pb, [rec.model_copy(
        update={"request_id": "r2"})])))[0]
    assert first.route == "vlm" and first.cache == {"hit": False, "stored": True}
    assert second.route == "cache" and second.vlm.violation == first.vlm.violation
    # purge-caches reloads a's clip_gate with a new epoch: the new instance empties Redis for b too
    args = stages._args("clip_gate")
    cfg = json.loads(args["model_config"])
    cfg.setdefault("parameters", {})["verdict_cache_epoch"] = {"string_value": uuid.uuid4().hex}
    reloaded = type(a)()
    reloaded.initialize({**args, "model_config": json.dumps(cfg)})
    third = stages._decisions(pb, stages._run(b, stages._gate_request(pb, [rec.model_copy(
        update={"request_id": "r3"})])))[0]
    assert third.route == "vlm"


# two real servers sharing one Redis ------------------------------------------------------------------------
SHARED_POLICY = "escalate_shared"


@pytest.fixture(scope="module")
def shared_servers(redis_server, tmp_path_factory):
    """Two embedded servers (two replicas) on one Redis, with a policy that escalates every post and caches."""
    from moderation.testing.policies import derive_policy, write_fixed_route_policies
    from moderation.testing.server import running_server

    if not (REPO / "language_decoder" / "1" / "artifact.json").exists():
        pytest.fail("model_repository has no exported models: run `make models`")
    policies = write_fixed_route_policies(tmp_path_factory.mktemp("shared-policies"))
    derive_policy(policies, SHARED_POLICY, gate={"allow_below": 0.0, "block_at": 1.01}, cache={"enabled": True})
    logs = tmp_path_factory.mktemp("shared-logs")
    servers = []
    try:
        for name in ("a", "b"):
            env = {"MODERATION_POLICY_DIR": str(policies), "MODERATION_AUDIT_LOG": str(logs / f"audit-{name}.jsonl"),
                   "MODERATION_REDIS_URL": redis_server.url, "MODERATION_REDIS_PREFIX": "shared-test",
                   "MODERATION_REDIS_TIMEOUT_MS": "1000"}
            srv = running_server(repository=REPO, env=env, log_path=logs / f"triton-{name}.log", key=ADMIN_KEY)
            servers.append(srv.__enter__())
        yield servers
    finally:
        for srv in servers:
            srv.__exit__(None, None, None)


def _send(srv, image: bytes, caption: str, **options) -> dict:
    import tritonclient.grpc as grpcclient

    from clients.client import build_inputs, parse_response

    opts = {"request_id": f"shared-{uuid.uuid4().hex[:12]}", "policy": SHARED_POLICY, **options}
    c = grpcclient.InferenceServerClient(srv.grpc_url)
    try:
        inputs, outputs = build_inputs(grpcclient, image, caption, opts)
        return parse_response(c.infer("moderate", inputs, outputs=outputs, client_timeout=120))
    finally:
        c.close()


def _posts():
    from moderation.testing.samples import sample_posts

    return {p.name: p for p in sample_posts()}


@pytest.mark.integration
def test_a_post_judged_on_one_replica_is_a_hit_on_the_other(shared_servers):
    from moderation.testing.traces import near_copy

    a, b = shared_servers
    src = _posts()["cat_en"].image_bytes()
    caption = f"shared across replicas {uuid.uuid4().hex[:6]}"
    first = _send(a, src, caption)
    assert first["route"] == "vlm" and first["cache"] == {"hit": False, "stored": True}
    exact = _send(b, src, caption)
    assert exact["route"] == "cache" and exact["cache"]["similarity"] > 0.999, exact.get("cache")
    near = _send(b, near_copy(src, "jpeg50"), caption.upper())
    assert near["route"] == "cache" and near["cache"]["hit"] and near["violation"] == first["violation"]
    assert near["model_versions"]["language_decoder"] == first["model_versions"]["language_decoder"]
    assert _send(a, _posts()["coffee_zh"].image_bytes(), caption)["route"] == "vlm"  # another photo misses


@pytest.mark.integration
def test_forget_and_purge_on_one_replica_act_on_the_other(shared_servers):
    from moderation.testing.traces import near_copy

    a, b = shared_servers
    src = _posts()["rocket_en"].image_bytes()
    caption = f"forget across replicas {uuid.uuid4().hex[:6]}"
    assert _send(a, src, caption)["route"] == "vlm"
    hit = _send(b, near_copy(src, "resize0.7"), caption, forget=True)  # served, then evicted from Redis
    assert hit["route"] == "cache"
    again = _send(a, src, caption)
    assert again["route"] == "vlm" and again["cache"] == {"hit": False, "stored": True}

    caption = f"purge across replicas {uuid.uuid4().hex[:6]}"
    assert _send(a, src, caption)["route"] == "vlm"
    assert _send(b, src, caption)["route"] == "cache"
    env = dict(os.environ, MODERATION_ADMIN_KEY=ADMIN_KEY)
    p = subprocess.run([sys.executable, "-m", "clients.admin", "--url", b.grpc_url, "purge-caches"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0 and json.loads(p.stdout)["purged"] == "clip_gate", p.stderr
    after = _send(a, src, caption)  # a was not reloaded: its answers come from the purged Redis
    assert after["route"] == "vlm" and not after["cache"]["hit"]


@pytest.mark.integration
def test_redis_killed_under_load_fails_no_request_and_hits_resume(shared_servers, redis_server):
    from moderation.testing.traces import near_copy

    a, b = shared_servers
    posts = list(_posts().values())
    results, errors, stop = [], [], threading.Event()
    lock = threading.Lock()

    def worker(w):
        i = 0
        while not stop.is_set():
            post = posts[(w + i) % len(posts)]
            srv = (a, b)[i % 2]
            try:
                r = _send(srv, post.image_bytes(), f"load {w} {i % 3} {post.name}")
                with lock:
                    results.append(r)
            except Exception as e:  # noqa: BLE001 - every failure is collected and fails the test
                with lock:
                    errors.append(repr(e))
            i += 1

    def answered_at_least(n: int) -> None:
        hang_guard = time.monotonic() + HANG_GUARD_S
        while len(results) + len(errors) < n:
            assert time.monotonic() < hang_guard, (len(results), errors[:3])
            time.sleep(0.2)

    threads = [threading.Thread(target=worker, args=(w,), daemon=True) for w in range(3)]
    [t.start() for t in threads]
    answered_at_least(6)  # the load is running against both servers
    before = len(results)
    redis_server.kill()
    answered_at_least(before + 9)  # every worker has sent calls since the kill
    during = len(results) - before
    stop.set()
    [t.join(180) for t in threads]
    assert not errors, errors[:3]
    assert before > 0 and during > 0, (before, during)
    assert any(r.get("cache", {}).get("unavailable") for r in results[before:])  # misses while Redis was down

    redis_server.start()  # back, empty
    src = posts[0].image_bytes()
    caption = f"after the outage {uuid.uuid4().hex[:6]}"
    deadline = time.monotonic() + 60
    while True:  # a's breaker lets a trial through within its cool-down (at most 5 s)
        r = _send(a, src, caption)
        if r["cache"].get("stored"):
            break
        assert time.monotonic() < deadline, r["cache"]
        time.sleep(0.5)
    deadline = time.monotonic() + 60
    while True:
        r = _send(b, near_copy(src, "jpeg50"), caption)
        if r["route"] == "cache":
            break
        assert time.monotonic() < deadline, r["cache"]
        time.sleep(0.5)
    import urllib.request

    metrics = urllib.request.urlopen(a.metrics_url, timeout=30).read().decode()
    assert "moderation_cache_backend_errors_total" in metrics


def test_forged_or_garbage_entries_are_misses_with_a_metric(redis_server):
    """An entry this service did not sign, or one cut short or edited in Redis, is never served and never an
    error: a miss, counted by reason. A forged entry with low scores stays unserved even with a valid shape."""
    import redis

    from moderation.gate.cache import GateCache, Probe
    from moderation.gate.shared_cache import entry_mac

    count = Counted()
    c = _shared(redis_server, count=count)
    r = redis.Redis.from_url(redis_server.url)
    verdict = {"violation": 0.9, "labels": {"violence": 0.8}, "sentiment": {"negative": 1.0}, "description": None,
               "untrained": True, "caption_truncated": False, "model_versions": {}}
    assert c.store(KEY, S, _vec(1), None, "c", None, verdict) is True
    (entry,) = [k for k in r.scan_iter(match=f"{c.root}:p:*:e:*")]
    good = r.hgetall(entry)

    def rejected(reason):
        return sum(1 for name, lab in count.calls if name == "moderation_cache_rejected_total" and
                   lab == {"reason": reason})

    assert c.lookup(KEY, S, _vec(1), None, "c").verdict == verdict
    forged_low = json.dumps({**verdict, "violation": 0.0, "labels": {"violence": 0.0}}).encode()
    edits = [("v", b"not json"), ("img", b"abc"), ("t", b"soon"), ("ver", b"{bad"), ("v", forged_low)]
    for n, (field, value) in enumerate(edits, start=1):
        r.hset(entry, mapping={**good, field: value})
        assert c.lookup(KEY, S, _vec(1), None, "c") is None, field
        assert rejected("mac") + rejected("schema") == n
    # signed with this service's key but not a verdict: the shape check refuses it, the gate too
    base = entry.decode().rsplit(":e:", 1)[0]
    fields = [good[b"img"], b"", b"", b"", b"c", b"", b'{"violation": "high"}', b"vlm", b"{}"]
    r.hset(entry, mapping={**good, "v": fields[6], "m": entry_mac(c.mac_key, base, fields)})
    gate = GateCache(cache=c, count=count)
    probe = Probe(KEY, S, _vec(1), None, "c", None, False, 0.0)
    assert gate.lookup(probe) is None and rejected("schema") >= 1
    r.hset(entry, mapping=good)
    assert c.lookup(KEY, S, _vec(1), None, "c").verdict == verdict  # the untouched entry still serves
