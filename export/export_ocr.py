"""Copy PaddleOCR's PP-OCRv4 ONNX models from the installed rapidocr-onnxruntime wheel into the repository
(ocr_detect, ocr_classify, ocr_recognize /<v>/model.onnx, with the licence) and check parity: the reader run on
the copies (moderation/ocr/reader.py, the way the server runs them) gives the package's own RapidOCR() text on
the rendered memes and the sample photos.

    .venv/bin/python -m export.export_ocr [--repository model_repository] [--version 1]
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import shutil
import sys
from pathlib import Path

from moderation.core.hashing import file_sha256
from moderation.ocr.reader import MODELS, ONNX_FILES, ImageTextReader, package_dir
from moderation.repository.artifacts import write_artifact_record

TOLERANCE = 1e-4


def _sessions(repo: Path, version: str):
    import onnxruntime as ort

    sessions = {m: ort.InferenceSession(str(repo / m / version / "model.onnx"), providers=["CPUExecutionProvider"])
                for m in MODELS}

    def infer(model, x):
        name_in, name_out = MODELS[model]
        return sessions[model].run([name_out], {name_in: x})[0]

    return infer


def output_diff(repo: Path, version: str, images: dict[str, bytes]) -> dict[str, float]:
    """Max |served copy - package session| of each model's output on the inputs the reader makes of the images."""
    import numpy as np

    from moderation.core.imaging import decode_image

    served, seen = _sessions(repo, version), {m: [] for m in MODELS}
    reference = ImageTextReader()
    engine = reference.engine
    own = {"ocr_detect": engine.text_det.infer, "ocr_classify": engine.text_cls.infer,
           "ocr_recognize": engine.text_rec.session}

    def recording(model):
        def call(x):
            out = own[model](x)
            seen[model].append(float(np.max(np.abs(served(model, x) - out[0]))))
            return out
        return call

    engine.text_det.infer, engine.text_cls.infer = recording("ocr_detect"), recording("ocr_classify")
    engine.text_rec.session = recording("ocr_recognize")
    for data in images.values():
        reference.read(decode_image(data).image)
    return {m: max(v) if v else 0.0 for m, v in seen.items()}


def parity(repo: Path, version: str) -> dict:
    """Lines read through the copied files vs the package's own pipeline, on every meme and sample photo."""
    from moderation.core.imaging import decode_image
    from moderation.testing.memes import memes, render
    from moderation.testing.samples import sample_posts

    served = ImageTextReader(_sessions(repo, version))
    reference = ImageTextReader()  # the package's RapidOCR with its own onnxruntime sessions
    images = {m.name: render(m) for m in memes()} | {p.name: p.image_bytes() for p in sample_posts()}
    differ = []
    for name, data in images.items():
        image = decode_image(data).image
        a, b = served.read(image), reference.read(image)
        if [(x.text, x.box) for x in a] != [(x.text, x.box) for x in b]:
            differ.append(name)
    return {"images": len(images), "differ": differ, "max_abs_diff": output_diff(repo, version, images)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repository", type=Path, default=Path("model_repository"))
    ap.add_argument("--version", default="1")
    args = ap.parse_args(argv)
    dist = importlib.metadata.distribution("rapidocr-onnxruntime")
    src_dir = package_dir() / "models"
    for model, filename in ONNX_FILES.items():
        vdir = args.repository / model / args.version
        vdir.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src_dir / filename, vdir / "model.onnx")
    result = parity(args.repository, args.version)
    print(f"ocr parity: {result['images']} images, differing: {result['differ'] or 'none'}")
    worst = max(result["max_abs_diff"].values())
    if result["differ"] or worst > TOLERANCE:
        raise SystemExit(f"OCR parity with rapidocr_onnxruntime failed: texts differ on {result['differ']}, "
                         f"max output difference {worst} (tolerance {TOLERANCE})")
    for model, filename in ONNX_FILES.items():
        write_artifact_record(
            args.repository / model / args.version, source=f"pypi:rapidocr-onnxruntime=={dist.version} ({filename})",
            untrained=False,
            export={"parity_reference": "rapidocr_onnxruntime.RapidOCR (same pre/post-processing, own sessions)",
                    "parity_images": result["images"], "parity_text_equal": not result["differ"],
                    "parity_max_abs_diff": result["max_abs_diff"][model], "tolerance": TOLERANCE,
                    "wheel_sha256": file_sha256(src_dir / filename)},
            extra={"licence": {"weights": "Apache-2.0 (PaddleOCR PP-OCRv4, PaddlePaddle Authors)",
                               "package": "Apache-2.0 (rapidocr-onnxruntime)"}})
    print(json.dumps({"ocr": result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
