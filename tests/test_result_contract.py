"""RESULT and the audit row are pydantic contracts: result.schema.json is generated from them (and must not drift),
every RESULT they build passes the shipped schema, the audit row projects RESULT without its content, and
contracts cannot be changed once built."""
from __future__ import annotations

import json

import jsonschema
import pydantic
import pytest

from moderation.core.contracts import FallbackInfo, PostError, VlmVerdict
from moderation.core.hashing import sha256_hex
from moderation.core.policy import load_policy
from moderation.core.result import finish_post, validate_result
from moderation.core.result_contract import SCHEMA_PATH, JudgedResult, main, parse_result, schema_text
from moderation.testing.records import gate_decision, request_record

POLICY = load_policy("default")
LABELS = POLICY.label_keys
MEDIA = [{"sha256": "f" * 64, "format": "GIF", "size": [10, 10], "frames": 4, "read": [0, 2]},
         {"sha256": "e" * 64, "format": "PNG", "size": [3, 4], "frames": 1, "read": [0]}]
LINES = [{"text": "secret words", "confidence": 0.9, "box": [[0, 0], [9, 0], [9, 4], [0, 4]], "frame": 2}]
TERM_HIT = {"kind": "term", "list": "review", "id": "term-1", "label": LABELS[0], "field": "image_text",
            "span": [0, 6], "variant": "exact", "image": 1, "frame": 2}


def _verdict(untrained: bool = True) -> VlmVerdict:
    return VlmVerdict(violation=0.7, labels=dict.fromkeys(LABELS, 0.6), sentiment={"negative": 0.8, "positive": 0.2},
                      description="a cat", untrained=untrained, caption_truncated=False,
                      model_versions={"language_decoder": "2"}, timings_ms={"prefill": 1.0})


def _judged_posts():
    yield request_record(), gate_decision(route="gate", scores=dict.fromkeys(LABELS, 0.1))
    yield (request_record(list_hits=[TERM_HIT], media=MEDIA, image_text=LINES),
           gate_decision(route="list", scores=dict.fromkeys(LABELS, 0.9),
                         signal_media={"nsfw_image": {"image": 1, "frame": 2}}))
    yield (request_record(media=MEDIA),
           gate_decision(route="vlm", scores=dict.fromkeys(LABELS, 0.4), vlm=_verdict(), vlm_ms=3.0, ab_arm="b",
                         escalated="gate", cache={"hit": False, "stored": True},
                         fallback=FallbackInfo(model="language_decoder_int8", reason="queue", inflight=3,
                                               oldest_wait_ms=2.0)))
    yield (request_record(),
           gate_decision(route="cache", scores=dict.fromkeys(LABELS, 0.4), vlm=_verdict(False), escalated="forced",
                         cache={"hit": True, "similarity": 0.99, "age_s": 3.0, "lookup_ms": 0.5,
                                "source_route": "vlm"}))


def test_committed_schema_is_the_one_the_contracts_generate():
    assert SCHEMA_PATH.read_text(encoding="utf-8") == schema_text(), \
        "run: .venv/bin/python -m moderation.core.result_contract --write-schema"
    assert main([]) == 0


@pytest.mark.parametrize("record,gate", list(_judged_posts()))
def test_every_judged_result_passes_the_shipped_schema_and_reads_back(record, gate):
    done = finish_post(record, gate, "1")
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator(schema).validate(done.result)
    assert done.result["error"] is None and done.result["action"] in ("allow", "review", "block")
    back = parse_result(json.dumps(done.result))
    assert isinstance(back, JudgedResult) and back.model_dump(mode="json") == done.result


def test_fields_that_do_not_apply_are_left_out_not_null():
    done = finish_post(request_record(), gate_decision(route="gate", scores={}), "1")
    for key in ("media", "cache", "ab", "fallback"):
        assert key not in done.result and key not in done.audit_row
    # what RESULT always says, even when there is nothing to say
    assert done.result["sentiment"] is None and done.result["image_text"] is None
    assert done.result["caption_truncated"] == {"clip": False, "vlm": None}
    assert "list_hit" not in done.result["decision"]


def test_a_failed_post_is_its_own_contract_and_row():
    record = request_record(error=PostError(code="bad_image", message="not an image"))
    done = finish_post(record, gate_decision(route=None, scores={}), "1")
    assert done.verdict == -1 and done.result["action"] is None
    assert done.result["error"] == {"code": "bad_image", "message": "not an image"}
    assert set(done.result) == {"request_id", "action", "error", "model_versions", "latency_ms", "hashes"}
    assert done.audit_row["stage"] == "moderate" and done.audit_row["policy"] == "default@test"
    assert parse_result(json.dumps(done.result)).model_dump(mode="json") == done.result
    with pytest.raises(jsonschema.ValidationError):  # a failed post has no action
        validate_result({**done.result, "action": "allow"})


def test_the_audit_row_projects_result_with_hashes_instead_of_content():
    record, gate = list(_judged_posts())[1]
    done = finish_post(record, gate, "1")
    row, result = done.audit_row, done.result
    for key in ("request_id", "route", "action", "decided_by", "severity", "labels", "scores", "policy",
                "model_versions", "latency_ms", "signals", "list_hits", "caption_truncated"):
        assert row[key] == result[key], key
    assert row["gate_band"] == result["gate"]["band"]
    assert row["media"] == result["media"]["images"]
    assert row["image_text_sha256"] == sha256_hex(b"secret words") and row["image_text_lines"] == 1
    assert "secret words" not in json.dumps(row) and "image_text" not in row


def test_contracts_are_immutable_after_construction():
    done = finish_post(request_record(), gate_decision(route="gate", scores={}), "1")
    result = parse_result(json.dumps(done.result))
    with pytest.raises(pydantic.ValidationError):
        result.action = "allow"  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError):
        result.gate.band = "block"  # type: ignore[misc]
    gate = gate_decision(route="gate", scores={})
    with pytest.raises(pydantic.ValidationError):
        gate.route = "vlm"  # type: ignore[misc]
    assert gate.model_copy(update={"route": "vlm"}).route == "vlm" and gate.route == "gate"


def test_result_refuses_unknown_fields_and_out_of_range_scores():
    done = finish_post(request_record(), gate_decision(route="gate", scores={}), "1")
    with pytest.raises(pydantic.ValidationError):
        parse_result(json.dumps({**done.result, "surprise": 1}))
    with pytest.raises(pydantic.ValidationError):
        parse_result(json.dumps({**done.result, "scores": {"violence": 1.5}}))
