"""End to end through a real Triton server: routes decided by policy thresholds, schema-valid results,
concurrency, the decoder reached only by escalated posts, the served verdict equal to a direct
transformers call, and the CLI contract."""
from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from clients.client import ModerationFailed
from moderation.core.policy import load_policy
from moderation.core.result import validate_result
from moderation.gate.scoring import gate_band
from moderation.testing.samples import sample_posts

from .conftest import ROOT, write_policy

POSTS = sample_posts()


def decoder_count(triton) -> int:
    c = grpcclient.InferenceServerClient(triton.grpc_url)
    stats = c.get_inference_statistics("language_decoder", headers=triton.admin_headers, as_json=True)
    return sum(int(m["inference_stats"]["success"].get("count", 0)) for m in stats["model_stats"])


@pytest.mark.parametrize("policy,route,band", [("escalate_all", "vlm", "escalate"), ("block_all", "gate", "block"),
                                               ("allow_all", "gate", "allow")])
def test_policy_thresholds_force_each_route(client, policy, route, band):
    post = POSTS[0]
    r = client.moderate(post.image_bytes(), post.text, policy=policy)
    assert (r["route"], r["gate"]["band"]) == (route, band)
    assert r["policy"].startswith(policy + "@")
    if band == "block":  # the untrained CLIP would block: it cannot, so a person decides
        assert r["action"] == "review" and r["decided_by"] == "clip" and r["violation"] is False
    if route == "vlm":
        assert r["sentiment"] is not None and r["model_versions"]["language_decoder"] == "1"
    else:
        assert "language_decoder" not in r["model_versions"]


def test_thresholds_between_observed_scores_split_posts_three_ways(client, policy_dir):
    """Take each post's gate scores, put the policy thresholds between them, and check that the server's
    bands, and the routes they imply, follow the policy (computed independently here with the same gate_band())."""
    gates = [client.moderate(p.image_bytes(), p.text, policy="escalate_all")["gate"] for p in POSTS]
    observed = [g["scores"] for g in gates]
    base = load_policy("default")
    tops = sorted(max(v for k, v in s.items() if k in base.gate.block_labels) for s in observed)
    allow_below = (tops[1] + tops[2]) / 2
    block_at = (tops[-3] + tops[-2]) / 2
    assert allow_below < block_at
    write_policy(policy_dir, "split3", allow_below=allow_below, block_at=block_at)
    split = load_policy("split3", policy_dir)
    expected = [gate_band(split, g["scores"], g.get("sources"))[0] for g in gates]
    assert {"allow", "block", "escalate"} <= set(expected)
    got = [client.moderate(p.image_bytes(), p.text, policy="split3") for p in POSTS]
    assert [r["gate"]["band"] for r in got] == expected
    assert [r["route"] for r in got] == ["vlm" if b == "escalate" else "gate" for b in expected]


def test_results_follow_schema_and_carry_versions_latency_and_honesty(client):
    for post in POSTS[:4]:
        r = client.moderate(post.image_bytes(), post.text, describe=True, request_id=f"schema-{post.name}")
        validate_result(r)
        assert r["request_id"] == f"schema-{post.name}"
        assert r["untrained"] is True and r["signals"]["clip"] == "untrained"
        assert {"preprocess", "clip_gate", "postprocess"} <= set(r["model_versions"])
        assert r["latency_ms"]["total"] > 0
        assert len(r["hashes"]["image_sha256"]) == 64
        if r["route"] == "vlm":
            assert isinstance(r["description"], str)


def test_only_escalated_posts_reach_the_decoder(client, triton):
    before = decoder_count(triton)
    routes = [client.moderate(p.image_bytes(), p.text)["route"] for p in POSTS]
    after = decoder_count(triton)
    escalated = routes.count("vlm")
    assert 0 < escalated < len(POSTS), routes  # the default policy settles some posts at the gate
    assert after - before == escalated


def test_concurrent_requests(triton):
    from clients.client import ModerationClient

    def one(i):
        post = POSTS[i % len(POSTS)]
        with ModerationClient(triton.grpc_url, timeout_s=120) as c:
            return c.moderate(post.image_bytes(), post.text, request_id=f"conc-{i}", policy="escalate_all")

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(24)))
    assert sorted(r["request_id"] for r in results) == sorted(f"conc-{i}" for i in range(24))
    assert all(r["route"] == "vlm" for r in results)


