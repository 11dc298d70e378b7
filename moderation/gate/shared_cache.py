"""The near-duplicate verdict cache shared by every clip_gate replica: Redis, when MODERATION_REDIS_URL is set.

Same API and the same decisions as the in-process VerdictCache (gate/cache.py): the same partitions (policy name
and digest, language, describe, A/B arm), the same match (`cache.match`: image cosine, caption key or text cosine,
fingerprint cosine, best image cosine first), the same stale-version check, an LRU bound of `max_entries` per
partition and a lifetime of `ttl_s` from the store. What differs is where the entries live and how many are
compared: a lookup fetches a bounded candidate set in one round trip and matches it here, with numpy.

Keys (`<prefix>:v<SCHEMA>:...`; a new SCHEMA starts from an empty cache, old keys expire on their own):

    gen, seq, tick, epoch               purge generation, entry ids, LRU logical clock, last purge epoch applied
    p:<partition>:e:<id>                hash: img, txt, fp (float32 unit vectors), lt (local thumbnail), c (caption
                                        key), x (exact key), v (verdict JSON), r (source route), ver (model versions
                                        JSON), m (MAC), t (stored, Redis server ms), g (generation); PEXPIRE ttl_s
    p:<partition>:lru                   zset id -> last use (tick): the size bound trims the least recently used
    p:<partition>:age                   zset id -> stored ms: expired ids leave the indexes before trimming
    p:<partition>:c:<caption key>       zset id -> last use: the candidates of a lookup by caption key
    p:<partition>:x:<exact key>         the id of a byte-identical copy (image sha256 + caption key)

Candidates of a lookup (at most `cache.candidates` + 1): the byte-identical copy, then the most recently used
entries with the same caption key (text_threshold null: a match needs that key anyway) or, when text_threshold is
set, of the whole partition. Store, trim and expiry run atomically in one Lua script; all times are Redis's own
clock (TIME), so replicas with skewed clocks agree.

Trust: Redis is shared storage, not a judge. Every entry carries an HMAC-SHA256 (`m`) of its partition and every
field a lookup acts on, under the key in the file MODERATION_CACHE_KEY_FILE names (one secret for all replicas);
a candidate whose MAC or shape is wrong (written by something else, cut short, edited) is a miss, counted in
moderation_cache_rejected_total{reason: mac | schema}, and never served or an error.

Degrade, don't fail: every call has short socket timeouts and no retries, behind a circuit breaker. A Redis error
opens it: lookups are misses and stores / forgets are skipped (moderation_cache_backend_errors_total{op, kind})
until a trial call after the cool-down succeeds; redis-py's pool reconnects by itself.

Purge: `purge()` bumps the generation (entries of an older generation are never served, and a store prepared
before the purge is refused) and deletes every key under the prefix. `purge_epoch(epoch)` does that once per
epoch: clients.admin purge-caches reloads clip_gate with a new `verdict_cache_epoch` and the first instance to load
with it empties the shared cache for every replica. Stale entries (their decoder version is not ready here) are
skipped, not deleted: during a rolling swap another replica may still serve that version."""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..core.hashing import sha256_hex
from ..core.imaging import FINGERPRINT_SIDE, LOCAL_SIDE
from ..core.redis_link import CircuitBreaker, redis_client, redis_errors
from .entries import Entry, Hit, match, stored_verdict, unit_inputs

SCHEMA = 2
CACHE_KEY_FILE_ENV = "MODERATION_CACHE_KEY_FILE"
FINGERPRINT_BYTES = FINGERPRINT_SIDE * FINGERPRINT_SIDE * 3 * 4
LOCAL_BYTES = LOCAL_SIDE * LOCAL_SIDE * 3
SOURCE_ROUTES = ("vlm",)
_PROCESS_KEY = secrets.token_bytes(32)  # without a configured key: entries this process wrote verify, others' do not
DEFAULT_PREFIX = "moderation:verdicts"
_DOWN = object()

