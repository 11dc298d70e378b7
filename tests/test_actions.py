"""Actions a platform can act on, against the real server: allow / review / block with who decided, untrained
signals never settling a post, custom image and term lists edited live, per-post results in a request of several
posts, forced escalation, and reviewer feedback driving clients.evaluate's proposed bands."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from clients.client import ModerationClient, build_batch_inputs, parse_results
from moderation.core.audit import read_rows
from moderation.gateway.health import LISTS_SERVICE
from moderation.launch.processes import grpc_health_serving
from moderation.testing.policies import derive_policy
from moderation.testing.samples import image_paths, sample_posts

from .conftest import ADMIN_KEY, ROOT
from .test_server import decoder_count

POSTS = sample_posts()


def _admin(triton, *args, key: str = ADMIN_KEY):
    """clients.admin as an operator runs it on another machine: from an empty working directory, with this machine's
    policy directory and audit log pointing into it. The command keeps no local state: it calls the server, and the
    directory is still empty afterwards."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="operator-") as here:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MODERATION_")}
        env.update(MODERATION_ADMIN_KEY=key, MODERATION_POLICY_DIR=str(Path(here) / "policies"),
                   MODERATION_AUDIT_LOG=str(Path(here) / "audit.jsonl"),
                   PYTHONPATH=os.pathsep.join(x for x in (str(ROOT), env.get("PYTHONPATH", "")) if x))
        p = subprocess.run([sys.executable, "-m", "clients.admin", "--url", triton.grpc_url, *args], env=env,
                           capture_output=True, text=True, timeout=180, cwd=here)
        left = sorted(str(x.relative_to(here)) for x in Path(here).rglob("*"))
        assert not left, f"clients.admin left local state: {left}"
    assert "Traceback" not in p.stderr, p.stderr
    return p


def _copies(data: bytes) -> dict[str, bytes]:
    """A repost's copies: JPEG q50, 0.8x resized, 5 % cropped from every side."""
    im = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = im.size

    def jpeg(x, q):
        buf = io.BytesIO()
        x.save(buf, "JPEG", quality=q)
        return buf.getvalue()

    dx, dy = int(w * 0.05), int(h * 0.05)
    return {"jpeg50": jpeg(im, 50), "resize0.8": jpeg(im.resize((int(w * 0.8), int(h * 0.8))), 90),
            "crop5": jpeg(im.crop((dx, dy, w - dx, h - dy)), 90)}


def test_every_result_has_an_action_and_no_untrained_source_blocks_a_sample_post(client):
    for p in POSTS:
        r = client.moderate(p.image_bytes(), p.text, policy="default")
        assert r["action"] in ("allow", "review", "block") and r["decided_by"], p.name
        assert r["violation"] == (r["action"] == "block")
        assert set(r["severity"]) == {lab["name"] for lab in r["labels"]} | set(r["severity"])
        if r["decided_by"] in r["signals"]:
            trained = r["signals"][r["decided_by"]] == "trained"
            assert trained or r["action"] == "review", (p.name, r["action"], r["decided_by"], r["decision"])
        else:
            assert r["decided_by"] in ("policy_default", "image_list", "terms"), r["decided_by"]
        # the sample posts are benign photos: nothing trained flags them, so nothing is blocked
        assert r["action"] != "block", (p.name, r["decision"])


def test_an_untrained_gate_block_band_goes_to_review(client):
    r = client.moderate(POSTS[0].image_bytes(), POSTS[0].text, policy="block_all")
    # the route names the path (settled at the gate) and the band what the gate's thresholds said, not a block
    assert (r["route"], r["gate"]["band"]) == ("gate", "block") and r["signals"]["clip"] == "untrained"
    assert r["action"] == "review" and r["decided_by"] == "clip" and r["violation"] is False


