"""Turn the sample posts (real photos from installed wheels, zh/en captions) into perf_analyzer
`--input-data` JSON files, one per target.

    .venv/bin/python -m perf make_inputs [--out build/perf/inputs]

Encoding (perf_analyzer 2.51, checked against the binary in .venv/bin): every tensor is given as
{"b64": ...}. For TYPE_STRING tensors the decoded bytes are Triton's serialized BYTES form — each element
a 4-byte little-endian length followed by its bytes; for numeric tensors they are the raw little-endian
values in row-major order. Variable dims get an explicit "shape" (batch dim excluded).

Targets:
  moderate.json          the entry ensemble, policy `default` (the gate decides the route)
  gate.json              the entry ensemble, policy `allow_all` (the gate settles every post: gate path)
  moderate_vlm.json      the entry ensemble, policy `escalate_all` (every post goes on to the VLM)
  vision_encoder.json    PIXEL_VALUES [784, 1536] from vlm_preprocess's own QwenPixels
  language_decoder.json  VISUAL_TOKENS / DEEPSTACK from the exported vision encoder, BODY_IDS, DECODER_OPTIONS
  nsfw_image.json        only when model_repository/nsfw_image exists (its inputs read from its config)
  gate_memes.json        the entry ensemble, policy `allow_all`, on the rendered memes (gate path + OCR of their text)
  ocr_detect.json        the detection input of each meme at the reader's bounded side (moderation/ocr/reader.py)
"""
from __future__ import annotations

import argparse
import base64
import json
import struct
import sys
from pathlib import Path

import numpy as np

from perf.common import BUILD, REPO


def b64_bytes(values: list[bytes]) -> dict:
    """Triton BYTES serialization: <uint32 little-endian length><bytes> per element."""
    raw = b"".join(struct.pack("<I", len(v)) + v for v in values)
    return {"b64": base64.b64encode(raw).decode("ascii")}


def post_images(images: list[bytes]) -> dict:
    """IMAGE of one post: its images, with the shape perf_analyzer needs for the variable image count."""
    return {**b64_bytes(images), "shape": [len(images)]}


def b64_array(a: np.ndarray, with_shape: bool = False) -> dict:
    a = np.ascontiguousarray(a)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    d = {"b64": base64.b64encode(a.tobytes()).decode("ascii")}
    if with_shape:
        d["shape"] = list(a.shape)
    return d


def decode_b64_bytes(d: dict) -> list[bytes]:
    """Inverse of b64_bytes (used by the tests to check the encoding round-trips)."""
    raw, out, i = base64.b64decode(d["b64"]), [], 0
    while i < len(raw):
        (n,) = struct.unpack_from("<I", raw, i)
        out.append(raw[i + 4:i + 4 + n])
        i += 4 + n
    return out


def post_entries(policy: str, posts=None) -> list[dict]:
    from moderation.testing.samples import sample_posts

    out = []
    for p in posts or sample_posts():
        # No request_id: the server assigns a fresh one per request, as for a client that sends none.
        opts = json.dumps({"policy": policy}).encode()
        out.append({"IMAGE": post_images([p.image_bytes()]), "TEXT": b64_bytes([p.text.encode("utf-8")]),
                    "OPTIONS": b64_bytes([opts])})
    return out


def multi_image_entries(policy: str, per_post: int = 3) -> list[dict]:
    """Posts of `per_post` images each (the sample posts' images in turn, the first post's caption)."""
    from moderation.testing.samples import sample_posts

    posts = sample_posts()
    opts = json.dumps({"policy": policy}).encode()
    return [{"IMAGE": post_images([posts[(i + k) % len(posts)].image_bytes() for k in range(per_post)]),
             "TEXT": b64_bytes([posts[i].text.encode("utf-8")]), "OPTIONS": b64_bytes([opts])}
            for i in range(len(posts))]


def vlm_entries(repo: Path, n: int, policy: str = "default") -> tuple[list[dict], list[dict]]:
    """vision_encoder and language_decoder inputs, computed exactly as the vlm ensemble would."""
    import onnxruntime as ort

    from moderation.core.post import parse_post
    from moderation.testing.samples import sample_posts
    from moderation.vlm.inputs import VlmInputs

    vin = VlmInputs(str(repo / "vlm_preprocess" / "1" / "qwen"), "1")
    sess = ort.InferenceSession(str(repo / "vision_encoder" / "1" / "model.onnx"),
                                providers=["CPUExecutionProvider"])
    venc, dec = [], []
    for p in sample_posts()[:n]:
        post = parse_post(p.image_bytes(), p.text.encode("utf-8"), json.dumps({"policy": policy}).encode())
        pixels, body, info = vin(post)
        vis, ds = sess.run(["VISUAL_TOKENS", "DEEPSTACK"], {"PIXEL_VALUES": pixels[None]})
        venc.append({"PIXEL_VALUES": b64_array(pixels.astype(np.float32))})
        # perf_analyzer wants every variable dim spelled out ([196, -1], [-1, 196, -1], [-1])
        dec.append({"VISUAL_TOKENS": b64_array(vis[0].astype(np.float32), with_shape=True),
                    "DEEPSTACK": b64_array(ds[0].astype(np.float32), with_shape=True),
                    "BODY_IDS": b64_array(body.astype(np.int64), with_shape=True),
                    "DECODER_OPTIONS": b64_bytes([info.to_json()])})
    return venc, dec


