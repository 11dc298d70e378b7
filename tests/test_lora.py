"""LoRA for slang: export/train_lora.py fits an adapter on export/data/slang_lora.jsonl (CPU, tiny untrained
model), the adapter moves the trained posts' scores toward their labels through VerdictDecoder, and released as
language_decoder version 2 it is hot-swapped on a real server (results change, name the version and adapter)
and rolled back."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from export.train_lora import Examples, read_rows, release_adapter, train
from moderation.core.policy import load_policy
from moderation.repository.artifacts import read_artifact_record
from moderation.vlm.decoder import VerdictDecoder

from .conftest import ADMIN_KEY, REPO, ROOT

DATA = ROOT / "export" / "data" / "slang_lora.jsonl"
CKPT = REPO / "language_decoder" / "1" / "checkpoint"
SERVE_MODELS = ("preprocess", "read_text", "clip_image", "clip_text", "nsfw_image", "clip_gate", "postprocess",
                "vlm_preprocess", "vision_encoder", "language_decoder", "vlm", "moderate", "ocr_detect", "ocr_classify",
                "ocr_recognize")


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lora") / "slang"
    train(DATA, out, REPO, "1", "default", steps=60, lr=3e-3, rank=8, seed=0)
    return out


def _vlm_keys(result: dict, keys) -> list[str]:
    """Labels the served result takes from the decoder (a trained gate signal outranks the untrained VLM on its own)."""
    return [k for k in keys if k not in result["gate"]["sources"]]


def _scores(decoder) -> tuple[list[float], list[float], list[dict]]:
    """P(yes) of every (row, question) whose label is 1 and of those whose label is 0, in data order."""
    ex = Examples(read_rows(DATA), REPO, "1", decoder, load_policy())
    pos, neg, per_row = [], [], []
    for reqs, tgts in ex.groups.values():
        for res, t in zip(decoder.score(reqs), tgts, strict=False):
            s = {"violation": res.violation, **res.labels}
            per_row.append(s)
            for k, v in t.items():
                (pos if v else neg).append(s[k])
    return pos, neg, per_row


def test_adapter_is_written_with_its_record(adapter):
    assert (adapter / "adapter_config.json").exists() and (adapter / "adapter_model.safetensors").exists()
    info = json.loads((adapter / "training.json").read_text())
    assert info["data"]["rows"] == 8 and info["base"] == "language_decoder/1" and info["base_untrained"]
    assert info["loss_after"] < info["loss_before"]


def test_adapter_moves_trained_scores_toward_labels(adapter):
    base_pos, base_neg, _ = _scores(VerdictDecoder(CKPT))
    dec = VerdictDecoder(CKPT, adapter=adapter)
    assert dec.adapter == "slang"
    pos, neg, _ = _scores(dec)
    assert np.mean(pos) > np.mean(base_pos) + 0.1, (np.mean(base_pos), np.mean(pos))
    assert np.mean(neg) < np.mean(base_neg) - 0.05, (np.mean(base_neg), np.mean(neg))

    def gap(p, n) -> float:
        return np.mean(np.abs(1 - np.array(p))) + np.mean(np.array(n))

    assert gap(pos, neg) < gap(base_pos, base_neg)
    # the int8 twin of an adapter version quantizes the merged weights and keeps the shift
    q_pos, q_neg, _ = _scores(VerdictDecoder(CKPT, adapter=adapter, quantization="int8"))
    assert abs(np.mean(q_pos) - np.mean(pos)) < 0.05 and abs(np.mean(q_neg) - np.mean(neg)) < 0.05


def test_adapter_version_hot_swaps_on_a_real_server(adapter, tmp_path_factory, policy_dir):
    from clients.client import ModerationClient
    from moderation.core.audit import AuditLog
    from moderation.ops.admin import RepositoryAdmin
    from moderation.testing.server import running_server

    root = tmp_path_factory.mktemp("lora_srv")
    repo = root / "model_repository"
    shutil.copytree(REPO, repo, symlinks=True, ignore=shutil.ignore_patterns("__pycache__", ".live_versions.json"))
    v2 = release_adapter(repo, adapter, "1")
    assert v2.name == "2"
    rec = read_artifact_record(v2)  # hashes the adapter files too
    assert rec["adapter"]["name"] == "slang" and "adapter/adapter_model.safetensors" in rec["files"]

    rows = read_rows(DATA)
    _, _, expected = _scores(VerdictDecoder(CKPT, adapter=adapter))
    _, _, base = _scores(VerdictDecoder(CKPT))
    langs = list(dict.fromkeys(_lang(r) for r in rows))
    order = [r for lang in langs for r in rows if _lang(r) == lang]  # Examples groups rows by language, in this order

    env = {"MODERATION_POLICY_DIR": str(policy_dir), "MODERATION_AUDIT_LOG": str(root / "audit.jsonl")}
    with running_server(repository=repo, env=env, log_path=root / "triton.log", key=ADMIN_KEY,
                        models=SERVE_MODELS) as srv, ModerationClient(srv.grpc_url, timeout_s=120) as c:
        admin = RepositoryAdmin(srv.grpc_url, ADMIN_KEY, repo, audit=AuditLog(root / "audit.jsonl"))

        def served():
            out = []
            for r in order:
                res = c.moderate(Path(r["image_path"]).read_bytes(), r["caption"], policy="escalate_all")
                out.append(res)
            return out

        # the server started on the newest version (2, with the adapter): pin v1 first, then swap to v2
        admin.swap("language_decoder", "1")
        before = served()
        assert all(r["model_versions"]["language_decoder"] == "1"
                   and "language_decoder_adapter" not in r["model_versions"] for r in before)
        admin.swap("language_decoder", "2")
        after = served()
        for r, want, was in zip(after, expected, base, strict=False):
            assert r["model_versions"]["language_decoder"] == "2"
            assert r["model_versions"]["language_decoder_adapter"] == "slang"
            for k in _vlm_keys(r, want):
                assert abs(r["scores"][k] - want[k]) < 2e-3, k  # batch-of-1 on the server vs a padded batch here
            assert max(abs(r["scores"][k] - was[k]) for k in _vlm_keys(r, want)) > 0.05  # the adapter changed them
        for r, was in zip(before, base, strict=False):
            assert max(abs(r["scores"][k] - was[k]) for k in _vlm_keys(r, was)) < 2e-3
        admin.rollback("language_decoder")
        again = served()
        assert all(r["model_versions"]["language_decoder"] == "1" for r in again)
        assert all(abs(a["scores"][k] - b["scores"][k]) < 1e-6
                   for a, b in zip(again, before, strict=False) for k in b["scores"])


def _lang(row) -> str:
    from moderation.core.text import detect_lang

    return detect_lang(row["caption"])