_DROP_FN = """
local function drop(base, lru, age, id)
  local ek = base .. ':e:' .. id
  local f = redis.call('HMGET', ek, 'c', 'x')
  if f[1] then redis.call('ZREM', base .. ':c:' .. f[1], id) end
  if f[2] and f[2] ~= '' then
    local xk = base .. ':x:' .. f[2]
    if redis.call('GET', xk) == id then redis.call('DEL', xk) end
  end
  redis.call('ZREM', lru, id)
  redis.call('ZREM', age, id)
  return redis.call('DEL', ek)
end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""

# KEYS: gen seq tick lru age bucket exact; ARGV: base expected_gen ttl_ms max_entries caption exact img txt fp verdict
# route versions local mac -> {id or -1 (refused: purged since the lookup), expired, evicted}
_STORE = _DROP_FN + """
local gen = redis.call('GET', KEYS[1]) or '0'
if ARGV[2] ~= '' and ARGV[2] ~= gen then return {-1, 0, 0} end
local base, ttl, maxn = ARGV[1], tonumber(ARGV[3]), tonumber(ARGV[4])
local now = now_ms()
local expired = redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', now - ttl)
for _, old in ipairs(expired) do drop(base, KEYS[4], KEYS[5], old) end
local id = tostring(redis.call('INCR', KEYS[2]))
local tick = redis.call('INCR', KEYS[3])
local ek = base .. ':e:' .. id
redis.call('HSET', ek, 'img', ARGV[7], 'txt', ARGV[8], 'fp', ARGV[9], 'v', ARGV[10], 'r', ARGV[11],
           'ver', ARGV[12], 't', now, 'g', gen, 'c', ARGV[5], 'x', ARGV[6], 'lt', ARGV[13], 'm', ARGV[14])
redis.call('PEXPIRE', ek, ttl)
redis.call('ZADD', KEYS[4], tick, id)
redis.call('ZADD', KEYS[5], now, id)
redis.call('ZADD', KEYS[6], tick, id)
if ARGV[6] ~= '' then redis.call('SET', KEYS[7], id, 'PX', ttl) end
local evicted = 0
local n = redis.call('ZCARD', KEYS[4])
if n > maxn then
  for _, old in ipairs(redis.call('ZRANGE', KEYS[4], 0, n - maxn - 1)) do
    drop(base, KEYS[4], KEYS[5], old)
    evicted = evicted + 1
  end
