import re

import numpy as np
import pytest
import yaml

from moderation.core.errors import UnknownPolicy
from moderation.core.policy import PACKAGE_POLICY_DIR, Band, Policy, Signal, load_policy
from moderation.gate.scoring import ALLOW, BLOCK, ESCALATE, gate_band


def test_default_policy_loads_with_zh_and_en():
    p = load_policy("default")
    assert p.id.startswith("default@")
    assert {"violence", "sexual", "mismatch", "sarcasm"} <= set(p.label_keys)
    assert set(p.prompts) == {"en", "zh"}
    assert all(lab.zh and lab.en for lab in p.labels)


@pytest.mark.parametrize("name", ["nope", "../default", "", "a" * 100])
def test_unknown_or_malformed_policy_names_are_rejected(name):
    with pytest.raises(UnknownPolicy):
        load_policy(name)


def test_policy_validation_rejects_unknown_block_label():
    data = load_policy().model_dump()
    data["gate"]["block_labels"] = ["not_a_label"]
    with pytest.raises(ValueError, match="unknown labels"):
        Policy.model_validate(data)


def test_gate_band_uses_thresholds():
    p = load_policy()
    g = p.gate
    low = {k: g.allow_below / 2 for k in p.label_keys}
    assert gate_band(p, low)[0] == ALLOW
    mid = dict(low, violence=(g.allow_below + g.block_at) / 2)
    assert gate_band(p, mid)[0] == ESCALATE
    high = dict(low, violence=g.block_at)
    assert gate_band(p, high)[0] == BLOCK
    # a label the gate may not block on alone escalates instead
    only_sarcasm = dict(low, sarcasm=0.999)
    assert gate_band(p, only_sarcasm)[0] == ESCALATE


def test_light_clip_tokenizer_matches_transformers():
    from pathlib import Path

    from transformers import AutoTokenizer

    from moderation.gate.inputs import ClipTokens

    clip = Path(__file__).resolve().parents[1] / "model_repository" / "preprocess" / "1" / "clip"
    texts = ["a photo of a cat", "岁月静好", "", "word " * 200]
    ref = AutoTokenizer.from_pretrained(clip)(texts, padding="max_length", truncation=True, max_length=77,
                                              return_tensors="np")
    ids, mask = ClipTokens(str(clip))(texts)
    assert (ids == ref["input_ids"]).all() and (mask == ref["attention_mask"]).all()


def test_a_lists_file_that_never_parsed_is_a_coded_policy_error(tmp_path):
    from moderation.core.errors import BadPolicy
    from moderation.core.policy import load_policy
    from moderation.testing.policies import derive_policy

    derive_policy(tmp_path, "never_parsed")
    (tmp_path / "never_parsed.lists.json").write_text('{"revision": 1, "terms": [', encoding="utf-8")
    with pytest.raises(BadPolicy, match="never_parsed.lists.json cannot be read: JSONDecodeError"):
        load_policy("never_parsed", tmp_path)


def _lists_json(revision: int, term: str) -> str:
    import json

    return json.dumps({"revision": revision, "terms": [{"id": f"t{revision}", "list": "block", "label": "scam",
                                                        "term": term}]})


def _new_process():
    """What a second model instance (or a restarted server) holds: no lists read yet, no policy cached."""
    from moderation.core import policy

    policy.forget_loaded()


@pytest.fixture
def lists_policy(tmp_path, monkeypatch):
    from moderation.testing.policies import derive_policy

    monkeypatch.setenv("MODERATION_STATE_DIR", str(tmp_path / "state"))
    (tmp_path / "policies").mkdir()
    derive_policy(tmp_path / "policies", "lkg")
    _new_process()
    yield tmp_path / "policies" / "lkg.lists.json"
    _new_process()


def test_a_process_that_never_read_the_lists_takes_the_state_copy_when_the_file_breaks(lists_policy):
    from moderation.core.policy import lists_state_path

    lists_policy.write_text(_lists_json(1, "click the link in bio"), encoding="utf-8")
    first = load_policy("lkg", lists_policy.parent)  # the first process reads a good file: the state copy follows it
    assert first.lists.revision == 1 and first.lists_fault is None
    state = lists_state_path(lists_policy)
    assert state.read_text(encoding="utf-8") == lists_policy.read_text(encoding="utf-8")
    assert state.parent.parent == lists_policy.parent.parent / "state"  # $MODERATION_STATE_DIR/lists/
    _new_process()
    lists_policy.write_text(_lists_json(1, "click the link in bio")[:40], encoding="utf-8")  # cut short
    second = load_policy("lkg", lists_policy.parent)
    assert second.lists == first.lists
    assert "JSONDecodeError" in second.lists_fault and "revision 1 stays in force" in second.lists_fault
    assert state.read_text(encoding="utf-8") == _lists_json(1, "click the link in bio")  # a bad file is never kept


