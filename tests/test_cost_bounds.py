"""Cost bounds on reading an image's text and on decoding it: OCR recognises at most a per-image budget of the
detected boxes (policy ocr), and a post whose text was read only in part says so (image_text.truncated) and goes to
review unless a list or a trained signal blocks it; maximum-size images decode at a reduced size and are judged.
Behaviour only: the costs themselves are measured in perf/cost_bounds.py."""
from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from moderation.core.audit import read_rows
from moderation.core.contracts import GateDecision
from moderation.core.decision import OCR_BUDGET, choose_action
from moderation.core.imaging import DECODE_SIDE, decode_image
from moderation.core.policy import load_policy
from moderation.ocr.reader import ImageTextReader, ReadBudget, rec_cost, within_budget
from moderation.testing.hostile_images import dense_text_png, flat_jpeg, spaced_words_png
from moderation.testing.memes import memes, render
from moderation.testing.policies import ALLOW_ALL_GATE, derive_policy

from .conftest import ADMIN_KEY, ROOT

MEMES = {m.name: m for m in memes()}


def _ocr_policy(directory, name: str, **ocr) -> None:
    """The shipped default under `name` with the gate allowing everything (only the OCR budget can send a post
    to review), the verdict cache off and some ocr settings changed."""
    derive_policy(directory, name, gate=ALLOW_ALL_GATE, cache={"enabled": False}, ocr=ocr)


def _box(x: float, y: float, w: float, h: float) -> np.ndarray:
    return np.array([[x, y], [x + w, y], [x + w, y + h], [x, y + h]], dtype=np.float32)


def test_the_budget_reads_the_largest_boxes_first_and_counts_padding():
    boxes = [_box(0, 0, 100, 10), _box(0, 20, 400, 40), _box(0, 80, 30, 10)]  # 10, 10 and 3 line squares
    assert within_budget(boxes, ReadBudget(max_boxes=1)) == [1]
    assert within_budget(boxes, ReadBudget(max_boxes=48)) == [1, 0, 2]
    # a batch is padded to its widest box: three boxes of one batch cost 3 x 10 squares
    assert rec_cost([10.0, 10.0, 3.0]) == 30.0
    assert within_budget(boxes, ReadBudget(max_area=25.0)) == [1, 0]
    # a box that does not fit is skipped; a smaller one may still (every batch costs at least 320/48 squares)
    assert within_budget(boxes, ReadBudget(max_area=7.0)) == [2]
    assert within_budget(boxes, ReadBudget(max_area=6.0)) == []


def test_a_dense_image_is_read_in_part_and_says_so_in_process():
    reader = ImageTextReader()
    image = decode_image(dense_text_png()).image
    part = reader.read_within(image, ReadBudget(max_boxes=3, max_area=10_000.0, max_ms=60_000.0))
    assert part.truncated and part.boxes_read == 3 < part.boxes_found and 1 <= len(part.lines) <= 3
    words = reader.read_within(decode_image(spaced_words_png()).image)  # a box per word
    assert words.truncated and words.boxes_found > 48 and 1 <= words.boxes_read <= 48
    meme = reader.read_within(decode_image(render(MEMES["cat_joke_en"])).image)
    assert not meme.truncated and meme.boxes_read == meme.boxes_found == 2


def test_a_truncated_read_is_reviewed_unless_a_list_or_a_trained_signal_blocks():
    policy = load_policy("default")
    untrained = GateDecision(route="gate", band="allow", reason="", scores={}, consistency=None,
                             signals={"clip": "untrained"}, gate_version="1", gate_ms=0.0, gate_started=0.0)
    d = choose_action(policy, untrained, [], image_text_truncated=True)
    assert (d.action, d.decided_by) == ("review", OCR_BUDGET) and "read only in part" in d.reason
    allow = {"list": "allow", "kind": "image", "id": "a1", "label": "scam"}
    assert choose_action(policy, untrained, [allow], image_text_truncated=True).action == "review"
    assert choose_action(policy, untrained, [allow]).action == "allow"
    block = {"list": "block", "kind": "term", "id": "b1", "label": "scam"}
    assert choose_action(policy, untrained, [allow, block], image_text_truncated=True).action == "block"
    trained = untrained.model_copy(update={"scores": {"sexual": 1.0}, "sources": {"sexual": "nsfw_image"},
                                           "signals": {"clip": "untrained", "nsfw_image": "trained"}})
    d = choose_action(policy, trained, [], image_text_truncated=True)
    assert (d.action, d.decided_by) == ("block", "nsfw_image")


