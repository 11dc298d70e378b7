"""What the stages hand each other in BYTES tensors, one typed contract per hand-off:

    preprocess      -> REQUEST          -> read_text                  RequestRecord
    read_text       -> REQUEST          -> clip_gate, postprocess     RequestRecord (with the image's text)
    vlm_preprocess  -> DECODER_OPTIONS  -> language_decoder           DecoderOptions
    language_decoder -> VLM_RESULT      -> clip_gate                  VlmVerdict
    clip_gate       -> GATE             -> postprocess                GateDecision

Each is written with to_json() and read with from_json(), which validates it (unknown or missing fields are
a `bad_request`: only a caller that bypassed the ensemble can send a malformed one). A contract cannot be changed
once built; RESULT and the audit row are contracts too (core/result_contract.py)."""
from __future__ import annotations

from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import BadRequest, ModerationError

# RESULT.route names the path a post took, never the decision (that is RESULT.action): settled at the gate
# without the VLM, settled by a custom block/allow list, judged by the VLM, or answered from a near-duplicate's
# stored VLM verdict. A text_only post or one of several images takes the same paths.
GATE: Final = "gate"  # Final: each name has its Literal type (a Route / a Band)
LIST: Final = "list"
VLM: Final = "vlm"
CACHE: Final = "cache"
Route = Literal["gate", "list", "vlm", "cache"]
# The gate's band (gate/scoring.py gate_band), kept as evidence in RESULT.gate.band: the router escalates on
# ESCALATE; ALLOW and BLOCK are what the gate's thresholds said, which the action may not follow (an untrained
# signal never allows or blocks).
ALLOW: Final = "allow"
BLOCK: Final = "block"
ESCALATE: Final = "escalate"
Band = Literal["allow", "block", "escalate"]
Signal = Literal["trained", "untrained", "uncalibrated"]  # uncalibrated: trained, but the policy's gate
# thresholds were fitted for another CLIP (moderation/gate/calibration.py)


class Contract(BaseModel):
    # immutable once built: a stage that changes a contract builds a new one (model_copy(update=...))
    model_config = ConfigDict(extra="forbid", frozen=True)

    def to_json(self) -> bytes:
        return self.model_dump_json().encode("utf-8")

    @classmethod
    def from_json(cls, raw: bytes | str):
        try:
            return cls.model_validate_json(raw)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(x) for x in first["loc"]) or cls.__name__
            raise BadRequest(f"{cls.__name__} field {where!r}: {first['msg']}") from None


class PostError(Contract):
    code: str
    message: str

    @classmethod
    def of(cls, err: Exception) -> PostError:
        """What a failure says: a ModerationError's code and message, anything else `internal` with its type."""
        if isinstance(err, ModerationError):
            return cls(code=err.code, message=err.message)
        return cls(code="internal", message=f"{type(err).__name__}: {err}")


