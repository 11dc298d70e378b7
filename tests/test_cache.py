"""Near-duplicate verdict cache (moderation/cache.py) unit tests, the threshold calibration, and end to end
against the real server: near copies hit, a different image misses, purge and OPTIONS forget clear, every
request keeps its own audit row; plus the opt-in EMBEDDING layout and the report's label trends by hour."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import uuid
from datetime import UTC

import numpy as np
import pytest
from pydantic import ValidationError

from moderation.core.policy import CacheSettings, load_policy
from moderation.core.text import caption_key
from moderation.gate.cache import GateCache, VerdictCache
from moderation.testing.policies import derive_policy

from .conftest import ADMIN_KEY, REPO, ROOT

S = CacheSettings(enabled=True, image_threshold=0.9, fingerprint_threshold=None, ttl_s=10, max_entries=3)
KEY = ("p", "d", "en", False, "")


def _vec(seed, d=16):
    return np.random.default_rng(seed).normal(size=d).astype(np.float32)


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


# unit ---------------------------------------------------------------------------------------------
def test_caption_key_normalises_case_spacing_and_invisible_characters_only():
    assert caption_key("Launch  day!  ") == caption_key("launch day!") == caption_key("LAUNCH DAY!")
    assert caption_key("la\u200bunch day!") == caption_key("launch day!")  # the caption normaliser drops it
    assert caption_key("launch day") != caption_key("launch day!")


def test_hit_needs_image_similarity_and_same_caption():
    c = VerdictCache()
    img = _vec(1)
    c.store(KEY, S, img, None, caption_key("a"), None, {"violation": 0.3, "timings_ms": {"prefill": 5.0}})
    near = img + 0.05 * _vec(2)
    hit = c.lookup(KEY, S, near, None, caption_key("A "))
    assert hit and hit.similarity > 0.9 and hit.verdict == {"violation": 0.3}  # timings of the source dropped
    assert c.lookup(KEY, S, _vec(3), None, caption_key("a")) is None  # different image
    assert c.lookup(KEY, S, img, None, caption_key("b")) is None  # different caption
    assert c.lookup(("p", "d", "zh", False, ""), S, img, None, caption_key("a")) is None  # other partition
    assert c.counts["hit"] == 1 and c.counts["miss"] == 3


def test_text_embedding_mode_and_fingerprint_check():
    s = S.model_copy(update={"text_threshold": 0.95, "fingerprint_threshold": 0.8})
    c = VerdictCache()
    img, txt, fp = _vec(1), _vec(4), _vec(5, 192)
    c.store(KEY, s, img, txt, "x", fp, {"v": 1})
    assert c.lookup(KEY, s, img, txt + 0.01 * _vec(6), "other caption", fp) is not None  # text by embedding
    assert c.lookup(KEY, s, img, _vec(7), "x", fp) is None  # dissimilar caption embedding
    assert c.lookup(KEY, s, img, txt, "x", _vec(8, 192)) is None  # CLIP agrees, fingerprint does not


def test_lru_bound_ttl_forget_and_purge():
    clock = Clock()
    c = VerdictCache(clock)
    imgs = [_vec(i) for i in range(5)]
    for i, v in enumerate(imgs):
        c.store(KEY, S, v, None, "c", None, {"i": i})
    assert len(c) == S.max_entries and c.counts["evicted"] == 2
    assert c.lookup(KEY, S, imgs[0], None, "c") is None  # evicted, least recently used
    assert c.lookup(KEY, S, imgs[4], None, "c").verdict == {"i": 4}
    clock.t = S.ttl_s + 1
    assert c.lookup(KEY, S, imgs[4], None, "c") is None and c.counts["expired"] == 3
    c.store(KEY, S, imgs[1], None, "c", None, {"i": 1})
    assert c.forget(KEY, S, imgs[1] + 0.01, None, "c") == 1 and len(c) == 0
    c.store(KEY, S, imgs[1], None, "c", None, {"i": 1})
    assert c.purge() == 1 and c.lookup(KEY, S, imgs[1], None, "c") is None


def test_stale_model_versions_are_not_served():
    served = {("language_decoder", "1"): True}
    g = GateCache(is_ready=lambda m, v: served.get((m, v), False))
    c = g.cache
    c.store(KEY, S, _vec(1), None, "c", None, {"v": 1}, versions={"language_decoder": "1"})
    assert c.lookup(KEY, S, _vec(1), None, "c", still_valid=g._valid) is not None
    served[("language_decoder", "1")] = False  # swapped to another version
    assert c.lookup(KEY, S, _vec(1), None, "c", still_valid=g._valid) is None and c.counts["stale"] == 1


def test_thread_safe_under_concurrent_store_and_lookup():
    c = VerdictCache()
    errors = []

    def work(seed):
        try:
            for i in range(200):
                v = _vec(seed * 1000 + i % 7)
                c.store(KEY, S, v, None, "c", None, {"i": i})
                c.lookup(KEY, S, v, None, "c")
        except Exception as e:  # noqa: BLE001 - any failure in a worker thread is collected and fails the test
            errors.append(e)

    ts = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    assert not errors and len(c) <= S.max_entries


def test_policy_cache_settings_validate():
    cfg = load_policy("default").cache
    assert 0 < cfg.image_threshold <= 1 and cfg.max_entries >= 1 and cfg.ttl_s > 0
    with pytest.raises(ValidationError):
        CacheSettings(max_entries=0)
    with pytest.raises(ValidationError):
        CacheSettings(image_threshold=1.5)


def test_thresholds_separate_near_copies_from_different_photos():
    """In-process on the served clip_image ONNX: the shipped thresholds match every JPEG q50 / 0.7x / 5 % crop
    copy of every sample photo and no pair of different photos. The untrained CLIP alone cannot (different photos
    reach a higher cosine than some copies): the fingerprint check is what separates them."""
    from perf.cache_savings import calibrate

    r = calibrate(REPO)
    assert r["separates"], r
    assert r["near_copies_matched"] == r["near_copies"] == 33 and r["different_pairs_matched"] == 0


def test_trace_has_the_stated_duplicate_mix():
    from moderation.testing.traces import make_trace, trace_mix

    trace = make_trace(n=40, dup_rate=0.3, seed=1)
    mix = trace_mix(trace)
    assert mix["posts"] == 40 and mix["duplicates"] == 12 and mix["by_kind"]["exact"] == 5
    seen = set()
    for t in trace:  # every copy follows its original
        if t["kind"] == "original":
            seen.add(t["of"])
        elif t["kind"] != "unique":
            assert t["of"] in seen


# against the real server ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cached_policy(policy_dir):
    """escalate_all with the verdict cache on, under a name no other test uses."""
    derive_policy(policy_dir, "escalate_cached", gate={"allow_below": 0.0, "block_at": 1.01},
                  cache={"enabled": True})
    return "escalate_cached"


def _send(triton, image: bytes, text: str, **options) -> dict:
    import tritonclient.grpc as grpcclient

    from clients.client import build_inputs, parse_response

    opts = {"request_id": f"cache-{uuid.uuid4().hex[:12]}", **options}
    c = grpcclient.InferenceServerClient(triton.grpc_url)
    try:
        inputs, outputs = build_inputs(grpcclient, image, text, opts)
        return parse_response(c.infer("moderate", inputs, outputs=outputs, client_timeout=60))
    finally:
        c.close()


def _decoder_count(triton) -> int:
    import tritonclient.grpc as grpcclient

    c = grpcclient.InferenceServerClient(triton.grpc_url)
    s = c.get_inference_statistics("language_decoder", headers=triton.admin_headers, as_json=True)
    c.close()
    return sum(int(m.get("inference_count", 0)) for m in s["model_stats"])


def _audit_rows(audit_log, request_id):
    return [json.loads(line) for line in audit_log.read_text().splitlines()
            if json.loads(line).get("request_id") == request_id]


def test_near_copies_hit_different_image_misses_purge_clears(triton, cached_policy, audit_log):
    from moderation.testing.samples import sample_posts
    from moderation.testing.traces import near_copy

    posts = {p.name: p for p in sample_posts()}
    src, other = posts["cat_en"], posts["coffee_zh"]
    caption = f"My cat judging me again {uuid.uuid4().hex[:6]}"  # fresh: nothing stored for it yet
    first = _send(triton, src.image_bytes(), caption, policy=cached_policy)
    assert first["route"] == "vlm" and first["cache"] == {"hit": False, "stored": True}

    n0 = _decoder_count(triton)
    for kind in ("jpeg50", "resize0.7", "crop5"):
        r = _send(triton, near_copy(src.image_bytes(), kind), "  " + caption.upper(), policy=cached_policy)
        assert r["route"] == "cache", (kind, r["route"], r.get("cache"))
        c = r["cache"]
        assert c["hit"] and c["similarity"] >= 0.98 and c["source_route"] == "vlm" and c["age_s"] >= 0, kind

        def vlm_scores(x: dict) -> dict:
            return {k: v for k, v in x["scores"].items() if k not in x["gate"]["sources"]}

        assert vlm_scores(r) == vlm_scores(first) and r["violation"] == first["violation"]  # the stored verdict
        assert r["model_versions"]["language_decoder"] == first["model_versions"]["language_decoder"]
        assert "cache_lookup" in r["latency_ms"] and "vlm" not in r["latency_ms"]
        assert r["request_id"] != first["request_id"]
        rows = _audit_rows(audit_log, r["request_id"])  # each cached post still gets its own audit row
        assert len(rows) == 1 and rows[0]["route"] == "cache" and rows[0]["cache"]["hit"]
    assert _decoder_count(triton) == n0  # three posts answered, no decoder work

    miss = _send(triton, other.image_bytes(), caption, policy=cached_policy)  # same caption, different photo
    assert miss["route"] == "vlm" and not miss["cache"]["hit"]

    env = dict(os.environ, MODERATION_ADMIN_KEY=ADMIN_KEY)
    p = subprocess.run([sys.executable, "-m", "clients.admin", "--url", triton.grpc_url, "purge-caches"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and json.loads(p.stdout)["purged"] == "clip_gate", p.stderr
    after = _send(triton, near_copy(src.image_bytes(), "jpeg50"), caption, policy=cached_policy)
    assert after["route"] == "vlm" and not after["cache"]["hit"]


def _with_patch(data: bytes, side: int = 80) -> bytes:
    """The post with a `side`-pixel square of its own pasted in (a payload: text on a flat block), re-encoded."""
    import io

    from PIL import Image, ImageDraw

    im = Image.open(io.BytesIO(data)).convert("RGB")
    block = Image.new("RGB", (side, side), (250, 240, 40))
    ImageDraw.Draw(block).text((6, side // 3), "BUY NOW", fill="black")
    im.paste(block, (im.width // 3, im.height // 3))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_a_patched_near_duplicate_misses_while_a_reencoded_copy_hits(triton, cached_policy):
    from moderation.testing.samples import sample_posts
    from moderation.testing.traces import near_copy

    src = next(p for p in sample_posts() if p.name == "cat_en")
    caption = f"patched {uuid.uuid4().hex[:6]}"
    assert _send(triton, src.image_bytes(), caption, policy=cached_policy)["cache"]["stored"]
    copy = _send(triton, near_copy(src.image_bytes(), "jpeg50"), caption, policy=cached_policy)
    assert copy["route"] == "cache" and copy["cache"]["local_difference"] <= 0.25, copy["cache"]
    patched = _send(triton, _with_patch(src.image_bytes()), caption, policy=cached_policy)
    assert patched["route"] == "vlm" and not patched["cache"]["hit"], patched["cache"]


def test_local_check_tells_a_copy_from_a_patched_copy():
    import io

    from PIL import Image

    from moderation.core.imaging import local_thumbnail
    from moderation.testing.samples import sample_posts
    from moderation.testing.traces import near_copy

    data = next(p for p in sample_posts() if p.name == "cat_en").image_bytes()
    local = {name: local_thumbnail(Image.open(io.BytesIO(b))) for name, b in
             {"src": data, "copy": near_copy(data, "crop5"), "patched": _with_patch(data)}.items()}
    s = S.model_copy(update={"local_threshold": 0.25})
    c = VerdictCache()
    img = _vec(1)
    c.store(KEY, s, img, None, "c", None, {"v": 1}, local=local["src"])
    assert c.lookup(KEY, s, img, None, "c", local=local["copy"]).verdict == {"v": 1}
    assert c.lookup(KEY, s, img, None, "c", local=local["patched"]) is None  # same embedding, a pasted region
    assert c.lookup(KEY, s, img, None, "c") is None  # a post without a thumbnail never matches a checked entry


def test_forget_option_serves_then_evicts(triton, cached_policy):
    from moderation.testing.samples import sample_posts
    from moderation.testing.traces import near_copy

    src = {p.name: p for p in sample_posts()}["rocket_en"]
    caption = f"Launch day {uuid.uuid4().hex[:6]}"
    assert _send(triton, src.image_bytes(), caption, policy=cached_policy)["route"] == "vlm"
    hit = _send(triton, near_copy(src.image_bytes(), "resize0.7"), caption, policy=cached_policy, forget=True)
    assert hit["route"] == "cache"
    again = _send(triton, src.image_bytes(), caption, policy=cached_policy, forget=True)
    assert again["route"] == "vlm" and again["cache"] == {"hit": False, "stored": False, "forgotten": 0}
    assert _send(triton, src.image_bytes(), caption, policy=cached_policy)["route"] == "vlm"  # nothing was kept


def test_cache_off_policy_never_looks_up(client):
    from moderation.testing.samples import sample_posts

    p = sample_posts()[0]
    r1 = client.moderate(p.image_bytes(), p.text, policy="escalate_all")
    r2 = client.moderate(p.image_bytes(), p.text, policy="escalate_all")
    assert r1["route"] == r2["route"] == "vlm" and "cache" not in r2


def test_embedding_layout_image_then_text(client):
    """EMBEDDING = [CLIP image embedding (D) | CLIP text embedding (D)], opt-in; checked against the same ONNX
    encoders run in-process on the same post."""
    import onnxruntime as ort

    from moderation.gate.inputs import Preprocess
    from moderation.testing.samples import sample_posts

    p = sample_posts()[2]
    plain = client.moderate(p.image_bytes(), p.text, policy="allow_all")
    assert "embedding" not in plain or len(plain["embedding"]) == 0
    r = client.moderate(p.image_bytes(), p.text, policy="allow_all", return_embedding=True)
    emb = np.asarray(r["embedding"], dtype=np.float32)
    inputs = Preprocess(str(REPO / "preprocess" / "1" / "clip"), "1")(p.image_bytes(), p.text.encode(), None, 0.0, 0.0)
    pixels, ids, mask = inputs.clip_pixels, inputs.clip_input_ids, inputs.clip_attention_mask
    img = ort.InferenceSession(str(REPO / "clip_image" / "1" / "model.onnx")).run(
        None, {"pixel_values": pixels[None]})[0][0]
    txt = ort.InferenceSession(str(REPO / "clip_text" / "1" / "model.onnx")).run(
        None, {"input_ids": ids[None], "attention_mask": mask[None]})[0][0]
    d = img.shape[0]
    assert emb.shape == (2 * d,) and txt.shape == (d,)
    np.testing.assert_allclose(emb[:d], img, atol=1e-4)
    np.testing.assert_allclose(emb[d:], txt, atol=1e-4)


def test_report_prints_label_trends_by_hour(tmp_path):
    from moderation.core.audit import AuditLog

    log = tmp_path / "audit.jsonl"
    a = AuditLog(log)
    base = 1_790_000_000  # a fixed hour boundary is not needed: buckets are by UTC hour of `ts`
    rows = [(base, "vlm", ["scam"]), (base + 60, "cache", ["scam", "hate"]), (base + 3600, "gate", []),
            (base + 3700, "vlm", ["hate"])]
    for i, (ts, route, labels) in enumerate(rows):
        a.write({"request_id": f"r{i}", "stage": "moderate", "ts": ts, "route": route, "violation": bool(labels),
                 "labels": [{"name": n, "score": 0.9, "source": "vlm"} for n in labels], "scores": {},
                 "latency_ms": {"total": 10.0}, "model_versions": {}, "error": None})
    p = subprocess.run([sys.executable, "-m", "clients.report", str(log), "--bucket", "hour"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert "label trends by hour" in out
    from datetime import datetime

    h0 = datetime.fromtimestamp(base, tz=UTC).strftime("%Y-%m-%d %H:00")
    h1 = datetime.fromtimestamp(base + 3600, tz=UTC).strftime("%Y-%m-%d %H:00")
    lines = {ln.split("  ")[0].strip(): ln for ln in out.splitlines() if ln.startswith((h0, h1))}
    assert "scam=2" in lines[h0] and "hate=1" in lines[h0]
    assert "hate=1" in lines[h1] and "scam" not in lines[h1]


def test_client_library_forget_keeps_nothing(triton, cached_policy):
    from clients.client import ModerationClient
    from moderation.testing.samples import sample_posts

    post = sample_posts()[5]
    caption = f"forget via the client {uuid.uuid4().hex}"
    with ModerationClient(triton.grpc_url) as c:
        first = c.moderate(post.image_bytes(), caption, policy=cached_policy, forget=True)
        second = c.moderate(post.image_bytes(), caption, policy=cached_policy)
        third = c.moderate(post.image_bytes(), caption, policy=cached_policy)
    assert (first["route"], second["route"], third["route"]) == ("vlm", "vlm", "cache")
