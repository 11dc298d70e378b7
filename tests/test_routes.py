"""RESULT.route names the path a post took (gate, list, vlm, cache) and RESULT.action the decision; the gate's own
band is evidence (RESULT.gate.band). Unit: the consistency rules (moderation/testing/routes.py) catch the
contradictions they name. Integration, on the real session server: every sample post under the fixed-route
policies, with list entries, forced escalations and a verdict-cache hit, has a route from the vocabulary that does
not contradict its action; editing the trained nsfw_image band moves route and action together."""
from __future__ import annotations

import pytest

from clients.admin import ServiceAdmin
from moderation.testing.policies import derive_policy
from moderation.testing.routes import ROUTES, route_contradictions
from moderation.testing.samples import sample_posts

from .conftest import ADMIN_KEY

POSTS = sample_posts()


def _result(route, band, action, decided_by, **over) -> dict:
    vlm = route in ("vlm", "cache")
    return {"action": action, "route": route, "decided_by": decided_by, "gate": {"band": band},
            "escalated": ("gate" if band == "escalate" else "forced") if vlm else None,
            "sentiment": {"label": "neutral", "score": 1.0} if vlm else None,
            "model_versions": {"language_decoder": "1"} if vlm else {},
            "signals": {"clip": "untrained", "nsfw_image": "trained", **({"vlm": "untrained"} if vlm else {})},
            "decision": {"reason": "x"}, **({"cache": {"hit": True}} if route == "cache" else {}), **over}


BLOCK_HIT = {"kind": "image", "list": "block", "id": "img-1"}


@pytest.mark.parametrize("result", [
    _result("gate", "block", "block", "nsfw_image"),
    _result("gate", "block", "review", "clip"),          # the untrained CLIP's block band: a person decides
    _result("gate", "allow", "allow", "policy_default"),
    _result("gate", "allow", "review", "terms"),         # a review-list hit does not settle a post
    _result("list", "escalate", "block", "image_list", decision={"reason": "x", "list_hit": BLOCK_HIT}),
    _result("vlm", "escalate", "review", "vlm"),
    _result("vlm", "allow", "block", "image_list", decision={"reason": "x", "list_hit": BLOCK_HIT}),  # forced
    _result("cache", "escalate", "review", "vlm"),
    {"action": None, "error": {"code": "bad_image"}},
])
def test_consistent_results_pass(result):
    assert route_contradictions(result) == []


@pytest.mark.parametrize("result,why", [
    (_result("gate_block", "block", "review", "clip"), "not one of"),           # the old vocabulary
    (_result("gate", "block", "block", "clip"), "trained gate signal"),         # an untrained signal never blocks
    (_result("gate", "allow", "block", "nsfw_image"), "trained gate signal"),   # blocked against the gate's band
    (_result("gate", "escalate", "review", "clip"), "only allow or block"),
    (_result("gate", "allow", "allow", "clip"), "only a trained signal"),
    (_result("gate", "allow", "allow", "terms", decision={"reason": "x", "list_hit": {**BLOCK_HIT, "list": "allow"}}),
     "settled the post without the VLM"),
    (_result("list", "allow", "review", "clip"), "route list, but"),
    (_result("vlm", "block", "review", "vlm", escalated="gate"), "escalated 'gate'"),
    (_result("vlm", "escalate", "review", "vlm", cache={"hit": True}), "with cache"),
    (_result("gate", "allow", "review", "vlm"), "decided by the VLM"),
])
def test_contradictions_are_named(result, why):
    problems = route_contradictions(result)
    assert any(why in p for p in problems), problems


@pytest.fixture(scope="module")
def listed_policy(triton, policy_dir) -> str:
    """A policy with list entries for some sample posts: the coins photo on the block list, the rocket post's
    caption on the allow list, the hopper post's phrase on the review list."""
    derive_policy(policy_dir, "routes_listed", cache={"enabled": False})
    coins = next(p for p in POSTS if p.name == "coins_scam_zh")
    with ServiceAdmin(triton.grpc_url, ADMIN_KEY) as admin:
        admin.add_image("routes_listed", "block", coins.image_bytes(), label="scam", note="route test")
        admin.add_term("routes_listed", "allow", "so proud of the team", note="route test")
        admin.add_term("routes_listed", "review", "deserved everything", label="hate", note="route test")
    return "routes_listed"


