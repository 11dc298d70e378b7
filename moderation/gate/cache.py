"""Near-duplicate verdict cache: repeated memes and ads (re-encoded, resized, slightly cropped copies with the
same caption) reuse an earlier VLM verdict instead of escalating again.

clip_gate looks a post up only when the gate would escalate it (gate decisions cost less than a lookup), and
stores each fresh VLM verdict. A match needs, within one partition (policy digest, language, describe, A/B arm):

  * CLIP image embedding cosine >= policy `cache.image_threshold`;
  * the caption: the same normalised caption (NFKC, case-folded, whitespace collapsed) when
    `cache.text_threshold` is null, else CLIP text embedding cosine >= text_threshold;
  * a tiny perceptual fingerprint (core.imaging.fingerprint, computed once in preprocess; cosine) >=
    `cache.fingerprint_threshold` when set: a cheap second check against false CLIP matches. The untrained tiny
    CLIP needs it (different photos reach cosine 0.997 there, see docs/performance.md); with a real CLIP it costs
    one thumbnail;
  * local agreement (core.imaging.local_difference <= `cache.local_threshold` when set): the stored and the new
    post's 64x64 thumbnails, aligned, differ in no 8x8 tile, so a caller cannot get another post's verdict for a
    copy with a region of its own pasted in (both global checks barely move for a 2 % patch).

Bounds: each partition is an LRU of at most `cache.max_entries` entries, each entry expires `cache.ttl_s`
after it was stored. Privacy: OPTIONS {"forget": true} evicts every entry the post matches and stores nothing
from it; `purge()` empties everything (clients.admin purge-caches reloads clip_gate: moderation/ops/purge.py).
Thread-safe (one lock); a lookup is one matrix-vector product over a partition.

Backends: this in-process VerdictCache (the default, one per clip_gate instance), or, when MODERATION_REDIS_URL
is set, gate/shared_cache.py's RedisVerdictCache shared by every replica (same API, same matching: gate/entries.py
`match()` decides for both). GateCache picks one when it is built (`verdict_cache()`)."""
from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from ..core.contracts import RequestRecord, VlmVerdict
from ..core.hashing import sha256_hex
from .entries import Entry, Hit, match, stored_verdict, unit_inputs


class _Partition:
    def __init__(self, max_entries: int, ttl_s: float):
        self.max_entries, self.ttl_s = max_entries, ttl_s
        self.entries: OrderedDict[int, Entry] = OrderedDict()


class VerdictCache:
    """Bounded LRU + TTL near-duplicate cache of verdicts, partitioned by (policy digest, lang, describe, arm)."""

    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._parts: dict[tuple, _Partition] = {}
        self._next = 0
        self.generation = 0  # purge() bumps it: a store prepared before a purge is refused
        self.counts = {"hit": 0, "miss": 0, "stored": 0, "evicted": 0, "expired": 0, "forgotten": 0, "stale": 0}

    # internals --------------------------------------------------------------------------------
    def _part(self, key: tuple, settings) -> _Partition:
        p = self._parts.get(key)
        if p is None:
            p = self._parts[key] = _Partition(settings.max_entries, settings.ttl_s)
        p.max_entries, p.ttl_s = settings.max_entries, settings.ttl_s  # a new policy version may change them
        return p

    def _expire(self, p: _Partition) -> None:
        now = self._clock()
        old = [k for k, e in p.entries.items() if now - e.stored > p.ttl_s]
        for k in old:
            del p.entries[k]
        self.counts["expired"] += len(old)

    def _matches(self, p: _Partition, settings, image, text, caption, fp, local) -> list[tuple]:
        return match(list(p.entries.items()), settings, image, text, caption, fp, local)

    @staticmethod
    def _inputs(image_emb, text_emb, fp):
        return unit_inputs(image_emb, text_emb, fp)

    # API --------------------------------------------------------------------------------------
    def lookup(self, key: tuple, settings, image_emb, text_emb, caption: str, fp=None,
               still_valid=None, exact: str | None = None, seen: dict | None = None,
               local: bytes | None = None) -> Hit | None:
        """The best live match, or None. `still_valid(entry.versions) -> bool` drops entries whose models are
        no longer served (e.g. after a decoder swap). `exact` (a hash of the image bytes and caption key) is the
        shared backend's index of byte-identical copies; here every entry of the partition is compared anyway.
        `seen`, when given, receives the cache generation this lookup saw (pass it to store())."""
        image, text, fp = self._inputs(image_emb, text_emb, fp)
        with self._lock:
            if seen is not None:
                seen["generation"] = self.generation
            p = self._part(key, settings)
            self._expire(p)
            for i, s, ts, fs, ld in self._matches(p, settings, image, text, caption, fp, local):
                e = p.entries[i]
                if still_valid is not None and not still_valid(e.versions):
                    del p.entries[i]
                    self.counts["stale"] += 1
                    continue
                p.entries.move_to_end(i)
                self.counts["hit"] += 1
                return Hit(dict(e.verdict), s, ts, fs, e.source_route, self._clock() - e.stored, dict(e.versions),
                           ld)
            self.counts["miss"] += 1
            return None

    def store(self, key: tuple, settings, image_emb, text_emb, caption: str, fp, verdict: dict,
              source_route: str = "vlm", versions: dict | None = None, exact: str | None = None,
              generation: int | None = None, local: bytes | None = None) -> bool:
        """Store a verdict; False (nothing stored) when `generation` is given and a purge happened since."""
        image, text, fp = self._inputs(image_emb, text_emb, fp)
        kept = stored_verdict(verdict)
        with self._lock:
            if generation is not None and generation != self.generation:
                self.counts["refused"] = self.counts.get("refused", 0) + 1
                return False
            p = self._part(key, settings)
            self._next += 1
            p.entries[self._next] = Entry(image, text, caption, fp, kept, source_route, self._clock(),
                                          dict(versions or {}), local)
            self.counts["stored"] += 1
            while len(p.entries) > p.max_entries:
                p.entries.popitem(last=False)
                self.counts["evicted"] += 1
            return True

    def forget(self, key: tuple, settings, image_emb, text_emb, caption: str, fp=None,
               exact: str | None = None, local: bytes | None = None) -> int:
        """Evict every entry this post matches (OPTIONS forget); returns how many."""
        image, text, fp = self._inputs(image_emb, text_emb, fp)
        with self._lock:
            p = self._part(key, settings)
            gone = self._matches(p, settings, image, text, caption, fp, local)
            for i, *_ in gone:
                del p.entries[i]
            self.counts["forgotten"] += len(gone)
            return len(gone)

    def purge(self) -> int:
        with self._lock:
            n = sum(len(p.entries) for p in self._parts.values())
            self._parts.clear()
            self.generation += 1
            return n

    def purge_epoch(self, epoch: str) -> int | None:
        """A purge asked for by a clip_gate reload (ops/purge.py): the reload already started with an empty
        in-process cache, so nothing is left to do."""
        return None

    def try_purge_epoch(self, epoch: str) -> bool:
        return True

    def __len__(self) -> int:
        with self._lock:
            return sum(len(p.entries) for p in self._parts.values())


