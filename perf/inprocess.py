"""The moderate pipeline in one process, for `make bench` (a): the library stages the Triton models call
(gate.inputs.Preprocess, gate.router.GateRouter, vlm.inputs.VlmInputs, vlm.decoder.VerdictDecoder,
core.result.finish_post) and onnxruntime sessions on the same model.onnx files with the same thread settings as
the server's runner (intra-op 1; torch 2 threads for the decoder), but no Triton: no ensemble scheduling, no
python-backend IPC, no dynamic batching, no gRPC. The router's model calls go to an in-process Executor."""
from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np

from moderation.core.audit import AuditLog
from moderation.core.contracts import DecoderOptions
from moderation.core.errors import ModelUnavailable
from moderation.core.pinned import pinned_policy
from moderation.core.post import parse_post, unpack_images
from moderation.core.result import finish_post
from moderation.gate.inputs import ClipTokens, Preprocess, ReadImageText
from moderation.gate.router import GatePost, GateRouter
from moderation.ocr.reader import ImageTextReader
from moderation.repository.artifacts import read_artifact_record, signal_of
from moderation.repository.served import served_clip_identity

VERSION = "1"


def _session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


class InProcessExecutor:
    """GateRouter's Executor without Triton: clip_text, and the vlm ensemble's three steps, in this process."""

    def __init__(self, repo: Path, torch_threads: int = 2):
        import torch

        from moderation.vlm.decoder import VerdictDecoder
        from moderation.vlm.inputs import VlmInputs

        torch.set_num_threads(torch_threads)
        self.clip_text = _session(repo / "clip_text" / VERSION / "model.onnx")
        self.vlm_inputs = VlmInputs(str(repo / "vlm_preprocess" / VERSION / "qwen"), VERSION)
        self.vision = _session(repo / "vision_encoder" / VERSION / "model.onnx")
        self.decoder = VerdictDecoder(repo / "language_decoder" / VERSION / "checkpoint")

    async def infer(self, model, inputs, outputs, version=-1):
        if model == "clip_text":
            return {"TEXT_EMBEDS": self.clip_text.run(["TEXT_EMBEDS"], inputs)[0]}
        if model == "vlm_preprocess":  # as serving/vlm_preprocess_model.py: preprocess's frames, the pinned policy
            drawn = inputs["IMAGE_TEXT"][0, 0].decode("utf-8") if "IMAGE_TEXT" in inputs else ""
            pin = inputs["POLICY_PIN"][0, 0].decode("ascii") if "POLICY_PIN" in inputs else ""
            images, _ = unpack_images(inputs["FRAMES"][0, 0])
            post = parse_post([], inputs["TEXT"][0, 0], inputs["OPTIONS"][0, 0] if "OPTIONS" in inputs else None,
                              decoded=images, pin=pin)
            pixels, body, opts = self.vlm_inputs(post, drawn)
            return {"PIXEL_VALUES": pixels[None], "BODY_IDS": body[None],
                    "DECODER_OPTIONS": np.array([[opts.to_json()]], dtype=np.object_)}
        if model == "vision_encoder":
            vis, ds = self.vision.run(["VISUAL_TOKENS", "DEEPSTACK"], inputs)
            return {"VISUAL_TOKENS": vis, "DEEPSTACK": ds}
        if model == "language_decoder":
            return {"VLM_RESULT": self._decode(inputs)}
        if model == "vlm":  # the ensemble: the same three steps
            pre = await self.infer("vlm_preprocess", inputs, [])
            vis = await self.infer("vision_encoder", {"PIXEL_VALUES": pre.pop("PIXEL_VALUES")}, [])
            return await self.infer("language_decoder", {**pre, **vis}, [])
        raise ModelUnavailable(f"{model} is not served in-process")

    def _decode(self, inputs) -> np.ndarray:
        from moderation.vlm.decoder import DecoderRequest

        opts = DecoderOptions.from_json(inputs["DECODER_OPTIONS"][0, 0])
        policy = pinned_policy(opts.policy_name, opts.policy_pin)
        res = self.decoder.score([DecoderRequest(inputs["BODY_IDS"][0], inputs["VISUAL_TOKENS"][0],
                                                 inputs["DEEPSTACK"][0], policy, opts.lang, opts.describe)])[0]
        verdict = res.verdict(untrained=self.decoder.untrained, caption_truncated=opts.caption_truncated,
                              model_versions={"vlm_preprocess": opts.vlm_preprocess_version,
                                              "language_decoder": VERSION})
        return np.array([[verdict.to_json()]], dtype=np.object_)

    def is_ready(self, model: str, version: str) -> bool:
        return True


class InProcessPipeline:
    def __init__(self, repo: Path, audit_path: Path, torch_threads: int = 2):
        pre_dir = repo / "preprocess" / VERSION
        self.preprocess = Preprocess(str(pre_dir / "clip"), VERSION)
        self.read_text = ReadImageText(ImageTextReader(), VERSION)  # the wheel's own onnxruntime sessions
        self.clip_image = _session(repo / "clip_image" / VERSION / "model.onnx")
        self.clip_text = _session(repo / "clip_text" / VERSION / "model.onnx")
        nsfw = repo / "nsfw_image" / VERSION / "model.onnx"
        self.nsfw = _session(nsfw) if nsfw.exists() else None
        gate_dir = repo / "clip_gate" / VERSION
        signals = {"clip": "untrained" if read_artifact_record(gate_dir, verify=False).get("untrained") else "trained",
                   "nsfw_image": signal_of(repo / "nsfw_image")}
        self.router = GateRouter(InProcessExecutor(repo, torch_threads), ClipTokens(str(gate_dir / "clip")), VERSION,
                                 signals, clip_identity=served_clip_identity(repo))
        self.audit = AuditLog(audit_path)

    def moderate(self, image: bytes, text: bytes, options: bytes) -> dict:
        """preprocess -> clip_image / clip_text / nsfw_image -> clip_gate (-> vlm) -> postprocess."""
        t0, received = time.perf_counter(), time.time()
        inputs = self.preprocess(image, text, options, received, t0)
        inputs.record = self.read_text(inputs.frames, text, inputs.record)  # beside the encoders on the server
        img = self.clip_image.run(["IMAGE_EMBEDS"], {"pixel_values": inputs.clip_pixels[None]})[0][0]
        txt = self.clip_text.run(["TEXT_EMBEDS"], {"input_ids": inputs.clip_input_ids[None],
                                                   "attention_mask": inputs.clip_attention_mask[None]})[0][0]
        nsfw = self.nsfw.run(["outputs"], {"input:0": inputs.nsfw_pixels[None]})[0][0] if self.nsfw else None
        post = GatePost(inputs.record, inputs.frames, text, img, txt, None if nsfw is None else float(nsfw[1]))
        decision = asyncio.run(self.router.route_posts([post]))[0]
        done = finish_post(inputs.record, decision, VERSION)
        self.audit.write(done.audit_row)
        return done.result