def test_a_corrupt_state_copy_is_no_copy(lists_policy):
    from moderation.core.errors import BadPolicy
    from moderation.core.policy import lists_state_path

    lists_policy.write_text(_lists_json(1, "click the link in bio"), encoding="utf-8")
    load_policy("lkg", lists_policy.parent)
    state = lists_state_path(lists_policy)
    for damaged in ('{"revision": 1, "terms": [', '{"revision": "one"}'):
        state.write_text(damaged, encoding="utf-8")
        _new_process()
        lists_policy.write_text("{", encoding="utf-8")
        with pytest.raises(BadPolicy, match="no earlier copy was loaded"):
            load_policy("lkg", lists_policy.parent)
        lists_policy.write_text(_lists_json(1, "click the link in bio"), encoding="utf-8")


def test_the_state_copy_is_never_read_while_the_lists_file_is_fine(lists_policy):
    from moderation.core.policy import lists_state_path

    state = lists_state_path(lists_policy)
    state.parent.mkdir(parents=True)
    state.write_text(_lists_json(9, "from another server"), encoding="utf-8")
    lists_policy.write_text(_lists_json(2, "click the link in bio"), encoding="utf-8")
    pol = load_policy("lkg", lists_policy.parent)
    assert pol.lists.revision == 2 and pol.lists.terms[0].term == "click the link in bio"
    assert state.read_text(encoding="utf-8") == lists_policy.read_text(encoding="utf-8")  # replaced by the good file


def test_a_process_with_an_older_copy_of_its_own_takes_the_newer_state_copy(lists_policy):
    lists_policy.write_text(_lists_json(1, "old term"), encoding="utf-8")
    assert load_policy("lkg", lists_policy.parent).lists.revision == 1  # this process read revision 1
    from moderation.core import list_store, policy

    mine = dict(list_store._LAST_GOOD_LISTS)
    _new_process()  # another instance reads revision 2 and keeps it in the state directory
    lists_policy.write_text(_lists_json(2, "new term"), encoding="utf-8")
    assert load_policy("lkg", lists_policy.parent).lists.revision == 2
    policy.forget_loaded()
    list_store._LAST_GOOD_LISTS.update(mine)  # back to the first instance, which saw only revision 1
    lists_policy.write_text("{", encoding="utf-8")
    pol = load_policy("lkg", lists_policy.parent)
    assert pol.lists.revision == 2 and pol.lists.terms[0].term == "new term"  # every instance agrees


def test_an_unwritable_state_directory_costs_only_the_copy(lists_policy, monkeypatch):
    blocker = lists_policy.parent.parent / "not_a_directory"
    blocker.write_text("", encoding="utf-8")
    monkeypatch.setenv("MODERATION_STATE_DIR", str(blocker / "state"))
    lists_policy.write_text(_lists_json(3, "click the link in bio"), encoding="utf-8")
    assert load_policy("lkg", lists_policy.parent).lists.revision == 3
    lists_policy.write_text("{", encoding="utf-8")  # the same process keeps its own copy
    pol = load_policy("lkg", lists_policy.parent)
    assert pol.lists.revision == 3 and "revision 3 stays in force" in pol.lists_fault