def partition_key(policy, lang: str, describe: bool, arm: str | None) -> tuple:
    return (policy.name, policy.digest, lang, bool(describe), arm or "")


# clip_gate's side -------------------------------------------------------------------------------
# Models whose version a stored verdict depends on; an entry is dropped once one of them no longer serves it.
VERDICT_MODELS = ("vlm_preprocess", "vision_encoder", "language_decoder", "language_decoder_int8")
REDIS_URL_ENV = "MODERATION_REDIS_URL"


def _no_count(name: str, **labels: str) -> None:
    return None


def verdict_cache(clock=time.monotonic, count=_no_count, warn=print, environ=None):
    """The verdict cache backend the environment names: Redis shared by every replica when MODERATION_REDIS_URL
    is set (gate/shared_cache.py; MODERATION_REDIS_PREFIX, MODERATION_REDIS_TIMEOUT_MS), else in-process."""
    env = os.environ if environ is None else environ
    url = env.get(REDIS_URL_ENV, "").strip()
    if not url:
        return VerdictCache(clock)
    from .shared_cache import RedisVerdictCache

    return RedisVerdictCache.from_env(url, env, count=count, warn=warn)


def exact_key(record: RequestRecord) -> str:
    """The shared cache's index of byte-identical copies: image bytes and caption key (which holds the image's
    words). Such a copy has the same embeddings and fingerprint, so it is also a match by `match()`."""
    return sha256_hex(f"{record.image_sha256}:{record.caption_key}".encode())[:32]


@dataclass
class Probe:
    key: tuple
    settings: object
    image_emb: np.ndarray
    text_emb: np.ndarray
    caption: str
    fingerprint: list[float] | None
    forget: bool
    started: float
    exact: str | None = None
    seen: dict = field(default_factory=dict)  # the cache generation the lookup saw
    local: bytes | None = None  # core.imaging.local_thumbnail of the post