def test_image_list_blocks_live_with_its_copies_and_not_other_photos(triton, client, policy_dir, audit_log):
    derive_policy(policy_dir, "listed", cache={"enabled": False})
    rocket = image_paths()["rocket"].read_bytes()
    p = _admin(triton, "lists", "add-image", "--policy", "listed", "--list", "block",
               "--image", str(image_paths()["rocket"]), "--label", "scam")
    assert p.returncode == 0, p.stderr
    entry = json.loads(p.stdout)
    for kind, data in {"original": rocket, **_copies(rocket)}.items():
        r = client.moderate(data, "Launch day!", policy="listed")
        assert r["action"] == "block" and r["decided_by"] == "image_list", (kind, r["decision"])
        assert r["decision"]["list_hit"]["id"] == entry["id"] and r["policy"].endswith("+lists.1"), kind
        assert r["severity"]["scam"] == 3
    for name, path in image_paths().items():
        if name != "rocket":
            r = client.moderate(path.read_bytes(), "Launch day!", policy="listed")
            assert r["decided_by"] != "image_list" and not r["list_hits"], name
    p = _admin(triton, "lists", "remove-image", "--policy", "listed", "--id", entry["id"])
    assert p.returncode == 0, p.stderr
    r = client.moderate(rocket, "Launch day!", policy="listed")
    assert r["decided_by"] != "image_list" and r["policy"].endswith("+lists.2")
    rows = [r for r in read_rows(audit_log) if (r.get("action") or "").startswith("lists.")]  # a failed post: null
    assert [(r["action"], r["ok"]) for r in rows][-2:] == [("lists.add-image", True), ("lists.remove-image", True)]
    wrong = _admin(triton, "lists", "show", "--policy", "listed")
    assert wrong.returncode == 0 and json.loads(wrong.stdout)["revision"] == 2


def test_term_lists_block_and_review_in_the_caption(triton, client, policy_dir, audit_log):
    derive_policy(policy_dir, "termed", cache={"enabled": False})
    for args in (("--list", "block", "--term", "Click the LINK in bio", "--label", "scam"),
                 ("--list", "review", "--term", "内部消息")):
        p = _admin(triton, "lists", "add-term", "--policy", "termed", *args)
        assert p.returncode == 0, p.stderr
    hubble = next(p for p in POSTS if p.name == "hubble_scam")
    coins = next(p for p in POSTS if p.name == "coins_scam_zh")
    r = client.moderate(hubble.image_bytes(), hubble.text, policy="termed")
    assert r["action"] == "block" and r["decided_by"] == "terms" and r["route"] == "list"
    assert r["list_hits"][0]["field"] == "caption" and r["list_hits"][0]["label"] == "scam"
    r = client.moderate(coins.image_bytes(), coins.text, policy="termed")
    assert r["action"] == "review" and r["decided_by"] == "terms"
    r = client.moderate(POSTS[1].image_bytes(), POSTS[1].text, policy="termed")
    assert not r["list_hits"]
    bad = _admin(triton, "lists", "add-term", "--policy", "termed", "--list", "block",
                 "--term", "x", "--label", "no_such_label")
    assert bad.returncode == 1 and "no_such_label" in bad.stderr
    assert "[bad_list_entry]" in bad.stderr
    refused = _admin(triton, "lists", "add-term", "--policy", "termed", "--list", "block", "--term", "y",
                     key="wrong-key")
    assert refused.returncode == 1 and "[unauthorized]" in refused.stderr, refused.stderr
    row = [r for r in read_rows(audit_log) if r.get("stage") == "admin"][-1]
    assert row["action"] == "lists.add-term" and row["ok"] is False and row["error"]["code"] == "unauthorized"


def _package_state() -> tuple[str, dict[str, str]]:
    """The package's policy folder as git and the disk see it: where a local edit would have landed."""
    from moderation.core.hashing import sha256_hex
    from moderation.core.policy import PACKAGE_POLICY_DIR

    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all", "--", str(PACKAGE_POLICY_DIR)],
                            capture_output=True, text=True, cwd=ROOT, check=True).stdout
    return status, {f.name: sha256_hex(f.read_bytes()) for f in sorted(PACKAGE_POLICY_DIR.iterdir())}


