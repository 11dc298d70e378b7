"""Every config.pbtxt parses as Triton's ModelConfig protobuf, matches its single definition in
moderation/repository.py, and the production rendering differs only where intended."""
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from moderation.repository.render import ALL_MODELS, ONNX_MODELS, render

REPO = Path(__file__).resolve().parents[1] / "model_repository"


def parse(text: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse(text, model_config_pb2.ModelConfig())


@pytest.mark.parametrize("name", ALL_MODELS)
def test_committed_config_parses_and_matches_rendering(name):
    text = (REPO / name / "config.pbtxt").read_text()
    cfg = parse(text)
    assert cfg.name == name
    assert text == render(name, "local"), f"{name}/config.pbtxt drifted: run `make render`"


@pytest.mark.parametrize("name", ALL_MODELS)
def test_production_rendering_parses(name):
    local, prod = parse(render(name, "local")), parse(render(name, "production"))
    assert [i.name for i in local.input] == [i.name for i in prod.input]
    assert [o.name for o in local.output] == [o.name for o in prod.output]
    if name in ONNX_MODELS:
        assert (local.backend, prod.backend) == ("python", "onnxruntime")
        assert prod.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU


def test_ensemble_steps_reference_models_and_tensors():
    for name in ("moderate", "vlm"):
        cfg = parse(render(name))
        produced = {i.name for i in cfg.input}
        for step in cfg.ensemble_scheduling.step:
            step_cfg = parse(render(step.model_name))
            step_inputs = {i.name for i in step_cfg.input}
            step_outputs = {o.name for o in step_cfg.output}
            assert set(step.input_map) <= step_inputs, step.model_name
            assert set(step.output_map) <= step_outputs, step.model_name
            optional = {i.name for i in step_cfg.input if i.optional}
            assert set(step.input_map.values()) <= produced, step.model_name
            assert step_inputs - set(step.input_map) <= optional, f"{step.model_name} misses required inputs"
            produced |= set(step.output_map.values())
        assert {o.name for o in cfg.output} <= produced


def test_encoders_and_decoder_batch_dynamically():
    for name in ("clip_image", "clip_text", "vision_encoder", "language_decoder"):
        cfg = parse(render(name))
        assert cfg.max_batch_size >= 8 and cfg.HasField("dynamic_batching"), name


def test_manifest_of_committed_configs_is_current():
    """Changing a served config, model.py or policy without recording it in MANIFEST.json fails CI."""
    import json

    from moderation.repository.manifest import MANIFEST, committed_manifest

    recorded = json.loads((REPO / MANIFEST).read_text())
    assert recorded == committed_manifest(REPO), "run `make manifest` and commit MANIFEST.json"


def test_full_manifest_includes_verified_artifact_records():
    from moderation.repository.manifest import full_manifest

    m = full_manifest(REPO)
    rec = m["models"]["language_decoder"]["versions"]["1"]["artifact"]
    assert rec["source"] and rec["files"] and "untrained" in rec


def test_only_preprocess_decodes_an_upload():
    """IMAGE (the bytes as sent) goes to preprocess alone; the stages after it read its decoded FRAMES."""
    from moderation.repository.render import MODELS

    takes_image = sorted(n for n, m in MODELS.items() if any(i["name"] == "IMAGE" for i in m["inputs"]))
    assert takes_image == ["moderate", "preprocess"]
    assert any(o["name"] == "FRAMES" for o in MODELS["preprocess"]["outputs"])
    for name in ("read_text", "clip_gate", "vlm_preprocess", "vlm"):
        assert any(i["name"] == "FRAMES" for i in MODELS[name]["inputs"]), name
