"""A post is a caption plus its images: IMAGE [posts, N], every signal on every image, evidence naming the image,
the VLM seeing the post's images in one picture, too many images a coded error of that post alone."""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from clients.client import ModerationFailed
from moderation.core.errors import BadImage
from moderation.core.policy import PolicyLists, TermEntry, load_policy
from moderation.core.post import parse_post, post_images
from moderation.gate.inputs import verdict_cache_key
from moderation.testing.samples import image_paths
from moderation.vlm.inputs import SHEET_IMAGES, contact_sheet

from .test_frames import _policy_with_lists

REPO = Path(__file__).resolve().parents[1] / "model_repository"
FONT = "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc"
TERM = "稳赚不赔"


def _jpeg(name: str, text: str | None = None, side: int = 480) -> bytes:
    im = Image.open(image_paths()[name]).convert("RGB").resize((side, side))
    if text:
        draw = ImageDraw.Draw(im)
        draw.rectangle((20, 360, 460, 440), fill=(255, 255, 255))
        draw.text((40, 370), text, font=ImageFont.truetype(FONT, 48), fill=(0, 0, 0))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=92)
    return buf.getvalue()


PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "horse", "flower", "coins", "hubble", "china")


# --- reading a post's images --------------------------------------------------------------------------------------
def test_empty_elements_pad_a_row_and_an_all_empty_row_is_one_empty_image():
    assert post_images([b"a", b"", b"b", b""]) == [b"a", b"b"]
    assert post_images([b"", b""]) == [b""] and post_images(b"x") == [b"x"] and post_images(None) == []


def test_a_post_of_several_images_keeps_each_ones_hash_and_names_a_bad_one():
    images = [_jpeg("astronaut"), _jpeg("coffee")]
    post = parse_post(images, b"hi", None)
    assert [m["format"] for m in post.media] == ["JPEG", "JPEG"] and post.image_format == "JPEG"
    assert [len(m["sha256"]) for m in post.media] == [64, 64] and post.media[0]["sha256"] != post.media[1]["sha256"]
    assert [i for i, _, _ in post.judged_frames] == [0, 1]
    assert parse_post(images[0], b"hi", None).media is None  # one still image: nothing more to say
    with pytest.raises(BadImage, match=r"^\[bad_image\] image 1: "):
        parse_post([images[0], b"not an image"], b"hi", None)


def test_the_cache_key_of_a_post_covers_all_its_images():
    a, b = [{"sha256": "a" * 64}, {"sha256": "b" * 64}], [{"sha256": "a" * 64}, {"sha256": "c" * 64}]
    assert verdict_cache_key("hi", "", a) != verdict_cache_key("hi", "", b)
    assert verdict_cache_key("hi", "", a[:1]) == verdict_cache_key("hi", "") == verdict_cache_key("hi", "", None)


def test_the_vlm_sees_up_to_four_images_in_reading_order_on_one_picture():
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)]
    images = [Image.new("RGB", (300, 200), c) for c in colours]
    sheet = np.asarray(contact_sheet(images), dtype=np.int16)
    assert sheet.shape == (448, 448, 3) and SHEET_IMAGES == 4
    centres = {(0, 0): (112, 110), (0, 1): (112, 330), (1, 0): (336, 110), (1, 1): (336, 330)}  # (y, x)
    for k, (cell, (y, x)) in enumerate(centres.items()):
        assert tuple(sheet[y, x]) == colours[k], cell
    assert not (np.abs(sheet - np.array(colours[4])).sum(-1) == 0).any()  # the fifth is not shown
    pair = np.asarray(contact_sheet(images[:2]), dtype=np.int16)
    assert tuple(pair[224, 110]) == colours[0] and tuple(pair[224, 330]) == colours[1]
    assert contact_sheet(images[:1]) is images[0]


def test_the_vlm_prompt_of_a_post_carries_its_images_together():
    from moderation.vlm.inputs import VlmInputs

    vlm = VlmInputs(str(REPO / "vlm_preprocess" / "1" / "qwen"), "test")
    two = parse_post([_jpeg("astronaut"), _jpeg("coffee")], b"look", None)
    one = parse_post(_jpeg("astronaut"), b"look", None)
    pixels_two, body_two, _ = vlm(two)
    pixels_one, body_one, _ = vlm(one)
    sheet, _ = vlm.pixels(contact_sheet([im.frames[0] for im in two.images]))
    np.testing.assert_array_equal(pixels_two, sheet)  # both images, in one picture of the fixed grid
    assert pixels_two.shape == pixels_one.shape and not np.array_equal(pixels_two, pixels_one)
    assert len(body_two) == len(body_one)  # one image's visual tokens whatever the image count


