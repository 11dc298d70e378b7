"""What a judged post was decided on, in words, for every kind of evidence a RESULT or an audit row carries: an
image-list hit (an operator's PDQ entry, with its Hamming distance), a term-list hit (the variant the term was written
in and the field it was found in: the caption or the text read in the image), a model signal (open_nsfw, CLIP, the
VLM, profanity) and a cache hit (a near-duplicate post's stored verdict). The demo, clients.moderate, clients.report
and clients.evaluate all read evidence through here, so a new kind of hit is handled in one place.

RESULT (moderation/core/schemas/result.schema.json) and the `stage: moderate` audit row (core/result.py) share the
fields read here: `decided_by`, `route`, `list_hits`, `cache`, `signals` and, on RESULT, `decision` and `gate.band`
(the audit row's `gate_band`)."""

from __future__ import annotations

# Who decided (RESULT.decided_by) when no signal did: a list entry, or a rule of the policy (core/decision.py).
IMAGE_LIST, TERMS = "image_list", "terms"
POLICY_RULES = ("policy_default", "ocr_budget")
# Evidence kinds, in the order the decision weighs them: lists settle a post first; a cached verdict stands for the
# VLM's; otherwise a model's signal, or the policy's own rule.
KINDS = (IMAGE_LIST, TERMS, "cache", "model", "policy")


def kind_of(row: dict) -> str:
    """The kind of evidence that decided a RESULT or an audit row (one of KINDS; "-" for a failed post)."""
    decided = row.get("decided_by")
    if not decided:
        return "-"
    if decided in (IMAGE_LIST, TERMS):
        return decided
    if row.get("route") == "cache" or (row.get("cache") or {}).get("hit"):
        return "cache"
    if decided in POLICY_RULES:
        return "policy"
    return "model"


def hit_text(hit: dict) -> str:
    """One list hit: `block:image img-3f2a… d=4 [scam]`, `review:term term-1c… leetspeak@image_text [scam]`; a hit in
    an animation names its frame (`block:image img-… d=2 frame 5`)."""
    kind, name, entry = hit.get("kind", "?"), hit.get("list", "?"), hit.get("id", "?")
    label = f" [{hit['label']}]" if hit.get("label") else ""
    if kind == "image":
        where = f" d={hit['distance']}" if "distance" in hit else ""
    elif kind == "term":
        where = f" {hit.get('variant') or '?'}@{hit.get('field') or '?'}"
    else:  # a kind this client does not know yet: named, never a crash
        where = f" @{hit['field']}" if hit.get("field") else ""
    if isinstance(hit.get("frame"), int):  # an animation: the frame it was found in
        where += f" frame {hit['frame']}"
    return f"{name}:{kind} {entry}{where}{label}"


def hits_text(row: dict, empty: str = "-") -> str:
    return ", ".join(hit_text(h) for h in row.get("list_hits") or []) or empty


def cache_text(cache: dict | None) -> str | None:
    """The verdict cache's part: a hit (how similar, how old, whose verdict), or None when it did not answer."""
    if not cache or not cache.get("hit"):
        return None
    parts = [f"similarity {cache['similarity']:.3f}"] if isinstance(cache.get("similarity"), (int, float)) else []
    if isinstance(cache.get("age_s"), (int, float)):
        parts.append(f"age {cache['age_s']:.0f} s")
    return f"a near-duplicate's stored {cache.get('source_route') or 'vlm'} verdict" + (
        f" ({', '.join(parts)})" if parts else ""
    )


def decided_text(result: dict) -> str:
    """Who decided and on what, one line: `image_list block:image img-… d=0 [scam]`, `terms review:term …`,
    `cache: a near-duplicate's stored vlm verdict (similarity 0.991) -> vlm`, `nsfw_image (trained)`,
    `policy_default`."""
    decided = result.get("decided_by")
    if not decided:
        error = result.get("error") or {}
        return f"error {error.get('code', '?')}" if error else "-"
    kind = kind_of(result)
    hit = (result.get("decision") or {}).get("list_hit")
    if kind in (IMAGE_LIST, TERMS):
        if hit is None:  # an audit row: the deciding hit is the first of its list kind
            want = "image" if kind == IMAGE_LIST else "term"
            hit = next((h for h in result.get("list_hits") or [] if h.get("kind") == want), None)
        return f"{decided} {hit_text(hit)}" if hit else decided
    grade = (result.get("signals") or {}).get(decided)
    who = f"{decided} ({grade})" if grade else decided
    if kind == "cache":
        return f"cache: {cache_text(result.get('cache')) or 'a stored verdict'} -> {who}"
    return who


def route_text(row: dict) -> str:
    """The path a post took with the gate's band beside it, e.g. `gate (band block)`: the band is what the gate's
    thresholds said, the action may differ (an untrained signal never blocks)."""
    route = row.get("route") or "-"
    band = (row.get("gate") or {}).get("band") or row.get("gate_band")
    return f"{route} (band {band})" if band else route


def summary(result: dict) -> str:
    """The action, who decided on what, the route, and every list hit: what the CLI prints beside a RESULT."""
    line = f"{(result.get('action') or 'error').upper()} by {decided_text(result)}"
    if result.get("route"):
        line += f"; route {route_text(result)}"
    others = [h for h in result.get("list_hits") or [] if h != (result.get("decision") or {}).get("list_hit")]
    if others:
        line += f"; list hits: {', '.join(hit_text(h) for h in others)}"
    return line
