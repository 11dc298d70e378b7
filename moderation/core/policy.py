"""Versioned moderation policy: labels (zh + en), gate concepts and thresholds, prompts, options.

Policies are YAML files named `<name>.yaml` in the policy directory ($MODERATION_POLICY_DIR, or the
ones shipped in this package). A request picks one with OPTIONS {"policy": name}."""
from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .errors import UnknownPolicy
from .hashing import sha256_hex
from .list_store import ImageEntry, ListEntry, PolicyLists, TermEntry, list_store, lists_path, lists_state_path
from .list_store import forget_loaded as forget_loaded_lists
from .text import Lang

__all__ = ["ImageEntry", "ListEntry", "PolicyLists", "TermEntry", "lists_path", "lists_state_path"]

PACKAGE_POLICY_DIR = Path(__file__).parent / "policies"
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Label(_Strict):
    key: str = Field(pattern=r"^[a-z][a-z0-9_]{0,31}$")
    en: str
    zh: str
    gate_concepts: list[str] = []


class ClipIdentity(_Strict):
    """The CLIP a policy's gate thresholds were calibrated for: the sha256 of clip_image's and clip_text's
    model.onnx as their artifact.json records them (moderation/gate/calibration.py served_clip_identity)."""
    clip_image: str = Field(pattern=r"^[0-9a-f]{64}$")
    clip_text: str = Field(pattern=r"^[0-9a-f]{64}$")
    name: str = ""  # where the checkpoint came from (the records' `source`), for people; not compared

    def same_clip(self, other: ClipIdentity | None) -> bool:
        return other is not None and (self.clip_image, self.clip_text) == (other.clip_image, other.clip_text)


class Gate(_Strict):
    # The CLIP these thresholds were fitted on (clients.evaluate --calibrate-gate). A trained CLIP that is not this
    # one is an "uncalibrated" signal: like an untrained one it may escalate or send to review, never allow or block.
    calibrated_for: ClipIdentity | None = None
    concept_scale: float = 40.0
    concept_center: float = 0.12
    consistency_scale: float = 40.0
    consistency_center: float = -0.05
    allow_below: float = Field(0.5, ge=0.0, le=1.01)
    block_at: float = Field(0.97, ge=0.0, le=1.01)
    block_labels: list[str] = []
    # Signals from trained classifiers (e.g. nsfw_image) override concept scores for their label.
    nsfw_label: str | None = "sexual"
    # The trained English profanity classifier (alt-profanity-check) on caption + image text scores this label.
    profanity_label: str | None = "hate"
    # The trained nsfw_image signal (open_nsfw's P(nsfw)) on nsfw_label routes and decides by one band,
    # decisions.bands.nsfw_image: allow below its review, block at its block (if the label is in block_labels),
    # escalate in between. These two mirror that band (Policy._one_band_per_trained_signal): a policy may still set
    # them instead of the band, never both to different values.
    nsfw_allow_below: float = Field(0.2, ge=0.0, le=1.01)
    nsfw_block_at: float = Field(0.8, ge=0.0, le=1.01)


class ABTest(_Strict):
    """Send `fraction` of escalated posts to `decoder_version` of language_decoder (both versions loaded:
    `clients.admin load --model language_decoder --versions 1,2`). Sticky: the arm is a function of the
    post's content hashes, so a repeated post always meets the same decoder."""
    decoder_version: str = Field(pattern=r"^[0-9]+$")
    fraction: float = Field(ge=0.0, le=1.0)


class DecoderFallback(_Strict):
    """Degrade, don't fail: while the full-precision decoder has `max_inflight` or more escalations from this gate
    instance in flight, or its oldest in-flight escalation has waited `max_queue_ms`, new escalations go to
    `model` (the INT8 twin); they return as soon as both drop below. Unset thresholds are not checked."""
    max_inflight: int | None = Field(None, ge=1)
    max_queue_ms: float | None = Field(None, gt=0)
    model: str = Field("language_decoder_int8", pattern=r"^[A-Za-z0-9_.-]{1,64}$")


class DecoderSettings(_Strict):
    violation_threshold: float = 0.5
    label_threshold: float = 0.5
    describe_max_tokens: int = Field(24, ge=1, le=256)
    fallback: DecoderFallback | None = None


