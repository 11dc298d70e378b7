"""vlm_preprocess: Qwen3-VL patches at the fixed resolution, the prompt body's token ids and DecoderOptions."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..core.hashing import post_hashes
from ..core.post import parse_post, unpack_images
from ..repository.artifacts import read_artifact_record
from ..vlm.inputs import VlmInputs
from .pb import pb
from .triton_io import Stage, StageModel, bytes_rows, string_tensor, tensor, version_dir


class VlmPreprocessModel(StageModel):
    def initialize(self, args):
        self.stage = Stage(args)
        vdir = version_dir(args)
        read_artifact_record(vdir)
        self.inputs = VlmInputs(str(vdir / "qwen"), self.stage.version)

    def respond(self, request, meta: dict, started: float):
        frames, texts = bytes_rows(request, "FRAMES"), bytes_rows(request, "TEXT")
        options: Sequence[bytes | None] = bytes_rows(request, "OPTIONS", optional=True) or [None] * len(frames)
        image_texts = bytes_rows(request, "IMAGE_TEXT", optional=True) or [b""] * len(frames)
        pins = bytes_rows(request, "POLICY_PIN", optional=True) or [b""] * len(frames)
        pixels, bodies, infos = [], [], []
        for blob, text, opt, drawn, pin in zip(frames, texts, options, image_texts, pins, strict=True):
            images, image_sha256 = unpack_images(blob)  # what preprocess decoded: no upload is decoded again
            meta.clear()
            meta.update(post_hashes(None, text), image_sha256=image_sha256)
            words = (drawn or b"").decode("utf-8", "replace")  # the image's words, read by read_text
            post = parse_post([], text, opt, meta, decoded=images, pin=(pin or b"").decode("ascii", "replace"))
            p, body, info = self.inputs(post, words)
            pixels.append(p)
            bodies.append(body)
            infos.append(info.to_json())
        width = max(len(b) for b in bodies)
        if any(len(b) != width for b in bodies):  # rows of one request share a length: pad with -1
            bodies = [np.pad(b, (0, width - len(b)), constant_values=-1) for b in bodies]
        return pb().InferenceResponse([tensor("PIXEL_VALUES", np.stack(pixels)),
                                       tensor("BODY_IDS", np.stack(bodies)),
                                       string_tensor("DECODER_OPTIONS", infos)])
