"""language_decoder: Qwen3-VL's language model (transformers) reads the ONNX vision encoder's tokens and
returns violation / label / sentiment probabilities from one prefill; all requests of a dynamic batch run
as one padded batch."""
import json
import time

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from moderation.artifacts import read_artifact_record
from moderation.decoder import DecoderRequest, VerdictDecoder
from moderation.policy import load_policy
from moderation.serving.metrics import Counter
from moderation.serving.triton_io import Stage, bytes_rows, parameters, rows, string_tensor, version_dir


class TritonPythonModel:
    def initialize(self, args):
        self.stage = Stage(args)
        self.batch_size = Counter("moderation_decoder_batch_size")
        params = parameters(args)
        torch.set_num_threads(int(params.get("torch_threads", "2")))
        vdir = version_dir(args)
        self.record = read_artifact_record(vdir)
        self.decoder = VerdictDecoder(vdir / "checkpoint", device=params.get("device", "auto"),
                                      dtype=params.get("dtype", "auto"))
        self.stage.logger.log_info(f"language_decoder v{self.stage.version} on {self.decoder.device} "
                                   f"({self.decoder.dtype}), untrained={self.decoder.untrained}")

    def execute(self, requests):
        t0 = time.perf_counter()
        items, owners, responses = [], [], [None] * len(requests)
        for i, request in enumerate(requests):
            try:
                vis, ds = rows(request, "VISUAL_TOKENS"), rows(request, "DEEPSTACK")
                body, opts = rows(request, "BODY_IDS"), [json.loads(o) for o in bytes_rows(request, "DECODER_OPTIONS")]
                for j, o in enumerate(opts):
                    ids = body[j][body[j] >= 0]
                    items.append((o, DecoderRequest(ids, vis[j], ds[j], load_policy(o["policy"]), o["lang"],
                                                    o["describe"])))
                owners.append((i, len(opts)))
            except Exception as e:  # noqa: BLE001
                responses[i] = self.stage.fail(e)
        if not items:
            return responses
        self.batch_size.set(len(items), version=self.stage.version)
        try:
            results = self.decoder.score([d for _, d in items])
        except Exception as e:  # noqa: BLE001
            for i, _ in owners:
                responses[i] = self.stage.fail(e)
            return responses
        k = 0
        for i, n in owners:
            out = []
            for (opts, _), res in zip(items[k:k + n], results[k:k + n]):
                versions = dict(opts.get("model_versions", {}), language_decoder=self.stage.version,
                                language_decoder_device=self.decoder.device_label)
                out.append(json.dumps({
                    "violation": res.violation, "labels": res.labels, "sentiment": res.sentiment,
                    "description": res.description, "untrained": self.decoder.untrained,
                    "caption_truncated": opts.get("caption_truncated", False), "model_versions": versions,
                    "batch_size": len(items),
                    "timings_ms": dict(res.timings_ms, execute=(time.perf_counter() - t0) * 1e3)}, ensure_ascii=False))
            responses[i] = pb_utils.InferenceResponse([string_tensor("VLM_RESULT", out)])
            k += n
        return responses
