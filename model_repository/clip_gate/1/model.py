"""clip_gate: scores each post against the policy's concept bank and its own caption, settles clear
posts (gate_allow / gate_block) and escalates ambiguous ones to the `vlm` ensemble by BLS. Escalations of
one batch are sent concurrently so the decoder's dynamic batcher can run them as one padded batch."""
import asyncio
import json
import time

import numpy as np
import triton_python_backend_utils as pb_utils

from moderation.artifacts import read_artifact_record
from moderation.cache import GateCache
from moderation.errors import ModelUnavailable, ModerationError, parse_error_text
from moderation.fallback import FallbackSwitch
from moderation.gate import ESCALATE, ConceptBank, ab_arm
from moderation.pipeline import ClipTokens, Gate
from moderation.policy import load_policy
from moderation.serving.metrics import Counter
from moderation.serving.triton_io import Stage, bytes_rows, rows, string_tensor, version_dir


class TritonPythonModel:
    def initialize(self, args):
        self.stage = Stage(args)
        vdir = version_dir(args)
        self.record = read_artifact_record(vdir)
        self.clip_tokens = ClipTokens(str(vdir / "clip"))
        self.gate = Gate()
        self.escalations = Counter("moderation_escalations_total")
        # near-duplicate verdict cache (policy `cache`); verdicts of swapped-out model versions are not served
        self.verdicts = GateCache(is_ready=lambda m, v: pb_utils.is_model_ready(model_name=m, model_version=v))
        self.cache_lookups = Counter("moderation_cache_total")
        self.fallback = FallbackSwitch()  # INT8 decoder at peak (policy decoder.fallback)
        self.fallbacks = Counter("moderation_decoder_fallback_total")
        self.nsfw_signal = _signal_of(vdir.parent.parent / "nsfw_image")

    async def _encode_texts(self, texts):
        ids, mask = self.clip_tokens(texts)
        out = []
        for s in range(0, len(texts), 64):
            req = pb_utils.InferenceRequest(
                model_name="clip_text", requested_output_names=["TEXT_EMBEDS"],
                inputs=[pb_utils.Tensor("input_ids", ids[s:s + 64]), pb_utils.Tensor("attention_mask", mask[s:s + 64])])
            resp = await req.async_exec()
            if resp.has_error():
                raise ModelUnavailable(f"clip_text failed while encoding the concept bank: {resp.error().message()}")
            out.append(pb_utils.get_output_tensor_by_name(resp, "TEXT_EMBEDS").as_numpy())
        return np.concatenate(out)

    async def _bank(self, policy):
        if policy.digest not in self.gate.banks:
            emb = await self._encode_texts([t for _, t in ConceptBank.concept_texts(policy)]) \
                if any(lab.gate_concepts for lab in policy.labels) else np.zeros((0, 1), np.float32)
            self.gate.bank(policy, lambda _texts: emb)
        return self.gate.banks[policy.digest]

    async def _bls(self, model, inputs, outputs, version=-1):
        req = pb_utils.InferenceRequest(model_name=model, model_version=version, requested_output_names=outputs,
                                        inputs=[pb_utils.Tensor(k, v) for k, v in inputs.items()])
        resp = await req.async_exec()
        if resp.has_error():
            code, message = parse_error_text(resp.error().message())
            raise ModerationError(f"{model}: {message}", code=code if code != "internal" else "model_unavailable")
        return {n: pb_utils.get_output_tensor_by_name(resp, n).as_numpy() for n in outputs}

    async def _escalate(self, image, text, record, policy):
        options = json.dumps({k: record[k] for k in ("request_id", "describe", "lang")} |
                             {"policy": record["policy_name"]})
        post = {"IMAGE": np.array([[image]], dtype=np.object_), "TEXT": np.array([[text]], dtype=np.object_),
                "OPTIONS": np.array([[options.encode()]], dtype=np.object_)}
        arm = ab_arm(policy, record["image_sha256"], record["text_sha256"])
        t = time.perf_counter()
        out = None
        fallback = self.fallback.check(policy.decoder.fallback)
        if fallback is not None:  # peak: the INT8 twin instead of queueing behind the full-precision decoder
            try:
                out = await self._chain(post, fallback["model"])
                arm = None
                self.fallbacks.inc(reason=fallback["reason"], model=fallback["model"])
            except ModerationError as e:  # INT8 decoder not loaded or failing: degrade to the normal path
                self.stage.logger.log_warn(f"fallback to {fallback['model']} failed, using the full decoder: {e}")
                fallback = None
        if out is None:
            with self.fallback.track():
                if arm is None:  # the default path: the vlm ensemble, whose decoder step takes the live version
                    out = (await self._bls("vlm", post, ["VLM_RESULT"]))["VLM_RESULT"]
                else:  # A/B arm: the same chain with the decoder version pinned
                    out = await self._chain(post, "language_decoder", int(arm))
        out = json.loads(out.reshape(-1)[0])
        out["roundtrip_ms"] = (time.perf_counter() - t) * 1e3
        out["ab_arm"] = "b" if arm else ("a" if policy.ab and fallback is None else None)
        out["fallback"] = fallback
        self.escalations.inc(arm=out["ab_arm"] or ("fallback" if fallback else "default"))
        return out

    async def _chain(self, post, decoder, version=-1):
        """vlm_preprocess -> vision_encoder -> `decoder` (pinned to `version`) by BLS: the vlm ensemble's steps."""
        pre = await self._bls("vlm_preprocess", post, ["PIXEL_VALUES", "BODY_IDS", "DECODER_OPTIONS"])
        vis = await self._bls("vision_encoder", {"PIXEL_VALUES": pre["PIXEL_VALUES"]}, ["VISUAL_TOKENS", "DEEPSTACK"])
        return (await self._bls(decoder, {**vis, "BODY_IDS": pre["BODY_IDS"], "DECODER_OPTIONS": pre["DECODER_OPTIONS"]},
                                ["VLM_RESULT"], version=version))["VLM_RESULT"]

    async def execute(self, requests):
        return await asyncio.gather(*(self._one(r) for r in requests))

    async def _one(self, request):
        t0, meta = time.perf_counter(), {}
        try:
            records = [json.loads(r) for r in bytes_rows(request, "REQUEST")]
            meta = records[0] if len(records) == 1 else {}
            images, texts = bytes_rows(request, "IMAGE"), bytes_rows(request, "TEXT")
            img_emb, txt_emb = rows(request, "IMAGE_EMBEDS"), rows(request, "TEXT_EMBEDS")
            nsfw = rows(request, "NSFW_SCORES", optional=True)  # [B, 2] = (sfw, nsfw) from nsfw_image
            options = bytes_rows(request, "OPTIONS", optional=True)
            decisions, pending = [], []
            for i, rec in enumerate(records):
                policy = load_policy(rec["policy_name"])
                bank = await self._bank(policy)
                d = self.gate(policy, bank, img_emb[i], txt_emb[i], has_caption=bool(texts[i].strip()),
                              nsfw_score=None if nsfw is None else float(nsfw[i][1]))
                signals = {"clip": "untrained" if self.record.get("untrained") else "trained"}
                if nsfw is not None:
                    signals["nsfw_image"] = self.nsfw_signal
                d.update(signals=signals,
                         gate_version=self.stage.version, gate_ms=(time.perf_counter() - t0) * 1e3,
                         gate_started=time.time())
                decisions.append(d)
                if d["route"] == ESCALATE:
                    probe = self.verdicts.probe(policy, rec, images[i], texts[i], img_emb[i], txt_emb[i],
                                                options[i] if i < len(options) else None,
                                                ab_arm(policy, rec["image_sha256"], rec["text_sha256"]))
                    hit = self.verdicts.lookup(probe) if probe else None
                    if probe:
                        self.cache_lookups.inc(result="hit" if hit else "miss")
                    if hit:  # a near-duplicate's stored VLM verdict: no escalation
                        d.update(route="cache", vlm=hit[0], cache=hit[1])
                    else:
                        pending.append((i, probe, self._escalate(images[i], texts[i], rec, policy)))
            for (i, probe, _), vlm in zip(pending, await asyncio.gather(*(p for *_, p in pending))):
                decisions[i]["vlm"] = vlm
                if probe:
                    decisions[i]["cache"] = self.verdicts.after(probe, vlm)
            return pb_utils.InferenceResponse([string_tensor("GATE", [json.dumps(d, ensure_ascii=False)
                                                                      for d in decisions])])
        except Exception as e:  # noqa: BLE001
            return self.stage.fail(e, meta, t0)


def _signal_of(model_dir):
    """'trained' / 'untrained' from the newest exported version's artifact record of a sibling model."""
    versions = sorted((d for d in model_dir.glob("[0-9]*") if (d / "artifact.json").exists()),
                      key=lambda d: int(d.name) if d.name.isdigit() else -1)
    if not versions:
        return "untrained"  # no record: nothing says it is trained
    return "untrained" if read_artifact_record(versions[-1], verify=False).get("untrained", True) else "trained"
