"""The action rules (moderation/core/decision.py) on hand-made decisions: who may settle a post, in what order."""
from __future__ import annotations

import pytest

from moderation.core.contracts import VlmVerdict
from moderation.core.decision import choose_action
from moderation.core.policy import LabelDecision, load_policy
from moderation.testing.records import gate_decision

POLICY = load_policy("default")
LOW = {k: 0.01 for k in POLICY.label_keys}


def _gate(clip: str = "untrained", vlm: dict | None = None, vlm_untrained: bool = True, sexual: float = 0.01,
          **scores):
    verdict = None
    if vlm is not None:
        verdict = VlmVerdict(violation=max(vlm.values(), default=0.0), labels={**LOW, **vlm},
                             sentiment={"neutral": 1.0}, description=None, untrained=vlm_untrained,
                             caption_truncated=False, model_versions={})
    return gate_decision(route="vlm" if vlm is not None else "gate", scores={**LOW, **scores, "sexual": sexual},
                         sources={"sexual": "nsfw_image"},
                         signals={"clip": clip, "nsfw_image": "trained"}, vlm=verdict)


def test_untrained_signals_send_to_review_but_never_block_or_allow():
    d = choose_action(POLICY, _gate(scam=0.99), [])
    assert (d.action, d.decided_by) == ("review", "clip") and d.severity["scam"] == 3
    d = choose_action(POLICY, _gate(vlm={"violence": 0.95}), [])
    assert (d.action, d.decided_by) == ("review", "vlm")  # the VLM's flag before the gate's
    d = choose_action(POLICY, _gate(), [])
    assert (d.action, d.decided_by) == ("allow", "policy_default")


def test_trained_signals_decide_and_outrank_untrained_ones_on_their_label():
    assert choose_action(POLICY, _gate(sexual=0.95), []).action == "block"
    d = choose_action(POLICY, _gate(sexual=0.5), [])
    assert (d.action, d.decided_by) == ("review", "nsfw_image")
    d = choose_action(POLICY, _gate(sexual=0.05, vlm={"sexual": 0.99}), [])  # trained open_nsfw says no
    assert (d.action, d.decided_by) == ("allow", "policy_default")
    d = choose_action(POLICY, _gate(vlm={"violence": 0.95}, vlm_untrained=False), [])  # a real VLM checkpoint
    assert (d.action, d.decided_by) == ("block", "vlm")
    d = choose_action(POLICY, _gate(vlm={}, vlm_untrained=False, scam=0.9), [])
    assert (d.action, d.decided_by) == ("allow", "vlm")  # a trained judge scored every label below review


@pytest.mark.parametrize("hits,expected", [
    ([{"kind": "image", "list": "allow", "id": "a", "label": None, "field": "image"},
      {"kind": "term", "list": "block", "id": "b", "label": "scam", "field": "caption"}], ("block", "terms")),
    ([{"kind": "image", "list": "allow", "id": "a", "label": None, "field": "image"}], ("allow", "image_list")),
    ([{"kind": "term", "list": "review", "id": "c", "label": "hate", "field": "caption"}], ("review", "terms")),
])
def test_list_hits_come_first(hits, expected):
    d = choose_action(POLICY, _gate(sexual=0.95 if expected[0] == "allow" else 0.01), hits)
    assert (d.action, d.decided_by) == expected and d.list_hit["id"] in ("a", "b", "c")


def test_label_overrides_and_deciders():
    only_vlm = {"sexual": LabelDecision(review=0.6, block=0.7, deciders=["vlm"])}
    policy = POLICY.model_copy(update={"decisions": POLICY.decisions.model_copy(update={"labels": only_vlm})})
    d = choose_action(policy, _gate(sexual=0.95), [])  # open_nsfw may not decide `sexual` here: its flag is ignored
    assert (d.action, d.decided_by) == ("allow", "policy_default")
    d = choose_action(policy, _gate(sexual=0.01, vlm={"sexual": 0.65}, vlm_untrained=False), [])
    assert (d.action, d.decided_by) == ("review", "vlm")  # the label's own review band, 0.6
