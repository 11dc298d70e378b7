"""vlm_preprocess: Qwen3-VL patches at the fixed resolution and the prompt body's token ids."""
import json
import time

import numpy as np
import triton_python_backend_utils as pb_utils

from moderation.artifacts import read_artifact_record
from moderation.pipeline import VlmInputs, hashes_of, parse_post
from moderation.serving.triton_io import Stage, bytes_rows, string_tensor, tensor, version_dir


class TritonPythonModel:
    def initialize(self, args):
        self.stage = Stage(args)
        vdir = version_dir(args)
        self.record = read_artifact_record(vdir)
        self.inputs = VlmInputs(str(vdir / "qwen"))

    def execute(self, requests):
        return [self._one(r) for r in requests]

    def _one(self, request):
        t0, meta = time.perf_counter(), {}
        try:
            images, texts = bytes_rows(request, "IMAGE"), bytes_rows(request, "TEXT")
            options = bytes_rows(request, "OPTIONS", optional=True) or [None] * len(images)
            pixels, bodies, infos = [], [], []
            for image, text, opt in zip(images, texts, options):
                meta = hashes_of(image, text)
                post = parse_post(image, text, opt, meta)
                p, body, info = self.inputs(post)
                info["model_versions"] = {"vlm_preprocess": self.stage.version}
                info["preprocess_ms"] = (time.perf_counter() - t0) * 1e3
                pixels.append(p), bodies.append(body), infos.append(json.dumps(info, ensure_ascii=False))
            width = max(len(b) for b in bodies)
            if any(len(b) != width for b in bodies):  # rows of one request share a length: pad with -1
                bodies = [np.pad(b, (0, width - len(b)), constant_values=-1) for b in bodies]
            return pb_utils.InferenceResponse([tensor("PIXEL_VALUES", np.stack(pixels)),
                                               tensor("BODY_IDS", np.stack(bodies)),
                                               string_tensor("DECODER_OPTIONS", infos)])
        except Exception as e:  # noqa: BLE001
            return self.stage.fail(e, meta, t0)