def test_operator_actions_go_through_the_service_from_another_directory(triton, client, policy_dir, audit_log):
    """clients.admin run elsewhere (an empty working directory whose own policy dir and audit log it never touches):
    the server applies the edits to the lists it reads and writes every row into its own audit log; a wrong key and
    malformed calls are refused with a code and audited; the package's source tree stays as it was."""
    from clients.admin import ServiceAdmin, ServiceError

    before = _package_state()
    derive_policy(policy_dir, "remote", cache={"enabled": False})
    hubble = next(p for p in POSTS if p.name == "hubble_scam")
    rocket = image_paths()["rocket"]
    term = _admin(triton, "lists", "add-term", "--policy", "remote", "--list", "block", "--term", "10k followers",
                  "--label", "scam")
    assert term.returncode == 0, term.stderr
    image = _admin(triton, "lists", "add-image", "--policy", "remote", "--list", "review", "--image", str(rocket),
                   "--label", "scam", "--note", "sent as bytes")
    assert image.returncode == 0, image.stderr
    entry = json.loads(image.stdout)
    assert entry["id"].startswith("img-") and len(entry["pdq"]) > 1  # the server hashed the image and its crops
    # where the server keeps its lists (its state directory), not where the CLI ran and never beside the policy
    assert _server_lists_file(triton, policy_dir, "remote").exists()
    assert not (policy_dir / "remote.lists.json").exists()
    r = client.moderate(hubble.image_bytes(), hubble.text, policy="remote")
    assert r["action"] == "block" and r["decided_by"] == "terms" and r["policy"].endswith("+lists.2"), r["decision"]
    r = client.moderate(rocket.read_bytes(), "Launch day!", policy="remote")
    assert r["action"] == "review" and r["decided_by"] == "image_list", r["decision"]
    assert r["decision"]["list_hit"]["id"] == entry["id"]
    rows = [x for x in read_rows(audit_log) if x.get("stage") == "admin" and x.get("policy") == "remote"]
    assert [(x["action"], x["ok"], x["via"]) for x in rows] == [("lists.add-term", True, "gateway"),
                                                               ("lists.add-image", True, "gateway")]
    assert rows[1]["image_sha256"] and "term" not in rows[0] and rows[0]["term_sha256"]  # hashes, never content

    rid = f"remote-{uuid.uuid4().hex[:8]}"
    fb = _admin(triton, "feedback", rid, "--verdict", "violation", "--label", "scam", "--reviewer", "r7")
    assert fb.returncode == 0, fb.stderr
    row = [x for x in read_rows(audit_log) if x.get("request_id") == rid][-1]
    assert {k: v for k, v in row.items() if k != "ts"} == json.loads(fb.stdout) == {
        "stage": "feedback", "request_id": rid, "verdict": "violation", "label": "scam", "reviewer": "r7"}
    wrong = _admin(triton, "feedback", rid, "--verdict", "ok", key="not-the-key")
    assert wrong.returncode == 1 and wrong.stderr.startswith("error: [unauthorized]"), wrong.stderr
    assert [x["verdict"] for x in read_rows(audit_log) if x.get("request_id") == rid] == ["violation"]
    refusal = [x for x in read_rows(audit_log) if x.get("stage") == "admin"][-1]
    assert refusal["action"] == "feedback" and refusal["error"]["code"] == "unauthorized" and not refusal["ok"]

    # malformed or refused calls: coded, audited, nothing applied
    with ServiceAdmin(triton.grpc_url, ADMIN_KEY) as service:
        cases = {"bad_request": {"action": "add-image", "policy": "remote", "list": "block", "image_b64": "%%"},
                 "unknown_policy": {"action": "add-term", "policy": "no_such_policy", "list": "block", "term": "x"},
                 "bad_image": {"action": "add-image", "policy": "remote", "list": "block", "image_b64": "bm90IGFu"},
                 "bad_list_entry": {"action": "remove-term", "policy": "remote", "id": "term-000000000000"}}
        for code, request in cases.items():
            with pytest.raises(ServiceError) as e:
                service.call("/moderation.Admin/Lists", request)
            assert e.value.code == code, (code, e.value)
            last = [x for x in read_rows(audit_log) if x.get("stage") == "admin"][-1]
            assert last["ok"] is False and last["error"]["code"] == code, (code, last)
        assert service.show("remote")["revision"] == 2
    assert _package_state() == before