def test_every_sample_post_has_a_route_that_does_not_contradict_its_action(client, policy_dir, listed_policy):
    derive_policy(policy_dir, "routes_cached", gate={"allow_below": 0.0, "block_at": 1.01},
                  cache={"enabled": True})
    judged = []
    for policy in ("default", "escalate_all", "block_all", "allow_all", listed_policy):
        for p in POSTS:
            judged.append((policy, p.name, client.moderate(p.image_bytes(), p.text, policy=policy)))
    for p in POSTS:  # forced escalations, list hits among them
        judged.append((f"{listed_policy}+escalate", p.name,
                       client.moderate(p.image_bytes(), p.text, policy=listed_policy, escalate=True)))
    for i in range(2):  # the second is answered from the first's stored verdict
        judged.append(("routes_cached", f"{POSTS[0].name} #{i}",
                       client.moderate(POSTS[0].image_bytes(), POSTS[0].text, policy="routes_cached")))
    problems = {(pol, name): route_contradictions(r) for pol, name, r in judged}
    assert not {k: v for k, v in problems.items() if v}, problems
    seen = {(r["route"], r["gate"]["band"], r["action"]) for _, _, r in judged}
    assert {route for route, _, _ in seen} == set(ROUTES), seen
    # the case: settled at the gate in the untrained CLIP's block band, sent to a person, not blocked
    assert ("gate", "block", "review") in seen, seen
    assert any(route == "gate" and band == "allow" for route, band, _ in seen), seen
    assert {"block", "allow"} <= {action for route, _, action in seen if route == "list"}, seen
    by = {(pol, name): r for pol, name, r in judged}
    forced = by[(f"{listed_policy}+escalate", "coins_scam_zh")]  # the block list still decides a forced escalation
    assert (forced["route"], forced["action"], forced["decided_by"]) == ("vlm", "block", "image_list")
    assert forced["escalated"] == ("gate" if forced["gate"]["band"] == "escalate" else "forced")


def _nsfw_band(policy_dir, name: str, review: float, block: float) -> str:
    """A policy where only the trained nsfw_image band differs from allow_all's (the CLIP concepts never block or
    escalate): one band, signals.nsfw_image.band, which the gate routes by and the action is chosen by."""
    derive_policy(policy_dir, name, gate={"allow_below": 1.01, "block_at": 1.01},
                  cache={"enabled": False}, bands={"nsfw_image": {"review": review, "block": block}})
    return name


def test_editing_the_nsfw_band_moves_route_and_action_together(client, policy_dir):
    p = next(p for p in POSTS if p.name == "astronaut_mix")
    first = client.moderate(p.image_bytes(), p.text, policy="allow_all")
    assert first["gate"]["sources"].get("sexual") == "nsfw_image"
    s = first["gate"]["scores"]["sexual"]  # the served P(nsfw) of this photo
    assert 0.001 < s < 0.95, s  # room for bands on both sides of it

    def judge(review: float, block: float) -> dict:
        name = _nsfw_band(policy_dir, f"nsfw_band_{review:.4f}_{block:.4f}", review, block)
        r = client.moderate(p.image_bytes(), p.text, policy=name)
        assert route_contradictions(r) == [], r
        return r

    below = judge(s / 4, s / 2)  # the score is in the block band: blocked at the gate, by the trained signal
    assert (below["route"], below["gate"]["band"], below["action"], below["decided_by"]) == (
        "gate", "block", "block", "nsfw_image")
    between = judge(s / 4, (s + 1) / 2)  # block band raised above the score: to the VLM, and a person decides
    assert (between["route"], between["gate"]["band"], between["action"], between["decided_by"]) == (
        "vlm", "escalate", "review", "nsfw_image")
    above = judge((s + 1) / 2, (s + 3) / 4)  # review band above it too: settled at the gate, not flagged by it
    assert (above["route"], above["gate"]["band"]) == ("gate", "allow")
    assert above["action"] != "block" and above["decided_by"] != "nsfw_image", above["decision"]


def test_a_list_settles_a_post_exactly_when_it_decides_its_action():
    """The router's list route and core/decision.py agree: a block hit settles, an allow hit settles unless OCR
    read the image's text only in part (then no allow list allows it), a review hit never settles."""
    from moderation.core.decision import choose_action
    from moderation.core.policy import load_policy
    from moderation.gate.router import settling_list_hit
    from moderation.testing.records import gate_decision, request_record

    policy = load_policy("default")
    block, allow = {**BLOCK_HIT, "label": "scam"}, {"kind": "term", "list": "allow", "id": "t-1", "label": None}
    review = {"kind": "term", "list": "review", "id": "t-2", "label": "scam"}
    for hits, truncated, settles in (([block], False, "block"), ([allow], False, "allow"), ([allow], True, None),
                                     ([allow, block], False, "block"), ([review], False, None)):
        rec = request_record(list_hits=hits, image_text_truncated=truncated)
        hit = settling_list_hit(rec)
        assert (hit or {}).get("list") == settles, (hits, truncated)
        d = choose_action(policy, gate_decision(route="gate", scores={}), hits, truncated)
        assert (d.list_hit is not None and d.list_hit["list"] in ("block", "allow")) == (settles is not None)
