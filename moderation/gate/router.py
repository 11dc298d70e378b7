"""clip_gate's orchestration: judge each post with the gate, then, for posts it escalates, answer from the
near-duplicate verdict cache or send the post on (the `vlm` ensemble; the A/B arm's pinned decoder version; the
INT8 decoder at peak). Escalations of one batch run concurrently, so the decoder's dynamic batcher can take them
as one padded batch.

Triton-free: the model calls go through an Executor (BLS in the server, onnxruntime and the decoder in-process
for the benchmark), so the same code decides in both."""
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ..core.contracts import CACHE, ESCALATE, GATE, LIST, VLM, GateDecision, PostError, RequestRecord, VlmVerdict
from ..core.errors import ModerationError
from ..core.hashing import unit_interval
from ..core.lists import evidence_place
from ..core.pinned import pinned_policy
from ..core.policy import ClipIdentity, Policy
from ..core.text import image_words
from .cache import GateCache
from .calibration import UNCALIBRATED, clip_signal
from .fallback import FallbackSwitch
from .inputs import ClipTokens, decode_embedding
from .scoring import ConceptBank, judge
from .text_signals import SIGNALS as TEXT_SIGNALS

TEXT_BATCH = 64  # concept texts per clip_text call (its max_batch_size)


class Executor(Protocol):
    async def infer(self, model: str, inputs: dict[str, np.ndarray], outputs: list[str],
                    version: int = -1) -> dict[str, np.ndarray]:
        """Run `model` (raise ModerationError, e.g. from failed_call(), when it fails)."""

    def is_ready(self, model: str, version: str) -> bool: ...


def ab_arm(policy: Policy, image_sha256: str, text_sha256: str) -> str | None:
    """The A/B arm of an escalated post: the B decoder version, or None for the default path. Sticky: a function
    of the post's content hashes, so a repeated post always meets the same decoder."""
    if policy.ab is None or policy.ab.fraction <= 0:
        return None
    return policy.ab.decoder_version if unit_interval(policy.name, image_sha256, text_sha256) < policy.ab.fraction \
        else None


@dataclass
class GatePost:
    """One post as clip_gate receives it."""
    record: RequestRecord
    frames: bytes  # the post's images as preprocess decoded them (FRAMES, core/post.py pack_images)
    text: bytes
    image_emb: np.ndarray
    text_emb: np.ndarray
    nsfw_score: float | None = None  # open_nsfw's P(nsfw) of the (first) frame, when nsfw_image ran

    def image_embeddings(self) -> tuple[np.ndarray, list[dict[str, int]]]:
        """CLIP's embedding of every image and frame clip_image read ([rows, d]; the first image's first frame in
        row 0) and where each row came from (evidence_place; {} for row 0)."""
        rows, places = [self.image_emb], [dict[str, int]()]
        for i, f, e in self.record.more_clip:
            rows.append(decode_embedding(e))
            places.append(evidence_place(i, f))
        return np.stack(rows), places

    def image_nsfw(self) -> tuple[float | None, dict[str, int]]:
        """open_nsfw's P(nsfw) of the post, the largest over its images and frames, and where it came from
        ({"image": i, "frame": f} as far as they apply; empty when the post's first image or frame scored it)."""
        best, where = self.nsfw_score, {}
        for i, f, p in self.record.more_nsfw:
            if best is None or p > best:
                best, where = p, evidence_place(i, f)
        return best, where


def _no_count(name: str, **labels: str) -> None:
    return None


def settling_list_hit(rec: RequestRecord) -> dict | None:
    """The custom-list hit that settles a post before any escalation, as core/decision.py chooses the action: a
    block-list hit, else an allow-list hit unless OCR read the image's text only in part (then no allow list
    allows it, so the post takes the gate's path)."""
    hits = rec.list_hits
    block = next((h for h in hits if h["list"] == "block"), None)
    if block is not None or rec.image_text_truncated:
        return block
    return next((h for h in hits if h["list"] == "allow"), None)


