"""Build and validate the RESULT object (the schema ships in moderation/schemas/result.schema.json)."""
from __future__ import annotations

import functools
import json
from pathlib import Path

import jsonschema

from .gate import BLOCK
from .policy import Policy

SCHEMA_PATH = Path(__file__).parent / "schemas" / "result.schema.json"


@functools.lru_cache(maxsize=1)
def _validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(json.loads(SCHEMA_PATH.read_text()))


def validate_result(result: dict) -> dict:
    """Raise jsonschema.ValidationError when `result` does not follow the schema; return it otherwise."""
    _validator().validate(result)
    return result


def build_result(policy: Policy, request: dict, gate: dict, versions: dict[str, str],
                 latency_ms: dict[str, float]) -> dict:
    """Combine the gate's decision and, for escalated posts, the decoder's answer into RESULT."""
    route = gate["route"]
    gate_scores = gate["scores"]
    vlm = gate.get("vlm")
    if route in ("vlm", "cache") and vlm:  # "cache": an earlier VLM verdict of a near-duplicate post
        scores = vlm["labels"]
        violation = vlm["violation"] >= policy.decoder.violation_threshold
        threshold, source = policy.decoder.label_threshold, "vlm"
        sent = max(vlm["sentiment"], key=vlm["sentiment"].get)
        sentiment = {"label": sent, "score": vlm["sentiment"][sent]}
        description = vlm.get("description")
        scores = {**scores, "violation": vlm["violation"]}
    else:
        scores = dict(gate_scores)
        violation = route == BLOCK
        threshold, source = policy.gate.allow_below, "clip_gate"
        sentiment, description = None, None
    # A trained gate signal (e.g. nsfw_image) names itself and its own threshold. It also outranks an untrained
    # VLM on its own label (trained beats untrained); a trained VLM keeps its judgement.
    sources, own = {}, {}
    if source == "clip_gate" or (vlm and vlm.get("untrained")):
        sources, own = gate.get("sources", {}), gate.get("thresholds", {})
        if source == "vlm":
            scores = {**scores, **{k: gate_scores[k] for k in sources if k in gate_scores}}
    labels = sorted(({"name": k, "score": v, "source": sources.get(k, source)} for k, v in scores.items()
                     if k in policy.label_keys and v >= own.get(k, threshold)), key=lambda x: -x["score"])
    signals = dict(gate.get("signals", {}))
    if route in ("vlm", "cache"):
        signals["vlm"] = "untrained" if vlm and vlm.get("untrained") else "trained"
    return {
        "request_id": request["request_id"],
        "violation": bool(violation),
        "labels": labels,
        "sentiment": sentiment,
        "description": description,
        "route": route,
        "scores": {k: float(v) for k, v in scores.items()},
        "gate": {"scores": gate_scores, "consistency": gate.get("consistency"), "reason": gate.get("reason", ""),
                 "sources": gate.get("sources", {})},
        "model_versions": versions,
        "latency_ms": {k: round(float(v), 3) for k, v in latency_ms.items()},
        "untrained": any(v == "untrained" for v in signals.values()),
        "signals": signals,
        "policy": policy.id,
        "hashes": {"image_sha256": request.get("image_sha256", ""), "text_sha256": request.get("text_sha256", "")},
        "error": None,
        # the verdict cache's answer for posts the gate escalated under a policy with `cache.enabled`
        **({"cache": gate["cache"]} if gate.get("cache") else {}),
        **({"ab": {"arm": vlm["ab_arm"], "decoder_version": versions.get("language_decoder", "")}}
           if vlm and vlm.get("ab_arm") else {}),
        # set only when the gate sent this post to the INT8 decoder at peak (policy decoder.fallback)
        **({"fallback": {k: vlm["fallback"][k] for k in ("model", "reason", "inflight", "oldest_wait_ms")}}
           if vlm and vlm.get("fallback") else {}),
    }