class RequestRecord(Contract):
    """One post as preprocess read it: validated, or (in a request of several posts) failed with `error`."""
    request_id: str
    policy_id: str            # name@version, RESULT.policy
    policy_name: str          # the policy file the post asked for
    policy_pin: str = ""      # the policy version every stage judges it under (core/pinned.py); "": the current
    lang: Literal["en", "zh"]
    describe: bool
    return_embedding: bool
    forget: bool              # clear the verdict cache of this post after judging it
    image_sha256: str
    text_sha256: str
    image_format: str
    image_size: tuple[int, int]
    has_caption: bool
    has_image: bool = True    # False: a text_only post, no image signal is read
    caption_key: str          # verdict-cache key of the normalised caption
    caption_truncated: bool   # CLIP read only its first 77 tokens
    fingerprint: list[float] | None = None  # thumbnail fingerprint, when the policy's cache checks one
    local_thumbnail: str | None = None  # base64 of core.imaging.local_thumbnail, when the cache checks local agreement
    escalate: bool = False    # OPTIONS escalate: to the VLM whatever the gate decides
    pdq: str | None = None    # PDQ hash (of the first frame), when the policy has an image list
    # each image's sha256, format, size, frame count and the frames read (core/post.py PostImage.media), for a post
    # of several images or an animated one; None for one still image
    media: list[dict[str, Any]] | None = None
    # open_nsfw's P(nsfw) of every image and frame read after the post's first, [[image, frame, p], ...] (image None
    # in a post of one image, frame None for a still); the first's comes from the ensemble's nsfw_image step
    more_nsfw: list[tuple[int | None, int | None, float]] = []
    # clip_image's embedding of the same images and frames, [[image, frame, base64 float32], ...]: the gate's concept
    # bank reads every one (gate/scoring.py)
    more_clip: list[tuple[int | None, int | None, str]] = []
    list_hits: list[dict[str, Any]] = []  # custom-list entries the post matched (core/lists.py ListHit)
    read_text: bool = False   # the read_text stage reads this post's image text (policy ocr and OPTIONS ocr)
    image_text: list[dict[str, Any]] | None = None  # OCR lines (ocr/reader.py TextLine); None: not read
    image_text_truncated: bool = False  # the OCR read budget left detected text unread
    text_scores: dict[str, float] = {}  # trained text signals on caption + image text, e.g. {"profanity": p}
    error: PostError | None = None
    received_at: float        # wall clock, s
    preprocessed_at: float    # wall clock, s
    preprocess_ms: float
    preprocess_version: str
    read_text_ms: float | None = None  # set by the read_text stage when it read the image
    read_text_version: str | None = None

    def local_thumbnail_bytes(self) -> bytes | None:
        import base64

        return base64.b64decode(self.local_thumbnail) if self.local_thumbnail else None

    @classmethod
    def failed(cls, request_id: str | None, hashes: dict[str, str], error: PostError, received_at: float,
               preprocess_ms: float, version: str) -> RequestRecord:
        """The record of a post that failed validation in a request of several posts."""
        return cls(request_id=request_id or "-", policy_id="", policy_name="default", lang="en", describe=False,
                   return_embedding=False, forget=False, image_sha256=hashes.get("image_sha256", ""),
                   text_sha256=hashes.get("text_sha256", ""), image_format="", image_size=(0, 0),
                   has_caption=False, caption_key="", caption_truncated=False, received_at=received_at,
                   preprocessed_at=received_at, preprocess_ms=preprocess_ms, preprocess_version=version, error=error)


class DecoderOptions(Contract):
    """How the decoder reads one post (vlm_preprocess built its prompt body)."""
    policy_name: str
    policy_pin: str = ""      # the post's pinned policy version (core/pinned.py)
    lang: Literal["en", "zh"]
    describe: bool
    caption_truncated: bool   # the VLM read only the first MAX_CAPTION_TOKENS tokens of the caption
    vlm_preprocess_version: str


class VlmVerdict(Contract):
    """The decoder's answer for one post (also what the verdict cache stores, without timings)."""
    violation: float
    labels: dict[str, float]
    sentiment: dict[str, float]
    description: str | None
    untrained: bool
    caption_truncated: bool
    model_versions: dict[str, str]
    timings_ms: dict[str, float] = {}


class FallbackInfo(Contract):
    """Why an escalation went to the INT8 decoder (RESULT.fallback)."""
    model: str
    reason: Literal["inflight", "queue"]
    inflight: int
    oldest_wait_ms: float


class GateDecision(Contract):
    """clip_gate's decision for one post, with the VLM's verdict when it escalated; a failed post has only
    `error` (and route None)."""
    route: Route | None
    band: Band | None = None             # the gate's own band for this post, whatever route it then took
    reason: str
    scores: dict[str, float]
    consistency: float | None
    sources: dict[str, str] = {}         # label -> trained signal that scored it instead of the concept bank
    # image signal -> {"image": i, "frame": f}: where its reported score came from, when not the post's first
    signal_media: dict[str, dict[str, int]] = {}
    # where each CLIP-scored label's score came from when not the post's first image or frame: {label: {image, frame}}
    label_media: dict[str, dict[str, int]] = {}
    signals: dict[str, Signal]
    gate_version: str
    gate_started: float                  # wall clock, s
    gate_ms: float
    vlm: VlmVerdict | None = None
    vlm_ms: float | None = None          # the escalation's round trip (absent for a cache hit)
    ab_arm: Literal["a", "b"] | None = None
    fallback: FallbackInfo | None = None
    cache: dict[str, Any] | None = None  # RESULT.cache
    escalated: Literal["gate", "forced"] | None = None  # who sent the post to the VLM
    error: PostError | None = None

    @classmethod
    def failed(cls, error: PostError, version: str, started: float, ms: float) -> GateDecision:
        return cls(route=None, reason="", scores={}, consistency=None, signals={}, gate_version=version,
                   gate_started=started, gate_ms=ms, error=error)
