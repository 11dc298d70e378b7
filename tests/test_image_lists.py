"""Image lists catch copies cut on one or two edges (a watermark or border trimmed off), not only re-encoded,
resized and centre-cropped ones, and still leave other photos alone: in process through the lists admin code,
and against the real server."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from moderation.core.audit import AuditLog
from moderation.core.image_match import PdqIndex, entry_hashes, entry_windows, one_side_crop
from moderation.core.imaging import PDQ_ENTRY_CROPS, centred_crop, decode_image, pdq_distance, pdq_hash
from moderation.core.lists import image_hits
from moderation.core.policy import ImageEntry, PolicyLists, lists_path, load_policy
from moderation.ops.lists import ListAdmin
from moderation.testing.policies import derive_policy
from moderation.testing.samples import image_paths

from .test_actions import _admin

EDGE_CUTS = [(side, cut) for cut in (0.05, 0.1) for side in ("left", "right", "top", "bottom")]


def _jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _one_edge_copy(data: bytes, side: str, cut: float, scale: float = 1.0) -> bytes:
    im = Image.open(io.BytesIO(data)).convert("RGB")
    if scale != 1.0:
        im = im.resize((int(im.width * scale), int(im.height * scale)), Image.BICUBIC)
    return _jpeg(one_side_crop(im, side, cut))


def _hash(data: bytes) -> str:
    return pdq_hash(decode_image(data).image)[0]


@pytest.fixture()
def listed(tmp_path):
    derive_policy(tmp_path, "listed")
    admin = ListAdmin(directory=tmp_path, audit=AuditLog(tmp_path / "audit.jsonl"))
    return admin, tmp_path


def test_an_entry_stores_the_hash_of_every_window_whole_image_first():
    im = decode_image(image_paths()["coffee"].read_bytes()).image
    hashes = entry_hashes(im)
    assert len(hashes) == len(entry_windows(im)) > len(PDQ_ENTRY_CROPS)
    assert hashes[0] == pdq_hash(im)
    assert len({h for h, _ in hashes}) == len(hashes)  # every window is a different cut of the image


@pytest.mark.parametrize("photo", ["rocket", "coffee", "grace_hopper"])
def test_copies_cut_on_one_edge_hit_the_entry_and_other_photos_do_not(listed, photo):
    admin, directory = listed
    data = image_paths()[photo].read_bytes()
    entry = admin.add_image("listed", "block", data, label="scam")
    assert len(entry["pdq"]) == len(entry_windows(decode_image(data).image))
    policy = load_policy("listed", directory)
    copies = {f"{side}{cut}": _one_edge_copy(data, side, cut) for side, cut in EDGE_CUTS}
    copies |= {f"0.8x+{side}0.05": _one_edge_copy(data, side, 0.05, scale=0.8) for side in ("left", "top")}
    for kind, copy in copies.items():
        hits = image_hits(policy, _hash(copy))
        assert [h.id for h in hits] == [entry["id"]], (photo, kind)
        assert hits[0].list == "block" and hits[0].detail["distance"] <= policy.decisions.image_match_distance
    for name, path in image_paths().items():
        if name != photo:
            assert image_hits(policy, _hash(path.read_bytes())) == [], (photo, name)


def test_before_the_one_edge_windows_a_5_percent_edge_cut_was_missed(listed):
    admin, directory = listed
    data = image_paths()["rocket"].read_bytes()
    im = decode_image(data).image
    centred_only = [pdq_hash(centred_crop(im, keep))[0] for keep in PDQ_ENTRY_CROPS]
    copy = _hash(_one_edge_copy(data, "left", 0.05))
    limit = load_policy("listed", directory).decisions.image_match_distance
    assert min(pdq_distance(copy, h) for h in centred_only) > limit
    admin.add_image("listed", "block", data)
    assert image_hits(load_policy("listed", directory), copy)


def test_entries_written_with_centred_crops_only_keep_matching_beside_new_ones(listed):
    admin, directory = listed
    rocket, coffee = (image_paths()[n].read_bytes() for n in ("rocket", "coffee"))
    im = decode_image(rocket).image
    old = ImageEntry(id="img-old-rocket", list="review", label=None, added=1.0,
                     pdq=[pdq_hash(centred_crop(im, keep))[0] for keep in PDQ_ENTRY_CROPS], quality=100)
    path = lists_path(directory / "listed.yaml")
    path.write_text(json.dumps(PolicyLists(revision=1, images=[old]).model_dump()), encoding="utf-8")
    new = admin.add_image("listed", "block", coffee)
    policy = load_policy("listed", directory)
    assert [len(e.pdq) for e in policy.lists.images] == [len(PDQ_ENTRY_CROPS), len(new["pdq"])]
    w, h = im.size
    crop5 = _jpeg(im.crop((int(w * 0.05), int(h * 0.05), w - int(w * 0.05), h - int(h * 0.05))))
    assert [x.id for x in image_hits(policy, _hash(crop5))] == ["img-old-rocket"]
    assert [x.id for x in image_hits(policy, _hash(_one_edge_copy(coffee, "right", 0.1)))] == [new["id"]]
    admin.remove("listed", "image", new["id"])
    assert image_hits(load_policy("listed", directory), _hash(_one_edge_copy(coffee, "right", 0.1))) == []


def test_the_index_gives_each_entry_its_nearest_stored_hash():
    rng = np.random.default_rng(7)
    entries = [[rng.bytes(32).hex() for _ in range(n)] for n in (1, 4, 36, 2, 12)]
    index = PdqIndex(entries)
    for _ in range(20):
        query = rng.bytes(32).hex()
        assert index.distances(query).tolist() == [min(pdq_distance(query, h) for h in e) for e in entries]
    assert index.distances(entries[2][17]).tolist()[2] == 0
    with pytest.raises(ValueError):
        PdqIndex([["ab"]])
    with pytest.raises(ValueError):
        PdqIndex([[]])


def test_a_copy_cut_on_one_edge_is_blocked_live(triton, client, policy_dir, audit_log):
    derive_policy(policy_dir, "edge_listed", cache={"enabled": False})
    photo = image_paths()["coffee"]
    p = _admin(triton, "lists", "add-image", "--policy", "edge_listed", "--list", "block",
               "--image", str(photo), "--label", "scam")
    assert p.returncode == 0, p.stderr
    entry = json.loads(p.stdout)
    data = photo.read_bytes()
    for kind, copy in {"left5": _one_edge_copy(data, "left", 0.05), "bottom10": _one_edge_copy(data, "bottom", 0.1),
                       "0.8x+right5": _one_edge_copy(data, "right", 0.05, scale=0.8)}.items():
        r = client.moderate(copy, "good morning", policy="edge_listed")
        assert r["action"] == "block" and r["decided_by"] == "image_list", (kind, r["decision"])
        assert r["decision"]["list_hit"]["id"] == entry["id"], kind
    r = client.moderate(image_paths()["chelsea"].read_bytes(), "good morning", policy="edge_listed")
    assert r["decided_by"] != "image_list" and not r["list_hits"]
