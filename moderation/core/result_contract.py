"""RESULT (what `moderate` answers for each post) and the `stage: moderate` audit row, as pydantic contracts.

A judged post's RESULT is a `JudgedResult`; a post that failed in a request of several posts gets a `FailedResult`
(its `error`, no action). The audit row is a projection of either (`audit_row()`): the same values, with hashes
and counts where RESULT carries content (the words read in the image), never the caption or the image.

Every contract is immutable once built. Fields that RESULT leaves out when they do not apply (a still image's
`frame`, `cache` of a post the verdict cache never saw, ...) are declared with `omitted()`: absent from the JSON,
never `null`. `moderation/core/schemas/result.schema.json` is generated from these models, and shipped with the
client, which validates every RESULT against it:

    .venv/bin/python -m moderation.core.result_contract --write-schema

tests/test_result_contract.py fails when the committed file differs from what the models generate."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, TypeAdapter
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue, SkipJsonSchema

from .contracts import Band, Route, Signal
from .hashing import sha256_hex

SCHEMA_PATH = Path(__file__).parent / "schemas" / "result.schema.json"
SCHEMA_ID = "https://example.invalid/moderation/result.schema.json"

Action = Literal["allow", "review", "block"]
Index = Annotated[int, Field(ge=0)]
Unit = Annotated[float, Field(ge=0, le=1)]
NonNegative = Annotated[float, Field(ge=0)]
IntList = list[int]
Pair = Annotated[list[int], Field(min_length=2, max_length=2)]


def _absent(value: object) -> bool:
    return value is None


def omitted(description: str | None = None) -> Any:
    """A field RESULT leaves out (rather than writing null) when it does not apply; its type is `T |
    SkipJsonSchema[None]`, so the schema names T alone."""
    return Field(default=None, exclude_if=_absent, description=description)


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


FRAME = "the animation frame (index in the file) this came from; absent for a still image"
IMAGE = "the image of a post of several images this came from (0-based)"


class Place(Frozen):
    """Where in a post a score came from, when not its first image or frame."""
    image: Index | SkipJsonSchema[None] = omitted(IMAGE)
    frame: Index | SkipJsonSchema[None] = omitted(FRAME)


class ListHit(Frozen):
    """A custom-list entry the post matched (core/lists.py ListHit)."""
    kind: Literal["image", "term"]
    list: Literal["block", "allow", "review"]
    id: str
    label: str | None
    field: str
    distance: int | SkipJsonSchema[None] = omitted("an image entry's Hamming distance to the post's PDQ hash")
    span: IntList | SkipJsonSchema[None] = omitted("a term's [start, end] in the field's text")
    variant: Literal["exact", "normalized", "separator", "leetspeak", "homophone", "letter"] | SkipJsonSchema[
        None] = omitted("how a term was written")
    frame: Index | SkipJsonSchema[None] = omitted(FRAME)
    image: Index | SkipJsonSchema[None] = omitted(IMAGE)


class DecisionSummary(Frozen):
    reason: str
    list_hit: ListHit | SkipJsonSchema[None] = omitted("the list entry that decided (image_list / terms)")


class Label(Frozen):
    name: str
    score: Unit
    source: str


class Sentiment(Frozen):
    label: str
    score: Unit


class GateSummary(Frozen):
    band: Band = Field(description="what the gate's thresholds said; evidence, not the action")
    scores: dict[str, float]
    consistency: float | None
    reason: str
    sources: dict[str, str] = Field(description="label -> the trained signal that scored it")


class Hashes(Frozen):
    image_sha256: str
    text_sha256: str


class CaptionTruncated(Frozen):
    clip: bool
    vlm: bool | None


class TextLine(Frozen):
    """One line OCR read in the image (ocr/reader.py TextLine)."""
    text: str
    confidence: Unit
    box: Annotated[list[Pair], Field(min_length=4, max_length=4)]
    frame: Index | SkipJsonSchema[None] = omitted(FRAME)
    image: Index | SkipJsonSchema[None] = omitted(IMAGE)


class ImageText(Frozen):
    lines: list[TextLine]
    truncated: bool

    def audit_fields(self) -> dict[str, Any]:
        """What the audit row keeps of the words: their hash and line count, never the text."""
        text = "\n".join(line.text for line in self.lines)
        return {"image_text_sha256": sha256_hex(text.encode("utf-8")), "image_text_lines": len(self.lines),
                "image_text_truncated": self.truncated}


class MediaImage(Frozen):
    """One image of a post (core/post.py PostImage.media): hashes and counts, never pixels."""
    sha256: str
    format: str
    size: Pair
    frames: Annotated[int, Field(ge=1)]
    read: Annotated[list[Index], Field(min_length=1)]


class Media(Frozen):
    """A post of several images or an animated one: each image's hash and frames (policy media), and where an image
    signal's reported score (signals) or a CLIP-scored label's score (labels) came from when not the post's first
    image or frame."""
    images: Annotated[list[MediaImage], Field(min_length=1)]
    signals: dict[str, Place] | SkipJsonSchema[None] = omitted()
    labels: dict[str, Place] | SkipJsonSchema[None] = omitted()


class CacheInfo(Frozen):
    """The verdict cache's answer for a post the gate escalated under a policy with `cache.enabled`."""
    hit: bool
    similarity: float | SkipJsonSchema[None] = omitted()
    text_similarity: float | SkipJsonSchema[None] = omitted()
    fingerprint_similarity: float | SkipJsonSchema[None] = omitted()
    local_difference: float | SkipJsonSchema[None] = omitted(
        "largest 8x8-tile difference of the aligned thumbnails (core.imaging.local_difference)")
    source_route: Literal["vlm"] | SkipJsonSchema[None] = omitted()
    age_s: NonNegative | SkipJsonSchema[None] = omitted()
    lookup_ms: NonNegative | SkipJsonSchema[None] = omitted()
    stored: bool | SkipJsonSchema[None] = omitted()
    forgotten: Index | SkipJsonSchema[None] = omitted()
    unavailable: bool | SkipJsonSchema[None] = omitted(
        "the shared (Redis) verdict cache could not be reached: a miss, nothing stored or forgotten")


