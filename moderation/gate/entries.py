"""What both verdict-cache backends share (gate/cache.py in-process, gate/shared_cache.py on Redis): an entry, a
hit, and the one match rule that decides for both."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..core.imaging import local_difference
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
    stored: float  # s: time.monotonic() in-process, Redis server time in the shared cache
    versions: dict = field(default_factory=dict)
    local: bytes | None = None  # core.imaging.local_thumbnail of the post the verdict was given to


@dataclass
class Hit:
    verdict: dict
    similarity: float
    text_similarity: float | None
    fingerprint_similarity: float | None
    source_route: str
    age_s: float
    versions: dict
    local_difference: float | None = None

    def info(self) -> dict:
        """The `cache` object of RESULT."""
        return {"hit": True, "similarity": round(self.similarity, 6), "source_route": self.source_route,
                "age_s": round(self.age_s, 3),
                **({"text_similarity": round(self.text_similarity, 6)} if self.text_similarity is not None else {}),
                **({"fingerprint_similarity": round(self.fingerprint_similarity, 6)}
                   if self.fingerprint_similarity is not None else {}),
                **({"local_difference": round(self.local_difference, 4)}
                   if self.local_difference is not None else {})}


def match(entries: list[tuple[object, Entry]], settings, image, text, caption, fp, local: bytes | None = None
          ) -> list[tuple[object, float, float | None, float | None, float | None]]:
    """(id, image cosine, text cosine, fingerprint cosine, local difference) of every (id, entry) the post matches,
    best image cosine first (ties keep the order given). Inputs are unit vectors (`unit_inputs`) and the post's
    local thumbnail; both backends decide with this. The local check runs last, on the few entries that passed
    the global ones: it is the only one that sees a region pasted into an otherwise identical picture."""
    if not entries:
        return []
    sims = np.stack([e.image for _, e in entries]) @ image
    out = []
    for (i, e), s in zip(entries, sims, strict=True):
        if s < settings.image_threshold:
            continue
        if settings.text_threshold is None and e.caption != caption:  # no text threshold: the same caption
            continue
        ok, ts = _check(settings.text_threshold, e.text, text, _cosine)
        if not ok:
            continue
        ok, fs = _check(settings.fingerprint_threshold, e.fingerprint, fp, _cosine)
        if not ok:
            continue
        ok, ld = _check(settings.local_threshold, e.local, local, local_difference, at_most=True)
        if not ok:
            continue
        out.append((i, float(s), ts, fs, ld))
    return sorted(out, key=lambda m: -m[1])


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b)


def _check(threshold: float | None, stored, query, measure: Callable[[Any, Any], float],
           at_most: bool = False) -> tuple[bool, float | None]:
    """(passes, value) of one of match's optional checks: off (no threshold) passes without a value; an entry or a
    post without the vector fails; else measure(stored, query) is at least the threshold (a cosine) or, at_most, at
    most it (a difference)."""
    if threshold is None:
        return True, None
    if stored is None or query is None:
        return False, None
    value = float(measure(stored, query))
    return (value <= threshold if at_most else value >= threshold), value


def unit_inputs(image_emb, text_emb, fp):
    def unit(x):
        return None if x is None else l2_normalize(np.asarray(x, dtype=np.float32).reshape(-1))

    return unit(image_emb), unit(text_emb), unit(fp)


def stored_verdict(verdict: dict) -> dict:
    """What an entry keeps of a verdict (timings describe the original request, not the ones it answers)."""
    return {k: v for k, v in verdict.items() if k not in _DROP}
