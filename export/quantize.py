"""Write the INT8 variants of exported models, each with its artifact record.

    .venv/bin/python -m export.quantize                          # everything, from version 1 (run by `make models`)
    .venv/bin/python -m export.quantize --only decoder --from-version 2   # the INT8 twin of language_decoder v2

Encoders (clip_image, clip_text, vision_encoder): onnxruntime dynamic quantization writes model.int8.onnx beside
model.onnx in the same version directory; the version's artifact.json is rewritten to hash it and gains an
"int8" entry (settings, sizes, parity against fp32 on sample inputs). Serve it by loading the model with config
parameter `onnx_file: "model.int8.onnx"` (our python runner) or `default_model_filename` (onnxruntime backend).

Decoder: language_decoder_int8/<v>/ gets the fp32 checkpoint of language_decoder/<v> (copied, or linked with
--link), its LoRA adapter if the version has one, and quantization.json; the int8 weights are made when the
model loads (moderation.vlm.int8: a deterministic function of the recorded fp32 weights)."""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

from moderation.repository.artifacts import read_artifact_record, write_artifact_record

ENCODERS = ("clip_image", "clip_text", "vision_encoder")
INT8_ONNX = "model.int8.onnx"
_RECORD_KEYS = ("model", "version", "source", "untrained", "export", "files")


def quantize_onnx(src: Path, dst: Path) -> dict:
    """onnxruntime dynamic quantization: int8 weights for MatMul/Gemm (per-channel), activations quantized at
    run time. Conv layers stay fp32 (ConvInteger has no CPU kernel in every build); the result runs anywhere
    the fp32 file does."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    dst.parent.mkdir(parents=True, exist_ok=True)
    settings = dict(weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul", "Gemm"])
    quantize_dynamic(str(src), str(dst), weight_type=settings["weight_type"], per_channel=settings["per_channel"],
                     op_types_to_quantize=settings["op_types_to_quantize"])
    return {"tool": "onnxruntime.quantization.quantize_dynamic", "weight_type": "QInt8", "per_channel": True,
            "op_types": settings["op_types_to_quantize"], "bytes_fp32": src.stat().st_size,
            "bytes_int8": dst.stat().st_size}


def _sample_feeds(model: str, repo: Path, version: str) -> dict[str, np.ndarray]:
    """Real inputs from the sample posts (the same preprocessing the server runs)."""
    from moderation.core.imaging import decode_image
    from moderation.gate.inputs import ClipPixels, ClipTokens
    from moderation.testing.samples import sample_posts
    from moderation.vlm.inputs import QwenPixels

    posts = sample_posts()[:4]
    if model == "clip_image":
        cp = ClipPixels(str(repo / "preprocess" / version / "clip"))
        return {"pixel_values": np.stack([cp(decode_image(p.image_bytes()).image) for p in posts])}
    if model == "clip_text":
        ids, mask = ClipTokens(str(repo / "preprocess" / version / "clip"))([p.text for p in posts])
        return {"input_ids": ids, "attention_mask": mask}
    qp = QwenPixels(str(repo / "vlm_preprocess" / version / "qwen"))
    return {"PIXEL_VALUES": np.stack([qp(decode_image(p.image_bytes()).image)[0] for p in posts[:2]])}


def _parity(fp32: Path, int8: Path, feeds: dict[str, np.ndarray]) -> dict:
    import onnxruntime as ort

    runs = [ort.InferenceSession(str(f), providers=["CPUExecutionProvider"]).run(None, feeds) for f in (fp32, int8)]
    diffs = [float(np.max(np.abs(a - b))) for a, b in zip(*runs, strict=False)]
    a, b = runs[0][0].reshape(len(runs[0][0]), -1), runs[1][0].reshape(len(runs[1][0]), -1)
    cos = np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return {"samples": int(len(a)), "max_abs_diff": max(diffs), "min_cosine_first_output": float(cos.min())}


def _rewrite_record(vdir: Path, old: dict, **added) -> dict:
    extra = {k: v for k, v in old.items() if k not in _RECORD_KEYS} | added
    return write_artifact_record(vdir, source=old["source"], untrained=old["untrained"], export=old.get("export", {}),
                                 extra=extra)


def quantize_encoders(repo: Path, version: str) -> dict:
    out = {}
    for model in ENCODERS:
        vdir = repo / model / version
        old = read_artifact_record(vdir)  # refuse to quantize a file that does not match its record
        info = quantize_onnx(vdir / "model.onnx", vdir / INT8_ONNX)
        info["file"] = INT8_ONNX
        info["parity_vs_fp32"] = _parity(vdir / "model.onnx", vdir / INT8_ONNX, _sample_feeds(model, repo, version))
        _rewrite_record(vdir, old, int8=info)
        print(f"  {model}/{version}/{INT8_ONNX}: {info['bytes_int8'] / 1e6:.2f} MB "
              f"(fp32 {info['bytes_fp32'] / 1e6:.2f} MB), "
              f"max |int8 - fp32| {info['parity_vs_fp32']['max_abs_diff']:.3g}, "
              f"min cosine {info['parity_vs_fp32']['min_cosine_first_output']:.4f}")
        out[model] = info
    return out


def quantize_decoder_version(repo: Path, from_version: str, to_version: str | None = None, link: bool = False,
                             scheme: str = "int8") -> Path:
    src = repo / "language_decoder" / from_version
    base = read_artifact_record(src)
    dst = repo / "language_decoder_int8" / (to_version or from_version)
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("checkpoint", "adapter"):
        target = dst / name
        if target.is_symlink() or target.is_file():
            target.unlink()
        elif target.exists():
            shutil.rmtree(target)
        if (src / name).exists():
            if link:
                target.symlink_to((src / name).resolve(), target_is_directory=True)
            else:
                shutil.copytree(src / name, target, symlinks=True)
    (dst / "quantization.json").write_text(json.dumps({"scheme": scheme}) + "\n")
    extra = {"quantization": {"scheme": scheme, "applied": "at load (moderation.vlm.int8.quantize_decoder)",
                              "from": f"language_decoder/{from_version}"}}
    if "adapter" in base:
        extra["adapter"] = base["adapter"]
    write_artifact_record(dst, source=f"{base['source']} (language_decoder/{from_version}, int8 at load)",
                          untrained=base["untrained"], export=base.get("export", {}), extra=extra)
    print(f"  language_decoder_int8/{dst.name}: {scheme} twin of language_decoder/{from_version}")
    return dst


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repository", type=Path, default=Path("model_repository"))
    ap.add_argument("--from-version", default="1")
    ap.add_argument("--to-version", default=None, help="version of language_decoder_int8 (default: --from-version)")
    ap.add_argument("--only", choices=["encoders", "decoder"], default=None)
    ap.add_argument("--scheme", default="int8", choices=["int8", "int8_dynamic", "int8_weight_only"])
    ap.add_argument("--link", action="store_true", help="symlink the decoder checkpoint instead of copying it")
    args = ap.parse_args(argv)
    if not (args.repository / "language_decoder" / args.from_version / "artifact.json").exists():
        print("error: no exported models: run `make models`", file=sys.stderr)
        return 2
    import logging

    logging.getLogger().setLevel(logging.ERROR)  # onnxruntime.quantization's "consider pre-processing" advice
    if args.only in (None, "encoders"):
        quantize_encoders(args.repository, args.from_version)
    if args.only in (None, "decoder"):
        quantize_decoder_version(args.repository, args.from_version, args.to_version, args.link, args.scheme)
    return 0


if __name__ == "__main__":
    sys.exit(main())
