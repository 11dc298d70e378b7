"""The one onnxruntime runner behind clip_image, clip_text and vision_encoder on the embedded CPU server
(the PyPI Triton wheel has no onnxruntime backend; NGC containers use `backend: "onnxruntime"` with the
same model.onnx and tensor names). Requests in a dynamic batch run as one session call."""
from __future__ import annotations

import json

import numpy as np

from ..repository.artifacts import read_artifact_record
from .pb import pb
from .triton_io import Stage, StageModel, parameters, tensor, version_dir


class OnnxRunner(StageModel):
    def initialize(self, args):
        import onnxruntime as ort

        self.stage = Stage(args)
        cfg = json.loads(args["model_config"])
        params = parameters(args)
        vdir = version_dir(args)
        self.record = read_artifact_record(vdir)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(params.get("intra_op_threads", "1"))
        opts.inter_op_num_threads = 1
        if opts.intra_op_num_threads > 1:  # threads that spin while waiting would take the core from other models
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # CUDA first when this onnxruntime build has it (onnxruntime-gpu); a config parameter can pin the order.
        wanted = params.get("execution_providers", "CUDAExecutionProvider,CPUExecutionProvider").split(",")
        providers = [p for p in wanted if p in ort.get_available_providers()] or ["CPUExecutionProvider"]
        # Parameter onnx_file="model.int8.onnx" serves the INT8 variant (the onnxruntime backend's equivalent is
        # default_model_filename, which the python backend reads as its own script name, hence a parameter here)
        self.filename = params.get("onnx_file", "model.onnx")
        self.session = ort.InferenceSession(str(vdir / self.filename), sess_options=opts, providers=providers)
        self.inputs = [i["name"] for i in cfg["input"]]
        self.outputs = [o["name"] for o in cfg["output"]]
        self.device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        self.stage.logger.log_info(f"{self.stage.name} v{self.stage.version} ({self.filename}): device {self.device}, "
                                   f"onnxruntime providers {self.session.get_providers()} (asked {wanted})")

    def execute(self, requests):
        u = pb()
        arrays: dict[str, list[np.ndarray]] = {n: [] for n in self.inputs}
        sizes, ok = [], []
        responses = [None] * len(requests)
        for i, request in enumerate(requests):
            try:
                feed = {n: u.get_input_tensor_by_name(request, n).as_numpy() for n in self.inputs}
            except Exception as e:  # noqa: BLE001 - one bad request must not fail the batch
                responses[i] = self.stage.fail(e)
                continue
            for n, a in feed.items():
                arrays[n].append(a)
            sizes.append(next(iter(feed.values())).shape[0])
            ok.append(i)
        if ok:
            try:
                outs = self.session.run(self.outputs, {n: np.concatenate(v) for n, v in arrays.items()})
            except Exception as e:  # noqa: BLE001 - a failed session run fails each request with a coded error
                for i in ok:
                    responses[i] = self.stage.fail(e)
                return responses
            start = 0
            for i, size in zip(ok, sizes, strict=False):
                responses[i] = u.InferenceResponse(
                    [tensor(name, out[start:start + size]) for name, out in zip(self.outputs, outs, strict=False)])
                start += size
        return responses