end
for i = 4, 6 do redis.call('PEXPIRE', KEYS[i], ttl) end
return {tonumber(id), #expired, evicted}
"""

# KEYS: gen bucket exact; ARGV: base limit has_exact -> {gen, now_ms, then per live candidate of this generation:
# id img txt fp t ver c lt x v r m}
_LOOKUP = """
local gen = redis.call('GET', KEYS[1]) or '0'
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ids, seen = {}, {}
if ARGV[3] == '1' then
  local x = redis.call('GET', KEYS[3])
  if x then ids[1] = x; seen[x] = true end
end
for _, id in ipairs(redis.call('ZREVRANGE', KEYS[2], 0, tonumber(ARGV[2]) - 1)) do
  if not seen[id] then ids[#ids + 1] = id; seen[id] = true end
end
local out = {gen, tostring(now)}
for _, id in ipairs(ids) do
  local f = redis.call('HMGET', ARGV[1] .. ':e:' .. id, 'img', 'txt', 'fp', 't', 'ver', 'c', 'lt', 'x', 'v', 'r',
                       'm', 'g')
  if not f[1] then
    redis.call('ZREM', KEYS[2], id)
  elseif f[12] == gen then
    out[#out + 1] = id
    for j = 1, 11 do out[#out + 1] = f[j] or false end
  end
end
return out
"""

# KEYS: tick lru; ARGV: base id -> {verdict, route} of a live entry (now the most recently used), or nil
_TOUCH = """
local ek = ARGV[1] .. ':e:' .. ARGV[2]
local f = redis.call('HMGET', ek, 'v', 'r', 'c')
if not f[1] then return false end
local tick = redis.call('INCR', KEYS[1])
redis.call('ZADD', KEYS[2], 'XX', tick, ARGV[2])
redis.call('ZADD', ARGV[1] .. ':c:' .. f[3], 'XX', tick, ARGV[2])
return {f[1], f[2]}
"""

# KEYS: lru age; ARGV: base id... -> entries deleted
_FORGET = _DROP_FN + """
local n = 0
for i = 2, #ARGV do n = n + drop(ARGV[1], KEYS[1], KEYS[2], ARGV[i]) end
return n
"""

# KEYS: epoch gen; ARGV: epoch -> 1 when this epoch is new (the generation is bumped with it), else 0
_EPOCH = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('INCR', KEYS[2])
return 1
"""


def _no_count(name: str, **labels: str) -> None:
    return None


def _partition_id(key: tuple) -> str:
    return sha256_hex(json.dumps(list(key), ensure_ascii=False).encode())[:20]


def _vec(b: bytes | None) -> np.ndarray | None:
    return np.frombuffer(b, dtype="<f4") if b else None


def _bytes(x: np.ndarray | None) -> bytes:
    return b"" if x is None else np.ascontiguousarray(x, dtype="<f4").tobytes()


def entry_mac(key: bytes, base: str, fields: list[bytes]) -> bytes:
    """HMAC-SHA256 of an entry's partition and fields, each length-prefixed (no two field lists frame alike)."""
    mac = hmac.new(key, base.encode(), hashlib.sha256)
    for f in fields:
        mac.update(struct.pack(">I", len(f)))
        mac.update(f)
    return mac.digest()


class RejectedEntry(ValueError):
    """A stored entry that is not one this service wrote (reason "mac") or not of this schema ("schema")."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def cache_mac_key(env, warn: Callable[[str], None] = print) -> bytes:
    """The entries' MAC key: the file MODERATION_CACHE_KEY_FILE names (the same secret on every replica). Without
    one, a random key of this process: its entries are trusted by itself only (a warning says so)."""
    path = env.get(CACHE_KEY_FILE_ENV, "").strip()
    if path:
        key = Path(path).read_bytes().strip()
        if len(key) < 16:
            raise ValueError(f"{CACHE_KEY_FILE_ENV}: the key must be at least 16 bytes")
        return key
    warn(f"verdict cache: no {CACHE_KEY_FILE_ENV}; entries are signed with a key of this process only, so other "
         "replicas' entries are misses")
    return _PROCESS_KEY


class RedisVerdictCache:
    """VerdictCache's API on Redis (see the module doc). Returns: store() True / False (refused: purged since the
    lookup) / None (backend unavailable: skipped); forget() the entries evicted, or -1 when unavailable; lookup()
    None on a miss or an outage (`seen["unavailable"]` says which)."""

    def __init__(self, client, prefix: str = DEFAULT_PREFIX, count: Callable[..., None] = _no_count,
                 warn: Callable[[str], None] = print, breaker: CircuitBreaker | None = None,
                 mac_key: bytes | None = None):
        self.redis, self.prefix, self.count, self.warn = client, prefix, count, warn
        self.mac_key = mac_key or cache_mac_key(os.environ, warn)
        self.errors = redis_errors()
        self.breaker = breaker or CircuitBreaker()
        self.root = f"{prefix}:v{SCHEMA}"
        self._gen, self._seq, self._tick, self._epoch = (f"{self.root}:{k}" for k in ("gen", "seq", "tick", "epoch"))
        self._store = client.register_script(_STORE)
        self._lookup = client.register_script(_LOOKUP)
        self._touch = client.register_script(_TOUCH)
        self._forget = client.register_script(_FORGET)
        self._epoch_script = client.register_script(_EPOCH)
        self.counts = {"hit": 0, "miss": 0, "stored": 0, "evicted": 0, "expired": 0, "forgotten": 0, "stale": 0,
                       "refused": 0, "skipped": 0, "errors": 0, "rejected": 0}

    @classmethod
    def from_env(cls, url: str, env, count=_no_count, warn=print) -> RedisVerdictCache:
        """A client for `url` (core/redis_link.py: MODERATION_REDIS_TIMEOUT_MS, no retries, the password file), keys
        under MODERATION_REDIS_PREFIX."""
        client = redis_client(url, env, "moderation-clip-gate")
        return cls(client, env.get("MODERATION_REDIS_PREFIX", DEFAULT_PREFIX), count=count, warn=warn,
                   mac_key=cache_mac_key(env, warn))

    # plumbing -----------------------------------------------------------------------------------
    def _call(self, op: str, fn: Callable[[], object]):
        """fn()'s result, or _DOWN when the breaker is open or Redis failed (counted, never raised)."""
        if not self.breaker.allow():
            self.counts["skipped"] += 1
            self.count("moderation_cache_backend_errors_total", op=op, kind="skipped")
            return _DOWN
        try:
            out = fn()
        except self.errors as e:
            self.counts["errors"] += 1
            self.count("moderation_cache_backend_errors_total", op=op, kind="error")
            if self.breaker.failure():
                self.warn(f"verdict cache: Redis unavailable ({type(e).__name__}: {e}); serving misses, skipping "
                          f"writes until it answers again")
            return _DOWN
        if self.breaker.success():
            self.warn("verdict cache: Redis answers again; shared cache back on")
        return out

    def _base(self, key: tuple) -> str:
        return f"{self.root}:p:{_partition_id(key)}"

    def _candidates(self, key: tuple, settings, caption: str, exact: str | None, dim: int):
        base = self._base(key)
        bucket = f"{base}:lru" if settings.text_threshold is not None else f"{base}:c:{caption}"
        raw = self._lookup(keys=[self._gen, bucket, f"{base}:x:{exact}" if exact else self._gen],
                           args=[base, settings.candidates, "1" if exact else "0"])
        gen, now = raw[0].decode(), int(raw[1])
        entries = []
        for j in range(2, len(raw), 12):
            cid, *fields = raw[j:j + 12]
            try:
                entries.append((cid.decode(), self._entry(base, dim, *fields)))
            except RejectedEntry as e:  # never served, never an error: a miss, counted
                self.counts["rejected"] += 1
                self.count("moderation_cache_rejected_total", reason=e.reason)
        return base, gen, now / 1e3, entries

    def _entry(self, base: str, dim: int, img, txt, fp, t, ver, cap, lt, x, v, r, mac) -> Entry:
        """A candidate as stored, checked: its MAC under this service's key, then its shape."""
        signed = [img or b"", txt or b"", fp or b"", lt or b"", cap or b"", x or b"", v or b"", r or b"", ver or b""]
        if not mac or not hmac.compare_digest(mac, entry_mac(self.mac_key, base, signed)):
            raise RejectedEntry("mac", "the entry's MAC does not verify")
        try:
            image, text, fpv = _vec(img), _vec(txt), _vec(fp)
            if image is None or image.shape[0] != dim:  # another encoder's entry: never a match
                raise ValueError("image embedding of another size")
            if text is not None and text.shape[0] != dim or fp and len(fp) != FINGERPRINT_BYTES \
                    or lt and len(lt) != LOCAL_BYTES:
                raise ValueError("a vector of the wrong size")
            verdict, versions = json.loads(v), json.loads(ver or b"{}")
            if not isinstance(verdict, dict) or not isinstance(versions, dict) \
                    or (r or b"").decode() not in SOURCE_ROUTES:
                raise ValueError("verdict, versions or route")
            return Entry(image, text, (cap or b"").decode(), fpv, verdict, r.decode(), int(t) / 1e3,
                         {str(k): str(val) for k, val in versions.items()}, lt or None)
        except (ValueError, TypeError, UnicodeDecodeError) as e:  # JSONDecodeError and UnicodeDecodeError included
            raise RejectedEntry("schema", f"{type(e).__name__}") from None

    # API (VerdictCache's) -------------------------------------------------------------------------
    def lookup(self, key: tuple, settings, image_emb, text_emb, caption: str, fp=None, still_valid=None,
               exact: str | None = None, seen: dict | None = None, local: bytes | None = None) -> Hit | None:
        image, text, fpu = unit_inputs(image_emb, text_emb, fp)

        def run():
            base, gen, now, entries = self._candidates(key, settings, caption, exact, image.shape[0])
            if seen is not None:
                seen["generation"] = gen
            by_id = dict(entries)
            for i, s, ts, fs, ld in match(entries, settings, image, text, caption, fpu, local):
                e = by_id[i]
                if now - e.stored > settings.ttl_s:
                    continue
                if still_valid is not None and not still_valid(e.versions):
                    self.counts["stale"] += 1
                    continue
                got = self._touch(keys=[self._tick, f"{base}:lru"], args=[base, i])
                if got is None:  # evicted since the candidates were read
                    continue
                # the verdict verified with the candidate (entries are written once, never changed in place)
                return Hit(e.verdict, s, ts, fs, e.source_route, max(0.0, now - e.stored), dict(e.versions), ld)
            return None

        hit = self._call("lookup", run)
        if hit is _DOWN:
            hit = None
            if seen is not None:
                seen["unavailable"] = True
        self.counts["hit" if hit else "miss"] += 1
        return hit

    def store(self, key: tuple, settings, image_emb, text_emb, caption: str, fp, verdict: dict,
              source_route: str = "vlm", versions: dict | None = None, exact: str | None = None,
              generation: str | None = None, local: bytes | None = None) -> bool | None:
        image, text, fpu = unit_inputs(image_emb, text_emb, fp)
        base = self._base(key)
        signed = [_bytes(image), _bytes(text), _bytes(fpu), local or b"", caption.encode(), (exact or "").encode(),
                  json.dumps(stored_verdict(verdict), ensure_ascii=False).encode(), source_route.encode(),
                  json.dumps(dict(versions or {})).encode()]
        keys = [self._gen, self._seq, self._tick, f"{base}:lru", f"{base}:age", f"{base}:c:{caption}",
                f"{base}:x:{exact}" if exact else self._gen]
        args = [base, "" if generation is None else str(generation), max(1, int(settings.ttl_s * 1e3)),
                settings.max_entries, caption, exact or "", *signed[:3], signed[6], signed[7], signed[8], signed[3],
                entry_mac(self.mac_key, base, signed)]
        out = self._call("store", lambda: self._store(keys=keys, args=args))
        if out is _DOWN:
            return None
        new_id, expired, evicted = (int(x) for x in out)
        if new_id < 0:
            self.counts["refused"] += 1
            return False
        self.counts["stored"] += 1
        self.counts["expired"] += expired
        self.counts["evicted"] += evicted
        return True

    def forget(self, key: tuple, settings, image_emb, text_emb, caption: str, fp=None,
               exact: str | None = None, local: bytes | None = None) -> int:
        image, text, fpu = unit_inputs(image_emb, text_emb, fp)

        def run():
            base, _, _, entries = self._candidates(key, settings, caption, exact, image.shape[0])
            ids = [i for i, *_ in match(entries, settings, image, text, caption, fpu, local)]
            if not ids:
                return 0
            return int(self._forget(keys=[f"{base}:lru", f"{base}:age"], args=[base, *ids]))

        n = self._call("forget", run)
        if n is _DOWN:
            return -1
        self.counts["forgotten"] += n
        return n

    def _delete_all(self) -> int:
        """Unlink every key under the prefix (all schema versions) but the counters; returns entries deleted."""
        n, batch = 0, []
        for k in self.redis.scan_iter(match=f"{self.prefix}:v*:p:*", count=1000):
            batch.append(k)
            n += b":e:" in k
            if len(batch) >= 1000:
                self.redis.unlink(*batch)
                batch = []
        if batch:
            self.redis.unlink(*batch)
        return n

    def purge(self) -> int:
        """Empty the shared cache for every replica; raises when Redis cannot be reached (a privacy action must
        not report success it did not have)."""
        self.redis.incr(self._gen)
        return self._delete_all()

    def purge_epoch(self, epoch: str) -> int | None:
        """purge() once per `epoch` (the first clip_gate instance loaded with it); None when another instance
        already did. Raises when Redis cannot be reached, so the reload, and purge-caches with it, fails."""
        if not int(self._epoch_script(keys=[self._epoch, self._gen], args=[epoch])):
            return None
        return self._delete_all()

    def try_purge_epoch(self, epoch: str) -> bool:
        """purge_epoch() behind the breaker (a deferred purge, GateCache.purge_on_load): True once it has run."""
        return self._call("purge", lambda: self.purge_epoch(epoch)) is not _DOWN

    def __len__(self) -> int:
        return sum(1 for _ in self.redis.scan_iter(match=f"{self.root}:p:*:e:*", count=1000))
