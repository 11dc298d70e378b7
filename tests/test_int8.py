"""INT8 variants and the automatic fallback: int8 artifacts exist with their records, the int8 decoder agrees
with full precision on the sample posts, the switch logic, and — on a real server — escalations past the policy's
in-flight threshold go to language_decoder_int8 (result, model_versions and metrics say so) and return after."""
from __future__ import annotations

import json
import urllib.request

import numpy as np
import onnxruntime as ort
import pytest

from moderation.core.policy import DecoderFallback, load_policy
from moderation.gate.fallback import FallbackSwitch
from moderation.repository.artifacts import read_artifact_record
from moderation.testing.policies import derive_policy
from moderation.testing.samples import sample_posts
from moderation.vlm.decoder import DecoderRequest, VerdictDecoder

from .conftest import REPO

POSTS = sample_posts()
CKPT = REPO / "language_decoder" / "1" / "checkpoint"


# artifacts ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["clip_image", "clip_text", "vision_encoder"])
def test_int8_encoders_are_recorded_and_close_to_fp32(model):
    vdir = REPO / model / "1"
    rec = read_artifact_record(vdir)  # verifies every hash, the int8 file included
    assert "model.int8.onnx" in rec["files"] and rec["int8"]["weight_type"] == "QInt8"
    assert rec["int8"]["bytes_int8"] < rec["int8"]["bytes_fp32"]
    # Random tiny weights quantize worse than trained ones: dynamic int8 keeps the sample posts' embeddings at
    # cosine >= 0.96 (clip_text 0.967 measured on the current samples, the others > 0.99).
    assert rec["int8"]["parity_vs_fp32"]["min_cosine_first_output"] > 0.95
    ops = {n.op_type for n in __import__("onnx").load(str(vdir / "model.int8.onnx")).graph.node}
    assert ops & {"MatMulInteger", "DynamicQuantizeLinear"}, ops  # really int8 arithmetic, not a copy


def test_int8_decoder_version_is_recorded():
    rec = read_artifact_record(REPO / "language_decoder_int8" / "1")
    assert rec["quantization"]["scheme"] == "int8" and rec["quantization"]["from"] == "language_decoder/1"
    assert json.loads((REPO / "language_decoder_int8" / "1" / "quantization.json").read_text())["scheme"] == "int8"


