"""Which CLIP a policy's gate thresholds fit, and fitting them for a new one.

The gate turns cosines into label scores with the policy's concept_center / concept_scale (and consistency_*),
then routes on allow_below / block_at. Cosines depend on the CLIP's weights: thresholds fitted for the seeded tiny
CLIP mean nothing for ViT-L/14, whose cosines sit elsewhere. A policy names the CLIP it was calibrated for
(gate.calibrated_for: the sha256 of clip_image's and clip_text's model.onnx from their artifact records,
moderation/repository/served.py); a trained
CLIP it does not name is an "uncalibrated" signal, which the decision treats like an untrained one (it may escalate
and send to review, never allow or block). `clients.evaluate --calibrate-gate` fits new thresholds from labelled
posts with the served encoders, in this process (fit_gate), and proposes them with the served CLIP's identity; an
operator applies them."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core.policy import ClipIdentity, Gate, Policy
from ..core.vectors import l2_normalize
from .scoring import ConceptBank, classifier_labels

UNCALIBRATED = "uncalibrated"
# the score a fitted sigmoid gives the median violating cosine (and 1 - it the median clean one): logit(0.95)
EDGE_LOGIT = math.log(19.0)


class CalibrationError(ValueError):
    """The labelled posts cannot fit the gate (no violating or no clean post, or no separation)."""


def clip_signal(artifact_signal: str, policy: Policy, served: ClipIdentity | None) -> str:
    """The CLIP signal's status under `policy`: untrained stays untrained; a trained CLIP is trained only when the
    policy's gate thresholds were calibrated for it, else uncalibrated."""
    if artifact_signal != "trained":
        return artifact_signal
    calibrated = policy.gate.calibrated_for
    return "trained" if calibrated is not None and calibrated.same_clip(served) else UNCALIBRATED


# fitting -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LabelledCosines:
    """One labelled post as the gate sees it, before any threshold."""
    labels: frozenset[str]        # the labels that apply (empty: a clean post)
    concept: dict[str, float]     # label -> highest cosine between the image and that label's concepts
    consistency: float | None     # cosine(image, caption); None without a caption


def post_cosines(bank: ConceptBank, image_emb: np.ndarray, text_emb: np.ndarray | None) -> tuple[dict, float | None]:
    """(label -> highest concept cosine, image-caption cosine) as gate/scoring.py gate_scores computes them."""
    img = l2_normalize(image_emb)
    concept = {label: float(np.max(c @ img)) for label, c in bank.by_label.items() if len(c)}
    return concept, None if text_emb is None else float(l2_normalize(text_emb) @ img)


def clip_labels(policy: Policy) -> list[str]:
    """The labels the CLIP alone scores: concept labels and `mismatch`, less those a trained signal scores."""
    by_trained = classifier_labels(policy)
    concept = {lab.key for lab in policy.labels if lab.gate_concepts}
    return [k for k in policy.label_keys if k not in by_trained and (k in concept or k == "mismatch")]


def _sigmoid(x: float) -> float:
    return float(1.0 / (1.0 + np.exp(-x)))


def clip_scores(gate: Gate, labels: list[str], post: LabelledCosines) -> dict[str, float]:
    """The gate's label scores of a post under `gate`'s centre and scale (as gate/scoring.py)."""
    out = {}
    for k in labels:
        if k == "mismatch":
            out[k] = 0.0 if post.consistency is None else _sigmoid(
                gate.consistency_scale * (gate.consistency_center - post.consistency))
        elif k in post.concept:
            out[k] = _sigmoid(gate.concept_scale * (post.concept[k] - gate.concept_center))
    return out


def clip_route(gate: Gate, labels: list[str], post: LabelledCosines) -> str:
    """allow / block / escalate by the CLIP's scores alone (gate/scoring.py gate_band without trained signals)."""
    scores = clip_scores(gate, labels, post)
    if any(v >= gate.block_at for k, v in scores.items() if k in gate.block_labels):
        return "block"
    return "allow" if all(v < gate.allow_below for v in scores.values()) else "escalate"


