"""What RESULT.route may say beside RESULT.action: the route names the path a post took, the action the
decision, and neither may contradict the other. Tests check every judged post against this; a platform can too.

  gate   no list settled the post and no VLM ran (escalated null, no sentiment, no language_decoder version); the
         gate's band was allow or block. It blocks only when its band was block and a trained gate signal decided
         (an untrained one never blocks; a list block is route list); it allows only by a trained signal or the
         policy's default, never by a list (a list allow is route list).
  list   a block- or allow-list hit settled the post before any escalation: the action is that list's, decided by
         image_list or terms, and no VLM ran. Conversely a post decided by a block or allow list that was not
         sent to the VLM is route list.
  vlm    the post was escalated (escalated "gate" exactly when the band was escalate, else "forced" by OPTIONS)
         and the VLM's verdict is in the result.
  cache  as vlm, answered from a near-duplicate's stored verdict (cache.hit).
Only vlm and cache results may be decided by the VLM."""
from __future__ import annotations

ROUTES = ("gate", "list", "vlm", "cache")
BANDS = ("allow", "block", "escalate")
LIST_DECIDERS = ("image_list", "terms")


def route_contradictions(result: dict) -> list[str]:
    """Every way a judged post's route contradicts its action or its evidence; [] when consistent. A failed post
    (action null) has no route to check."""
    if result.get("action") is None:
        return []
    route, action, by = result.get("route"), result["action"], result.get("decided_by")
    band = (result.get("gate") or {}).get("band")
    escalated = result.get("escalated")
    hit: dict = (result.get("decision") or {}).get("list_hit") or {}
    vlm_ran = result.get("sentiment") is not None or "language_decoder" in result.get("model_versions", {})
    trained_gate_signal = by != "vlm" and (result.get("signals") or {}).get(by) == "trained"
    settled_by_list = by in LIST_DECIDERS and hit.get("list") in ("block", "allow")
    out = []
    if route not in ROUTES:
        out.append(f"route {route!r} is not one of {ROUTES}")
    if band not in BANDS:
        out.append(f"gate.band {band!r} is not one of {BANDS}")
    if route in ("gate", "list") and (escalated is not None or vlm_ran):
        out.append(f"route {route} but the post went to the VLM (escalated {escalated!r})")
    if route == "gate":
        if band not in ("allow", "block"):
            out.append(f"route gate with gate band {band!r}: only allow or block settle a post at the gate")
        if action == "block" and not (band == "block" and trained_gate_signal):
            out.append(f"route gate blocks, but by {by!r} with gate band {band!r} (needs a trained gate signal "
                       "in the block band)")
        if action == "allow" and not (trained_gate_signal or by == "policy_default"):
            out.append(f"route gate allows by {by!r}: only a trained signal or the policy default allows there")
    if route == "list" and not (settled_by_list and action == hit["list"]):
        out.append(f"route list, but {action} by {by!r} (list hit {hit!r})")
    if route != "list" and settled_by_list and escalated is None:
        out.append(f"a {hit['list']}-list hit settled the post without the VLM, but its route is {route!r}")
    if route in ("vlm", "cache"):
        if escalated not in ("gate", "forced") or (escalated == "gate") != (band == "escalate"):
            out.append(f"route {route} with escalated {escalated!r} and gate band {band!r}")
        if result.get("sentiment") is None:
            out.append(f"route {route} without the VLM's verdict")
    if (route == "cache") != bool((result.get("cache") or {}).get("hit")):
        out.append(f"route {route!r} with cache {result.get('cache')!r}")
    if by == "vlm" and route not in ("vlm", "cache"):
        out.append(f"decided by the VLM on route {route!r}")
    return out
