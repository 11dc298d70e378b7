"""The request and response shapes of OpenAI's moderation API (POST /v1/moderations) as OpenAI documents them,
and its error shape. This service's own fields ride under the extension key `moderation` of each result: a
projection of RESULT (core/result_contract.py)."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..core.contracts import Band, Route
from ..core.result_contract import Action, ImageText, JudgedResult, ListHit, Media, ResultError

EXTENSION_KEY = "moderation"


class _Loose(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI adds fields over time; unknown ones are not errors


class ImageURL(_Loose):
    url: str = Field(max_length=64 * 1024 * 1024)


class TextPart(_Loose):
    type: Literal["text"]
    text: str


class ImagePart(_Loose):
    type: Literal["image_url"]
    image_url: ImageURL


Part = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ModerationRequest(_Loose):
    input: str | list[str] | list[Part]
    model: str = "omni-moderation-latest"


class _Extension(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class JudgedExtension(_Extension):
    """EXTENSION_KEY of a judged post: what RESULT says of the action and its evidence."""
    request_id: str
    action: Action
    decided_by: str
    reason: str
    route: Route
    gate_band: Band
    severity: dict[str, int]
    policy: str
    image_text: ImageText | None
    list_hits: list[ListHit]
    media: Media | None
    untrained: bool
    unmapped_categories: list[str]  # OpenAI categories the policy maps no label to: always false, scored 0

    @classmethod
    def of(cls, result: JudgedResult, unmapped_categories: list[str]) -> JudgedExtension:
        return cls(request_id=result.request_id, action=result.action, decided_by=result.decided_by,
                   reason=result.decision.reason, route=result.route, gate_band=result.gate.band,
                   severity=result.severity, policy=result.policy, image_text=result.image_text,
                   list_hits=result.list_hits, media=result.media, untrained=result.untrained,
                   unmapped_categories=unmapped_categories)


class FailedExtension(_Extension):
    """EXTENSION_KEY of a post that could not be judged, in a request of several."""
    action: None = None
    error: ResultError


class ModerationResult(BaseModel):
    flagged: bool
    categories: dict[str, bool]
    category_scores: dict[str, float]
    category_applied_input_types: dict[str, list[Literal["text", "image"]]]
    moderation: JudgedExtension | FailedExtension  # EXTENSION_KEY


class ModerationResponse(BaseModel):
    id: str
    model: str
    results: list[ModerationResult]


class OpenAIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, code: str, type_: str = "invalid_request_error",
                 param: str | None = None, retry_after: int | None = None, audited: bool = False):
        super().__init__(message)
        self.status, self.message, self.code, self.type, self.param = status, message, code, type_, param
        self.retry_after = retry_after  # seconds, sent as Retry-After
        self.audited = audited  # a row exists already (the gateway or a model wrote it)
        self.inputs: dict = {}  # hashes of the input it concerns, for its audit row

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