def outcomes(gate: Gate, labels: list[str], posts: list[LabelledCosines]) -> dict:
    """How the labelled posts route under `gate` (truth: a label the CLIP scores applies): allowed / blocked /
    escalated, and how many of each were wrong (a violating post allowed, a clean post blocked)."""
    out = {"n": len(posts), "allowed": 0, "blocked": 0, "escalated": 0, "wrongly_allowed": 0, "wrongly_blocked": 0,
           "escalated_clean": 0, "escalated_violating": 0}
    for p in posts:
        violating = bool(p.labels & set(labels))
        route = clip_route(gate, labels, p)
        out[{"allow": "allowed", "block": "blocked", "escalate": "escalated"}[route]] += 1
        if route == "allow" and violating:
            out["wrongly_allowed"] += 1
        elif route == "block" and not violating:
            out["wrongly_blocked"] += 1
        elif route == "escalate":
            out["escalated_violating" if violating else "escalated_clean"] += 1
    return out


def _centre_and_scale(pos: list[float], neg: list[float], what: str) -> tuple[float, float]:
    """Centre midway between the medians of the violating (`pos`) and clean (`neg`) cosines; a scale that puts the
    medians at 0.95 / 0.05, flatter when the two spread wider than their gap (overlap gives no confident score)."""
    if not pos or not neg:
        raise CalibrationError(f"{what}: need labelled violating and clean posts (got {len(pos)} and {len(neg)})")
    hi, lo = float(np.median(pos)), float(np.median(neg))
    if hi <= lo:
        raise CalibrationError(f"{what}: violating posts do not score above clean ones (median cosine {hi:.4f} "
                               f"<= {lo:.4f}); this CLIP cannot separate these labels")
    spread = math.sqrt((float(np.var(pos)) + float(np.var(neg))) / 2)
    return (hi + lo) / 2, EDGE_LOGIT / max((hi - lo) / 2, spread)


def _between(lo: float | None, hi: float) -> float:
    """A threshold midway between two neighbouring scores (a margin for posts the fit did not see)."""
    return hi if lo is None else round((lo + hi) / 2, 6)


@dataclass
class GateFit:
    gate: Gate                      # the proposed gate section (calibrated_for = the served CLIP)
    labels: list[str]               # the labels the CLIP alone scores
    now: dict                       # outcomes under the policy's current gate
    proposed: dict                  # outcomes under the proposed gate
    notes: list[str] = field(default_factory=list)

    def section(self) -> dict:
        """The policy sections the fit proposes: the gate's scales and centres, and the CLIP's routing band, which
        the policy's signal table holds (signals.clip.route)."""
        gate = self.gate.model_dump(mode="json")
        route = {"review": gate.pop("allow_below"), "block": gate.pop("block_at")}
        return {"gate": gate, "signals": {"clip": {"route": route}}}


