"""Animated GIF, WebP and APNG are judged frame by frame: the frames read, the lists and the image text per frame,
and what RESULT and the audit row say about them (unit, then on a real server)."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import yaml
from PIL import Image, ImageDraw, ImageFont

from moderation.core.errors import ImageTooLarge
from moderation.core.image_match import entry_hashes
from moderation.core.imaging import ANIMATION_PIXELS, decode_image
from moderation.core.lists import ListHit, media_hits
from moderation.core.policy import ImageEntry, PolicyLists, TermEntry, lists_path
from moderation.testing.policies import derive_policy
from moderation.testing.samples import image_paths

FONT = "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc"
TERM = "稳赚不赔"


def _photo(name: str = "astronaut", side: int = 480) -> Image.Image:
    return Image.open(image_paths()[name]).convert("RGB").resize((side, side))


def _with_text(im: Image.Image, text: str) -> Image.Image:
    im = im.copy()
    draw = ImageDraw.Draw(im)
    draw.rectangle((20, 360, 460, 440), fill=(255, 255, 255))
    draw.text((40, 370), text, font=ImageFont.truetype(FONT, 48), fill=(0, 0, 0))
    return im


def _moving_dot(im: Image.Image, i: int) -> Image.Image:
    im = im.copy()
    ImageDraw.Draw(im).ellipse((20 + 30 * i, 20, 36 + 30 * i, 36), fill=(255, 0, 0))
    return im


def _animation(frames: list[Image.Image], fmt: str = "GIF") -> bytes:
    buf = io.BytesIO()
    extra = {"lossless": True} if fmt == "WEBP" else {}  # each frame keeps the exact pixels it was drawn with
    frames[0].save(buf, fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **extra)
    return buf.getvalue()


def _text_in_frame(index: int, n: int = 6, fmt: str = "GIF", text: str = f"{TERM} 加我") -> bytes:
    """n frames of a photo with a dot moving (so no two frames are equal), `text` drawn in frame `index` only."""
    base = _photo()
    return _animation([_with_text(_moving_dot(base, i), text) if i == index else _moving_dot(base, i)
                       for i in range(n)], fmt)


# --- reading frames ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_every_changed_frame_of_a_short_animation_is_read(fmt):
    d = decode_image(_text_in_frame(3, fmt=fmt), max_frames=8)
    assert d.format == fmt and d.animated and d.frame_count == 6
    assert d.frame_indices == (0, 1, 2, 3, 4, 5) and len(d.frames) == 6
    assert d.frames[0] is d.image
    first_only = decode_image(_text_in_frame(3, fmt=fmt), max_frames=1)
    assert first_only.frame_count == 6 and first_only.frame_indices == (0,)


def test_frames_that_barely_change_are_skipped_and_the_change_is_kept():
    base = _photo()
    rng = np.random.default_rng(0)
    frames = []
    for i in range(12):  # a few pixels flicker in every frame; the caption appears at frame 7
        arr = np.asarray(base).copy()
        arr[rng.integers(0, 480, 3), rng.integers(0, 480, 3)] = 255
        im = Image.fromarray(arr)
        frames.append(_with_text(im, "LOOK") if i >= 7 else im)
    d = decode_image(_animation(frames, "WEBP"), max_frames=8)
    assert d.frame_count == 12 and d.frame_indices == (0, 7)


def test_a_long_animation_is_thinned_evenly_keeping_the_first_and_last_changes():
    rng = np.random.default_rng(1)
    frames = [Image.fromarray(np.full((64, 64, 3), rng.integers(0, 255, 3), dtype=np.uint8)) for _ in range(40)]
    d = decode_image(_animation(frames), max_frames=8)
    assert d.frame_count == 40 and len(d.frame_indices) == 8
    assert d.frame_indices[0] == 0 and d.frame_indices[-1] == 39
    assert list(d.frame_indices) == sorted(set(d.frame_indices))


def test_an_animation_too_long_to_read_is_refused_with_a_code_and_its_first_frame_still_decodes():
    rng = np.random.default_rng(2)
    side = 1000
    n = ANIMATION_PIXELS // (side * side) + 1
    frames = [Image.fromarray(np.full((side, side, 3), rng.integers(0, 255, 3), dtype=np.uint8)) for _ in range(n)]
    data = _animation(frames)
    with pytest.raises(ImageTooLarge) as e:
        decode_image(data, max_frames=8)
    assert e.value.code == "image_too_large" and f"{n} frames of {side}x{side}" in str(e.value)
    assert decode_image(data, max_frames=1).frame_count == n


def test_a_frame_is_read_and_scored_where_it_changed():
    """Decode once, read what changed: the bands of a later frame hold its changed rows (the moving dot's, the
    caption's), open_nsfw scores a frame only when its change covers SEEN_CHANGE of the picture (the dot does not,
    the caption does), and the caption drawn in frame 3 is read from its band with boxes in the frame's pixels."""
    from moderation.core.imaging import CHANGE_CELL, SEEN_CHANGE, change_mask, changed_bands, read_bands
    from moderation.core.policy import load_policy
    from moderation.core.post import decode_post_images
    from moderation.gate.inputs import scored_frames
    from moderation.ocr.reader import ImageTextReader

    images = decode_post_images([_text_in_frame(3)], load_policy())
    frames = images[0].frames
    assert images[0].frame_indices == (0, 1, 2, 3, 4, 5)
    assert changed_bands(change_mask(frames[0], frames[0]), 480) == ()
    dot = changed_bands(change_mask(frames[0], frames[1]), 480)
    assert len(dot) == 1 and dot[0][0] <= 20 and 36 <= dot[0][1] <= 36 + 4 * CHANGE_CELL
    caption = changed_bands(change_mask(frames[2], frames[3]), 480)
    assert [b for b in caption if b[0] <= 360 and b[1] >= 440], caption
    assert float(change_mask(frames[0], frames[1]).mean()) < SEEN_CHANGE <= float(change_mask(frames[2],
                                                                                              frames[3]).mean())
    # frame 4 (the caption gone) is frame 2 with the dot moved: neither scored again nor read beyond the dot's rows
    assert scored_frames(images) == [(0, 0), (0, 3)]
    bands = read_bands(frames)
    assert bands[0] is None and bands[4] == changed_bands(change_mask(frames[2], frames[4]), 480)
    dot_rows = bands[1][0]
    assert dot_rows[0] == 0 and dot_rows[1] <= 36 + 3 * CHANGE_CELL, bands  # the dot's rows (it moves at y 20-36)
    assert [rows[1:] for rows in bands[1:]] == [(), (), ((344, 464),), (), ()], bands  # and the caption's
    reader = ImageTextReader()
    reads, truncated = reader.read_frames([(k, f, rows) for k, (f, rows) in enumerate(zip(frames, bands, strict=True))])
    assert not truncated and [k for k, read in reads if read.lines] == [3]
    lines = dict(reads)[3].lines
    assert "".join(line.text for line in lines).replace(" ", "").startswith(TERM), lines
    assert all(360 - CHANGE_CELL <= y <= 440 + CHANGE_CELL for line in lines for _, y in line.box)
    # the same frames read whole find the same text
    whole, _ = reader.read_frames([(k, frame, None) for k, frame in enumerate(frames)])
    assert [[line.text for line in r.lines] for _, r in whole] == [[line.text for line in r.lines] for _, r in reads]


