"""The exported ONNX encoders agree with PyTorch (re-checked here, not only at export time), and every
artifact matches its recorded sha256."""
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from moderation.core.errors import ArtifactMismatch
from moderation.core.imaging import decode_image
from moderation.gate.inputs import ClipPixels
from moderation.repository.artifacts import read_artifact_record
from moderation.repository.render import ONNX_MODELS, PYTHON_MODELS
from moderation.testing.samples import sample_posts

ROOT = Path(__file__).resolve().parents[1]
REPO = ROOT / "model_repository"


def test_clip_image_onnx_matches_torch():
    from transformers import CLIPModel

    from export.export_models import ClipImageEncoder

    src = read_artifact_record(REPO / "clip_image" / "1")["source"]
    enc = ClipImageEncoder(CLIPModel.from_pretrained(src).eval())
    pix = np.stack([ClipPixels(src)(decode_image(p.image_bytes()).image) for p in sample_posts()[4:7]])
    got = ort.InferenceSession(str(REPO / "clip_image" / "1" / "model.onnx")).run(None, {"pixel_values": pix})[0]
    with torch.no_grad():
        ref = enc(torch.from_numpy(pix)).numpy()
    assert np.max(np.abs(got - ref)) < 1e-4


@pytest.mark.parametrize("model", [m for m in ONNX_MODELS + PYTHON_MODELS if m not in ("postprocess", "read_text")])
def test_artifacts_match_their_records(model):
    rec = read_artifact_record(REPO / model / "1")
    assert rec["files"], model
    if model in ONNX_MODELS:
        assert rec["export"]["parity_max_abs_diff"] <= rec["export"]["tolerance"]


def test_tampered_artifact_is_refused(tmp_path):
    import shutil

    d = tmp_path / "clip_text" / "1"
    shutil.copytree(REPO / "clip_text" / "1", d)
    (d / "model.onnx").write_bytes((d / "model.onnx").read_bytes()[:-10] + b"0123456789")
    with pytest.raises(ArtifactMismatch, match="model.onnx"):
        read_artifact_record(d)
