"""The exported ONNX encoders agree with PyTorch (re-checked here, not only at export time), and every
artifact matches its recorded sha256. The Qwen3-VL vision tower exports from its own tensors alone, at the
real model's width."""
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
        measured = rec["export"].get("parity_max_rel_diff", rec["export"]["parity_max_abs_diff"])
        assert measured <= rec["export"]["tolerance"]


def test_tampered_artifact_is_refused(tmp_path):
    import shutil

    d = tmp_path / "clip_text" / "1"
    shutil.copytree(REPO / "clip_text" / "1", d)
    (d / "model.onnx").write_bytes((d / "model.onnx").read_bytes()[:-10] + b"0123456789")
    with pytest.raises(ArtifactMismatch, match="model.onnx"):
        read_artifact_record(d)


# Qwen3-VL-8B's vision tower at its real width, two blocks deep, inside a checkpoint whose text model is tiny.
REAL_WIDTH_VISION = {"depth": 2, "hidden_size": 1152, "num_heads": 16, "intermediate_size": 4304,
                     "out_hidden_size": 4096, "num_position_embeddings": 2304, "deepstack_visual_indexes": [0, 1],
                     "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
                     "hidden_act": "gelu_pytorch_tanh"}
TINY_TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 1024,
             "rope_parameters": {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [2, 3, 3],
                                 "mrope_interleaved": True}}


