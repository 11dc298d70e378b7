"""The GPU memory plan: Qwen3-VL-8B + CLIP ViT-L/14 (their published configs) fit a 24 GB A10's 22 GiB and not
16 GiB; its parameter formulas are the real modules' counts; the decoder's KV during the question pass is what the
plan's formula says; the launcher and the container entrypoint refuse a set that does not fit, with the numbers."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from moderation import preflight
from moderation.preflight import GiB, PlanDoesNotFit, PromptLayout, kv_bytes, plan, read_config
from moderation.repository.render import default_models

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "checkpoints"
QWEN_8B, CLIP_L14 = DATA / "qwen3-vl-8b-instruct", DATA / "clip-vit-large-patch14"
TINY_QWEN = ROOT / "model_repository" / "language_decoder" / "1" / "checkpoint"
TINY_CLIP = ROOT / "build" / "checkpoints" / "tiny-clip"
CONFIGS = {"MODERATION_QWEN_CONFIG": str(QWEN_8B), "MODERATION_CLIP_CONFIG": str(CLIP_L14)}


def _plan(budget: str, **kw):
    return plan(read_config(QWEN_8B), read_config(CLIP_L14), preflight.parse_bytes(budget), **kw)


def test_8b_and_vit_l14_fit_an_a10_at_batch_8_and_not_16_gib(capsys):
    a10 = _plan("22GiB")
    assert a10.fits and a10.total <= 22 * GiB
    decoder = next(m for m in a10.models if m.name == "language_decoder")
    assert decoder.max_batch == 8 and decoder.kind == "decoder bf16"
    assert "language_decoder_int8" not in {m.name for m in a10.models}  # not loaded beside the bf16 decoder
    assert preflight.main(["--qwen", str(QWEN_8B), "--clip", str(CLIP_L14), "--gpu-memory", "22GiB",
                           "--target", "gpu"]) == 0
    assert "FITS" in capsys.readouterr().out

    small = _plan("16GiB")
    assert not small.fits and small.total == a10.total
    assert preflight.main(["--qwen", str(QWEN_8B), "--clip", str(CLIP_L14), "--gpu-memory", "16GiB"]) == 1
    out = capsys.readouterr()
    assert "DOES NOT FIT" in out.out and "16.00 GiB" in out.err and f"{small.total / GiB:.2f} GiB" in out.err


def test_the_int8_twin_beside_the_bf16_decoder_does_not_fit_an_a10():
    both = _plan("22GiB", models=default_models("production") + ("language_decoder_int8",))
    assert not both.fits
    int8 = next(m for m in both.models if m.name == "language_decoder_int8")
    assert int8.kind == "decoder int8" and 8.5e9 < int8.weights < 9.2e9  # the 8.8 GB
    bf16 = next(m for m in both.models if m.name == "language_decoder")
    assert 16.2e9 < bf16.weights < 16.6e9  # 8.19 B text parameters in bf16 (the vision tower is the ONNX encoder)


def test_cuda_execution_provider_fp32_encoders_do_not_fit_an_a10():
    fp32 = _plan("22GiB", onnx_accelerator="cuda")
    assert not fp32.fits and {m.kind for m in fp32.models if m.name.startswith("clip")} == {"onnx fp32"}


def test_parameter_formulas_are_the_modules_counts():
    from transformers import CLIPModel, Qwen3VLForConditionalGeneration

    qwen = Qwen3VLForConditionalGeneration.from_pretrained(TINY_QWEN)
    cfg = read_config(TINY_QWEN)
    text = preflight.qwen_text_params(cfg)
    lm = sum(p.numel() for p in qwen.model.language_model.parameters()) + qwen.lm_head.weight.numel()
    assert text["linear"] + text["other"] - text["tied"] == lm
    assert text["linear"] == sum(m.weight.numel() for n, m in qwen.named_modules()
                                 if isinstance(m, torch.nn.Linear) and not n.startswith("model.visual"))
    assert preflight.qwen_vision_params(cfg) == sum(p.numel() for p in qwen.model.visual.parameters())
    clip = CLIPModel.from_pretrained(TINY_CLIP)
    counts = preflight.clip_params(read_config(TINY_CLIP))
    assert counts["image"] == sum(p.numel() for p in clip.vision_model.parameters()) + \
        clip.visual_projection.weight.numel()
    assert counts["text"] == sum(p.numel() for p in clip.text_model.parameters()) + clip.text_projection.weight.numel()
    # the published 8B: ~8.77 B parameters in all
    big = read_config(QWEN_8B)
    p8 = preflight.qwen_text_params(big)
    assert abs(p8["linear"] + p8["other"] + preflight.qwen_vision_params(big) - 8.77e9) < 0.05e9


def test_prompt_layout_bounds_the_default_policys_prompts():
    from transformers import AutoTokenizer

    from moderation.core.policy import load_policy
    from moderation.vlm.inputs import MAX_CAPTION_TOKENS
    from moderation.vlm.prompts import PromptBuilder

    layout, pol = PromptLayout(), load_policy()
    builder = PromptBuilder(AutoTokenizer.from_pretrained(TINY_QWEN), layout.visual)
    assert layout.caption == MAX_CAPTION_TOKENS and layout.image_text == pol.ocr.prompt_max_tokens
    assert layout.describe_tokens == pol.decoder.describe_max_tokens
    for lang in pol.prompts:
        qs = builder.questions(pol, lang)
        assert len(builder.prefix_ids(pol, lang)) <= layout.prefix
        assert sum(len(q.ids) for q in qs) <= layout.questions and len(qs) <= layout.question_count
        assert len(builder.describe_ids(pol, lang)) <= layout.describe_prompt
        # the body without its caption and image text: every markup token around them
        assert len(builder.body_ids(pol, lang, "x", "y")) - 2 - layout.visual <= layout.body_markup


def test_question_pass_kv_bytes_are_the_plans_formula():
    from moderation.core.policy import load_policy
    from moderation.vlm.decoder import DecoderRequest, VerdictDecoder

    dec = VerdictDecoder(TINY_QWEN)
    cfg, pol = read_config(TINY_QWEN), load_policy()
    builder = dec.prompts(196)
    rng = np.random.default_rng(0)
    hidden = cfg["text_config"]["hidden_size"]
    n_ds = len(cfg["vision_config"]["deepstack_visual_indexes"])
    captions = ["a cat on a mat", "buy cheap watches now, limited offer, click the link", "hi"]
    reqs = [DecoderRequest(np.array(builder.body_ids(pol, "en", c)), rng.standard_normal((196, hidden), np.float32),
                           rng.standard_normal((n_ds, 196, hidden), np.float32), pol, "en", describe=(i == 1))
            for i, c in enumerate(captions)]
    results = dec.score(reqs)
    P = len(builder.prefix_ids(pol, "en"))
    L = max(len(r.body_ids) for r in reqs)  # bodies are right-padded to the longest
    S = sum(len(q.ids) for q in builder.questions(pol, "en"))
    B, dtype_bytes = len(reqs), 4  # float32 on the CPU
    assert dec.kv_bytes["body"] == kv_bytes(cfg, B, P + L, dtype_bytes)
    assert dec.kv_bytes["questions"] == kv_bytes(cfg, B, P + L + S, dtype_bytes)
    # the description runs on the describing row only, within the plan's bound
    steps = max(1, results[1].description_tokens)
    assert 0 < dec.kv_bytes["describe"] <= kv_bytes(cfg, 1, P + L + len(builder.describe_ids(pol, "en")) + steps,
                                                    dtype_bytes)
    layout = PromptLayout()
    assert dec.kv_bytes["questions"] <= kv_bytes(cfg, B, layout.peak_tokens, dtype_bytes)


def test_launcher_refuses_a_set_that_does_not_fit_with_the_numbers():
    from moderation.launch.config import ServerConfig
    from moderation.launch.serve import gpu_memory_plan

    cfg = ServerConfig(repository=ROOT / "model_repository", key="k" * 32)
    assert gpu_memory_plan(cfg, {}) is None  # no budget named: nothing to check
    with pytest.raises(PlanDoesNotFit) as refused:
        gpu_memory_plan(cfg, {"MODERATION_GPU_MEMORY": "16GiB", **CONFIGS})
    message = str(refused.value)
    # the embedded server loads both decoders (device auto takes the GPU): 15.26 + 8.2 GiB of weights alone
    assert "16.00 GiB" in message and f"{refused.value.plan.total / GiB:.2f} GiB" in message
    assert "language_decoder_int8" in message and "DOES NOT FIT" in message
    assert gpu_memory_plan(cfg, {"MODERATION_GPU_MEMORY": "48GiB", **CONFIGS}).startswith("GPU memory plan:")


def test_entrypoint_refuses_a_set_that_does_not_fit(tmp_path):
    sys.path.insert(0, str(ROOT / "deploy"))
    try:
        import entrypoint
    finally:
        sys.path.remove(str(ROOT / "deploy"))
    keyfile = tmp_path / "admin_key"
    keyfile.write_text("k" * 32)
    env = {"MODERATION_ADMIN_KEY_FILE": str(keyfile), "MODEL_REPOSITORY": "s3://bucket/repo", **CONFIGS}
    args = entrypoint.command({**env, "MODERATION_GPU_MEMORY": "22GiB"})
    assert "--load-model=language_decoder" in args and "--load-model=language_decoder_int8" not in args
    with pytest.raises(SystemExit, match=r"16\.00 GiB"):
        entrypoint.command({**env, "MODERATION_GPU_MEMORY": "16GiB"})
    with pytest.raises(SystemExit, match="DOES NOT FIT"):
        entrypoint.command({**env, "MODERATION_GPU_MEMORY": "22GiB",
                            "LOAD_MODELS": ",".join(default_models("production") + ("language_decoder_int8",))})