class AbArm(Frozen):
    arm: Literal["a", "b"]
    decoder_version: str


class Fallback(Frozen):
    """Why an escalation went to the INT8 decoder at peak (policy decoder.fallback)."""
    model: str
    reason: Literal["inflight", "queue"]
    inflight: Index
    oldest_wait_ms: NonNegative


class ResultError(Frozen):
    code: str
    message: str


RequestId = Annotated[str, Field(min_length=1, max_length=128)]


class ModerateAuditRow(Frozen):
    """The audit row of a judged post: RESULT's decision and evidence, hashes instead of content."""
    request_id: str
    stage: Literal["moderate"] = "moderate"
    route: Route
    gate_band: Band
    action: Action
    decided_by: str
    severity: dict[str, int]
    violation: bool
    labels: list[Label]
    scores: dict[str, float]
    # every (signal, label, score, trained) the action was chosen from: clients.evaluate recalibrates on it
    evidence: list[tuple[str, str, float, bool]]
    sentiment: Sentiment | None
    policy: str
    model_versions: dict[str, str]
    latency_ms: dict[str, float]
    image_sha256: str
    text_sha256: str
    image_format: str
    image_size: IntList
    caption_truncated: CaptionTruncated
    lang: str
    error: None = None
    untrained: bool
    signals: dict[str, Signal]
    image_text_sha256: str | SkipJsonSchema[None] = omitted()
    image_text_lines: int | SkipJsonSchema[None] = omitted()
    image_text_truncated: bool | SkipJsonSchema[None] = omitted()
    media: list[MediaImage] | SkipJsonSchema[None] = omitted()
    list_hits: list[ListHit] | SkipJsonSchema[None] = omitted()
    escalated: Literal["gate", "forced"] | SkipJsonSchema[None] = omitted()
    ab: AbArm | SkipJsonSchema[None] = omitted()
    cache: CacheInfo | SkipJsonSchema[None] = omitted()


class FailedAuditRow(Frozen):
    """The audit row of a post that failed in a request of several posts."""
    request_id: str
    stage: Literal["moderate"] = "moderate"
    error: ResultError
    action: None = None
    model_versions: dict[str, str]
    latency_ms: dict[str, float]
    image_sha256: str
    text_sha256: str
    policy: str | SkipJsonSchema[None] = omitted()