def test_the_default_state_directory_is_per_user_and_outside_the_package(monkeypatch, tmp_path):
    from pathlib import Path

    import moderation
    from moderation.core.state import state_dir

    monkeypatch.delenv("MODERATION_STATE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert state_dir() == tmp_path / "cache" / "moderation" / "state"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert state_dir() == tmp_path / "home" / ".cache" / "moderation" / "state"
    assert Path(moderation.__file__).parent not in state_dir().parents


def _with(**sections) -> Policy:
    """The shipped policy file with these sections updated key by key (a section given as None is removed)."""
    data = yaml.safe_load((PACKAGE_POLICY_DIR / "default.yaml").read_text(encoding="utf-8"))
    for name, section in sections.items():
        if section is None:
            data.pop(name, None)
        else:
            data[name] = {**(data.get(name) or {}), **section}
    return Policy.model_validate(data)


def test_a_trained_signal_has_one_band_for_its_route_and_its_action():
    from moderation.gate.scoring import NSFW_SOURCE, thresholds

    # the table entry: the gate routes by its band and the action reads the same band
    p = _with(signals={"nsfw_image": {"band": {"review": 0.3, "block": 0.9}}})
    assert thresholds(p, "sexual", {"sexual": NSFW_SOURCE}) == (0.3, 0.9)
    assert p.band("nsfw_image", "sexual") == Band(review=0.3, block=0.9)
    assert p.signals["vlm"] == load_policy().signals["vlm"]  # entries not named keep theirs
    assert p.signals["nsfw_image"].labels == ["sexual"]  # fields not named keep theirs
    assert _with(signals={"nsfw_image": {"band": {"block": 0.95}}}).band("nsfw_image", "sexual") == \
        Band(review=0.2, block=0.95)
    # a label's own band applies to routing and to the action alike
    p = _with(decisions={"labels": {"sexual": {"block": 0.95}}})
    assert thresholds(p, "sexual", {"sexual": NSFW_SOURCE}) == (0.2, 0.95) and p.band("vlm", "sexual").block == 0.95
    with pytest.raises(ValueError, match="decisions.labels.sexual over signals.nsfw_image.band"):
        _with(decisions={"labels": {"sexual": {"review": 0.85}}})  # above open_nsfw's block 0.8
    with pytest.raises(ValueError, match="must not exceed"):
        _with(signals={"profanity": {"band": {"review": 0.9, "block": 0.5}}})


def test_the_older_places_of_a_signal_fold_into_the_table_or_are_refused():
    bare = {"signals": None, "decisions": None}  # a policy written before the table
    p = _with(**bare, gate={"nsfw_allow_below": 0.1, "nsfw_block_at": 0.7, "nsfw_label": "violence",
                            "profanity_label": None, "allow_below": 0.4, "block_at": 0.9})
    assert p.signals["nsfw_image"] == Signal(labels=["violence"], band=Band(review=0.1, block=0.7))
    assert p.signals["profanity"].labels == [] and p.signals["clip"].route == Band(review=0.4, block=0.9)
    assert (p.gate.allow_below, p.gate.block_at) == (0.4, 0.9)  # the calibration code's mirror
    p = _with(signals={"clip": {"route": None, "band": {"review": 0.3, "block": 0.95}}})
    assert (p.gate.allow_below, p.gate.block_at) == (0.3, 0.95) and p.route_band("clip", "gore").review == 0.3
    p = _with(signals=None, decisions={"bands": {"vlm": {"review": 0.6, "block": 0.95}}},
              decoder={"label_threshold": 0.6})
    assert p.signals["vlm"].band == Band(review=0.6, block=0.95) and p.listed_from("vlm", "gore") == 0.6
    with pytest.raises(ValueError, match=re.escape("decoder.label_threshold (0.7) contradicts decisions.bands.vlm")):
        _with(signals=None, decisions={"bands": {"vlm": {"review": 0.6, "block": 0.95}}},
              decoder={"label_threshold": 0.7})
    # an older field that says what the table says is fine; one that says otherwise is refused, naming both
    _with(gate={"nsfw_block_at": 0.8})
    for sections, named in (({"gate": {"nsfw_block_at": 0.9}}, "signals.nsfw_image.band.block"),
                            ({"gate": {"allow_below": 0.3}}, "signals.clip.route.review"),
                            ({"gate": {"nsfw_label": "gore"}}, "signals.nsfw_image.labels"),
                            ({"decoder": {"label_threshold": 0.7}}, "signals.vlm.band.review"),
                            ({"decisions": {"bands": {"nsfw_image": {"review": 0.5, "block": 0.8}}}},
                             "signals.nsfw_image.band.review")):
        with pytest.raises(ValueError, match=re.escape(named)):
            _with(**sections)
    with pytest.raises(ValueError, match="signals.nsfw_image.labels names unknown labels"):
        _with(signals={"nsfw_image": {"labels": ["nudity"]}})
    with pytest.raises(ValueError, match="a classifier routes by its one band"):
        _with(signals={"nsfw_image": {"route": {"review": 0.1, "block": 0.9}}})


def test_adding_a_trained_signal_is_one_table_entry():
    """A new classifier's score (here an English hate-speech model's, as gate/text_signals.py would add it) routes,
    decides and is listed by its entry alone: no code names it."""
    from moderation.core.contracts import GateDecision
    from moderation.core.decision import choose_action
    from moderation.gate.scoring import ConceptBank, judge

    p = _with(signals={"hate_speech": {"labels": ["hate"], "band": {"review": 0.4, "block": 0.7}},
                       "profanity": {"labels": []}})
    bank = ConceptBank.from_embeddings(p, np.eye(len(ConceptBank.concept_texts(p)), 8, dtype=np.float32))
    for score, band, action in ((0.75, "block", "block"), (0.5, "escalate", "review"), (0.1, "allow", "allow")):
        judged = judge(p, bank, np.full(8, -1.0, np.float32), None, False, {"hate_speech": score})
        assert judged["sources"] == {"hate": "hate_speech"} and judged["band"] == band, judged["reason"]
        gate = GateDecision(route="gate", band=judged["band"], reason=judged["reason"], scores=judged["scores"],
                            consistency=None, sources=judged["sources"], gate_version="1", gate_started=0.0,
                            gate_ms=0.0, signals={"clip": "untrained", "hate_speech": "trained"})
        decision = choose_action(p, gate, [])
        assert decision.action == action, decision
        if action != "allow":
            assert decision.decided_by == "hate_speech"
        assert p.listed_from("hate_speech", "hate") == 0.4