@pytest.fixture(scope="module")
def real_width_checkpoint(tmp_path_factory):
    """(directory, the saved model's vision state dict): bf16, sharded like the real one (index + shards)."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    torch.manual_seed(0)
    config = Qwen3VLConfig(vision_config=REAL_WIDTH_VISION, text_config=TINY_TEXT)
    model = Qwen3VLForConditionalGeneration(config).to(torch.bfloat16).eval()
    path = tmp_path_factory.mktemp("real-width-qwen3-vl")
    model.save_pretrained(path, max_shard_size="100MB")
    visual = {k: v.clone() for k, v in model.model.visual.state_dict().items()}
    del model
    return path, visual


def _patches(n: int, grid: int = 28, patch_dim: int = 1536) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, grid * grid, patch_dim)).astype(np.float32)


def test_vision_tower_loads_alone_in_checkpoint_dtype(real_width_checkpoint, monkeypatch):
    import json

    from transformers.models.qwen3_vl import modeling_qwen3_vl as mq

    from export.vision_export import load_vision_tower

    path, visual = real_width_checkpoint
    weight_map = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(weight_map.values())) > 1  # the sharded layout is what is exercised

    def no_language_model(*args, **kwargs):
        raise AssertionError("the language model was built")

    monkeypatch.setattr(mq.Qwen3VLTextModel, "__init__", no_language_model)
    tower, info = load_vision_tower(path)
    assert info["prefix"] == "model.visual."
    assert info["tensors"] == sorted(k for k in weight_map if k.startswith("model.visual."))
    assert info["dtype"] == "bfloat16"
    state = tower.state_dict()
    assert set(state) == set(visual)
    assert all(torch.equal(state[k], visual[k]) for k in visual)
    assert info["bytes"] == sum(v.numel() * v.element_size() for v in visual.values())


def test_real_width_vision_tower_export_parity(real_width_checkpoint, tmp_path):
    from export.export_models import export_vision_encoder

    path, visual = real_width_checkpoint
    out = tmp_path / "vision_encoder" / "1" / "model.onnx"
    result = export_vision_encoder(path, out, _patches(2), dtype="float32")
    assert result["external_data"] is None and sorted(p.name for p in out.parent.iterdir()) == ["model.onnx"]
    assert result["parity_max_rel_diff"] <= result["tolerance"] == 1e-4
    assert result["parameters"] == sum(v.numel() for v in visual.values())
    assert result["checkpoint_dtype"] == "bfloat16"
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    tokens, deepstack = sess.run(None, {"PIXEL_VALUES": _patches(1)})
    assert tokens.shape == (1, 196, 4096) and deepstack.shape == (1, 2, 196, 4096)


def test_fp16_vision_export_with_external_data_is_hashed(real_width_checkpoint, tmp_path):
    """fp16 weights above the (lowered) size threshold: one model.onnx.data beside model.onnx, parity against
    the fp32 tower, and the artifact record hashes the data file too."""
    import shutil

    from export.export_models import export_vision_encoder
    from moderation.repository.artifacts import write_artifact_record

    path, _ = real_width_checkpoint
    vdir = tmp_path / "vision_encoder" / "1"
    result = export_vision_encoder(path, vdir / "model.onnx", _patches(2), dtype="float16",
                                   external_data_threshold=64 << 20)
    assert result["external_data"] == "model.onnx.data"
    assert sorted(p.name for p in vdir.iterdir()) == ["model.onnx", "model.onnx.data"]
    # the graph keeps only small constants (position table, rotary cos/sin); the weights are in the data file
    assert (vdir / "model.onnx").stat().st_size * 50 < (vdir / "model.onnx.data").stat().st_size
    assert result["parity_max_rel_diff"] <= result["tolerance"] == 1e-2
    assert result["parity_max_rel_diff"] > 1e-5  # fp16 weights: this is not the fp32 graph
    write_artifact_record(vdir, source=str(path), untrained=True, export=result)
    assert set(read_artifact_record(vdir)["files"]) == {"model.onnx", "model.onnx.data"}
    moved = tmp_path / "copy" / "vision_encoder" / "1"
    shutil.copytree(vdir, moved)  # external data is found beside the model wherever the directory goes
    tokens = ort.InferenceSession(str(moved / "model.onnx")).run(["VISUAL_TOKENS"], {"PIXEL_VALUES": _patches(1)})[0]
    assert tokens.dtype == np.float32 and np.isfinite(tokens).all()
    with (moved / "model.onnx.data").open("r+b") as f:
        f.seek(4096)
        f.write(b"\x00" * 64)
    with pytest.raises(ArtifactMismatch, match="model.onnx.data"):
        read_artifact_record(moved)


def test_onnx_above_the_threshold_keeps_its_weights_in_one_file(tmp_path):
    import onnx

    from export.export_models import export_onnx

    torch.manual_seed(0)
    net = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(8)]).eval()
    x = torch.randn(2, 64)
    out = tmp_path / "m" / "model.onnx"
    assert export_onnx(net, (x,), out, ["x"], ["y"], 17, external_data_threshold=16 << 10) == "model.onnx.data"
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx", "model.onnx.data"]
    proto = onnx.load(str(out), load_external_data=False)
    locations = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"model.onnx.data"}
    got = ort.InferenceSession(str(out)).run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, net(x).numpy(), rtol=1e-5, atol=1e-6)
    # Exported again under the threshold: one self-contained file, the old data file gone.
    assert export_onnx(net, (x,), out, ["x"], ["y"], 17) is None
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx"]
    assert ort.InferenceSession(str(out)).run(None, {"x": x.numpy()})[0].shape == (2, 64)


def test_per_tensor_data_files_are_merged_into_one(tmp_path):
    """The layout torch's exporter writes above 2 GB (one file per tensor, Constant values included) becomes one
    data file that onnxruntime reads to the same outputs."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from export.export_models import _save_with_one_data_file

    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), f"w{i}") for i in range(4)]
    shift = numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "shift")
    nodes = [helper.make_node("Constant", [], ["c"], value=shift), helper.make_node("Add", ["x", "c"], ["h0"])]
    nodes += [helper.make_node("MatMul", [f"h{i}", f"w{i}"], [f"h{i + 1}"]) for i in range(4)]
    nodes.append(helper.make_node("Identity", ["h4"], ["y"]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64, 64])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    inline = tmp_path / "inline.onnx"
    onnx.save_model(model, str(inline))
    staged = tmp_path / "staged" / "model.onnx"
    staged.parent.mkdir()
    onnx.save_model(model, str(staged), save_as_external_data=True, all_tensors_to_one_file=False,
                    size_threshold=1024, convert_attribute=True)
    assert len(list(staged.parent.iterdir())) == 6  # the graph, 4 weights, the Constant's value
    out = tmp_path / "out" / "model.onnx"
    out.parent.mkdir()
    _save_with_one_data_file(staged, out, out.with_name("model.onnx.data"))
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx", "model.onnx.data"]
    x = {"x": rng.standard_normal((64, 64)).astype(np.float32)}
    want = ort.InferenceSession(str(inline)).run(None, x)[0]
    np.testing.assert_array_equal(ort.InferenceSession(str(out)).run(None, x)[0], want)