class JudgedResult(Frozen):
    """RESULT of a judged post."""
    model_config = ConfigDict(title="Judged post")

    request_id: RequestId
    action: Action
    decided_by: str = Field(min_length=1)
    severity: dict[str, Annotated[int, Field(ge=0, le=3)]]
    decision: DecisionSummary
    violation: bool
    labels: list[Label]
    sentiment: Sentiment | None
    description: str | None
    route: Route = Field(description="the path the post took, never the decision (that is `action`): gate (settled "
                         "at the gate, no VLM), list (a block or allow list settled it), vlm (the VLM judged it), "
                         "cache (a near-duplicate's stored VLM verdict)")
    scores: dict[str, Unit]
    gate: GateSummary
    model_versions: dict[str, str]
    latency_ms: dict[str, NonNegative]
    untrained: bool
    signals: dict[str, Signal]
    policy: str
    hashes: Hashes
    caption_truncated: CaptionTruncated
    list_hits: list[ListHit]
    image_text: ImageText | None = Field(description="the words OCR read in the image (null: not read, OPTIONS ocr "
                                         "false or the policy's ocr off)")
    escalated: Literal["gate", "forced"] | None = Field(description="who sent the post to the VLM")
    media: Media | SkipJsonSchema[None] = omitted(Media.__doc__)
    error: None
    cache: CacheInfo | SkipJsonSchema[None] = omitted(CacheInfo.__doc__)
    ab: AbArm | SkipJsonSchema[None] = omitted("the A/B arm of the decoder that judged the post")
    fallback: Fallback | SkipJsonSchema[None] = omitted(Fallback.__doc__)

    def audit_row(self, evidence: list[tuple[str, str, float, bool]], image_format: str,
                  image_size: tuple[int, int], lang: str) -> ModerateAuditRow:
        """The post's audit row: this RESULT's values, with the image text's hash for its words, and what only
        preprocess saw (the image's format and size, the language) and the evidence the action was chosen from."""
        return ModerateAuditRow(
            request_id=self.request_id, route=self.route, gate_band=self.gate.band, action=self.action,
            decided_by=self.decided_by, severity=self.severity, violation=self.violation, labels=self.labels,
            scores=self.scores, evidence=evidence, sentiment=self.sentiment, policy=self.policy,
            model_versions=self.model_versions, latency_ms=self.latency_ms, image_sha256=self.hashes.image_sha256,
            text_sha256=self.hashes.text_sha256, image_format=image_format, image_size=list(image_size),
            caption_truncated=self.caption_truncated, lang=lang, untrained=self.untrained, signals=self.signals,
            **(self.image_text.audit_fields() if self.image_text is not None else {}),
            media=self.media.images if self.media else None, list_hits=self.list_hits or None,
            escalated=self.escalated, ab=self.ab, cache=self.cache)


class FailedResult(Frozen):
    """RESULT of a post that failed in a request of several posts: its error, no action."""
    model_config = ConfigDict(title="Failed post")

    request_id: RequestId
    action: None
    error: ResultError
    model_versions: dict[str, str]
    latency_ms: dict[str, NonNegative]
    hashes: Hashes

    def audit_row(self, policy_id: str) -> FailedAuditRow:
        return FailedAuditRow(request_id=self.request_id, error=self.error, model_versions=self.model_versions,
                              latency_ms=self.latency_ms, image_sha256=self.hashes.image_sha256,
                              text_sha256=self.hashes.text_sha256, policy=policy_id or None)


def _kind(value: Any) -> str:
    error = value.get("error") if isinstance(value, dict) else getattr(value, "error", None)
    return "judged" if error is None else "failed"


Result = Annotated[Annotated[JudgedResult, Tag("judged")] | Annotated[FailedResult, Tag("failed")],
                   Discriminator(_kind)]
RESULT: TypeAdapter[JudgedResult | FailedResult] = TypeAdapter(Result)


def parse_result(raw: str | bytes) -> JudgedResult | FailedResult:
    """A RESULT tensor's JSON as its contract (pydantic's ValidationError when it is not one)."""
    return RESULT.validate_json(raw)


class _SchemaGenerator(GenerateJsonSchema):
    """Schema as clients read it: no per-field titles, no `default: null` on fields that are left out instead."""

    def field_title_should_be_set(self, schema) -> bool:
        return False

    def default_schema(self, schema) -> JsonSchemaValue:
        inner = self.generate_inner(schema["schema"])
        default = schema.get("default")
        return inner if default is None else {**inner, "default": default}


def result_schema() -> dict[str, Any]:
    """result.schema.json: every RESULT is exactly one of a judged post's and a failed post's."""
    body = RESULT.json_schema(schema_generator=_SchemaGenerator, ref_template="#/$defs/{model}")
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": SCHEMA_ID,
            "title": "Moderation RESULT", **body}


def schema_text() -> str:
    return json.dumps(result_schema(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moderation.core.result_contract",
                                     description="Write or check result.schema.json from the RESULT contracts.")
    parser.add_argument("--write-schema", action="store_true", help=f"write {SCHEMA_PATH.name}")
    args = parser.parse_args(argv)
    current = SCHEMA_PATH.read_text(encoding="utf-8") if SCHEMA_PATH.exists() else ""
    if args.write_schema:
        SCHEMA_PATH.write_text(schema_text(), encoding="utf-8")
        print(f"wrote {SCHEMA_PATH}")
        return 0
    if current != schema_text():
        print(f"{SCHEMA_PATH} differs from the RESULT contracts: run with --write-schema", file=sys.stderr)
        return 1
    print(f"{SCHEMA_PATH} matches the RESULT contracts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
