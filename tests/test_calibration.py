"""A trained CLIP decides only on gate thresholds calibrated for it: a policy names its CLIP (gate.calibrated_for);
under a policy that names another CLIP, or none, the CLIP is an "uncalibrated" signal that may escalate or send to
review but never allow or block; clients.evaluate --calibrate-gate fits thresholds for the served CLIP from
labelled posts. The server tests run a copy of the repository whose tiny CLIP is recorded as trained."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid

import numpy as np
import pytest
import yaml

from clients.client import ModerationClient
from moderation.core.audit import read_rows
from moderation.core.policy import ClipIdentity, load_policy
from moderation.gate.calibration import CalibrationError, LabelledCosines, ServedClip, clip_signal, fit_gate
from moderation.repository.artifacts import read_artifact_record, write_artifact_record
from moderation.repository.served import served_clip_identity, served_version, served_version_dirs
from moderation.testing.policies import derive_policy
from moderation.testing.samples import sample_posts

from .conftest import ADMIN_KEY, REPO, ROOT

POLICY = load_policy("default")
OTHER_CLIP = ClipIdentity(clip_image="a" * 64, clip_text="b" * 64, name="another CLIP")
# gate-only models: the posts below never reach the VLM
GATE_MODELS = ("preprocess", "read_text", "clip_image", "clip_text", "nsfw_image", "clip_gate", "postprocess",
               "moderate", "ocr_detect", "ocr_classify", "ocr_recognize")


def _policy(calibrated_for: ClipIdentity | None):
    gate = {**POLICY.gate.model_dump(), "calibrated_for": calibrated_for}
    return POLICY.model_copy(update={"gate": type(POLICY.gate).model_validate(gate)})


def test_a_trained_clip_counts_as_trained_only_under_thresholds_calibrated_for_it():
    served = served_clip_identity(REPO)
    assert served is not None and served.clip_image == read_artifact_record(
        REPO / "clip_image" / "1", verify=False)["files"]["model.onnx"]
    renamed = served.model_copy(update={"name": "the same files, exported elsewhere"})
    assert clip_signal("trained", _policy(renamed), served) == "trained"
    assert clip_signal("trained", _policy(OTHER_CLIP), served) == "uncalibrated"
    assert clip_signal("trained", _policy(None), served) == "uncalibrated"
    assert clip_signal("trained", _policy(served), None) == "uncalibrated"  # no record names the served CLIP
    assert clip_signal("untrained", _policy(OTHER_CLIP), served) == "untrained"  # untrained stays untrained
    # the shipped policy names the tiny CLIP `make models` builds
    assert POLICY.gate.calibrated_for is not None and POLICY.gate.calibrated_for.name.endswith("tiny-clip")


def test_the_served_clip_is_the_live_version_else_the_newest(tmp_path):
    for v, digest in (("1", "1" * 64), ("2", "2" * 64)):
        for model in ("clip_image", "clip_text"):
            d = tmp_path / model / v
            d.mkdir(parents=True)
            (d / "model.onnx").write_bytes(digest.encode())
            write_artifact_record(d, source=f"ckpt-{v}", untrained=False)
    assert served_version(tmp_path / "clip_image").name == "2" and served_clip_identity(tmp_path).name == "ckpt-2"
    (tmp_path / ".live_versions.json").write_text(json.dumps({"clip_image": {"live": "1", "history": ["2"]},
                                                              "clip_text": {"live": "1", "history": ["2"]}}))
    assert served_clip_identity(tmp_path).name == "ckpt-1"
    shutil.rmtree(tmp_path / "clip_text")
    assert served_clip_identity(tmp_path) is None


def _toy_posts(rng) -> list[LabelledCosines]:
    """Cosines as a real ViT-L/14 gives them (0.10-0.35): clean posts' concepts near 0.22, the labelled label's
    concept near 0.31 on violating posts; mismatched captions near 0.05 consistency, matching ones near 0.28."""
    posts = []
    for i in range(60):
        label = ("scam", "violence", "mismatch", None, None, None)[i % 6]
        concept = {k: float(rng.normal(0.22, 0.012)) for k in ("violence", "gore", "self_harm", "drugs", "scam",
                                                                  "sarcasm", "hate", "sexual")}
        if label in concept:
            concept[label] = float(rng.normal(0.31, 0.012))
        consistency = float(rng.normal(0.05 if label == "mismatch" else 0.28, 0.02))
        posts.append(LabelledCosines(frozenset({label} - {None}), concept, consistency))
    return posts


def test_fitted_thresholds_separate_a_labelled_toy_set_that_the_tiny_clips_thresholds_misroute():
    posts = _toy_posts(np.random.default_rng(0))
    fit = fit_gate(POLICY, posts, OTHER_CLIP, target_precision=1.0)
    assert fit.gate.calibrated_for == OTHER_CLIP
    assert 0.22 < fit.gate.concept_center < 0.31 and 0.05 < fit.gate.consistency_center < 0.28
    assert fit.labels == ["violence", "gore", "self_harm", "drugs", "scam", "mismatch", "sarcasm"]  # not sexual, hate
    # the tiny CLIP's centre (0.17) puts every clean real-CLIP cosine in the block band
    assert fit.now["wrongly_blocked"] == 30 and fit.now["allowed"] == 0
    p = fit.proposed
    assert p["wrongly_allowed"] == 0 and p["wrongly_blocked"] == 0
    assert p["allowed"] == 30 and p["blocked"] == 20 and p["escalated_violating"] == 10  # mismatch cannot block
    # a lower target may buy more blocks with a few wrong ones, within the target
    loose = fit_gate(POLICY, posts, OTHER_CLIP, target_precision=0.9).proposed
    assert loose["blocked"] >= 20 and loose["wrongly_blocked"] <= 0.1 * loose["blocked"]
    assert loose["wrongly_allowed"] <= 0.1 * loose["allowed"]
    with pytest.raises(CalibrationError, match="do not score above"):
        fit_gate(POLICY, [LabelledCosines(frozenset(p.labels), {k: 0.5 - v for k, v in p.concept.items()},
                                          p.consistency) for p in posts], OTHER_CLIP)
    with pytest.raises(CalibrationError, match="need labelled violating and clean"):
        fit_gate(POLICY, [LabelledCosines(frozenset(), p.concept, p.consistency) for p in posts], OTHER_CLIP)


def test_calibrate_gate_cli_proposes_a_section_for_the_served_clip(tmp_path):
    """Truth constructed from the served tiny CLIP itself: `scam` marks the three posts whose scam concepts it
    finds closest (the labels are made up; the CLIP is random), so the labels are separable by its cosines."""
    posts = sample_posts()
    clip = ServedClip(served_version_dirs(REPO, ServedClip.MODELS), served_clip_identity(REPO))
    bank = clip.bank(POLICY)
    scam = [clip.cosines(POLICY, bank, p.image_bytes(), p.text, []).concept["scam"] for p in posts]
    top = set(np.argsort(scam)[-3:].tolist())
    labelled = tmp_path / "labelled.jsonl"
    labelled.write_text("".join(json.dumps({"image": str(p.image_path), "caption": p.text,
                                            "labels": ["scam"] if i in top else []}) + "\n"
                                for i, p in enumerate(posts)))
    out, written = tmp_path / "calibration.json", tmp_path / "policies" / "default.yaml"
    written.parent.mkdir()
    proc = subprocess.run([sys.executable, "-m", "clients.evaluate", str(labelled), "--calibrate-gate",
                           "--repository", str(REPO), "--json", str(out), "--write-policy", str(written)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    served = served_clip_identity(REPO)
    assert report["gate"]["calibrated_for"] == served.model_dump()
    assert report["proposed"]["wrongly_allowed"] == 0 and report["proposed"]["wrongly_blocked"] == 0
    assert report["proposed"]["allowed"] > 0
    assert "proposed gate section" in proc.stdout and served.clip_image in proc.stdout
    section = yaml.safe_load(proc.stdout.split("nothing is applied):", 1)[1].split("\nwrote ", 1)[0])
    assert section["gate"] == report["gate"]
    proposed = load_policy("default", written.parent)
    assert proposed.version.endswith(f"-clip.{served.clip_image[:8]}") and proposed.labels == POLICY.labels
    assert clip_signal("trained", proposed, served) == "trained"
    bad = subprocess.run([sys.executable, "-m", "clients.evaluate", str(labelled), "--calibrate-gate",
                          "--repository", str(tmp_path / "no_repository")],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert bad.returncode == 2 and "no exported version" in bad.stderr


@pytest.fixture(scope="module")
def trained_clip_server(tmp_path_factory):
    """A server on a copy of the repository whose tiny CLIP is recorded as trained (no UNTRAINED marker), with
    policies that make every CLIP concept score ~1 (concept_center -1): calibrated for the served CLIP, for
    another one, and for none."""
    root = tmp_path_factory.mktemp("trained_clip")
    repo = root / "model_repository"
    shutil.copytree(REPO, repo, symlinks=True, ignore=shutil.ignore_patterns(
        "__pycache__", ".live_versions.json", "language_decoder*", "vision_encoder", "vlm*"))
    gate_dir = repo / "clip_gate" / "1"
    before = read_artifact_record(gate_dir)
    (gate_dir / "clip" / "UNTRAINED.json").unlink()
    write_artifact_record(gate_dir, source=before["source"], untrained=False, export=before["export"])
    served = served_clip_identity(repo)
    policies = root / "policies"
    policies.mkdir()
    for name, calibrated in (("matched", served), ("other_clip", OTHER_CLIP), ("unnamed", None)):
        derive_policy(policies, name, gate={"concept_center": -1.0, "calibrated_for": calibrated and
                                            calibrated.model_dump()}, cache={"enabled": False})
    audit = root / "audit.jsonl"
    env = {"MODERATION_POLICY_DIR": str(policies), "MODERATION_AUDIT_LOG": str(audit)}
    from moderation.testing.server import running_server

    with running_server(repository=repo, env=env, log_path=root / "triton.log", key=ADMIN_KEY,
                        models=GATE_MODELS) as srv, ModerationClient(srv.grpc_url, timeout_s=120) as c:
        srv.client, srv.audit, srv.served = c, audit, served
        yield srv


def test_an_uncalibrated_trained_clip_sends_to_review_where_a_calibrated_one_blocks(trained_clip_server):
    srv = trained_clip_server
    post = next(p for p in sample_posts() if p.name == "rocket_en")
    results = {}
    for policy in ("matched", "other_clip", "unnamed"):
        rid = f"calibration-{policy}-{uuid.uuid4().hex[:8]}"
        results[policy] = srv.client.moderate(post.image_bytes(), post.text, policy=policy, request_id=rid)
        row = next(r for r in read_rows(srv.audit) if r.get("request_id") == rid and r.get("stage") == "moderate")
        assert row["signals"]["clip"] == results[policy]["signals"]["clip"], policy
    r = results["matched"]  # today's behaviour for a calibrated trained CLIP: its block band blocks
    assert r["signals"]["clip"] == "trained" and (r["route"], r["gate"]["band"]) == ("gate", "block")
    assert r["action"] == "block" and r["decided_by"] == "clip" and r["violation"] is True
    for policy in ("other_clip", "unnamed"):  # the same scores, on thresholds not fitted for this CLIP
        r = results[policy]
        assert r["signals"]["clip"] == "uncalibrated" and (r["route"], r["gate"]["band"]) == ("gate", "block"), policy
        assert r["action"] == "review" and r["violation"] is False, (policy, r["decision"])
        assert "a person decides" in r["decision"]["reason"], policy
        assert r["gate"]["scores"] == results["matched"]["gate"]["scores"], policy
        assert r["signals"]["nsfw_image"] == "trained" and r["untrained"] is False, policy
    log = srv.log_path.read_text(encoding="utf-8", errors="replace")
    assert "gate thresholds not calibrated for the served CLIP" in log