class CacheSettings(_Strict):
    """Near-duplicate verdict cache in clip_gate (moderation/gate/cache.py). A post the gate would escalate reuses a
    stored VLM verdict when its CLIP image embedding cosine >= image_threshold, its caption matches (same
    normalised text when text_threshold is null, else CLIP text cosine >= text_threshold) and, when set, its
    thumbnail fingerprint cosine >= fingerprint_threshold. Per partition: LRU of max_entries, ttl_s lifetime.
    The shared (Redis) backend compares at most `candidates` entries per lookup: the byte-identical copy, then the
    most recently used entries with the same caption key (all entries of the partition when text_threshold is
    set); the in-process backend compares the whole partition."""
    enabled: bool = False
    image_threshold: float = Field(0.98, ge=0.0, le=1.0)
    text_threshold: float | None = Field(None, ge=0.0, le=1.0)
    fingerprint_threshold: float | None = Field(0.7, ge=-1.0, le=1.0)
    # largest 8x8-tile difference of the aligned 64x64 thumbnails (core.imaging.local_difference); null: not checked
    local_threshold: float | None = Field(None, ge=0.0)
    ttl_s: float = Field(3600.0, gt=0)
    max_entries: int = Field(4096, ge=1, le=1_000_000)
    candidates: int = Field(128, ge=1, le=10_000)


class LabelDecision(_Strict):
    """Per-label overrides of the action bands (a score >= review -> review, >= block -> block) and the signals
    that may settle the label (lists always may); unset: every signal's own bands, every trained signal."""
    review: float | None = Field(None, ge=0.0, le=1.01)
    block: float | None = Field(None, ge=0.0, le=1.01)
    deciders: list[str] | None = None


class Band(_Strict):
    """A signal's band on a label score: >= review sends to review, >= block blocks. A trained signal's band also
    routes at the gate (below review: allow, at block: block, between: escalate): one band, so the route's band and
    the action cannot disagree (gate/scoring.py thresholds)."""
    review: float = Field(ge=0.0, le=1.01)
    block: float = Field(ge=0.0, le=1.01)

    @model_validator(mode="after")
    def _ordered(self):
        if self.review > self.block:
            raise ValueError(f"a band's review ({self.review}) must not exceed its block ({self.block})")
        return self


def _default_bands() -> dict[str, Band]:
    # open_nsfw's guidance (< 0.2 likely safe, > 0.8 likely NSFW); the others as the gate's defaults
    return {"clip": Band(review=0.5, block=0.97), "nsfw_image": Band(review=0.2, block=0.8),
            "vlm": Band(review=0.5, block=0.9), "profanity": Band(review=0.5, block=0.9)}


class Decisions(_Strict):
    """How RESULT.action is chosen (moderation/core/decision.py). Untrained signals may escalate and may send a
    post to review, never settle it: what no trained signal flagged gets `default_action`. The bands are the
    action's, apart from the gate's routing thresholds (a policy that escalates everything does not flag it)."""
    default_action: Literal["allow", "review"] = "allow"
    # per signal, over the defaults (a policy names the bands it changes); a signal without one uses "clip"'s
    bands: dict[str, Band] = Field(default_factory=_default_bands)
    image_match_distance: int = Field(31, ge=0, le=128)  # PDQ Hamming distance of an image-list match
    labels: dict[str, LabelDecision] = {}


class OcrSettings(_Strict):
    """Reading the text drawn in images (moderation/ocr/reader.py); OPTIONS {"ocr": false} skips it per post."""
    enabled: bool = True
    prompt_max_tokens: int = Field(128, ge=0, le=1024)  # image-text tokens the VLM prompt carries
    # Per-image read budget (ocr/reader.py ReadBudget): detected boxes recognised, largest first; their cost in
    # line squares (a box's long side / short side, padded per batch as the recogniser reads them); time after
    # which no new batch starts. Past it the post carries what was read, image_text.truncated, and goes to review.
    max_boxes: int = Field(48, ge=1, le=1000)
    max_read_area: float = Field(48.0, ge=7.0, le=10_000.0)
    max_read_ms: float = Field(400.0, ge=10.0, le=60_000.0)


class MediaSettings(_Strict):
    """How much of a post's media is read (core/imaging.py): at most `max_images` images per post (more is the
    post's `too_many_images` error); an animated GIF, WebP or APNG is judged on at most `max_frames` distinct frames
    spread over it (1: the first frame only, as a still image)."""
    max_images: int = Field(9, ge=1, le=18)
    max_frames: int = Field(8, ge=1, le=32)


