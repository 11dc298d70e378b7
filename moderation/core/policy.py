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
    # The CLIP concept scores' routing band, signals.clip.route (allow below review, block at block, escalate between):
    # mirrored here for the calibration code; a policy sets one of the two, never both to different values.
    allow_below: float = Field(0.5, ge=0.0, le=1.01)
    block_at: float = Field(0.97, ge=0.0, le=1.01)
    block_labels: list[str] = []


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


class Signal(_Strict):
    """One entry of the policy's signal table (`signals:`): a signal a post is judged on. `labels`: the labels its
    score is for (a trained classifier's one score stands for each; None: every label, as the CLIP concept bank and
    the VLM score them). `band`: a score >= review sends to review, >= block blocks; a trained signal also routes by
    it at the gate, so its route and its action cannot disagree. `route`: the CLIP concept scores' own routing band
    (allow below review, block at block, escalate between), which may differ from the action's band: an untrained
    CLIP escalates what no action would flag. Whether a signal is trained is never the policy's to say: its model's
    artifact record says so."""
    labels: list[str] | None = None
    band: Band
    route: Band | None = None


# Routing by a band apart from the action's is the concept bank's alone: a classifier routes by its one band.
SEPARATE_ROUTE = ("clip",)


def _default_signals() -> dict[str, Signal]:
    # open_nsfw's guidance (< 0.2 likely safe, > 0.8 likely NSFW); the others as the gate's defaults
    return {"clip": Signal(band=Band(review=0.5, block=0.97), route=Band(review=0.5, block=0.97)),
            "nsfw_image": Signal(labels=["sexual"], band=Band(review=0.2, block=0.8)),
            "profanity": Signal(labels=["hate"], band=Band(review=0.5, block=0.9)),
            "vlm": Signal(band=Band(review=0.5, block=0.9))}


def _fold_older_fields(data: dict) -> dict:
    """`signals` over the defaults, with the places signals were set before it folded in: decisions.bands.<signal>
    (its band), gate.nsfw_label / profanity_label (their labels), gate.nsfw_allow_below / nsfw_block_at (open_nsfw's
    band), gate.allow_below / block_at (clip's route), decoder.label_threshold (the VLM's review). Each older field
    either agrees with `signals` or is refused as a contradiction; afterwards only `signals` holds them."""
    signals = {k: v.model_dump() for k, v in _default_signals().items()}
    given = data.get("signals") or {}
    if not isinstance(given, dict):
        return data
    for name, entry in given.items():  # an entry names what it changes: a band's review alone keeps its block
        own = signals.get(name, {})
        entry = entry if isinstance(entry, dict) else {}
        signals[name] = {**own, **entry, **{k: {**own[k], **entry[k]} for k in ("band", "route")
                                            if isinstance(own.get(k), dict) and isinstance(entry.get(k), dict)}}
    gate = dict(data.get("gate") or {})
    decisions = dict(data.get("decisions") or {})
    decoder = dict(data.get("decoder") or {})

    said: dict[tuple[str, str, str | None], str] = {}  # what the policy set, and where
    for name, entry in given.items():
        for key, value in (entry if isinstance(entry, dict) else {}).items():
            subs = value if key in ("band", "route") and isinstance(value, dict) else {None: value}
            for sub in subs:
                said[(name, key, sub)] = f"signals.{name}.{key}" + (f".{sub}" if sub else "")

    def fold(where: str, name: str, key: str, value, sub: str | None = None):
        entry = signals.setdefault(name, {})
        if (name, key, sub) in said:
            have = (entry.get(key) or {}).get(sub) if sub else entry.get(key)
            if have != value:
                raise ValueError(f"{where} ({value}) contradicts {said[(name, key, sub)]} ({have}): "
                                 f"set it in signals.{name} only")
        said[(name, key, sub)] = where
        if sub:
            entry[key] = {**(entry.get(key) or {}), sub: value}
        else:
            entry[key] = value

    for name, band in (decisions.pop("bands", None) or {}).items():
        for sub, value in (band or {}).items():
            fold(f"decisions.bands.{name}.{sub}", name, "band", value, sub)
    for name, field in (("nsfw_image", "nsfw_label"), ("profanity", "profanity_label")):
        if field in gate:
            label = gate.pop(field)
            fold(f"gate.{field}", name, "labels", [label] if label is not None else [])
    for sub, field in (("review", "nsfw_allow_below"), ("block", "nsfw_block_at")):
        if field in gate:
            fold(f"gate.{field}", "nsfw_image", "band", gate.pop(field), sub)
    for sub, field in (("review", "allow_below"), ("block", "block_at")):
        if field in gate:
            fold(f"gate.{field}", "clip", "route", gate[field], sub)
    if "label_threshold" in decoder:
        fold("decoder.label_threshold", "vlm", "band", decoder.pop("label_threshold"), "review")
    clip = signals.get("clip", {})
    route = clip.get("route") or clip.get("band") or {}  # without a route of its own, clip routes by its band
    gate.update(allow_below=route.get("review", 0.5), block_at=route.get("block", 0.97))
    out = {**data, "gate": gate, "signals": signals}
    if "decisions" in data:
        out["decisions"] = decisions
    if "decoder" in data:
        out["decoder"] = decoder
    return out


