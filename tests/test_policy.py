import pytest

from moderation.core.errors import UnknownPolicy
from moderation.core.policy import Policy, load_policy
from moderation.gate.scoring import ALLOW, BLOCK, ESCALATE, decide


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


def test_decide_uses_thresholds():
    p = load_policy()
    g = p.gate
    low = {k: g.allow_below / 2 for k in p.label_keys}
    assert decide(p, low)[0] == ALLOW
    mid = dict(low, violence=(g.allow_below + g.block_at) / 2)
    assert decide(p, mid)[0] == ESCALATE
    high = dict(low, violence=g.block_at)
    assert decide(p, high)[0] == BLOCK
    # a label the gate may not block on alone escalates instead
    only_sarcasm = dict(low, sarcasm=0.999)
    assert decide(p, only_sarcasm)[0] == ESCALATE


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
