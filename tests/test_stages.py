"""The python models' adapters and the library code they call (gate/router.py, core/result.py, gate/inputs.py),
run without a server: `triton_python_backend_utils` is replaced by a test double (tests/pb_utils_double.py) whose
BLS calls go to handlers each test sets. The same stages run on a real server in the other test files."""
from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from google.protobuf import json_format
from PIL import Image

from moderation.core.audit import read_rows
from moderation.core.contracts import DecoderOptions, GateDecision, RequestRecord, VlmVerdict
from moderation.core.post import unpack_images
from moderation.ocr.reader import MODELS as OCR_MODELS
from moderation.repository.render import model_config
from moderation.testing.policies import derive_policy, write_fixed_route_policies
from moderation.testing.records import frames_of, request_record
from moderation.testing.samples import sample_posts

from . import pb_utils_double

REPO = Path(__file__).resolve().parents[1] / "model_repository"
D = 32  # embedding width the fake clip_text answers with


@pytest.fixture
def pb(tmp_path, monkeypatch):
    policies = write_fixed_route_policies(tmp_path / "policies")
    derive_policy(policies, "ab_all", gate={"allow_below": 0.0, "block_at": 1.01}, cache={"enabled": False})
    data = (policies / "ab_all.yaml").read_text() + '\nab:\n  decoder_version: "2"\n  fraction: 1.0\n'
    (policies / "ab_all.yaml").write_text(data)
    derive_policy(policies, "fallback_1", gate={"allow_below": 0.0, "block_at": 1.01}, cache={"enabled": False},
                  decoder={"fallback": {"max_inflight": 1}})
    derive_policy(policies, "escalate_cached", gate={"allow_below": 0.0, "block_at": 1.01},
                  cache={"enabled": True})
    monkeypatch.setenv("MODERATION_POLICY_DIR", str(policies))
    monkeypatch.setenv("MODERATION_AUDIT_LOG", str(tmp_path / "audit.jsonl"))
    u = pb_utils_double.install()
    rng = np.random.default_rng(0)
    u.InferenceRequest.handlers["clip_text"] = lambda feed, _v: {
        "TEXT_EMBEDS": rng.normal(size=(len(feed["input_ids"]), D)).astype(np.float32)}
    for decoder in ("vlm", "language_decoder", "language_decoder_int8"):
        u.InferenceRequest.handlers[decoder] = _verdict_handler(decoder)
    u.InferenceRequest.handlers["vlm_preprocess"] = lambda feed, _v: {
        "PIXEL_VALUES": np.zeros((1, 784, 1536), np.float32), "BODY_IDS": np.zeros((1, 4), np.int64),
        "DECODER_OPTIONS": np.array([[b"{}"]], dtype=np.object_)}
    u.InferenceRequest.handlers["vision_encoder"] = lambda feed, _v: {
        "VISUAL_TOKENS": np.zeros((1, 196, 8), np.float32), "DEEPSTACK": np.zeros((1, 2, 196, 8), np.float32)}
    for model, (name_in, name_out) in OCR_MODELS.items():  # the exported PP-OCRv4 files, as Triton would run them
        session = ort.InferenceSession(str(REPO / model / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
        u.InferenceRequest.handlers[model] = lambda feed, _v, s=session, i=name_in, o=name_out: {
            o: s.run([o], {i: feed[i]})[0]}
    u.ready_models.update({("language_decoder", "1"), ("vlm_preprocess", "1"), ("language_decoder_int8", "")})
    u.audit_path = tmp_path / "audit.jsonl"
    yield u


def _verdict_handler(decoder: str):
    def handle(feed, version):
        v = VlmVerdict(violation=0.9, labels={"violence": 0.8}, sentiment={"negative": 1.0}, description=None,
                       untrained=True, caption_truncated=False,
                       model_versions={"vlm_preprocess": "1", "language_decoder": "1", "answered_by": decoder})
        return {"VLM_RESULT": np.array([[v.to_json()]], dtype=np.object_)}
    return handle


def _args(name: str) -> dict:
    cfg = json_format.MessageToDict(model_config(name), preserving_proto_field_name=True)
    return {"model_name": name, "model_version": "1", "model_repository": str(REPO / name),
            "model_config": json.dumps(cfg)}


def _gate_request(u, records: list[RequestRecord], seed: int = 1):
    rng = np.random.default_rng(seed)
    n = len(records)
    return u.Request(REQUEST=np.array([[r.to_json()] for r in records], dtype=np.object_),
                     FRAMES=np.array([[b""]] * n, dtype=np.object_),
                     TEXT=np.array([[b"caption"]] * n, dtype=np.object_),
                     IMAGE_EMBEDS=np.tile(rng.normal(size=(1, D)).astype(np.float32), (n, 1)),
                     TEXT_EMBEDS=np.tile(rng.normal(size=(1, D)).astype(np.float32), (n, 1)),
                     NSFW_SCORES=np.array([[0.99, 0.01]] * n, dtype=np.float32))


def _gate(u):
    from moderation.serving.clip_gate_model import ClipGateModel

    m = ClipGateModel()
    m.initialize(_args("clip_gate"))
    return m


def _decisions(u, response) -> list[GateDecision]:
    assert not response.has_error(), response.error().message()
    return [GateDecision.from_json(x[0]) for x in u.get_output_tensor_by_name(response, "GATE").as_numpy()]


def _run(model, request):
    return asyncio.run(model.execute([request]))[0]


# clip_gate -----------------------------------------------------------------------------------------------------
def test_gate_escalates_through_the_vlm_ensemble_and_settles_by_policy(pb):
    gate = _gate(pb)
    d = _decisions(pb, _run(gate, _gate_request(pb, [request_record(policy_name="escalate_all")])))[0]
    assert d.route == "vlm" and d.vlm.model_versions["answered_by"] == "vlm" and d.vlm_ms > 0
    assert d.signals == {"clip": "untrained", "nsfw_image": "trained"} and d.ab_arm is None
    assert [c["model"] for c in pb.InferenceRequest.calls] == ["clip_text", "vlm"]  # concept bank, then escalation
    opts = json.loads(pb.InferenceRequest.calls[-1]["inputs"]["OPTIONS"][0, 0])
    assert opts == {"request_id": "r1", "describe": False, "lang": "en", "policy": "escalate_all"}
    assert d.band == "escalate" and d.escalated == "gate"
    for policy, band in (("allow_all", "allow"), ("block_all", "block")):
        d = _decisions(pb, _run(gate, _gate_request(pb, [request_record(policy_name=policy)])))[0]
        assert (d.route, d.band, d.escalated) == ("gate", band, None) and d.vlm is None
    assert [c["model"] for c in pb.InferenceRequest.calls].count("vlm") == 1  # the bank is encoded once


def test_gate_ab_arm_pins_the_decoder_version_by_chain(pb):
    d = _decisions(pb, _run(_gate(pb), _gate_request(pb, [request_record(policy_name="ab_all")])))[0]
    chain = [(c["model"], c["version"]) for c in pb.InferenceRequest.calls if c["model"] != "clip_text"]
    assert chain == [("vlm_preprocess", -1), ("vision_encoder", -1), ("language_decoder", 2)]
    assert d.ab_arm == "b" and d.vlm.model_versions["answered_by"] == "language_decoder"


def test_gate_sends_escalations_past_max_inflight_to_the_int8_decoder(pb):
    real = pb.InferenceRequest.async_exec

    async def slow_exec(self):
        await asyncio.sleep(0.01)  # both escalations are in flight together, as on a server
        return await real(self)

    pb.InferenceRequest.async_exec = slow_exec
    records = [request_record(policy_name="fallback_1", request_id=f"r{i}") for i in range(2)]
    ds = _decisions(pb, _run(_gate(pb), _gate_request(pb, records)))
    assert ds[0].fallback is None and ds[0].vlm.model_versions["answered_by"] == "vlm"
    assert ds[1].fallback.reason == "inflight" and ds[1].fallback.model == "language_decoder_int8"
    assert ds[1].vlm.model_versions["answered_by"] == "language_decoder_int8"
    # a render without the INT8 twin (a GPU with no room for it): the peak stays on the full decoder, no refused call
    pb.ready_models.discard(("language_decoder_int8", ""))
    pb.InferenceRequest.calls.clear()
    ds = _decisions(pb, _run(_gate(pb), _gate_request(pb, records)))
    assert [d.fallback for d in ds] == [None, None] and [d.vlm.model_versions["answered_by"] for d in ds] == ["vlm"] * 2
    assert not [c for c in pb.InferenceRequest.calls if c["model"] == "language_decoder_int8"]


def test_gate_answers_a_near_duplicate_from_the_verdict_cache(pb):
    from PIL import Image

    from moderation.testing.records import local_thumbnail_b64

    gate = _gate(pb)
    rec = request_record(policy_name="escalate_cached", fingerprint=[1.0] + [0.0] * 191,
                         local_thumbnail=local_thumbnail_b64(Image.open(sample_posts()[0].image_path)))
    first = _decisions(pb, _run(gate, _gate_request(pb, [rec])))[0]
    second = _decisions(pb, _run(gate, _gate_request(pb, [rec.model_copy(update={"request_id": "r2"})])))[0]
    assert first.route == "vlm" and first.cache == {"hit": False, "stored": True}
    assert second.route == "cache" and second.cache["hit"] and second.vlm.violation == first.vlm.violation
    assert [c["model"] for c in pb.InferenceRequest.calls].count("vlm") == 1
    forget = rec.model_copy(update={"request_id": "r3", "forget": True})
    assert _decisions(pb, _run(gate, _gate_request(pb, [forget])))[0].route == "cache"
    assert _decisions(pb, _run(gate, _gate_request(pb, [rec])))[0].route == "vlm"  # forgotten: judged again


def test_gate_fails_one_request_with_the_callees_code_and_audits_it(pb):
    pb.InferenceRequest.handlers["vlm"] = lambda feed, v: "in ensemble 'vlm', [bad_image] image is truncated"
    resp = _run(_gate(pb), _gate_request(pb, [request_record(policy_name="escalate_all")]))
    assert resp.has_error() and resp.error().message() == "[bad_image] vlm: image is truncated"
    rows = read_rows(pb.audit_path)
    assert len(rows) == 1 and rows[0]["error"]["code"] == "bad_image" and rows[0]["request_id"] == "r1"
    pb.InferenceRequest.handlers["vlm"] = lambda feed, v: "Request for unknown model: 'vlm' is not found"
    resp = _run(_gate(pb), _gate_request(pb, [request_record(policy_name="escalate_all")]))
    assert resp.error().message().startswith("[model_unavailable] vlm: ")


def test_gate_refuses_a_malformed_record_as_bad_request(pb):
    req = _gate_request(pb, [request_record()])
    req.inputs[0] = pb.Tensor("REQUEST", np.array([[b'{"request_id": "x"}']], dtype=np.object_))
    resp = _run(_gate(pb), req)
    assert resp.error().message().startswith("[bad_request] RequestRecord field ")


# postprocess ---------------------------------------------------------------------------------------------------
def test_postprocess_builds_result_scores_and_one_audit_row_per_post(pb):
    from moderation.serving.postprocess_model import PostprocessModel

    rec = request_record(policy_name="escalate_all", caption_truncated=True, return_embedding=True)
    gate = _decisions(pb, _run(_gate(pb), _gate_request(pb, [rec])))[0]
    post = PostprocessModel()
    post.initialize(_args("postprocess"))
    resp = post.execute([pb.Request(REQUEST=np.array([[rec.to_json()]], dtype=np.object_),
                                    GATE=np.array([[gate.to_json()]], dtype=np.object_),
                                    IMAGE_EMBEDS=np.ones((1, D), np.float32),
                                    TEXT_EMBEDS=np.zeros((1, D), np.float32))])[0]
    assert not resp.has_error(), resp.error().message()
    result = json.loads(pb.get_output_tensor_by_name(resp, "RESULT").as_numpy()[0, 0])
    # the fake VLM says violation 0.9, violence 0.8, but it is untrained: a person decides
    assert result["route"] == "vlm" and result["action"] == "review" and result["decided_by"] == "vlm"
    assert result["violation"] is False and result["severity"]["violence"] == 2
    assert result["caption_truncated"] == {"clip": True, "vlm": False}
    assert {"preprocess", "clip_encoders", "gate", "vlm", "total"} <= set(result["latency_ms"])
    assert result["model_versions"]["postprocess"] == "1" and result["model_versions"]["clip_gate"] == "1"
    assert pb.get_output_tensor_by_name(resp, "VERDICT").as_numpy().tolist() == [[0]]
    assert pb.get_output_tensor_by_name(resp, "EMBEDDING").as_numpy().shape == (1, 2 * D)
    rows = [r for r in read_rows(pb.audit_path) if r["stage"] == "moderate"]
    assert len(rows) == 1 and rows[0]["request_id"] == "r1" and rows[0]["caption_truncated"]["clip"] is True
    assert "caption" not in json.dumps(rows[0]).replace("caption_truncated", "")  # hashes only, never text


# preprocess and vlm_preprocess ---------------------------------------------------------------------------------
def test_preprocess_records_truncation_fingerprint_and_forget_once(pb):
    from moderation.serving.preprocess_model import PreprocessModel

    m = PreprocessModel()
    m.initialize(_args("preprocess"))
    post = sample_posts()[0]
    long_caption = " ".join(["word"] * 120).encode()
    opts = json.dumps({"request_id": "p1", "forget": True, "policy": "escalate_cached"}).encode()
    resp = m.execute([pb.Request(IMAGE=np.array([[post.image_bytes()]], dtype=np.object_),
                                 TEXT=np.array([[long_caption]], dtype=np.object_),
                                 OPTIONS=np.array([[opts]], dtype=np.object_))])[0]
    assert not resp.has_error(), resp.error().message()
    rec = RequestRecord.from_json(pb.get_output_tensor_by_name(resp, "REQUEST").as_numpy()[0, 0])
    assert rec.request_id == "p1" and rec.forget and rec.caption_truncated and rec.has_caption
    assert rec.fingerprint is not None and len(rec.fingerprint) == 192  # its cache checks the fingerprint
    assert pb.get_output_tensor_by_name(resp, "CLIP_INPUT_IDS").as_numpy().shape == (1, 77)
    bad = m.execute([pb.Request(IMAGE=np.array([[b"not an image"]], dtype=np.object_),
                                TEXT=np.array([[b"x"]], dtype=np.object_))])[0]
    assert bad.error().message().startswith("[bad_image] ")
    rows = read_rows(pb.audit_path)
    assert len(rows) == 1 and rows[0]["stage"] == "preprocess" and rows[0]["image_sha256"]



def test_read_text_adds_the_image_text_and_what_depends_on_it_and_fails_one_post_alone(pb):
    from moderation.serving.preprocess_model import PreprocessModel
    from moderation.serving.read_text_model import ReadTextModel
    from moderation.testing.memes import memes, render

    pre, read = PreprocessModel(), ReadTextModel()
    pre.initialize(_args("preprocess"))
    read.initialize(_args("read_text"))
    meme = render(next(m for m in memes() if m.name == "cat_threat_en"))
    photo = sample_posts()[0].image_bytes()
    images, texts = [meme, photo, meme], [b"lol", b"lol", b"lol"]
    opts = [json.dumps({"request_id": f"rt{i}", "policy": "allow_all", "ocr": i != 2}).encode() for i in range(3)]
    resp = pre.execute([pb.Request(IMAGE=np.array([[x] for x in images], dtype=np.object_),
                                   TEXT=np.array([[x] for x in texts], dtype=np.object_),
                                   OPTIONS=np.array([[x] for x in opts], dtype=np.object_))])[0]
    before = [RequestRecord.from_json(r[0]) for r in pb.get_output_tensor_by_name(resp, "REQUEST").as_numpy()]
    assert [r.read_text for r in before] == [True, True, False] and all(r.image_text is None for r in before)
    assert before[0].caption_key == before[2].caption_key  # preprocess keys on the caption alone

    def run(frame_rows, records):
        out = read.execute([pb.Request(FRAMES=np.array([[x] for x in frame_rows], dtype=np.object_),
                                       TEXT=np.array([[b"lol"]] * len(records), dtype=np.object_),
                                       REQUEST=np.array([[r.to_json()] for r in records], dtype=np.object_))])[0]
        assert not out.has_error(), out.error().message()
        return [RequestRecord.from_json(r[0]) for r in pb.get_output_tensor_by_name(out, "REQUEST").as_numpy()]

    frames = [x[0] for x in pb.get_output_tensor_by_name(resp, "FRAMES").as_numpy()]
    assert [unpack_images(f)[0][0].size for f in frames] == [Image.open(io.BytesIO(x)).size for x in images]
    after = run(frames, before)
    assert [line["text"] for line in after[0].image_text] == ["I KNOWWHEREYOULIVE", "YOUARENEXT"]
    assert after[0].caption_key != before[0].caption_key  # other words drawn on the template: another post
    assert after[0].read_text_version == "1" and after[0].read_text_ms > 0
    assert after[1].image_text == [] and after[1].caption_key == before[1].caption_key  # a photo with no text
    assert after[2] == before[2]  # ocr: false: untouched
    # one post whose frames do not unpack fails alone; the others are read
    broken = run([frames[0], frames[1][:-7], frames[2]], before)
    assert broken[1].error is not None and broken[1].error.code == "internal"
    assert broken[0].image_text and broken[2] == before[2]


def test_vlm_preprocess_hands_the_decoder_typed_options(pb):
    from moderation.serving.vlm_preprocess_model import VlmPreprocessModel

    m = VlmPreprocessModel()
    m.initialize(_args("vlm_preprocess"))
    post = sample_posts()[1]
    resp = m.execute([pb.Request(FRAMES=np.array([[frames_of(post.image_bytes())]], dtype=np.object_),
                                 TEXT=np.array([[post.text.encode()]], dtype=np.object_))])[0]
    assert not resp.has_error(), resp.error().message()
    opts = DecoderOptions.from_json(pb.get_output_tensor_by_name(resp, "DECODER_OPTIONS").as_numpy()[0, 0])
    assert opts.lang == "zh" and opts.vlm_preprocess_version == "1" and not opts.caption_truncated
    assert pb.get_output_tensor_by_name(resp, "PIXEL_VALUES").as_numpy().shape == (1, 784, 1536)


def test_a_list_edit_while_a_post_is_in_flight_judges_it_under_one_revision(pb, tmp_path, monkeypatch):
    """preprocess pins the policy (revision 0: no lists); a block term the post's image text carries is added before
    read_text runs. read_text still reads under revision 0 (no hit) in this process and in a fresh one (preprocess's
    copy in the state directory), the revision the record names (RESULT.policy); a post that starts after the edit
    is judged under revision 1 and its image text hits the term."""
    from moderation.core.pinned import forget_pinned, pin_of, pinned_policy
    from moderation.core.policy import load_policy
    from moderation.ops.lists import ListAdmin
    from moderation.serving.preprocess_model import PreprocessModel
    from moderation.serving.read_text_model import ReadTextModel
    from moderation.testing.memes import memes, render

    monkeypatch.setenv("MODERATION_STATE_DIR", str(tmp_path / "state"))
    forget_pinned()  # a new server process: earlier tests' posts pinned this policy's revision 0 elsewhere
    pre, read = PreprocessModel(), ReadTextModel()
    pre.initialize(_args("preprocess"))
    read.initialize(_args("read_text"))
    meme = render(next(m for m in memes() if m.name == "cat_threat_en"))

    def preprocess(request_id: str):
        resp = pre.execute([pb.Request(IMAGE=np.array([[meme]], dtype=np.object_),
                                       TEXT=np.array([[b"lol"]], dtype=np.object_),
                                       OPTIONS=np.array([[json.dumps({"request_id": request_id,
                                                                      "policy": "allow_all"}).encode()]],
                                                        dtype=np.object_))])[0]
        assert not resp.has_error(), resp.error().message()
        return (RequestRecord.from_json(pb.get_output_tensor_by_name(resp, "REQUEST").as_numpy()[0, 0]),
                pb.get_output_tensor_by_name(resp, "FRAMES").as_numpy()[0, 0])

    def read_text(record, frames) -> RequestRecord:
        out = read.execute([pb.Request(FRAMES=np.array([[frames]], dtype=np.object_),
                                       TEXT=np.array([[b"lol"]], dtype=np.object_),
                                       REQUEST=np.array([[record.to_json()]], dtype=np.object_))])[0]
        assert not out.has_error(), out.error().message()
        return RequestRecord.from_json(pb.get_output_tensor_by_name(out, "REQUEST").as_numpy()[0, 0])

    before, frames = preprocess("in-flight")
    assert before.policy_id == "allow_all@" + load_policy("allow_all").version and before.policy_pin
    ListAdmin().add_term("allow_all", "block", "KNOW WHERE", label="hate")  # the meme says I KNOW WHERE YOU LIVE
    assert load_policy("allow_all").lists.revision == 1 and pin_of(load_policy("allow_all")) != before.policy_pin
    for fresh_process in (False, True):
        if fresh_process:
            forget_pinned()
        judged = read_text(before, frames)
        assert judged.image_text and not judged.list_hits, fresh_process
        assert pinned_policy("allow_all", before.policy_pin).lists.revision == 0
    later, later_frames = preprocess("after-edit")
    assert later.policy_id.endswith("+lists.1")
    hits = read_text(later, later_frames).list_hits
    assert [(h["list"], h["field"]) for h in hits] == [("block", "image_text")]
