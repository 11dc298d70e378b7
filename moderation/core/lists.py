"""Matching a post against its policy's custom lists (policy.lists): images by PDQ hash, terms in the caption.
Hits are trained-grade evidence: an operator wrote them. Editing the lists is moderation/ops/lists.py."""
from __future__ import annotations

import functools
from dataclasses import dataclass

from .image_match import index_for
from .policy import Policy
from .terms import TermMatcher


@dataclass(frozen=True)
class ListHit:
    kind: str          # "image" | "term"
    list: str          # "block" | "allow" | "review"
    id: str
    label: str | None
    field: str         # what matched: "image", or the text field ("caption")
    detail: dict       # image: {"distance"}; term: {"span": [start, end] in the field's text, "variant"}

    def to_dict(self) -> dict:
        return {"kind": self.kind, "list": self.list, "id": self.id, "label": self.label, "field": self.field,
                **self.detail}


def image_hits(policy: Policy, pdq: str | None) -> list[ListHit]:
    """Entries whose nearest stored hash (any window of the entry's image: core/image_match.py) is within the
    policy's distance (none for an image without a hash)."""
    if not pdq:
        return []
    images = policy.lists.images
    if not images:
        return []
    limit, hits = policy.decisions.image_match_distance, []
    for e, d in zip(images, index_for(images).distances(pdq).tolist(), strict=True):
        if d <= limit:
            hits.append(ListHit("image", e.list, e.id, e.label, "image", {"distance": d}))
    return hits


def evidence_place(image: int | None, frame: int | None) -> dict[str, int]:
    """Where in a post a piece of evidence came from: its `image` and `frame`, each only where it applies (None: a
    post of one image, a still image; core/post.py judged_items)."""
    return {k: v for k, v in (("image", image), ("frame", frame)) if v is not None}


def media_hits(hits_per_item: list[tuple[int | None, int | None, list[ListHit]]]) -> list[ListHit]:
    """The hits of every image and frame of a post as one list: each entry once, from the item it matched first
    (by the smallest distance for an image entry), with that `image` and `frame` in its detail where not None (a
    post of one image names no image, a still names no frame)."""
    best: dict[tuple[str, str], ListHit] = {}
    for image, frame, hits in hits_per_item:
        where = evidence_place(image, frame)
        for h in hits:
            if where:
                h = ListHit(h.kind, h.list, h.id, h.label, h.field, {**h.detail, **where})
            key = (h.kind, h.id)
            old = best.get(key)
            if old is None or h.detail.get("distance", 0) < old.detail.get("distance", 0):
                best[key] = h
    return list(best.values())


@functools.lru_cache(maxsize=64)
def _matcher(policy_name: str, revision: int, digest: str, terms: tuple[tuple[str, str], ...]) -> TermMatcher:
    return TermMatcher(list(terms))


def term_hits(policy: Policy, text: str, field: str = "caption") -> list[ListHit]:
    """Every term entry found in `text`, with the variant it was written in (core/terms.py)."""
    if not policy.lists.terms or not text:
        return []
    entries = {e.id: e for e in policy.lists.terms}
    matcher = _matcher(policy.name, policy.lists.revision, policy.digest,
                       tuple((e.id, e.term) for e in policy.lists.terms))
    return [ListHit("term", entries[h.entry_id].list, h.entry_id, entries[h.entry_id].label, field,
                    {"span": list(h.span), "variant": h.variant}) for h in matcher.match(text)]