class Decisions(_Strict):
    """How RESULT.action is chosen (moderation/core/decision.py) beyond each signal's band (`signals`). Untrained
    signals may escalate and may send a post to review, never settle it: what no trained signal flagged gets
    `default_action`."""
    default_action: Literal["allow", "review"] = "allow"
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
    # the signal table (moderation/core/policy.py Signal): over the defaults, a policy names the entries it changes
    signals: dict[str, Signal] = Field(default_factory=_default_signals)
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
    def _one_signal_table(cls, data):
        if not isinstance(data, dict) or not isinstance(data.get("gate"), dict):
            return data
        return _fold_older_fields(data)

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
        for name, signal in self.signals.items():
            bad = [k for k in signal.labels or [] if k not in keys]
            if bad:
                raise ValueError(f"signals.{name}.labels names unknown labels {bad}")
            if signal.route is not None and name not in SEPARATE_ROUTE:
                raise ValueError(f"signals.{name}.route: only {list(SEPARATE_ROUTE)} route apart from their band; "
                                 f"a classifier routes by its one band (signals.{name}.band)")
        bad = [k for k in self.decisions.labels if k not in keys]
        if bad:
            raise ValueError(f"decisions.labels names unknown labels {bad}")
        for label in self.decisions.labels:  # a label's override must leave every signal's band ordered
            for name in self.signals:
                try:
                    self.band(name, label)
                except ValueError as e:
                    raise ValueError(f"decisions.labels.{label} over signals.{name}.band: "
                                     f"{str(e).splitlines()[-1].strip()}") from None
        bad = sorted({k for labels in self.openai.categories.values() for k in labels} - set(keys))
        if bad:
            raise ValueError(f"openai.categories names unknown labels {bad}")
        return self

    def band(self, signal: str, label: str) -> Band:
        """The band `signal` decides `label` by (core/decision.py) and, for a trained signal, routes it by at the gate
        (gate/scoring.py): signals.<signal>.band (a signal not in the table: clip's), with decisions.labels'
        overrides for the label. The one place both read, so a route and an action cannot disagree."""
        entry = self.signals.get(signal) or self.signals.get("clip")
        band = entry.band if entry is not None else Band(review=0.5, block=1.01)
        own = self.decisions.labels.get(label)
        if own is None or (own.review is None and own.block is None):
            return band
        return Band(review=own.review if own.review is not None else band.review,
                    block=own.block if own.block is not None else band.block)

    def route_band(self, signal: str, label: str) -> Band:
        """The band `signal`'s score on `label` routes a post by at the gate: allow below review, block at block
        (a blockable label), escalate between. clip's own route when set, else the signal's band()."""
        entry = self.signals.get(signal)
        if entry is not None and entry.route is not None:
            return entry.route
        return self.band(signal, label)

    def listed_from(self, signal: str, label: str) -> float:
        """The score from which RESULT.labels lists `label` as scored by `signal`: where its routing band stops
        allowing (a score below it was clear), for the VLM, which does not route, its band's review."""
        return self.route_band(signal, label).review

    def signal_labels(self) -> dict[str, list[str]]:
        """{signal: the labels it scores} for the signals that score named labels (the trained classifiers), in
        table order: a label two of them score takes the first's."""
        return {name: list(s.labels) for name, s in self.signals.items() if s.labels is not None}

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