class GateCache:
    """What clip_gate calls: probe() a post it would escalate, lookup() it, and after() its VLM verdict (store,
    or forget when the request asked to). `is_ready(model, version) -> bool` (pb_utils.is_model_ready in the
    server) keeps verdicts of swapped-out model versions from being served. The backend is in-process or Redis
    (`verdict_cache()`); `count` feeds moderation_cache_backend_errors_total, `warn` logs a backend outage."""

    def __init__(self, is_ready=None, clock=time.monotonic, count=_no_count, warn=print, cache=None):
        self.cache = cache if cache is not None else verdict_cache(clock, count=count, warn=warn)
        self.is_ready = is_ready
        self.warn, self.count = warn, count
        self.pending_epoch: str | None = None  # a purge Redis missed: nothing is served or stored until it ran

    @property
    def shared(self) -> bool:
        return not isinstance(self.cache, VerdictCache)

    def probe(self, policy, record: RequestRecord, image_emb, text_emb, arm: str | None = None) -> Probe | None:
        """None when the policy has no cache. The caption key, fingerprint and forget flag come from preprocess."""
        settings = policy.cache
        if not settings.enabled:
            return None
        return Probe(partition_key(policy, record.lang, record.describe, arm), settings, image_emb, text_emb,
                     record.caption_key, record.fingerprint, record.forget, time.perf_counter(),
                     exact_key(record) if record.image_sha256 else None, local=record.local_thumbnail_bytes())

    def _valid(self, versions: dict) -> bool:
        if self.is_ready is None:
            return True
        for model, version in versions.items():
            if model in VERDICT_MODELS and str(version).isdigit() and not self.is_ready(model, str(version)):
                return False
        return True

    def _pending_done(self) -> bool:
        """False while a deferred purge has not run yet (it is tried again, behind the breaker, on every call)."""
        if self.pending_epoch is None:
            return True
        if self.cache.try_purge_epoch(self.pending_epoch):
            self.warn(f"verdict cache: the deferred purge of epoch {self.pending_epoch} ran")
            self.pending_epoch = None
            return True
        return False

    def lookup(self, probe: Probe) -> tuple[VlmVerdict, dict] | None:
        """(verdict, RESULT.cache info) of a hit, or None."""
        if not self._pending_done():
            probe.seen["unavailable"] = True
            return None
        hit = self.cache.lookup(probe.key, probe.settings, probe.image_emb, probe.text_emb, probe.caption,
                                probe.fingerprint, still_valid=self._valid, exact=probe.exact, seen=probe.seen,
                                local=probe.local)
        if hit is None:
            return None
        if probe.forget:
            self.cache.forget(probe.key, probe.settings, probe.image_emb, probe.text_emb, probe.caption,
                              probe.fingerprint, exact=probe.exact, local=probe.local)
        try:
            verdict = VlmVerdict.model_validate(hit.verdict)
        except ValueError:  # a stored verdict that is not a verdict (pydantic's ValidationError): a miss, never served
            self.count("moderation_cache_rejected_total", reason="schema")
            return None
        info = dict(hit.info(), lookup_ms=round((time.perf_counter() - probe.started) * 1e3, 3))
        return verdict, info

    def after(self, probe: Probe, verdict: VlmVerdict) -> dict:
        """Store a fresh verdict (or, for forget, evict what it matches); returns RESULT.cache info of a miss.
        `unavailable: true` says the shared backend could not be reached (nothing stored or forgotten)."""
        if not self._pending_done():
            return {"hit": False, "stored": False, "unavailable": True}
        if probe.forget:
            n = self.cache.forget(probe.key, probe.settings, probe.image_emb, probe.text_emb, probe.caption,
                                  probe.fingerprint, exact=probe.exact, local=probe.local)
            info = {"hit": False, "stored": False, "forgotten": max(n, 0)}
            return {**info, "unavailable": True} if n < 0 else info
        versions = {k: v for k, v in verdict.model_versions.items() if k in VERDICT_MODELS}
        stored = self.cache.store(probe.key, probe.settings, probe.image_emb, probe.text_emb, probe.caption,
                                  probe.fingerprint, verdict.model_dump(), "vlm", versions, exact=probe.exact,
                                  generation=probe.seen.get("generation"), local=probe.local)
        info = {"hit": False, "stored": stored is True}
        return {**info, "unavailable": True} if stored is None else info

    def purge_on_load(self, epoch: str, now: float | None = None) -> int | None:
        """clip_gate loaded with a `verdict_cache_epoch` parameter: empty the shared backend once per epoch (every
        instance and replica loaded with it sees the same one); the entries purged, or None when another did.

        The parameter stays in the live config, so later reloads (the stub watchdog, a swap) carry it too. When
        Redis cannot be reached: a fresh epoch (issued less than PURGE_FRESH_S ago: this is clients.admin
        purge-caches) raises, so the reload and the purge report the failure; an older one is deferred, so the
        reload succeeds, and until the purge has run this instance serves and stores nothing."""
        try:
            return self.cache.purge_epoch(epoch)
        except Exception:  # any backend failure: decide below whether the reload may go on
            issued = epoch_time(epoch)
            now = time.time() if now is None else now
            if issued is None or now - issued < PURGE_FRESH_S:
                raise
            self.pending_epoch = epoch
            self.warn(f"verdict cache: Redis unavailable at load; the purge of epoch {epoch} waits for it")
            return None


PURGE_FRESH_S = 120.0


def epoch_time(epoch: str) -> float | None:
    """When ops/purge.py issued an epoch (time.time_ns() as text), in seconds; None for another format."""
    return int(epoch) / 1e9 if epoch.isdigit() else None