def test_a_batch_of_eight_with_one_broken_image_returns_seven_judged_rows_and_one_error(triton, audit_log):
    rid = uuid.uuid4().hex[:8]
    posts = [(p.image_bytes(), p.text, {"request_id": f"{rid}-{i}", "policy": "escalate_all" if i % 2 else "default"})
             for i, p in enumerate(POSTS[:8])]
    posts[3] = (b"\x89PNG\r\n\x1a\nbroken", "broken", {"request_id": f"{rid}-3"})
    c = grpcclient.InferenceServerClient(triton.grpc_url)
    inputs, outputs = build_batch_inputs(grpcclient, posts)
    resp = c.infer("moderate", inputs, outputs=outputs, client_timeout=120)
    results = parse_results(resp)
    assert [r["request_id"] for r in results] == [f"{rid}-{i}" for i in range(8)]
    assert results[3]["error"]["code"] == "bad_image" and results[3]["action"] is None
    assert all(r["error"] is None and r["action"] for i, r in enumerate(results) if i != 3)
    assert resp.as_numpy("VERDICT").reshape(-1).tolist()[3] == -1
    rows = [r for r in read_rows(audit_log) if str(r.get("request_id", "")).startswith(rid)]
    assert sorted(r["request_id"] for r in rows) == sorted(f"{rid}-{i}" for i in range(8))
    assert next(r for r in rows if r["request_id"] == f"{rid}-3")["error"]["code"] == "bad_image"
    with ModerationClient(triton.grpc_url, timeout_s=120) as mc:  # the library exposes both shapes
        rows = mc.moderate_batch([(p[0], p[1], p[2]) for p in posts[:3]])
        assert len(rows) == 3 and all(r["action"] for r in rows)


def test_a_request_whose_rows_do_not_line_up_still_fails_whole(triton):
    c = grpcclient.InferenceServerClient(triton.grpc_url)
    inputs, outputs = build_batch_inputs(grpcclient, [(POSTS[0].image_bytes(), "a", None)] * 2)
    text = grpcclient.InferInput("TEXT", [1, 1], "BYTES")
    text.set_data_from_numpy(np.array([[b"only one"]], dtype=np.object_))
    with pytest.raises(InferenceServerException) as e:  # Triton refuses it; the gateway audits it
        c.infer("moderate", [inputs[0], text], outputs=outputs, client_timeout=60)
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT" and "batch size does not match" in e.value.message()


def test_forced_escalation_reaches_the_decoder(triton, client):
    p = POSTS[2]
    allowed = client.moderate(p.image_bytes(), p.text, policy="allow_all")
    assert (allowed["route"], allowed["gate"]["band"], allowed["escalated"]) == ("gate", "allow", None)
    before = decoder_count(triton)
    r = client.moderate(p.image_bytes(), p.text, policy="allow_all", escalate=True)
    assert r["route"] == "vlm" and r["escalated"] == "forced" and "forced" in r["gate"]["reason"]
    assert r["gate"]["band"] == "allow"  # the gate's own band stays evidence when an escalation is forced
    assert decoder_count(triton) == before + 1


def test_reviewer_feedback_drives_evaluate_and_its_proposed_bands_reach_the_recall(triton, client, policy_dir,
                                                                                  audit_log, tmp_path):
    import yaml

    rid = uuid.uuid4().hex[:8]
    truth = {"hubble_scam": "scam", "coins_scam_zh": "scam", "hopper_attack": "hate", "flower_threat": "violence"}
    for p in POSTS:
        client.moderate(p.image_bytes(), p.text, policy="default", request_id=f"{rid}-{p.name}")
        verdict = ["--verdict", "violation", "--label", truth[p.name]] if p.name in truth else ["--verdict", "ok"]
        fb = _admin(triton, "feedback", f"{rid}-{p.name}", *verdict)
        assert fb.returncode == 0, fb.stderr
    rows = [r for r in read_rows(audit_log) if r.get("stage") == "feedback" and r["request_id"].startswith(rid)]
    assert len(rows) == len(POSTS) and all(set(r) <= {"ts", "stage", "request_id", "verdict", "label"} for r in rows)
    out = tmp_path / "eval.json"
    proposed = tmp_path / "calibrated.yaml"
    p = subprocess.run([sys.executable, "-m", "clients.evaluate", "--audit", str(audit_log), "--target-recall", "1.0",
                        "--policy", "default", "--policy-dir", str(policy_dir), "--write-policy", str(proposed),
                        "--json", str(out)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    report = json.loads(out.read_text())
    assert report["per_action"] and report["per_decided_by"] and report["overall"]["positives"] >= len(truth)
    bands = report["proposed_bands"]
    assert set(bands) == set(truth.values()) and all(b["recall"] == 1.0 for b in bands.values())
    assert "+  labels:" in report["policy_diff"] or "labels:" in report["policy_diff"]
    data = yaml.safe_load(proposed.read_text())
    data["name"] = "calibrated"
    (policy_dir / "calibrated.yaml").write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False))
    for name in truth:
        post = next(p for p in POSTS if p.name == name)
        r = client.moderate(post.image_bytes(), post.text, policy="calibrated")
        assert r["action"] in ("review", "block"), (name, r["decision"])