def test_served_dense_text_goes_to_review_with_what_was_read(triton, client, policy_dir, audit_log):
    _ocr_policy(policy_dir, "ocr_bounded")
    r = client.moderate(dense_text_png(), "lol", policy="ocr_bounded", request_id="dense-text-1")
    assert r["image_text"]["truncated"] is True and r["image_text"]["lines"]
    assert r["action"] == "review" and r["decided_by"] == OCR_BUDGET and r["error"] is None
    row = next(x for x in read_rows(audit_log) if x.get("request_id") == "dense-text-1")
    assert row["image_text_truncated"] is True and row["action"] == "review" and row["decided_by"] == OCR_BUDGET
    meme = client.moderate(render(MEMES["cat_joke_en"]), "lol", policy="ocr_bounded", request_id="meme-1")
    assert meme["image_text"]["truncated"] is False and len(meme["image_text"]["lines"]) == 2
    assert meme["action"] == "allow"
    row = next(x for x in read_rows(audit_log) if x.get("request_id") == "meme-1")
    assert row["image_text_truncated"] is False


def test_the_policy_box_budget_truncates_a_two_line_meme(client, policy_dir):
    _ocr_policy(policy_dir, "ocr_one_box", max_boxes=1)
    r = client.moderate(render(MEMES["rocket_joke_en"]), "lol", policy="ocr_one_box")
    assert r["image_text"]["truncated"] is True and len(r["image_text"]["lines"]) == 1
    assert r["action"] == "review" and r["decided_by"] == OCR_BUDGET


def _admin(triton, policy_dir, audit_log, *args):
    env = dict(os.environ, MODERATION_ADMIN_KEY=ADMIN_KEY, MODERATION_POLICY_DIR=str(policy_dir),
               MODERATION_AUDIT_LOG=str(audit_log))
    return subprocess.run([sys.executable, "-m", "clients.admin", "--url", triton.grpc_url, *args], env=env,
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_a_block_list_hit_still_blocks_a_truncated_read(triton, client, policy_dir, audit_log):
    _ocr_policy(policy_dir, "ocr_bounded_terms")
    p = _admin(triton, policy_dir, audit_log, "lists", "add-term", "--policy", "ocr_bounded_terms", "--list",
               "block", "--term", "free money", "--label", "scam")
    assert p.returncode == 0, p.stderr
    r = client.moderate(dense_text_png(seed=1), "free money here", policy="ocr_bounded_terms")
    assert r["image_text"]["truncated"] is True
    assert r["action"] == "block" and r["decided_by"] == "terms"


@pytest.mark.parametrize("size", [(6324, 6324), (16384, 2441)])
def test_maximum_size_jpegs_decode_reduced_and_are_judged(client, size):
    data = flat_jpeg(*size)
    decoded = decode_image(data)
    assert decoded.original_size == size and max(decoded.image.size) < 2 * DECODE_SIDE
    r = client.moderate(data, "a wall", policy="allow_all")
    assert r["error"] is None and r["action"] == "allow"


def test_reduced_decoding_keeps_orientation_and_every_format():
    base = Image.new("RGB", (4000, 3000), (10, 200, 30))
    exif = base.getexif()
    exif[0x0112] = 6  # rotate 90: a portrait phone photo stored landscape
    for fmt in ("JPEG", "PNG", "WEBP"):
        buf = io.BytesIO()
        base.save(buf, fmt, exif=exif.tobytes())
        d = decode_image(buf.getvalue())
        w, h = d.image.size
        assert d.original_size == (4000, 3000) and h > w and max(w, h) < 2 * DECODE_SIDE, fmt
        assert d.image.mode == "RGB" and d.image.getpixel((w // 2, h // 2))[1] > 150, fmt
    buf = io.BytesIO()
    Image.new("P", (5000, 300)).save(buf, "GIF")
    assert decode_image(buf.getvalue()).image.size == (1250, 75)
    assert decode_image(buf.getvalue(), decode_side=None).image.size == (5000, 300)