# the int8 decoder ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def requests_():
    from transformers import AutoTokenizer

    from moderation.core.imaging import decode_image
    from moderation.core.text import detect_lang
    from moderation.vlm.inputs import QwenPixels
    from moderation.vlm.prompts import PromptBuilder

    sess = ort.InferenceSession(str(REPO / "vision_encoder" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    qp, pol = QwenPixels(str(CKPT)), load_policy()
    builder = PromptBuilder(AutoTokenizer.from_pretrained(CKPT), qp.num_visual_tokens)
    out = []
    for p in POSTS:
        tok, ds = sess.run(None, {"PIXEL_VALUES": qp(decode_image(p.image_bytes()).image)[0][None]})
        lang = detect_lang(p.text)
        out.append(DecoderRequest(np.array(builder.body_ids(pol, lang, p.text)), tok[0], ds[0], pol, lang))
    return out


@pytest.mark.parametrize("scheme,label", [("int8", "int8_dynamic"), ("int8_weight_only", "int8_weight_only")])
def test_int8_decoder_agrees_with_full_precision(requests_, scheme, label):
    import torch

    fp32 = VerdictDecoder(CKPT).score(requests_)
    dec = VerdictDecoder(CKPT, quantization=scheme)
    assert dec.quantization == label and dec.device_label == f"cpu:float32+{label}" and dec.quantized_layers == 15
    assert not any(isinstance(m, torch.nn.Linear) and type(m) is torch.nn.Linear for m in dec.model.modules())
    q = dec.score(requests_)
    diffs = [abs(a.violation - b.violation) for a, b in zip(q, fp32, strict=False)]
    diffs += [abs(a.labels[k] - b.labels[k]) for a, b in zip(q, fp32, strict=False) for k in a.labels]
    # untrained tiny model: scores sit near 0.5, so this bounds noise logits, not a verdict's quality
    assert 0 < max(diffs) < 0.05, max(diffs)



def test_int8_weight_only_dequantizes_in_blocks_with_the_same_output(monkeypatch):
    import torch

    from moderation.vlm import int8

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 100)
    q = int8.Int8WeightOnlyLinear(linear)
    x = torch.randn(3, 5, 64)
    whole = torch.nn.functional.linear(x, q.qweight.float() * q.scale[:, None], linear.bias.detach())
    monkeypatch.setattr(int8, "DEQUANT_BLOCK_ELEMENTS", 64 * 7)  # 7 output rows per block: 15 blocks, a short last
    blocked = q(x)
    assert blocked.shape == (3, 5, 100)
    assert torch.allclose(blocked, whole, atol=1e-5)
    assert (blocked - linear(x)).abs().max() < 0.05  # and still the layer it quantized

# the switch ----------------------------------------------------------------------------------------------
def test_switch_trips_on_inflight_and_queue_age_and_returns():
    now = [100.0]
    sw = FallbackSwitch(clock=lambda: now[0])
    cfg = DecoderFallback(max_inflight=2, max_queue_ms=500)
    assert sw.check(cfg) is None and sw.check(None) is None
    with sw.track():
        assert sw.check(cfg) is None
        now[0] += 0.6  # the oldest escalation has waited 600 ms
        assert sw.check(cfg).reason == "queue"
        now[0] -= 0.6
        with sw.track():
            got = sw.check(cfg)
            assert got.reason == "inflight" and got.inflight == 2 and got.model == "language_decoder_int8"
        assert sw.check(cfg) is None
    assert sw.inflight == 0 and sw.check(cfg) is None
    with sw.track():
        now[0] += 10
        assert sw.check(DecoderFallback(max_inflight=5)) is None  # unset thresholds are not checked


# against a real server -------------------------------------------------------------------------------------
def _fallback_policy(policy_dir, name, **fallback):
    # every post escalates; verdict cache off so repeated posts are judged (and can fall back) each time
    derive_policy(policy_dir, name, gate={"allow_below": 0.0, "block_at": 1.01}, cache={"enabled": False},
                  decoder={"fallback": fallback})


def _fallback_count(triton) -> float:
    text = urllib.request.urlopen(triton.metrics_url, timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("moderation_decoder_fallback_total{") and "language_decoder_int8" in line)


def test_escalations_past_max_inflight_go_to_int8_and_return(triton, policy_dir):
    """max_inflight 1. One request of four posts: the gate escalates them together (one decide call, in post
    order), so the first post's escalation holds the full-precision decoder when the other three are checked, and
    those three go to the INT8 twin; the result, model_versions and metrics say so. Then one post at a time: nothing
    is in flight, every post meets the full-precision decoder again. Driven through the switch's input (escalations
    in flight), not by racing clients; the overload itself is measured by perf/int8_bench.py (`make bench-int8`)."""
    from clients.client import ModerationClient

    _fallback_policy(policy_dir, "fallback_1", max_inflight=1)
    before = _fallback_count(triton)
    posts = POSTS[:4]
    with ModerationClient(triton.grpc_url, timeout_s=120) as c:
        peak = c.moderate_batch([(p.image_bytes(), p.text, {"policy": "fallback_1", "request_id": f"peak-{i}"})
                                 for i, p in enumerate(posts)])
        after = [c.moderate(p.image_bytes(), p.text, policy="fallback_1") for p in posts]
    assert [r["route"] for r in peak] == ["vlm"] * 4, peak
    assert [bool(r.get("fallback")) for r in peak] == [False, True, True, True], [r.get("fallback") for r in peak]
    full, fell = peak[0], peak[1:]
    assert full["model_versions"]["language_decoder"] == "1" and "language_decoder_int8" not in full["model_versions"]
    for r in fell:
        assert r["fallback"]["reason"] == "inflight" and r["fallback"]["inflight"] == 1, r["fallback"]
        assert r["model_versions"]["language_decoder_int8"] == "1" and "language_decoder" not in r["model_versions"]
        assert "int8" in r["model_versions"]["language_decoder_int8_device"]
    assert _fallback_count(triton) - before == 3
    # the peak is over: one at a time, every post meets the full-precision decoder again, and the posts that fell
    # back got scores near their full-precision ones (untrained model: noise logits)
    assert all(not r.get("fallback") and r["model_versions"]["language_decoder"] == "1" for r in after), after
    for r, ref in zip(fell, after[1:], strict=True):
        assert max(abs(r["scores"][k] - ref["scores"][k]) for k in ref["scores"]) < 0.05