def _lists_stale(triton, policy: str) -> float | None:
    import urllib.request

    text = urllib.request.urlopen(triton.metrics_url, timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith("moderation_lists_stale{") and f'policy="{policy}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return None


def test_a_corrupt_lists_file_leaves_the_last_good_lists_in_force(triton, client, policy_dir, audit_log):
    derive_policy(policy_dir, "lists_lkg", cache={"enabled": False})
    p = _admin(triton, "lists", "add-term", "--policy", "lists_lkg", "--list", "block",
               "--term", "click the link in bio", "--label", "scam")
    assert p.returncode == 0, p.stderr
    hubble = next(p for p in POSTS if p.name == "hubble_scam")
    r = client.moderate(hubble.image_bytes(), hubble.text, policy="lists_lkg")
    assert r["action"] == "block" and r["decided_by"] == "terms" and _lists_stale(triton, "lists_lkg") == 0.0
    lists = _server_lists_file(triton, policy_dir, "lists_lkg")
    good = lists.read_bytes()
    for broken in (good[: len(good) // 2], b'{"revision": "not a number"}'):  # cut short; parses, wrong schema
        lists.write_bytes(broken)
        r = client.moderate(hubble.image_bytes(), hubble.text, policy="lists_lkg")
        assert r["error"] is None and r["action"] == "block" and r["decided_by"] == "terms", r
        assert r["policy"].endswith("+lists.1") and _lists_stale(triton, "lists_lkg") == 1.0
    # readiness detail: the gateway's `moderation.lists` health service says so; the service itself stays SERVING
    assert _lists_health(triton, serving=False) and grpc_health_serving(triton.grpc_url)
    lists.write_bytes(good.replace(b'"revision": 1', b'"revision": 2'))
    r = client.moderate(hubble.image_bytes(), hubble.text, policy="lists_lkg")
    assert r["policy"].endswith("+lists.2") and _lists_stale(triton, "lists_lkg") == 0.0
    assert _lists_health(triton, serving=True)


def _server_lists_file(triton, policy_dir: Path, policy: str) -> Path:
    """The file a server without Redis keeps a policy's lists in: under its state directory."""
    from moderation.core.list_store import FileListStore

    saved = os.environ.get("MODERATION_STATE_DIR")
    os.environ["MODERATION_STATE_DIR"] = triton.config.env()["MODERATION_STATE_DIR"]
    try:
        return FileListStore(policy_dir).path(policy)
    finally:
        if saved is None:
            os.environ.pop("MODERATION_STATE_DIR")
        else:
            os.environ["MODERATION_STATE_DIR"] = saved


def _lists_health(triton, serving: bool) -> bool:
    """Wait (hang guard 60 s: the gateway probes every 0.5 s) until `moderation.lists` reports `serving`."""
    import time

    hang_guard = time.monotonic() + 60
    while grpc_health_serving(triton.grpc_url, LISTS_SERVICE) != serving:
        assert time.monotonic() < hang_guard, f"moderation.lists never turned {'SERVING' if serving else 'NOT'}"
        time.sleep(0.2)
    return True