class GateRouter:
    def __init__(self, executor: Executor, clip_tokens: ClipTokens, version: str, signals: dict[str, str],
                 count: Callable[..., None] = _no_count, warn: Callable[[str], None] = print,
                 clip_identity: ClipIdentity | None = None):
        """`signals`: 'trained' / 'untrained' per signal the gate reads (clip, nsfw_image), from artifact records;
        `count(metric, **labels)` feeds the custom metrics; `warn` logs a degraded path; `clip_identity`: the
        served CLIP (calibration.served_clip_identity), which a policy's gate.calibrated_for must name for a
        trained CLIP to count as trained under it."""
        self.executor, self.clip_tokens, self.version = executor, clip_tokens, version
        self.clip_identity = clip_identity
        self._uncalibrated_told: set[str] = set()
        self.signals, self.count, self.warn = {**TEXT_SIGNALS, **signals}, count, warn
        self.banks: dict[str, ConceptBank] = {}
        # near-duplicate verdict cache (policy `cache`); verdicts of swapped-out model versions are not served
        # (in-process, or shared by every replica through Redis when MODERATION_REDIS_URL is set)
        self.verdicts = GateCache(is_ready=executor.is_ready, count=count, warn=warn)
        self.fallback = FallbackSwitch()  # INT8 decoder at peak (policy decoder.fallback)

    async def bank(self, policy: Policy) -> ConceptBank:
        """The policy's concept bank, encoded by clip_text once per policy version."""
        bank = self.banks.get(policy.digest)
        if bank is None:
            texts = [t for _, t in ConceptBank.concept_texts(policy)]
            emb = await self._encode_texts(texts) if texts else None
            bank = self.banks[policy.digest] = ConceptBank.from_embeddings(policy, emb)
        return bank

    async def _encode_texts(self, texts: list[str]) -> np.ndarray:
        ids, mask = self.clip_tokens(texts)
        out = []
        for s in range(0, len(texts), TEXT_BATCH):
            got = await self.executor.infer("clip_text", {"input_ids": ids[s:s + TEXT_BATCH],
                                                          "attention_mask": mask[s:s + TEXT_BATCH]}, ["TEXT_EMBEDS"])
            out.append(got["TEXT_EMBEDS"])
        return np.concatenate(out)

    async def route_posts(self, posts: list[GatePost], started: float | None = None) -> list[GateDecision]:
        """One decision per post, in order; escalations (and cache lookups) included. A post that failed before
        (its record has an error) keeps it; an escalation that fails costs its post only in a request of several
        posts (a request of one fails with it)."""
        t0 = started if started is not None else time.perf_counter()
        decisions, pending = [], []
        for i, post in enumerate(posts):
            rec = post.record
            if rec.error is not None:
                decisions.append(GateDecision.failed(rec.error, self.version, time.time(),
                                                     (time.perf_counter() - t0) * 1e3))
                continue
            policy = pinned_policy(rec.policy_name, rec.policy_pin)
            trained = dict(rec.text_scores)
            nsfw, nsfw_from = post.image_nsfw()
            if nsfw is not None and rec.has_image:
                trained["nsfw_image"] = nsfw
            # a text_only post: the concept bank reads the caption's CLIP embedding (one space for both), and
            # there is no image for the caption to be consistent with
            embeddings, places = post.image_embeddings() if rec.has_image else (post.text_emb, [{}])
            judged = judge(policy, await self.bank(policy), embeddings, post.text_emb,
                           rec.has_caption and rec.has_image, trained)
            label_media = {label: places[row] for label, row in judged.pop("label_rows").items()}
            signals = {"clip": self._clip_signal(policy)}
            for source in trained:  # an artifact record (or the text classifier's own module) says trained
                signals[source] = self.signals.get(source, "untrained")
            d = GateDecision(**judged, route=GATE, signals=signals, gate_version=self.version,
                             gate_started=time.time(), gate_ms=(time.perf_counter() - t0) * 1e3,
                             signal_media={"nsfw_image": nsfw_from} if nsfw_from and "nsfw_image" in trained else {},
                             label_media=label_media)
            settled = settling_list_hit(rec)
            if settled is not None and not rec.escalate:  # an operator's list decides, whatever the gate's band
                decisions.append(d.model_copy(update={
                    "route": LIST, "escalated": None,
                    "reason": f"{settled['kind']} on the {settled['list']} list (entry {settled['id']}); {d.reason}"}))
                continue
            if rec.escalate and d.band != ESCALATE:  # reported posts, appeals, spot checks
                d = d.model_copy(update={"escalated": "forced", "reason": "escalation forced by OPTIONS (the gate's "
                                                                          f"band was {d.band}: {d.reason})"})
            elif d.band == ESCALATE:
                d = d.model_copy(update={"escalated": "gate"})
            if d.escalated is None:  # the gate's band settles the post (its action is chosen in postprocess)
                decisions.append(d)
                continue
            d = d.model_copy(update={"route": VLM})
            arm = ab_arm(policy, rec.image_sha256, rec.text_sha256)
            probe = self.verdicts.probe(policy, rec, post.image_emb, post.text_emb, arm)
            hit = self.verdicts.lookup(probe) if probe else None
            if probe:
                self.count("moderation_cache_total", result="hit" if hit else "miss")
            if hit:  # a near-duplicate's stored VLM verdict: no escalation
                d = d.model_copy(update={"route": CACHE, "vlm": hit[0], "cache": hit[1]})
            else:
                pending.append((i, d, probe, self._escalate(post, policy, arm)))
            decisions.append(d)
        answers = await asyncio.gather(*(p for *_, p in pending), return_exceptions=True)
        for (i, d, probe, _), answer in zip(pending, answers, strict=True):
            if isinstance(answer, BaseException):
                if len(posts) == 1 or not isinstance(answer, ModerationError):
                    raise answer
                decisions[i] = GateDecision.failed(PostError(code=answer.code, message=answer.message),
                                                   self.version, d.gate_started, d.gate_ms)
                continue
            verdict, vlm_ms, arm_name, fallback = answer
            decisions[i] = d.model_copy(update={"vlm": verdict, "vlm_ms": vlm_ms, "ab_arm": arm_name,
                                                "fallback": fallback,
                                                **({"cache": self.verdicts.after(probe, verdict)} if probe else {})})
        return decisions

    def _clip_signal(self, policy: Policy) -> str:
        status = clip_signal(self.signals["clip"], policy, self.clip_identity)
        if status == UNCALIBRATED and policy.digest not in self._uncalibrated_told:
            self._uncalibrated_told.add(policy.digest)
            self.warn(f"policy {policy.id}: gate thresholds not calibrated for the served CLIP "
                      f"({self.clip_identity.name if self.clip_identity else 'no artifact record'}): its scores may "
                      "escalate or send to review, never allow or block (clients.evaluate --calibrate-gate)")
        return status

    async def _escalate(self, post: GatePost, policy: Policy, arm: str | None):
        """(verdict, round trip ms, A/B arm name, fallback info) of one escalated post."""
        opts = json.dumps({"request_id": post.record.request_id, "describe": post.record.describe,
                           "lang": post.record.lang, "policy": post.record.policy_name}).encode()
        inputs = {"FRAMES": np.array([[post.frames]], dtype=np.object_),
                  "TEXT": np.array([[post.text]], dtype=np.object_),
                  "OPTIONS": np.array([[opts]], dtype=np.object_),
                  "POLICY_PIN": np.array([[post.record.policy_pin.encode()]], dtype=np.object_)}
        words = image_words(post.record.image_text)  # for the prompt (OCR ran once, in read_text)
        if words:
            inputs["IMAGE_TEXT"] = np.array([[words.encode("utf-8")]], dtype=np.object_)
        t = time.perf_counter()
        out = None
        fallback = self.fallback.check(policy.decoder.fallback)
        if fallback is not None and not self.executor.is_ready(fallback.model, ""):
            fallback = None  # not loaded (a GPU render without room for the twin): no refused call per escalation
        if fallback is not None:  # peak: the INT8 twin instead of queueing behind the full-precision decoder
            try:
                out = await self._chain(inputs, fallback.model)
                arm = None
                self.count("moderation_decoder_fallback_total", reason=fallback.reason, model=fallback.model)
            except ModerationError as e:  # INT8 decoder not loaded or failing: degrade to the normal path
                self.warn(f"fallback to {fallback.model} failed, using the full decoder: {e}")
                fallback = None
        if out is None:
            with self.fallback.track():
                if arm is None:  # the default path: the vlm ensemble, whose decoder step takes the live version
                    out = (await self.executor.infer("vlm", inputs, ["VLM_RESULT"]))["VLM_RESULT"]
                else:  # A/B arm: the same chain with the decoder version pinned
                    out = await self._chain(inputs, "language_decoder", int(arm))
        verdict = VlmVerdict.from_json(out.reshape(-1)[0])
        arm_name = "b" if arm else ("a" if policy.ab and fallback is None else None)
        self.count("moderation_escalations_total", arm=arm_name or ("fallback" if fallback else "default"))
        return verdict, (time.perf_counter() - t) * 1e3, arm_name, fallback

    async def _chain(self, post: dict[str, np.ndarray], decoder: str, version: int = -1) -> np.ndarray:
        """vlm_preprocess -> vision_encoder -> `decoder` (pinned to `version`): the vlm ensemble's steps."""
        ex = self.executor
        pre = await ex.infer("vlm_preprocess", post, ["PIXEL_VALUES", "BODY_IDS", "DECODER_OPTIONS"])
        vis = await ex.infer("vision_encoder", {"PIXEL_VALUES": pre["PIXEL_VALUES"]}, ["VISUAL_TOKENS", "DEEPSTACK"])
        return (await ex.infer(decoder, {**vis, "BODY_IDS": pre["BODY_IDS"],
                                         "DECODER_OPTIONS": pre["DECODER_OPTIONS"]},
                               ["VLM_RESULT"], version=version))["VLM_RESULT"]