# The categories of OpenAI's moderation API (POST /v1/moderations, omni-moderation-latest), every one reported.
OPENAI_CATEGORIES = ("harassment", "harassment/threatening", "hate", "hate/threatening", "illicit",
                     "illicit/violent", "self-harm", "self-harm/intent", "self-harm/instructions", "sexual",
                     "sexual/minors", "violence", "violence/graphic")


class OpenAICompat(_Strict):
    """How /v1/moderations (moderation/openai/) reports this policy: each OpenAI category from the policy labels
    it names (its score is their highest, flagged when any of them reaches its review band); a category naming no
    label is reported false / 0 and listed as unmapped."""
    categories: dict[str, list[str]] = {}

    @field_validator("categories")
    @classmethod
    def _known(cls, categories):
        bad = [c for c in categories if c not in OPENAI_CATEGORIES]
        if bad:
            raise ValueError(f"openai.categories names unknown OpenAI categories {bad}")
        return categories


class SentimentOption(_Strict):
    key: str
    en: str
    zh: str


class Prompt(_Strict):
    system: str
    caption: str
    violation: str
    label: str
    sentiment: str
    describe: str
    yes: str
    no: str
    image_text: str = ""  # the prompt's line for the text in the image, e.g. "Text in the image: {text}"


class Policy(_Strict):
    name: str
    version: str
    labels: list[Label]
    gate: Gate
    decoder: DecoderSettings = DecoderSettings()
    ab: ABTest | None = None
    cache: CacheSettings = CacheSettings()
    decisions: Decisions = Decisions()
    ocr: OcrSettings = OcrSettings()
    media: MediaSettings = MediaSettings()
    openai: OpenAICompat = OpenAICompat()
    sentiment: list[SentimentOption]
    prompts: dict[Lang, Prompt]
    digest: str = ""
    lists: PolicyLists = PolicyLists()
    # why the lists in force are not the store's latest (a lists file fails to parse, Redis cannot be reached: the
    # last good lists are in force), or None
    lists_fault: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _one_band_per_trained_signal(cls, data):
        """decisions.bands over the defaults, and open_nsfw's one band: gate.nsfw_allow_below / nsfw_block_at (the
        older place for it) set decisions.bands.nsfw_image when that is not given, must equal it when it is, and
        mirror it either way."""
        if not isinstance(data, dict) or not isinstance(data.get("gate"), dict):
            return data
        decisions = data.get("decisions") or {}
        if not isinstance(decisions, dict):
            return data
        given = decisions.get("bands") or {}
        if not isinstance(given, dict):
            return data
        bands = {**{k: b.model_dump() for k, b in _default_bands().items()}, **given}
        gate = dict(data["gate"])
        legacy = {k: gate[f] for k, f in (("review", "nsfw_allow_below"), ("block", "nsfw_block_at")) if f in gate}
        if legacy.get("review", 0.0) > legacy.get("block", 1.01):
            raise ValueError("gate.nsfw_allow_below must not exceed gate.nsfw_block_at")
        nsfw = bands["nsfw_image"]
        nsfw = nsfw.model_dump() if isinstance(nsfw, Band) else dict(nsfw)
        if legacy and "nsfw_image" in given and any(nsfw.get(k) != v for k, v in legacy.items()):
            raise ValueError(f"gate.nsfw_allow_below / nsfw_block_at {legacy} contradict decisions.bands.nsfw_image "
                             f"{nsfw}: open_nsfw routes and decides by one band; set decisions.bands.nsfw_image only")
        nsfw.update(legacy)
        bands["nsfw_image"] = nsfw
        gate.update(nsfw_allow_below=nsfw.get("review"), nsfw_block_at=nsfw.get("block"))
        return {**data, "gate": gate, "decisions": {**decisions, "bands": bands}}

    @field_validator("labels")
    @classmethod
    def _unique_keys(cls, labels):
        keys = [lab.key for lab in labels]
        if len(set(keys)) != len(keys):
            raise ValueError(f"duplicate label keys in {keys}")
        return labels

    @model_validator(mode="after")
    def _check_refs(self):
        keys = self.label_keys
        bad = [k for k in self.gate.block_labels if k not in keys]
        if bad:
            raise ValueError(f"gate.block_labels names unknown labels {bad}")
        if self.gate.allow_below > self.gate.block_at:
            raise ValueError("gate.allow_below must not exceed gate.block_at")
        if self.gate.profanity_label is not None and self.gate.profanity_label not in keys:
            raise ValueError(f"gate.profanity_label names an unknown label {self.gate.profanity_label!r}")
        if self.gate.nsfw_label is not None and self.gate.nsfw_label not in keys:
            raise ValueError(f"gate.nsfw_label names an unknown label {self.gate.nsfw_label!r}")
        bad = [k for k in self.decisions.labels if k not in keys]
        if bad:
            raise ValueError(f"decisions.labels names unknown labels {bad}")
        for label in self.decisions.labels:  # a label's override must leave every signal's band ordered
            for signal in self.decisions.bands:
                try:
                    self.band(signal, label)
                except ValueError as e:
                    raise ValueError(f"decisions.labels.{label} over decisions.bands.{signal}: "
                                     f"{str(e).splitlines()[-1].strip()}") from None
        bad = sorted({k for labels in self.openai.categories.values() for k in labels} - set(keys))
        if bad:
            raise ValueError(f"openai.categories names unknown labels {bad}")
        return self

    def band(self, signal: str, label: str) -> Band:
        """The band `signal` decides `label` by (core/decision.py) and, for a trained signal, routes it by at the gate
        (gate/scoring.py): decisions.bands (a signal without one: the clip band), with decisions.labels' overrides
        for the label. The one place both read, so a route and an action cannot disagree."""
        bands = self.decisions.bands
        band = bands.get(signal) or bands.get("clip") or Band(review=0.5, block=1.01)
        own = self.decisions.labels.get(label)
        if own is None or (own.review is None and own.block is None):
            return band
        return Band(review=own.review if own.review is not None else band.review,
                    block=own.block if own.block is not None else band.block)

    @property
    def label_keys(self) -> list[str]:
        return [lab.key for lab in self.labels]

    @property
    def id(self) -> str:
        """name@version, plus the lists' revision once they were edited (results and audit rows carry it)."""
        return f"{self.name}@{self.version}" + (f"+lists.{self.lists.revision}" if self.lists.revision else "")

    def label_names(self, lang: str) -> list[str]:
        return [getattr(lab, lang) for lab in self.labels]

    def all_prompt_text(self) -> list[str]:
        """Every string the prompts can contain (used to train the toy tokenizer)."""
        out = []
        for lang, p in self.prompts.items():
            out += [p.system, p.caption, p.violation, p.sentiment, p.describe, p.yes, p.no]
            out += [p.label.format(name=n) for n in self.label_names(lang)]
            out += [getattr(s, lang) for s in self.sentiment]
        return out