def fit_gate(policy: Policy, posts: list[LabelledCosines], served: ClipIdentity,
             target_precision: float = 0.95) -> GateFit:
    """Fit the gate for `served` from labelled posts: the concept centre and scale from the cosines of each CLIP
    label's concepts on posts with and without it (pooled over labels: one centre for all, as the gate has), the
    consistency centre and scale from `mismatch` posts when any are labelled; then block_at, the lowest score at
    which the posts blocked are violating with `target_precision`, and allow_below, the highest (not above
    block_at) at which the posts allowed are clean with `target_precision`."""
    labels = clip_labels(policy)
    concept_labels = [k for k in labels if k != "mismatch"]
    pos = [p.concept[k] for p in posts for k in concept_labels if k in p.concept and k in p.labels]
    neg = [p.concept[k] for p in posts for k in concept_labels if k in p.concept and k not in p.labels]
    center, scale = _centre_and_scale(pos, neg, "concept cosines")
    update = {"calibrated_for": served, "concept_center": round(center, 6), "concept_scale": round(scale, 4)}
    notes = []
    if "mismatch" in labels:
        with_caption = [(p, p.consistency) for p in posts if p.consistency is not None]
        mpos = [-c for p, c in with_caption if "mismatch" in p.labels]  # low consistency = mismatch
        mneg = [-c for p, c in with_caption if "mismatch" not in p.labels]
        try:
            c, s = _centre_and_scale(mpos, mneg, "image-caption consistency")
            update |= {"consistency_center": round(-c, 6), "consistency_scale": round(s, 4)}
        except CalibrationError as e:
            notes.append(f"consistency kept as it is: {e}")
    draft = Gate.model_validate({**policy.gate.model_dump(), **update, "allow_below": 0.0, "block_at": 1.01})
    scored = [(bool(p.labels & set(labels)), clip_scores(draft, labels, p)) for p in posts]
    blockable = [(v, max([s for k, s in sc.items() if k in draft.block_labels], default=0.0)) for v, sc in scored]
    block_at, ladder = 1.01, sorted({b for _, b in blockable})
    for i, t in enumerate(ladder):  # the lowest block threshold that is precise enough
        hit = [v for v, b in blockable if b >= t]
        if hit and sum(hit) / len(hit) >= target_precision:
            block_at = _between(ladder[i - 1] if i else None, t)
            break
    if block_at > 1.0:
        notes.append(f"no score blocks with precision >= {target_precision} on these posts: the gate never blocks")
    top = [(v, max(sc.values(), default=0.0)) for v, sc in scored]
    allow_below, ladder = 0.0, sorted({s for _, s in top if s < block_at})
    for i in range(len(ladder), 0, -1):  # the highest allow threshold (below block_at) that is precise enough
        allowed = [v for v, s in top if s <= ladder[i - 1]]
        if sum(not v for v in allowed) / len(allowed) >= target_precision:
            allow_below = _between(ladder[i - 1], ladder[i] if i < len(ladder) else block_at)
            break
    gate = Gate.model_validate({**draft.model_dump(), "allow_below": allow_below, "block_at": block_at})
    return GateFit(gate, labels, outcomes(policy.gate, labels, posts), outcomes(gate, labels, posts), notes)


# the served encoders, in this process -------------------------------------------------------------------------
class ServedClip:
    """The gate's cosines of posts with the served CLIP: preprocess's pixels and tokens, clip_image's and
    clip_text's model.onnx through onnxruntime, the policy's concept bank (the code the server runs).
    `version_dirs`: the served version directory of preprocess, clip_gate, clip_image and clip_text."""

    MODELS = ("preprocess", "clip_gate", "clip_image", "clip_text")

    def __init__(self, version_dirs: dict[str, Path], identity: ClipIdentity):
        import onnxruntime as ort

        from .inputs import ClipTokens, Preprocess

        self.identity = identity
        pre = Path(version_dirs["preprocess"])
        self.preprocess = Preprocess(str(pre / "clip"), pre.name)
        self.tokens = ClipTokens(str(Path(version_dirs["clip_gate"]) / "clip"))
        self.image = ort.InferenceSession(str(Path(version_dirs["clip_image"]) / "model.onnx"),
                                          providers=["CPUExecutionProvider"])
        self.text = ort.InferenceSession(str(Path(version_dirs["clip_text"]) / "model.onnx"),
                                         providers=["CPUExecutionProvider"])

    def bank(self, policy: Policy) -> ConceptBank:
        texts = [t for _, t in ConceptBank.concept_texts(policy)]
        if not texts:
            return ConceptBank.from_embeddings(policy, None)
        ids, mask = self.tokens(texts)
        return ConceptBank.from_embeddings(policy, self.text.run(["TEXT_EMBEDS"], {"input_ids": ids,
                                                                                  "attention_mask": mask})[0])

    def cosines(self, policy: Policy, bank: ConceptBank, image: bytes, caption: str,
                labels: list[str]) -> LabelledCosines:
        import time

        opts = json.dumps({"policy": policy.name, "ocr": False}).encode()
        inputs = self.preprocess(image, caption.encode("utf-8"), opts, time.time(), time.perf_counter())
        img = self.image.run(["IMAGE_EMBEDS"], {"pixel_values": inputs.clip_pixels[None]})[0][0]
        txt = None
        if inputs.record.has_caption:
            txt = self.text.run(["TEXT_EMBEDS"], {"input_ids": inputs.clip_input_ids[None],
                                                  "attention_mask": inputs.clip_attention_mask[None]})[0][0]
        concept, consistency = post_cosines(bank, img, txt)
        return LabelledCosines(frozenset(labels), concept, consistency)