def test_media_hits_name_each_entry_once_from_its_best_image_and_frame():
    def hit(entry, distance):
        return ListHit("image", "block", entry, "scam", "image", {"distance": distance})

    hits = media_hits([(None, 0, [hit("a", 20)]), (None, 3, [hit("a", 4), hit("b", 30)]), (None, 5, [hit("b", 30)])])
    assert {h.id: (h.detail["frame"], h.detail["distance"]) for h in hits} == {"a": (3, 4), "b": (3, 30)}
    several = media_hits([(0, None, [hit("a", 9)]), (2, 1, [hit("a", 3)])])
    assert several[0].detail == {"distance": 3, "image": 2, "frame": 1}
    still = media_hits([(None, None, [hit("a", 7)])])
    assert still[0].to_dict() == {"kind": "image", "list": "block", "id": "a", "label": "scam", "field": "image",
                                  "distance": 7}


# --- on a real server ----------------------------------------------------------------------------------------
def _policy_with_lists(directory, name: str, lists: PolicyLists, max_frames: int | None = None) -> None:
    path = derive_policy(directory, name, cache={"enabled": False})
    if max_frames is not None:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        data["media"] = {"max_frames": max_frames}
        path.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")
    lists_path(path).write_text(lists.model_dump_json(), encoding="utf-8")


def _audit_rows(audit_log, request_id: str) -> list[dict]:
    rows = [json.loads(line) for line in audit_log.read_text(encoding="utf-8").splitlines()]
    return [r for r in rows if r.get("request_id") == request_id and r.get("stage") == "moderate"]