def test_served_verdict_equals_direct_transformers_call(client):
    import torch
    from transformers import AutoTokenizer, Qwen3VLForConditionalGeneration

    from moderation.core.imaging import decode_image
    from moderation.core.text import detect_lang
    from moderation.vlm.inputs import QwenPixels
    from moderation.vlm.prompts import PromptBuilder

    ckpt = ROOT / "model_repository" / "language_decoder" / "1" / "checkpoint"
    model = Qwen3VLForConditionalGeneration.from_pretrained(ckpt).eval()
    tok = AutoTokenizer.from_pretrained(ckpt)
    qp = QwenPixels(str(ckpt))
    builder = PromptBuilder(tok, qp.num_visual_tokens)
    post = POSTS[3]
    served = client.moderate(post.image_bytes(), post.text, policy="escalate_all")
    pol = load_policy("default")
    lang = detect_lang(post.text)
    pv, grid = qp(decode_image(post.image_bytes()).image)
    prefix, body = builder.prefix_ids(pol, lang), builder.body_ids(pol, lang, post.text)
    for q in builder.questions(pol, lang):
        ids = torch.tensor([prefix + body + list(q.ids)])
        with torch.no_grad():
            logits = model(input_ids=ids, pixel_values=torch.from_numpy(pv), image_grid_thw=torch.from_numpy(grid),
                           mm_token_type_ids=(ids == model.config.image_token_id).int()).logits[0, -1]
        probs = dict(zip(q.options, torch.softmax(logits[list(q.option_ids)], -1).tolist(), strict=False))
        if q.name == "sentiment":
            assert abs(served["sentiment"]["score"] - max(probs.values())) < 1e-4
        elif q.name in served["gate"]["sources"]:  # a trained gate signal outranks the untrained VLM here
            assert served["scores"][q.name] == served["gate"]["scores"][q.name]
        else:
            assert abs(served["scores"][q.name] - probs["yes"]) < 1e-4, q.name


def test_bad_image_is_a_coded_error_and_the_server_stays_up(client):
    with pytest.raises(ModerationFailed) as e:
        client.moderate(b"this is not an image", "hello")
    assert e.value.code == "bad_image"
    ok = client.moderate(POSTS[1].image_bytes(), POSTS[1].text)
    assert ok["error"] is None


def test_outputs_tensors(triton):
    c = grpcclient.InferenceServerClient(triton.grpc_url)
    post = POSTS[2]
    inputs = []
    for name, value in [("IMAGE", post.image_bytes()), ("TEXT", post.text.encode()),
                        ("OPTIONS", json.dumps({"return_embedding": True}).encode())]:
        t = grpcclient.InferInput(name, [1, 1], "BYTES")
        t.set_data_from_numpy(np.array([[value]], dtype=np.object_))
        inputs.append(t)
    resp = c.infer("moderate", inputs)
    result = json.loads(resp.as_numpy("RESULT")[0, 0])
    assert resp.as_numpy("VERDICT")[0, 0] == int(result["violation"])
    assert resp.as_numpy("SCORES").shape == (1, len(load_policy().label_keys))
    assert resp.as_numpy("EMBEDDING").shape[1] > 0


def _cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "clients.moderate", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_cli_single_post(triton):
    post = POSTS[0]
    p = _cli("--url", triton.grpc_url, "--image", str(post.image_path), "--text", post.text, "--describe")
    assert p.returncode == 0, p.stderr
    result = json.loads(p.stdout)
    validate_result(result)
    assert "untrained" in p.stderr


def test_cli_batch_and_failures(triton, tmp_path):
    lines = [{"image": str(p.image_path), "text": p.text} for p in POSTS[:3]]
    batch = tmp_path / "posts.jsonl"
    batch.write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in lines))
    p = _cli("--url", triton.grpc_url, "--batch", str(batch), "--concurrency", "3")
    assert p.returncode == 0, p.stderr
    out = [json.loads(x) for x in p.stdout.splitlines()]
    assert sorted(o["line"] for o in out) == [1, 2, 3] and all(o["error"] is None for o in out)

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image": str(batch), "text": "x"}) + "\n")
    p = _cli("--url", triton.grpc_url, "--batch", str(bad))
    assert p.returncode == 1 and "bad_image" in p.stdout and "failed" in p.stderr

    p = _cli("--url", triton.grpc_url, "--image", "/nonexistent.png", "--text", "x")
    assert p.returncode == 2 and "cannot read image" in p.stderr
