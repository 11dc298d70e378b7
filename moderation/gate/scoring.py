"""The CLIP gate: concept-bank similarities (as in Stable Diffusion's safety checker) plus image-caption
consistency, turned into per-label scores (gate_scores) and the gate's band, allow / block / escalate, by the
policy's thresholds (gate_band). The band routes a post (escalate: to the VLM); the action is chosen elsewhere
(core/decision.py)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..core.contracts import ALLOW, BLOCK, ESCALATE
from ..core.policy import Policy
from ..core.vectors import l2_normalize

NSFW_SOURCE = "nsfw_image"  # the trained image-safety model's name, used as the score's source


def classifier_labels(policy: Policy) -> set[str]:
    """The labels a classifier of the policy's signal table scores instead of the CLIP concept bank."""
    return {label for labels in policy.signal_labels().values() for label in labels}


def _sigmoid(x: float) -> float:
    return float(1.0 / (1.0 + np.exp(-x)))


@dataclass
class ConceptBank:
    """Normalised CLIP text embeddings of every gate concept, grouped by label."""
    policy_digest: str
    by_label: dict[str, np.ndarray]

    @staticmethod
    def concept_texts(policy: Policy) -> list[tuple[str, str]]:
        return [(lab.key, c) for lab in policy.labels for c in lab.gate_concepts]

    @classmethod
    def from_embeddings(cls, policy: Policy, embeddings: np.ndarray | None) -> ConceptBank:
        """`embeddings`: one row per concept_texts() entry; None for a policy without gate concepts."""
        pairs = cls.concept_texts(policy)
        by_label: dict[str, list] = {}
        if pairs:
            for (label, _), e in zip(pairs, l2_normalize(embeddings), strict=True):
                by_label.setdefault(label, []).append(e)
        return cls(policy.digest, {k: np.stack(v) for k, v in by_label.items()})


def gate_scores(policy: Policy, bank: ConceptBank, image_embs: np.ndarray, text_emb: np.ndarray | None,
                trained: dict[str, float] | None = None) -> tuple[dict[str, float], float | None, dict[str, int]]:
    """Per-label scores (concept bank, consistency for `mismatch`) over a post's images and frames (`image_embs`,
    [rows, d]; one row for a single picture); a trained signal's score (`trained`: {signal: score}) replaces the
    concept score of its label: trained beats untrained. A label scores its largest concept similarity over the rows
    (the riskiest picture); consistency is the caption's best match over them (a caption that fits one of the
    pictures is not a mismatch). Also {label: row} for each concept-bank label whose score came from a row other than
    the first."""
    g = policy.gate
    img = l2_normalize(image_embs)
    scores: dict[str, float] = {}
    rows: dict[str, int] = {}
    for lab in policy.labels:
        concepts = bank.by_label.get(lab.key)
        if concepts is not None and len(concepts):
            per_row = (img @ concepts.T).max(axis=1)
            best = int(np.argmax(per_row))
            scores[lab.key] = _sigmoid(g.concept_scale * (float(per_row[best]) - g.concept_center))
            if best:
                rows[lab.key] = best
        else:
            scores[lab.key] = 0.0
    consistency = None
    if text_emb is not None:
        fit = img @ l2_normalize(text_emb)
        best = int(np.argmax(fit))
        consistency = float(fit[best])
        if "mismatch" in scores:
            scores["mismatch"] = _sigmoid(g.consistency_scale * (g.consistency_center - consistency))
            rows.pop("mismatch", None)
            if best:
                rows["mismatch"] = best
    for label, source in score_sources(policy, trained).items():  # none without trained signals
        scores[label] = float((trained or {})[source])
        rows.pop(label, None)
    return scores, consistency, rows


def score_sources(policy: Policy, trained: dict[str, float] | None) -> dict[str, str]:
    """{label: source} for labels scored by a classifier of the signal table (policy `signals`, entries with
    labels) instead of the CLIP concept bank; a label two of them score keeps the first in the table."""
    out: dict[str, str] = {}
    for source, labels in policy.signal_labels().items():
        if (trained or {}).get(source) is not None:
            for label in labels:
                out.setdefault(label, source)
    return out


def thresholds(policy: Policy, label: str, sources: dict[str, str] | None = None) -> tuple[float, float]:
    """(allow_below, block_at) for one label: the routing band of the signal that scored it (Policy.route_band: a
    classifier's one band, so its route and its action agree; the concept bank's route for the rest)."""
    band = policy.route_band((sources or {}).get(label, "clip"), label)
    return band.review, band.block


def gate_band(policy: Policy, scores: dict[str, float], sources: dict[str, str] | None = None) -> tuple[str, str]:
    """(band, reason): block when a blockable label reaches its block threshold, allow when every label is below
    its allow threshold, escalate otherwise. Labels in `sources` use that signal's thresholds (see thresholds())."""
    g = policy.gate
    th = {k: thresholds(policy, k, sources) for k in scores}
    blocking = {k: v for k, v in scores.items() if k in g.block_labels and v >= th[k][1]}
    if blocking:
        top = max(blocking, key=blocking.__getitem__)
        via = f" ({sources[top]})" if sources and top in sources else ""
        return BLOCK, f"{top} score {blocking[top]:.3f}{via} >= block_at {th[top][1]}"
    ambiguous = {k: v for k, v in scores.items() if v >= th[k][0]}
    if not ambiguous:
        trained = "".join(f", {lab} from {src} below {th[lab][0]}" for lab, src in (sources or {}).items())
        return ALLOW, f"every label score below its allow threshold (allow_below {g.allow_below}{trained})"
    top = max(ambiguous, key=ambiguous.__getitem__)
    via = f" ({sources[top]})" if sources and top in sources else ""
    return ESCALATE, (f"{top} score {scores[top]:.3f}{via} is ambiguous "
                      f"(between {th[top][0]} and {th[top][1]})")


def judge(policy: Policy, bank: ConceptBank, image_emb, text_emb, has_caption: bool,
          trained: dict[str, float] | None = None) -> dict:
    """The gate's fields for one post: band, reason, scores, consistency, the labels a trained signal scored
    (sources), and gate_scores' label rows. `trained`: {signal: score};
    `image_emb`: one embedding or one row per image and frame."""
    scores, consistency, rows = gate_scores(policy, bank, np.atleast_2d(image_emb), text_emb if has_caption else None,
                                            trained)
    sources = score_sources(policy, trained)
    band, reason = gate_band(policy, scores, sources)
    return {"band": band, "reason": reason, "scores": scores, "consistency": consistency, "sources": sources,
            "label_rows": rows}