def test_a_term_drawn_in_frame_4_blocks_the_post_and_names_the_frame(triton, client, policy_dir, audit_log):
    terms = PolicyLists(revision=1, terms=[TermEntry(id="term-wzbp", list="block", label="scam", term=TERM)])
    _policy_with_lists(policy_dir, "frames_terms", terms)
    _policy_with_lists(policy_dir, "frames_terms_first_only", terms, max_frames=1)
    gif = _text_in_frame(3)

    r = client.moderate(gif, "今天天气真好", policy="frames_terms", request_id="frames-term-4")
    assert r["action"] == "block" and r["decided_by"] == "terms", r["decision"]
    (hit,) = [h for h in r["list_hits"] if h["id"] == "term-wzbp"]
    assert hit["field"] == "image_text" and hit["frame"] == 3
    (media,) = r["media"]["images"]
    assert (media["frames"], media["read"], media["format"]) == (6, [0, 1, 2, 3, 4, 5], "GIF")
    assert any(TERM in line["text"] and line["frame"] == 3 for line in r["image_text"]["lines"])
    (row,) = _audit_rows(audit_log, "frames-term-4")
    assert row["media"] == r["media"]["images"]
    assert TERM not in json.dumps(row, ensure_ascii=False)  # the audit row keeps hashes, never the words

    # the same GIF judged on its first frame only (what the service did before frames were read)
    r = client.moderate(gif, "今天天气真好", policy="frames_terms_first_only")
    assert r["decided_by"] != "terms" and not r["list_hits"]
    assert r["media"] == {"images": [{**media, "read": [0]}]}  # no later frame was scored

    # the same text in the first frame of a still image is blocked as before, and says no frame
    still = io.BytesIO()
    _with_text(_photo(), f"{TERM} 加我").save(still, "PNG")
    r = client.moderate(still.getvalue(), "今天天气真好", policy="frames_terms")
    assert r["decided_by"] == "terms" and "frame" not in r["list_hits"][0] and "media" not in r


def test_a_listed_photo_in_a_later_frame_blocks_the_post(triton, client, policy_dir):
    listed = _photo("coffee")
    entry = ImageEntry(id="img-coffee", list="block", label="scam", pdq=[h for h, _ in entry_hashes(listed)])
    _policy_with_lists(policy_dir, "frames_images", PolicyLists(revision=1, images=[entry]))
    other = _photo("chelsea")
    gif = _animation([_moving_dot(other, 0), _moving_dot(other, 1), listed, _moving_dot(other, 3)])
    r = client.moderate(gif, "good morning", policy="frames_images")
    assert r["action"] == "block" and r["decided_by"] == "image_list", r["decision"]
    assert r["decision"]["list_hit"]["id"] == "img-coffee" and r["decision"]["list_hit"]["frame"] == 2
    # a still of the other photo matches nothing
    still = io.BytesIO()
    other.save(still, "JPEG")
    assert not client.moderate(still.getvalue(), "good morning", policy="frames_images")["list_hits"]


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def _nsfw_score(result: dict) -> float:
    (label,) = [k for k, v in result["gate"]["sources"].items() if v == "nsfw_image"]
    return result["gate"]["scores"][label]


def test_open_nsfw_reads_every_frame_and_reports_the_frame_of_its_score(triton, client):
    # open_nsfw on the shipped photos as stills: the lowest-scoring one opens the animation, the highest is frame 2
    stills = {name: _photo(name, 320) for name in ("astronaut", "coffee", "chelsea", "rocket", "horse")}
    score = {name: _nsfw_score(client.moderate(_png(im), "hello")) for name, im in stills.items()}
    low, high = min(score, key=score.get), max(score, key=score.get)
    assert score[high] > score[low]
    frames = [stills[low], _moving_dot(stills[low], 1), stills[high], _moving_dot(stills[low], 3)]
    r = client.moderate(_animation(frames, "WEBP"), "hello")
    assert r["media"]["images"][0]["read"] == [0, 1, 2, 3] and r["media"]["signals"] == {"nsfw_image": {"frame": 2}}
    assert _nsfw_score(r) == pytest.approx(score[high], abs=1e-4)
    # frames that all score below the first: the first frame's score, and no frame named
    r = client.moderate(_animation([stills[high], _moving_dot(stills[low], 1)], "WEBP"), "hello")
    assert _nsfw_score(r) == pytest.approx(score[high], abs=1e-4) and "signals" not in r["media"]