# --- on a real server ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def term_policy(policy_dir):
    terms = PolicyLists(revision=1, terms=[TermEntry(id="term-wzbp", list="block", label="scam", term=TERM)])
    _policy_with_lists(policy_dir, "multi_terms", terms)
    return "multi_terms"


def _rows(audit_log, request_id: str) -> list[dict]:
    rows = [json.loads(line) for line in audit_log.read_text(encoding="utf-8").splitlines()]
    return [r for r in rows if r.get("request_id") == request_id and r.get("stage") == "moderate"]


def test_a_term_in_the_third_image_blocks_the_post_and_names_the_image(triton, client, term_policy, audit_log):
    images = [_jpeg("astronaut"), _jpeg("coffee"), _jpeg("chelsea", f"{TERM} 加我")]
    r = client.moderate(images, "周末愉快", policy=term_policy, request_id="multi-3")
    assert r["action"] == "block" and r["decided_by"] == "terms", r["decision"]
    (hit,) = [h for h in r["list_hits"] if h["id"] == "term-wzbp"]
    assert hit["field"] == "image_text" and hit["image"] == 2 and "frame" not in hit
    assert any(TERM in line["text"] and line["image"] == 2 for line in r["image_text"]["lines"])
    assert [m["sha256"] for m in r["media"]["images"]] == [hashlib.sha256(x).hexdigest() for x in images]
    (row,) = _rows(audit_log, "multi-3")
    assert row["media"] == r["media"]["images"] and row["image_sha256"] == r["media"]["images"][0]["sha256"]
    assert TERM not in json.dumps(row, ensure_ascii=False)
    # the same images without the third: nothing to block
    r = client.moderate(images[:2], "周末愉快", policy=term_policy)
    assert r["decided_by"] != "terms" and not r["list_hits"]


def test_nine_images_are_judged_and_ten_fail_that_post_alone(triton, client, term_policy, policy_dir):
    nine = [_jpeg(name, side=240) for name in PHOTOS]
    r = client.moderate(nine, "nine photos", policy=term_policy)
    assert r["action"] in ("allow", "review", "block") and len(r["media"]["images"]) == 9
    assert load_policy(term_policy, policy_dir).media.max_images == 9
    with pytest.raises(ModerationFailed) as e:
        client.moderate(nine + [nine[0]], "ten photos", policy=term_policy)
    assert e.value.code == "too_many_images" and "10 images" in e.value.message
    # in a request of several posts, of one, three and ten images (padded rows): only the ten-image post fails
    out = client.moderate_batch([(nine[0], "one", {"policy": term_policy}),
                                 (nine[:3], "three", {"policy": term_policy}),
                                 (nine + [nine[1]], "ten", {"policy": term_policy})])
    assert out[0]["action"] and "media" not in out[0]
    assert out[1]["action"] and len(out[1]["media"]["images"]) == 3
    assert out[2]["action"] is None and out[2]["error"]["code"] == "too_many_images"


def test_an_escalated_post_of_several_images_reaches_the_vlm(triton, client):
    images = [_jpeg("astronaut"), _jpeg("coffee"), _jpeg("rocket")]
    r = client.moderate(images, "what do you think", escalate=True)
    # forced, or escalated by the gate itself: its concept bank reads all three images (the riskiest decides)
    assert r["route"] == "vlm" and r["escalated"] in ("forced", "gate") and r["signals"]["vlm"] == "untrained"
    assert len(r["media"]["images"]) == 3


def test_the_clip_gate_reads_every_image_and_names_where_a_score_came_from(triton, client):
    """Each concept-bank label of a post of three images scores what the riskiest image scores alone (the largest of
    the three), the caption's mismatch what the image it fits best scores (the smallest), and RESULT.media.labels
    names the image a label's score came from when it was not the first."""
    images = [_jpeg("astronaut"), _jpeg("coffee"), _jpeg("rocket")]
    caption = "a quiet morning"
    alone = [client.moderate(image, caption, policy="allow_all")["gate"] for image in images]
    post = client.moderate(images, caption, policy="allow_all")
    gate = post["gate"]
    clip_labels = [k for k in gate["scores"] if k not in gate["sources"]]
    assert "mismatch" in clip_labels and len(clip_labels) > 2
    where = post["media"].get("labels", {})
    for label in clip_labels:
        singles = [g["scores"][label] for g in alone]
        pick = min if label == "mismatch" else max
        best = singles.index(pick(singles))
        assert gate["scores"][label] == pytest.approx(pick(singles), abs=1e-5), label
        assert where.get(label) == ({"image": best} if best else None), (label, singles)
    assert where and set(where) <= set(clip_labels)  # these three images: some labels' scores come from a later one
    assert gate["consistency"] == pytest.approx(max(g["consistency"] for g in alone), abs=1e-5)