def policy_dir() -> Path:
    return Path(os.environ.get("MODERATION_POLICY_DIR") or PACKAGE_POLICY_DIR)


def load_policy(name: str = "default", directory: Path | None = None) -> Policy:
    """The policy file `<name>.yaml` (re-read when it changes) with its lists in force (core/list_store.py: Redis or
    the state directory, checked for a new revision at most every LISTS_POLL_S)."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise UnknownPolicy(f"policy name {name!r} is not a valid name")
    path = Path(directory or policy_dir()) / f"{name}.yaml"
    if not path.is_file():
        raise UnknownPolicy(f"unknown policy {name!r}: no {path.name} in the policy directory")
    lists, fault = list_store(path.parent).current(name)
    return _with_lists(_load_yaml(str(path), path.stat().st_mtime_ns), lists, fault)


@functools.lru_cache(maxsize=32)
def _load_yaml(path: str, _mtime: int) -> Policy:
    raw = Path(path).read_bytes()
    data = yaml.safe_load(raw)
    data["digest"] = sha256_hex(raw)[:16]  # of the YAML: caches keyed on it survive list edits
    return Policy.model_validate(data)


# (policy, lists, fault) -> the policy with those lists: one object per combination, so caches keyed on the lists'
# identity (core/image_match.py index_for) keep hitting; the entries hold their objects, so no id is reused
_WITH_LISTS: dict[tuple[int, int, str | None], tuple[Policy, PolicyLists, Policy]] = {}


def _with_lists(base: Policy, lists: PolicyLists, fault: str | None) -> Policy:
    key = (id(base), id(lists), fault)
    hit = _WITH_LISTS.get(key)
    if hit is not None and hit[0] is base and hit[1] is lists:
        return hit[2]
    policy = base.model_copy(update={"lists": lists, "lists_fault": fault})
    if len(_WITH_LISTS) >= 64:
        _WITH_LISTS.clear()
    _WITH_LISTS[key] = (base, lists, policy)
    return policy


def forget_loaded() -> None:
    """What a new process holds: no policy or lists read yet."""
    _load_yaml.cache_clear()
    _WITH_LISTS.clear()
    forget_loaded_lists()
