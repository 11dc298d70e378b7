"""clip_gate: the gate router (gate/router.py) behind Triton; its calls to clip_text and the VLM path are BLS."""
from __future__ import annotations

import asyncio

from ..core.contracts import RequestRecord
from ..core.errors import failed_call
from ..core.policy import load_policy
from ..gate.inputs import ClipTokens
from ..gate.router import GatePost, GateRouter
from ..repository.artifacts import read_artifact_record, signal_of
from ..repository.served import served_clip_identity
from .metrics import CountByName, Counter
from .pb import pb
from .triton_io import Stage, StageModel, bytes_rows, parameters, rows, string_tensor, version_dir

# The parameter `clients.admin purge-caches` reloads clip_gate with (moderation/ops/purge.py PURGE_PARAMETER).
EPOCH_PARAMETER = "verdict_cache_epoch"


class BlsExecutor:
    """GateRouter's Executor over Triton's business-logic scripting (async BLS)."""

    async def infer(self, model, inputs, outputs, version=-1):
        u = pb()
        req = u.InferenceRequest(model_name=model, model_version=version, requested_output_names=outputs,
                                 inputs=[u.Tensor(k, v) for k, v in inputs.items()])
        resp = await req.async_exec()
        if resp.has_error():
            raise failed_call(model, resp.error().message())
        return {n: u.get_output_tensor_by_name(resp, n).as_numpy() for n in outputs}

    def is_ready(self, model: str, version: str) -> bool:
        return pb().is_model_ready(model_name=model, model_version=version)


class ClipGateModel(StageModel):
    def initialize(self, args):
        self.stage = Stage(args)
        vdir = version_dir(args)
        record = read_artifact_record(vdir)
        signals = {"clip": "untrained" if record.get("untrained") else "trained",
                   "nsfw_image": signal_of(vdir.parent.parent / "nsfw_image")}
        self.lists_stale = Counter("moderation_lists_stale")
        self.lists_revision = Counter("moderation_lists_revision")
        self._lists_faults: dict[str, str | None] = {}
        identity = served_clip_identity(vdir.parent.parent)  # the policies' gate.calibrated_for must name it
        self.stage.logger.log_info(f"clip_gate: CLIP {signals['clip']}, served encoders "
                                   f"{identity.model_dump() if identity else 'without artifact records'}")
        self.router = GateRouter(BlsExecutor(), ClipTokens(str(vdir / "clip")), self.stage.version, signals,
                                 count=CountByName(), warn=self.stage.logger.log_warn, clip_identity=identity)
        epoch = parameters(args).get(EPOCH_PARAMETER)
        if epoch and self.router.verdicts.shared:  # a purge reload: the in-process cache is new, Redis is not
            n = self.router.verdicts.purge_on_load(epoch)  # Redis down: a fresh purge fails the reload
            if n is not None:
                self.stage.logger.log_info(f"verdict cache: purged {n} shared entries (epoch {epoch})")

    async def execute(self, requests):
        return await asyncio.gather(*(self.stage.answer_async(r, self.respond) for r in requests))

    async def respond(self, request, meta: dict, t0: float):
        records = [RequestRecord.from_json(r) for r in bytes_rows(request, "REQUEST")]
        if len(records) == 1:
            meta.update(records[0].model_dump(include={"request_id", "image_sha256", "text_sha256"}))
        frames, texts = bytes_rows(request, "FRAMES"), bytes_rows(request, "TEXT")
        img_emb, txt_emb = rows(request, "IMAGE_EMBEDS"), rows(request, "TEXT_EMBEDS")
        nsfw = rows(request, "NSFW_SCORES", optional=True)  # [B, 2] = (sfw, nsfw) from nsfw_image
        posts = [GatePost(rec, frames[i], texts[i], img_emb[i], txt_emb[i],
                          None if nsfw is None else float(nsfw[i][1])) for i, rec in enumerate(records)]
        decisions = await self.router.route_posts(posts, started=t0)
        self._report_lists({rec.policy_name for rec in records})
        return pb().InferenceResponse([string_tensor("GATE", [d.to_json() for d in decisions])])

    def _report_lists(self, policy_names: set[str]) -> None:
        """The lists state of the policies just used: the metric, and one log line when it changes."""
        for name in policy_names:
            policy = load_policy(name)
            fault = policy.lists_fault
            self.lists_stale.set(1.0 if fault else 0.0, policy=name)
            self.lists_revision.set(float(policy.lists.revision), policy=name)
            if self._lists_faults.get(name) != fault:
                self._lists_faults[name] = fault
                log = self.stage.logger.log_warn if fault else self.stage.logger.log_info
                log(f"policy {name}: {fault or 'its newest lists are in force'}")
