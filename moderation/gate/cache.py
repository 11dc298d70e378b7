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
    one thumbnail.

Bounds: each partition is an LRU of at most `cache.max_entries` entries, each entry expires `cache.ttl_s`
after it was stored. Privacy: OPTIONS {"forget": true} evicts every entry the post matches and stores nothing
from it; `purge()` empties everything (clients.admin purge-caches reloads clip_gate: moderation/ops/purge.py).
Thread-safe (one lock); a lookup is one matrix-vector product over a partition."""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from ..core.contracts import RequestRecord, VlmVerdict
from ..core.vectors import l2_normalize

# Timings describe the original request, not the one a stored verdict answers.
_DROP = ("timings_ms",)


@dataclass
class Entry:
    image: np.ndarray
    text: np.ndarray | None
    caption: str
    fingerprint: np.ndarray | None
    verdict: dict
    source_route: str
    stored: float  # time.monotonic()
    versions: dict = field(default_factory=dict)


@dataclass
class Hit:
    verdict: dict
    similarity: float
    text_similarity: float | None
    fingerprint_similarity: float | None
    source_route: str
    age_s: float
    versions: dict

    def info(self) -> dict:
        """The `cache` object of RESULT."""
        return {"hit": True, "similarity": round(self.similarity, 6), "source_route": self.source_route,
                "age_s": round(self.age_s, 3),
                **({"text_similarity": round(self.text_similarity, 6)} if self.text_similarity is not None else {}),
                **({"fingerprint_similarity": round(self.fingerprint_similarity, 6)}
                   if self.fingerprint_similarity is not None else {})}


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

    def _matches(self, p: _Partition, settings, image, text, caption, fp) -> list[tuple[int, float, float | None,
                                                                                        float | None]]:
        """(id, image cosine, text cosine, fingerprint cosine) of every entry the post matches, best first."""
        if not p.entries:
            return []
        ids = list(p.entries)
        ents = [p.entries[i] for i in ids]
        sims = np.stack([e.image for e in ents]) @ image
        out = []
        for i, e, s in zip(ids, ents, sims, strict=False):
            if s < settings.image_threshold:
                continue
            ts = None
            if settings.text_threshold is None:
                if e.caption != caption:
                    continue
            else:
                if text is None or e.text is None:
                    continue
                ts = float(e.text @ text)
                if ts < settings.text_threshold:
                    continue
            fs = None
            if settings.fingerprint_threshold is not None:
                if fp is None or e.fingerprint is None:
                    continue
                fs = float(e.fingerprint @ fp)
                if fs < settings.fingerprint_threshold:
                    continue
            out.append((i, float(s), ts, fs))
        return sorted(out, key=lambda m: -m[1])

    @staticmethod
    def _inputs(image_emb, text_emb, fp):
        def unit(x):
            return None if x is None else l2_normalize(np.asarray(x, dtype=np.float32).reshape(-1))

        return unit(image_emb), unit(text_emb), unit(fp)

    # API --------------------------------------------------------------------------------------
    def lookup(self, key: tuple, settings, image_emb, text_emb, caption: str, fp=None,
               still_valid=None) -> Hit | None:
        """The best live match, or None. `still_valid(entry.versions) -> bool` drops entries whose models are
        no longer served (e.g. after a decoder swap)."""
        image, text, fp = self._inputs(image_emb, text_emb, fp)
        with self._lock:
            p = self._part(key, settings)
            self._expire(p)
            for i, s, ts, fs in self._matches(p, settings, image, text, caption, fp):
                e = p.entries[i]
                if still_valid is not None and not still_valid(e.versions):
                    del p.entries[i]
                    self.counts["stale"] += 1
                    continue
                p.entries.move_to_end(i)
                self.counts["hit"] += 1
                return Hit(dict(e.verdict), s, ts, fs, e.source_route, self._clock() - e.stored, dict(e.versions))
            self.counts["miss"] += 1
            return None

    def store(self, key: tuple, settings, image_emb, text_emb, caption: str, fp, verdict: dict,
              source_route: str = "vlm", versions: dict | None = None) -> None:
        image, text, fp = self._inputs(image_emb, text_emb, fp)
        kept = {k: v for k, v in verdict.items() if k not in _DROP}
        with self._lock:
            p = self._part(key, settings)
            self._next += 1
            p.entries[self._next] = Entry(image, text, caption, fp, kept, source_route, self._clock(),
                                          dict(versions or {}))
            self.counts["stored"] += 1
            while len(p.entries) > p.max_entries:
                p.entries.popitem(last=False)
                self.counts["evicted"] += 1

    def forget(self, key: tuple, settings, image_emb, text_emb, caption: str, fp=None) -> int:
        """Evict every entry this post matches (OPTIONS forget); returns how many."""
        image, text, fp = self._inputs(image_emb, text_emb, fp)
        with self._lock:
            p = self._part(key, settings)
            gone = self._matches(p, settings, image, text, caption, fp)
            for i, *_ in gone:
                del p.entries[i]
            self.counts["forgotten"] += len(gone)
            return len(gone)

    def purge(self) -> int:
        with self._lock:
            n = sum(len(p.entries) for p in self._parts.values())
            self._parts.clear()
            return n

    def __len__(self) -> int:
        with self._lock:
            return sum(len(p.entries) for p in self._parts.values())


def partition_key(policy, lang: str, describe: bool, arm: str | None) -> tuple:
    return (policy.name, policy.digest, lang, bool(describe), arm or "")


# clip_gate's side -------------------------------------------------------------------------------
# Models whose version a stored verdict depends on; an entry is dropped once one of them no longer serves it.
VERDICT_MODELS = ("vlm_preprocess", "vision_encoder", "language_decoder", "language_decoder_int8")


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


class GateCache:
    """What clip_gate calls: probe() a post it would escalate, lookup() it, and after() its VLM verdict (store,
    or forget when the request asked to). `is_ready(model, version) -> bool` (pb_utils.is_model_ready in the
    server) keeps verdicts of swapped-out model versions from being served."""

    def __init__(self, is_ready=None, clock=time.monotonic):
        self.cache = VerdictCache(clock)
        self.is_ready = is_ready

    def probe(self, policy, record: RequestRecord, image_emb, text_emb, arm: str | None = None) -> Probe | None:
        """None when the policy has no cache. The caption key, fingerprint and forget flag come from preprocess."""
        settings = policy.cache
        if not settings.enabled:
            return None
        return Probe(partition_key(policy, record.lang, record.describe, arm), settings, image_emb, text_emb,
                     record.caption_key, record.fingerprint, record.forget, time.perf_counter())

    def _valid(self, versions: dict) -> bool:
        if self.is_ready is None:
            return True
        for model, version in versions.items():
            if model in VERDICT_MODELS and str(version).isdigit() and not self.is_ready(model, str(version)):
                return False
        return True

    def lookup(self, probe: Probe) -> tuple[VlmVerdict, dict] | None:
        """(verdict, RESULT.cache info) of a hit, or None."""
        hit = self.cache.lookup(probe.key, probe.settings, probe.image_emb, probe.text_emb, probe.caption,
                                probe.fingerprint, still_valid=self._valid)
        if hit is None:
            return None
        if probe.forget:
            self.cache.forget(probe.key, probe.settings, probe.image_emb, probe.text_emb, probe.caption,
                              probe.fingerprint)
        info = dict(hit.info(), lookup_ms=round((time.perf_counter() - probe.started) * 1e3, 3))
        return VlmVerdict.model_validate(hit.verdict), info

    def after(self, probe: Probe, verdict: VlmVerdict) -> dict:
        """Store a fresh verdict (or, for forget, evict what it matches); returns RESULT.cache info of a miss."""
        if probe.forget:
            n = self.cache.forget(probe.key, probe.settings, probe.image_emb, probe.text_emb, probe.caption,
                                  probe.fingerprint)
            return {"hit": False, "stored": False, "forgotten": n}
        versions = {k: v for k, v in verdict.model_versions.items() if k in VERDICT_MODELS}
        self.cache.store(probe.key, probe.settings, probe.image_emb, probe.text_emb, probe.caption,
                         probe.fingerprint, verdict.model_dump(), "vlm", versions)
        return {"hit": False, "stored": True}
