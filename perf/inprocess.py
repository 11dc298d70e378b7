"""The moderate pipeline in one process, for `make bench` (a) and (c): the same library stages the Triton
models call (moderation.pipeline / gate / decoder / result / audit) and onnxruntime sessions on the same
model.onnx files with the same thread settings as the server's runner (intra-op 1; torch 2 threads for the
decoder), but no Triton: no ensemble scheduling, no python-backend IPC, no dynamic batching, no gRPC."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np


def _session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


class InProcessPipeline:
    def __init__(self, repo: Path, audit_path: Path, torch_threads: int = 2):
        import torch

        from moderation.audit import AuditLog
        from moderation.decoder import VerdictDecoder
        from moderation.imaging import NsfwPixels
        from moderation.pipeline import ClipInputs, Gate, VlmInputs

        torch.set_num_threads(torch_threads)
        self.clip = ClipInputs(str(repo / "preprocess" / "1" / "clip"))
        self.nsfw_pixels = NsfwPixels()
        self.clip_image = _session(repo / "clip_image" / "1" / "model.onnx")
        self.clip_text = _session(repo / "clip_text" / "1" / "model.onnx")
        nsfw = repo / "nsfw_image" / "1" / "model.onnx"
        self.nsfw = _session(nsfw) if nsfw.exists() else None
        self.gate = Gate()
        self.vlm_inputs = VlmInputs(str(repo / "vlm_preprocess" / "1" / "qwen"))
        self.vision = _session(repo / "vision_encoder" / "1" / "model.onnx")
        self.decoder = VerdictDecoder(repo / "language_decoder" / "1" / "checkpoint")
        self.audit = AuditLog(audit_path)

    def _encode_texts(self, texts):
        ids, mask = self.clip.tokens(texts)
        return self.clip_text.run(["TEXT_EMBEDS"], {"input_ids": ids, "attention_mask": mask})[0]

    def vlm(self, image: bytes, text: bytes, options: bytes) -> dict:
        """The `vlm` ensemble's work for one post: vlm_preprocess -> vision_encoder -> language_decoder."""
        from moderation.decoder import DecoderRequest
        from moderation.pipeline import parse_post

        t = time.perf_counter()
        post = parse_post(image, text, options)
        pixels, body, info = self.vlm_inputs(post)
        vis, ds = self.vision.run(["VISUAL_TOKENS", "DEEPSTACK"], {"PIXEL_VALUES": pixels[None]})
        res = self.decoder.score([DecoderRequest(body, vis[0], ds[0], post.policy, info["lang"],
                                                 info["describe"])])[0]
        return {"violation": res.violation, "labels": res.labels, "sentiment": res.sentiment,
                "description": res.description, "untrained": self.decoder.untrained,
                "caption_truncated": info["caption_truncated"],
                "model_versions": {"vlm_preprocess": "1", "vision_encoder": "1", "language_decoder": "1"},
                "timings_ms": res.timings_ms, "roundtrip_ms": (time.perf_counter() - t) * 1e3}

    def moderate(self, image: bytes, text: bytes, options: bytes) -> dict:
        """preprocess -> clip_image / clip_text / nsfw_image -> clip_gate (-> vlm) -> postprocess."""
        from moderation.gate import ESCALATE, ConceptBank
        from moderation.pipeline import parse_post
        from moderation.result import build_result, validate_result

        t0, wall0 = time.perf_counter(), time.time()
        post = parse_post(image, text, options)
        pixels, ids, mask = self.clip(post)
        nsfw_px = self.nsfw_pixels(post.image)
        t_pre = time.perf_counter()
        img = self.clip_image.run(["IMAGE_EMBEDS"], {"pixel_values": pixels[None]})[0][0]
        txt = self.clip_text.run(["TEXT_EMBEDS"], {"input_ids": ids[None], "attention_mask": mask[None]})[0][0]
        nsfw = self.nsfw.run(["outputs"], {"input:0": nsfw_px[None]})[0][0] if self.nsfw else None
        t_enc = time.perf_counter()
        policy = post.policy
        bank = self.gate.bank(policy, self._encode_texts) if any(lab.gate_concepts for lab in policy.labels) \
            else self.gate.bank(policy, lambda _t: np.zeros((0, 1), np.float32))
        d = self.gate(policy, bank, img, txt, has_caption=bool(post.caption.strip()),
                      nsfw_score=None if nsfw is None else float(nsfw[1]))
        d.update(signals={"clip": "untrained"}, gate_version="1", gate_ms=(time.perf_counter() - t_enc) * 1e3)
        if d["route"] == ESCALATE:
            d["vlm"] = self.vlm(image, text, json.dumps({"request_id": post.options.request_id,
                                                         "describe": post.options.describe, "lang": post.lang,
                                                         "policy": post.options.policy}).encode())
        rec = post.request_record()
        versions = {"preprocess": "1", "clip_gate": "1", "postprocess": "1"}
        latency = {"preprocess": (t_pre - t0) * 1e3, "clip_encoders": (t_enc - t_pre) * 1e3, "gate": d["gate_ms"]}
        if d.get("vlm"):
            versions.update(d["vlm"]["model_versions"])
            latency["vlm"] = d["vlm"]["roundtrip_ms"]
        latency["total"] = (time.time() - wall0) * 1e3
        result = validate_result(build_result(policy, rec, d, versions, latency))
        self.audit.write({"request_id": result["request_id"], "stage": "moderate", "route": result["route"],
                          "violation": result["violation"], "labels": result["labels"], "scores": result["scores"],
                          "sentiment": result["sentiment"], "policy": result["policy"], "model_versions": versions,
                          "latency_ms": result["latency_ms"], "image_sha256": rec["image_sha256"],
                          "text_sha256": rec["text_sha256"], "lang": rec["lang"], "error": None,
                          "untrained": result["untrained"]})
        return result
