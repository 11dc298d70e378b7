"""The words drawn in images, against the real server: PP-OCRv4 served through Triton reads what the package's
own pipeline reads; the text reaches RESULT, the term lists (every variant kind, caption and image text), the
profanity signal, the verdict cache's key (a meme template with other words is another post; a re-encoded copy of
the same meme is the same) and the audit row (hash and line count only)."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from moderation.core.audit import read_rows
from moderation.core.imaging import decode_image
from moderation.ocr.reader import ImageTextReader
from moderation.testing.memes import memes, render
from moderation.testing.policies import derive_policy
from moderation.testing.samples import sample_posts

from .conftest import ADMIN_KEY, ROOT

MEMES = {m.name: m for m in memes()}


@pytest.fixture(scope="module")
def rendered():
    return {name: render(m) for name, m in MEMES.items()}


def _texts(result) -> list[str]:
    return [line["text"] for line in (result["image_text"] or {}).get("lines", [])]


def test_served_text_equals_the_package_pipeline(client, rendered):
    reference = ImageTextReader()  # rapidocr_onnxruntime with its own onnxruntime sessions
    images = dict(rendered) | {p.name: p.image_bytes() for p in sample_posts()}
    for name, data in images.items():
        r = client.moderate(data, "lol", policy="allow_all")
        want = [(x.text, x.box) for x in reference.read(decode_image(data).image)]
        assert [(x["text"], x["box"]) for x in (r["image_text"] or {"lines": []})["lines"]] == want, name
    r = client.moderate(rendered["cat_joke_en"], "lol", policy="allow_all")
    assert len(r["image_text"]["lines"]) == 2 and all(0.5 <= x["confidence"] <= 1 for x in r["image_text"]["lines"])


def test_ocr_false_skips_it_and_audit_rows_keep_only_hash_and_count(client, audit_log, rendered):
    r = client.moderate(rendered["coffee_joke_zh"], "lol", policy="allow_all", request_id="ocr-audit-1")
    assert "周一早上的我" in _texts(r)
    skipped = client.moderate_batch([(rendered["coffee_joke_zh"], "lol", {"policy": "allow_all", "ocr": False})])[0]
    assert skipped["image_text"] is None
    row = next(x for x in read_rows(audit_log) if x.get("request_id") == "ocr-audit-1")
    assert row["image_text_lines"] == 2 and len(row["image_text_sha256"]) == 64
    assert "周一" not in json.dumps(row, ensure_ascii=False)


def _reencode(data: bytes, quality: int = 85) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def test_a_meme_template_with_other_words_is_not_answered_from_the_cache(client, policy_dir, rendered):
    derive_policy(policy_dir, "memes_cached", gate={"allow_below": 0.0, "block_at": 1.01}, cache={"enabled": True})
    joke = client.moderate(rendered["cat_joke_en"], "lol", policy="memes_cached")
    assert joke["route"] == "vlm" and joke["cache"]["stored"]
    for other in ("cat_threat_en", "cat_slur_en"):
        r = client.moderate(rendered[other], "lol", policy="memes_cached")
        assert r["route"] == "vlm" and not r["cache"]["hit"], other  # judged, not the joke's verdict
    copy = client.moderate(_reencode(rendered["cat_joke_en"]), "lol", policy="memes_cached")
    assert [t.replace(" ", "") for t in _texts(copy)] == [t.replace(" ", "") for t in _texts(joke)]
    assert copy["route"] == "cache" and copy["cache"]["hit"]  # the same meme, re-encoded


def _admin(triton, policy_dir, audit_log, *args):
    env = dict(os.environ, MODERATION_ADMIN_KEY=ADMIN_KEY, MODERATION_POLICY_DIR=str(policy_dir),
               MODERATION_AUDIT_LOG=str(audit_log))
    return subprocess.run([sys.executable, "-m", "clients.admin", "--url", triton.grpc_url, *args], env=env,
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


VARIANTS = [("赌 博", "separator"), ("赌.博", "separator"), ("赌💰博", "separator"), ("賭博", "normalized"),
            ("堵博", "homophone"), ("du博", "homophone"), ("吻赚不赔", "homophone"), ("加V信", "letter"),
            ("fr33 m0ney", "leetspeak"), ("$cam", "leetspeak"), ("ＳＣＡＭ", "normalized"), ("s c a m", "separator"),
            ("赌博", "exact")]


def test_term_variants_are_caught_in_the_caption_and_in_the_image(triton, client, policy_dir, audit_log, rendered):
    derive_policy(policy_dir, "worded", cache={"enabled": False})
    for term, lst in (("赌博", "block"), ("稳赚不赔", "block"), ("加微信", "review"), ("free money", "block"),
                      ("scam", "review")):
        p = _admin(triton, policy_dir, audit_log, "lists", "add-term", "--policy", "worded", "--list", lst,
                   "--term", term, "--label", "scam")
        assert p.returncode == 0, p.stderr
    photo = sample_posts()[1].image_bytes()
    for caption, kind in VARIANTS:
        r = client.moderate(photo, f"今天 {caption} 走起", policy="worded")
        hits = [h for h in r["list_hits"] if h["field"] == "caption"]
        assert hits and hits[0]["variant"] == kind, (caption, r["list_hits"])
        assert r["decided_by"] == "terms" and r["action"] in ("block", "review")
    r = client.moderate(rendered["scam_homophone_zh"], "", policy="worded")
    kinds = {h["variant"] for h in r["list_hits"] if h["field"] == "image_text"}
    assert {"homophone", "letter"} <= kinds and r["action"] == "block" and r["decided_by"] == "terms"
    r = client.moderate(rendered["scam_ad_zh"], "", policy="worded")
    assert r["action"] == "block" and {h["field"] for h in r["list_hits"]} == {"image_text"}
    for name in ("cat_joke_en", "coffee_joke_zh", "rocket_joke_en"):
        assert not client.moderate(rendered[name], "lol", policy="worded")["list_hits"], name


def test_profanity_is_a_trained_text_signal_that_may_decide(client):
    photo = sample_posts()[2].image_bytes()
    r = client.moderate(photo, "you fucking idiot", policy="default")
    assert r["signals"]["profanity"] == "trained" and r["gate"]["sources"]["hate"] == "profanity"
    assert r["action"] == "block" and r["decided_by"] == "profanity" and r["severity"]["hate"] == 3
    calm = client.moderate(photo, "what a nice day", policy="default")
    assert calm["decided_by"] != "profanity" and calm["gate"]["scores"]["hate"] < 0.5


def test_detection_runs_within_its_side_limit_whatever_the_image_size():
    import numpy as np

    from moderation.ocr.reader import DET_SIDE

    shapes = []

    def infer(model, x):
        shapes.append((model, x.shape))
        return np.zeros((x.shape[0], 1, *x.shape[2:]), np.float32)  # no text anywhere

    reader = ImageTextReader(infer)
    for size in ((4000, 3000), (1200, 300), (300, 200)):
        assert reader.read(Image.new("RGB", size, (200, 180, 160))) == []
    assert [m for m, _ in shapes] == ["ocr_detect"] * 3  # a photo with no text costs detection only
    assert all(max(s[2:]) <= DET_SIDE for _, s in shapes), shapes
    assert shapes[-1][1][2:] == (192, 288)  # a small image is not enlarged (multiples of 32)
