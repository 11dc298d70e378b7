"""RESULT and the audit row of one judged post, from what preprocess recorded and what the gate decided: the
contracts of core/result_contract.py (the schema generated from them ships in
moderation/core/schemas/result.schema.json). postprocess and the in-process benchmark both call finish_post()."""
from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass
from operator import itemgetter

import jsonschema
from pydantic import BaseModel

from .contracts import CACHE, VLM, GateDecision, PostError, RequestRecord
from .decision import Decision, choose_action
from .pinned import pinned_policy
from .policy import Policy
from .result_contract import SCHEMA_PATH, FailedResult, JudgedResult

__all__ = ["SCHEMA_PATH", "FinishedPost", "build_result", "finish_post", "validate_result"]


@functools.lru_cache(maxsize=1)
def _validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(json.loads(SCHEMA_PATH.read_text(encoding="utf-8")))


def validate_result(result: dict | BaseModel) -> dict:
    """Raise jsonschema.ValidationError when `result` (RESULT's JSON form, or its contract) does not follow the
    schema; return its JSON form otherwise."""
    if isinstance(result, BaseModel):
        result = result.model_dump(mode="json")
    _validator().validate(result)
    return result


def build_result(policy: Policy, record: RequestRecord, gate: GateDecision, versions: dict[str, str],
                 latency_ms: dict[str, float], decision: Decision | None = None) -> JudgedResult:
    """Combine the gate's decision, the decoder's answer for escalated posts and list hits into RESULT
    (`decision`: the action already chosen for this post, else chosen here)."""
    route, gate_scores, vlm = gate.route, gate.scores, gate.vlm
    decision = decision or choose_action(policy, gate, record.list_hits, record.image_text_truncated)
    if route in (VLM, CACHE) and vlm:  # CACHE: an earlier VLM verdict of a near-duplicate post
        signal, source = "vlm", "vlm"
        sent = max(vlm.sentiment, key=vlm.sentiment.__getitem__)
        sentiment = {"label": sent, "score": vlm.sentiment[sent]}
        description = vlm.description
        scores = {**vlm.labels, "violation": vlm.violation}
    else:
        scores = dict(gate_scores)
        signal, source = "clip", "clip_gate"
        sentiment, description = None, None
    # A trained gate signal (e.g. nsfw_image) names itself and is listed from its own band. It also outranks an
    # untrained VLM on its own label (trained beats untrained); a trained VLM keeps its judgement.
    sources: dict[str, str] = {}
    if source == "clip_gate" or (vlm and vlm.untrained):
        sources = gate.sources
        if source == "vlm":
            scores = {**scores, **{k: gate_scores[k] for k in sources if k in gate_scores}}
    labels = sorted(({"name": k, "score": v, "source": sources.get(k, source)} for k, v in scores.items()
                     if k in policy.label_keys and v >= policy.listed_from(sources.get(k, signal), k)),
                    key=itemgetter("score"), reverse=True)
    signals = dict(gate.signals)
    if route in (VLM, CACHE):
        signals["vlm"] = "untrained" if vlm and vlm.untrained else "trained"
    return JudgedResult(
        request_id=record.request_id,
        action=decision.action,
        decided_by=decision.decided_by,
        severity=decision.severity,
        decision={"reason": decision.reason, "list_hit": decision.list_hit},
        violation=decision.action == "block",
        labels=labels,
        sentiment=sentiment,
        description=description,
        route=route,
        scores={k: float(v) for k, v in scores.items()},
        # band: what the gate's thresholds said (allow / block / escalate), evidence beside the action
        gate={"band": gate.band, "scores": gate_scores, "consistency": gate.consistency, "reason": gate.reason,
              "sources": gate.sources},
        model_versions=versions,
        latency_ms={k: round(float(v), 3) for k, v in latency_ms.items()},
        untrained=any(v == "untrained" for v in signals.values()),
        signals=signals,
        policy=record.policy_id,
        hashes={"image_sha256": record.image_sha256, "text_sha256": record.text_sha256},
        caption_truncated={"clip": record.caption_truncated, "vlm": vlm.caption_truncated if vlm else None},
        list_hits=record.list_hits,
        image_text=None if record.image_text is None else {"lines": record.image_text,
                                                           "truncated": record.image_text_truncated},
        escalated=gate.escalated,
        # where an image signal's (or a CLIP-scored label's) reported score came from when not the first image
        # or frame: empty maps are left out
        media={"images": record.media, "signals": gate.signal_media or None, "labels": gate.label_media or None}
        if record.media else None,
        error=None,
        cache=gate.cache,
        ab={"arm": gate.ab_arm, "decoder_version": versions.get("language_decoder", "")} if gate.ab_arm else None,
        fallback=gate.fallback.model_dump() if gate.fallback else None,
    )


@dataclass(frozen=True)
class FinishedPost:
    contract: JudgedResult | FailedResult  # RESULT
    result: dict       # RESULT's JSON form, schema-validated
    audit_row: dict
    scores: list[float]  # SCORES: one per policy label, in policy order
    verdict: int       # VERDICT: 1 block, 0 allow or review, -1 a post that failed


def _failed_post(record: RequestRecord, error: PostError, versions: dict[str, str], now: float) -> FinishedPost:
    """A post that failed in a request of several posts: its own row, with the error and no action."""
    result = FailedResult(request_id=record.request_id, action=None, error=error.model_dump(), model_versions=versions,
                          latency_ms={"total": round((now - record.received_at) * 1e3, 3)},
                          hashes={"image_sha256": record.image_sha256, "text_sha256": record.text_sha256})
    return FinishedPost(result, validate_result(result), result.audit_row(record.policy_id).model_dump(mode="json"),
                        [], -1)


def finish_post(record: RequestRecord, gate: GateDecision, postprocess_version: str,
                now: float | None = None) -> FinishedPost:
    """RESULT with every stage's version and latency, and the post's audit row (hashes, never content)."""
    now = now or time.time()
    error = record.error or gate.error
    if error is not None:
        return _failed_post(record, error, {"preprocess": record.preprocess_version, "clip_gate": gate.gate_version,
                                            "postprocess": postprocess_version}, now)
    policy = pinned_policy(record.policy_name, record.policy_pin)
    versions = {"preprocess": record.preprocess_version, "clip_gate": gate.gate_version,
                "postprocess": postprocess_version}
    latency = {"preprocess": record.preprocess_ms,
               **({"read_text": record.read_text_ms} if record.read_text_ms is not None else {}),
               "clip_encoders": max(0.0, (gate.gate_started - record.preprocessed_at) * 1e3),
               "gate": gate.gate_ms}
    if record.read_text_version:
        versions["read_text"] = record.read_text_version
    if gate.vlm:
        versions.update(gate.vlm.model_versions)
        if gate.cache and gate.cache.get("hit"):  # a near-duplicate's stored verdict: no VLM ran for this post
            latency["cache_lookup"] = gate.cache["lookup_ms"]
        else:
            latency["vlm"] = gate.vlm_ms or 0.0
            latency.update({f"decoder_{k}": v for k, v in gate.vlm.timings_ms.items()})
    latency["total"] = (now - record.received_at) * 1e3
    decision = choose_action(policy, gate, record.list_hits, record.image_text_truncated)
    result = build_result(policy, record, gate, versions, latency, decision)
    row = result.audit_row([(e.signal, e.label, round(e.score, 6), e.trained) for e in decision.evidence],
                           record.image_format, record.image_size, record.lang)
    return FinishedPost(result, validate_result(result), row.model_dump(mode="json"),
                        [result.scores.get(k, 0.0) for k in policy.label_keys], int(result.action == "block"))