_NP = {"TYPE_FP32": np.float32, "TYPE_FP16": np.float16, "TYPE_INT64": np.int64, "TYPE_INT32": np.int32,
       "TYPE_UINT8": np.uint8}


def nsfw_entries(repo: Path, n: int) -> list[dict] | None:
    """The nsfw_image model (added separately): pixels from moderation.imaging.NsfwPixels for a
    single-input model whose input matches its output shape; None when the model is not there."""
    cfg = repo / "nsfw_image" / "config.pbtxt"
    if not cfg.exists():
        return None
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    mc = text_format.Parse(cfg.read_text(), model_config_pb2.ModelConfig())
    from moderation.core.imaging import decode_image
    from moderation.gate.inputs import NsfwPixels
    from moderation.testing.samples import sample_posts

    if len(mc.input) != 1:
        raise SystemExit(f"nsfw_image has {len(mc.input)} inputs; perf/make_inputs.py knows only one")
    inp = mc.input[0]
    dtype = model_config_pb2.DataType.Name(inp.data_type)
    out = []
    for p in sample_posts()[:n]:
        if dtype == "TYPE_STRING":
            out.append({inp.name: b64_bytes([p.image_bytes()])})
            continue
        arr = NsfwPixels()(decode_image(p.image_bytes()).image)
        dims = list(inp.dims)
        if list(arr.shape) != dims and all(d > 0 for d in dims):
            arr = arr.reshape(dims) if arr.size == int(np.prod(dims)) else arr.transpose(2, 0, 1)
        out.append({inp.name: b64_array(arr.astype(_NP[dtype]), with_shape=any(d < 0 for d in dims))})
    return out


def meme_entries(policy: str) -> list[dict]:
    from moderation.testing.memes import memes, render

    opts = json.dumps({"policy": policy}).encode()
    return [{"IMAGE": post_images([render(m)]), "TEXT": b64_bytes([m.caption.encode("utf-8")]),
             "OPTIONS": b64_bytes([opts])} for m in memes()]


def ocr_detect_entries() -> list[dict]:
    """ocr_detect's input for each meme, made by the reader's own detection preprocessing."""
    from moderation.core.imaging import decode_image
    from moderation.ocr.reader import ImageTextReader
    from moderation.testing.memes import memes, render

    det = ImageTextReader().engine.text_det
    out = []
    for m in memes():
        bgr = np.asarray(decode_image(render(m)).image)[:, :, ::-1]
        x = det.get_preprocess(max(bgr.shape[:2]))(bgr)[0].astype(np.float32)
        out.append({"x": b64_array(x, with_shape=True)})
    return out


def write(out: Path, name: str, entries: list[dict]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps({"data": entries}))
    return path


def make_all(out: Path = BUILD / "inputs", repo: Path = REPO, vlm_samples: int = 4) -> dict[str, Path]:
    files = {
        "moderate": write(out, "moderate", post_entries("default")),
        "gate": write(out, "gate", post_entries("allow_all")),
        "moderate_vlm": write(out, "moderate_vlm", post_entries("escalate_all")),
        "moderate_multi": write(out, "moderate_multi", multi_image_entries("default")),
    }
    venc, dec = vlm_entries(repo, vlm_samples)
    files["vision_encoder"] = write(out, "vision_encoder", venc)
    files["language_decoder"] = write(out, "language_decoder", dec)
    nsfw = nsfw_entries(repo, vlm_samples)
    if nsfw is not None:
        files["nsfw_image"] = write(out, "nsfw_image", nsfw)
    files["gate_memes"] = write(out, "gate_memes", meme_entries("allow_all"))
    files["ocr_detect"] = write(out, "ocr_detect", ocr_detect_entries())
    return files


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=BUILD / "inputs")
    ap.add_argument("--repository", type=Path, default=REPO)
    args = ap.parse_args(argv)
    if not (args.repository / "vision_encoder" / "1" / "model.onnx").exists():
        print("error: no exported models; run `make models` first", file=sys.stderr)
        return 2
    for name, path in make_all(args.out, args.repository).items():
        print(f"{name:18s} {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
