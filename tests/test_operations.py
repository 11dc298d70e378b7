"""Operations against real Triton servers: hot swaps under load with zero failed requests, rollback,
A/B by decoder version, the admin CLI, the audit log surviving a stop, metrics and the report tool."""
from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest

from clients.client import ModerationClient, ModerationFailed
from export.release import release
from moderation.core.audit import AuditLog, read_rows
from moderation.ops.admin import RepositoryAdmin
from moderation.testing.results import write_result
from moderation.testing.samples import sample_posts
from moderation.testing.server import running_server

from .conftest import ADMIN_KEY, REPO, ROOT, write_policy

POSTS = sample_posts()
SWAPS = 20
HANG_GUARD_S = 120.0  # only a server that stopped answering makes a wait this long
_IDS = itertools.count()


@pytest.fixture(scope="module")
def ops(tmp_path_factory, policy_dir):
    """A second server on a copy of the repository with version 2 of language_decoder and clip_gate."""
    root = tmp_path_factory.mktemp("ops")
    repo = root / "model_repository"
    shutil.copytree(REPO, repo, symlinks=True, ignore=shutil.ignore_patterns("__pycache__", ".live_versions.json"))
    release(repo, "language_decoder", note="test v2")
    release(repo, "clip_gate", note="test v2")
    write_policy(policy_dir, "ab_half", allow_below=0.0, block_at=1.01)  # every post escalates ...
    data = (policy_dir / "ab_half.yaml").read_text() + "ab:\n  decoder_version: \"1\"\n  fraction: 0.5\n"
    (policy_dir / "ab_half.yaml").write_text(data)  # ... and half of them meet decoder version 1
    audit = root / "audit.jsonl"
    env = {"MODERATION_POLICY_DIR": str(policy_dir), "MODERATION_AUDIT_LOG": str(audit)}
    with running_server(repository=repo, env=env, log_path=root / "triton.log", key=ADMIN_KEY) as srv:
        srv.repo, srv.audit, srv.sent = repo, audit, []
        srv.admin = RepositoryAdmin(srv.grpc_url, ADMIN_KEY, repo, audit=AuditLog(audit))
        yield srv


def _load(url: str, stop: threading.Event, out: list, policy: str, sent: list):
    with ModerationClient(url, timeout_s=120, retries=0) as c:
        i = 0
        while not stop.is_set():
            p = POSTS[i % len(POSTS)]
            rid = f"load-{next(_IDS)}"  # unique across runs: thread idents are reused
            i += 1
            t = time.perf_counter()
            sent.append(rid)
            try:
                r = c.moderate(p.image_bytes(), p.text, policy=policy, request_id=rid)
                out.append(("ok", time.perf_counter() - t, r["model_versions"]))
            except Exception as e:  # noqa: BLE001 - every failure is counted and reported
                out.append(("fail", time.perf_counter() - t, str(e)))


def _run_load(srv, seconds: float | None, action=None, threads: int = 2) -> list:
    stop, out = threading.Event(), []
    ts = [threading.Thread(target=_load, args=(srv.grpc_url, stop, out, "escalate_all", srv.sent))
          for _ in range(threads)]
    for t in ts:
        t.start()
    try:
        if action:
            action(out)
        else:
            time.sleep(seconds)
    finally:
        stop.set()
        for t in ts:
            t.join()
    return out


def test_swaps_under_load_fail_no_request(ops):
    baseline = _run_load(ops, seconds=8)
    swaps = []

    def do_swaps(out: list):
        for i in range(SWAPS):
            model = ("language_decoder", "clip_gate")[i % 2]
            version = "1" if (i // 2) % 2 == 0 else "2"
            answered = len(out)
            swaps.append(ops.admin.swap(model, version))
            # the next swap waits for a request answered by this version: load meets every version, by order
            hang_guard = time.monotonic() + HANG_GUARD_S
            while not any(o[0] == "ok" and o[2].get(model) == version for o in out[answered:]):
                assert time.monotonic() < hang_guard, f"no request answered by {model} {version}"
                if any(o[0] == "fail" for o in out[answered:]):
                    return  # no more swaps: the failures are counted and reported below
                time.sleep(0.05)

    during = _run_load(ops, seconds=None, action=do_swaps)
    failures = [o for o in during + baseline if o[0] == "fail"]

    def p99(xs) -> float:
        return float(np.percentile([o[1] * 1e3 for o in xs], 99)) if xs else float("nan")

    report = {"swaps": len(swaps), "requests_during_swaps": len(during), "requests_baseline": len(baseline),
              "p99_ms_baseline": p99(baseline), "p99_ms_during_swaps": p99(during),
              "swap_ms_median": float(np.median([s["ms"] for s in swaps])) if swaps else float("nan")}
    report = write_result(ROOT / "build" / "test-results" / "swap_under_load.json", report, runs=1,
                          settings={"swaps_planned": SWAPS, "load_threads": 2, "policy": "escalate_all",
                                    "baseline_s": 8, "models": ["language_decoder", "clip_gate"]},
                          failed=len(failures))
    print("\nswap under load:", {k: v for k, v in report.items() if k != "machine"})
    assert not failures, failures[:3]
    assert len(swaps) == SWAPS
    seen = {(o[2]["clip_gate"], o[2]["language_decoder"]) for o in during}
    assert {v for v, _ in seen} == {"1", "2"} and {v for _, v in seen} == {"1", "2"}, seen


def test_rollback_returns_to_the_previous_version(ops):
    ops.admin.swap("language_decoder", "2")
    ops.admin.swap("language_decoder", "1")
    assert ops.admin.live_versions("language_decoder") == ["1"]
    ops.admin.rollback("language_decoder")
    assert ops.admin.live_versions("language_decoder") == ["2"]
    with ModerationClient(ops.grpc_url) as c:
        r = c.moderate(POSTS[0].image_bytes(), POSTS[0].text, policy="escalate_all")
    assert r["model_versions"]["language_decoder"] == "2"
    state = json.loads((ops.repo / ".live_versions.json").read_text())
    assert state["language_decoder"]["live"] == "2"


def test_ab_split_is_sticky_and_named_in_result_and_audit(ops):
    ops.admin.load("language_decoder", ["1", "2"])  # both arms loaded; the default arm takes the latest (2)
    with ModerationClient(ops.grpc_url) as c:
        first = [c.moderate(p.image_bytes(), p.text, policy="ab_half", request_id=f"ab-{p.name}") for p in POSTS]
        again = [c.moderate(p.image_bytes(), p.text, policy="ab_half") for p in POSTS]
    arms = [r["ab"]["arm"] for r in first]
    assert set(arms) == {"a", "b"}, arms
    for r, r2 in zip(first, again, strict=False):
        assert r["ab"] == r2["ab"]  # sticky by content
        assert r["model_versions"]["language_decoder"] == ("1" if r["ab"]["arm"] == "b" else "2")
    rows = {row["request_id"]: row for row in read_rows(ops.audit) if row.get("request_id", "").startswith("ab-")}
    assert all(rows[r["request_id"]]["ab"] == r["ab"] for r in first)


def test_admin_cli(ops):
    env = dict(os.environ, MODERATION_ADMIN_KEY=ADMIN_KEY, MODERATION_AUDIT_LOG=str(ops.audit))

    def run(*a, **kw):
        return subprocess.run([sys.executable, "-m", "clients.admin", "--url", ops.grpc_url,
                               "--repository", str(ops.repo), *a], capture_output=True, text=True,
                              timeout=300, cwd=ROOT, **kw)

    p = run("status", env=env)
    assert p.returncode == 0 and "language_decoder" in p.stdout and "READY" in p.stdout, p.stderr
    p = run("swap", "--model", "clip_gate", "--version", "1", env=env)
    assert p.returncode == 0 and json.loads(p.stdout)["to"] == "1", p.stderr
    p = run("swap", "--model", "clip_gate", "--version", "9", env=env)
    assert p.returncode == 1 and "no version 9" in p.stderr
    no_key = {k: v for k, v in env.items() if not k.startswith("MODERATION_ADMIN_KEY")}
    assert run("status", env=no_key).returncode == 2
    p = run("status", env=dict(env, MODERATION_ADMIN_KEY="wrong"))
    assert p.returncode == 1 and "restricted" in p.stderr.lower()
    actions = [r for r in read_rows(ops.audit) if r.get("stage") == "admin"]
    swaps = [(a["to_version"], a["ok"]) for a in actions if a["action"] == "swap" and a["model"] == "clip_gate"]
    assert ("1", True) in swaps and ("9", False) in swaps
    refused = [a for a in actions if a["action"] == "swap" and not a["ok"]]
    assert all("error" in a for a in refused)


def test_metrics_move_with_requests(ops):
    def scrape() -> dict[str, float]:
        text = urllib.request.urlopen(ops.metrics_url, timeout=10).read().decode()
        out = {}
        for line in text.splitlines():
            if line.startswith(("moderation_", "nv_inference_request_success")) and " " in line:
                k, v = line.rsplit(" ", 1)
                out[k] = float(v)
        return out

    before = scrape()
    with ModerationClient(ops.grpc_url) as c:
        for p in POSTS[:3]:
            c.moderate(p.image_bytes(), p.text, policy="escalate_all")
        with pytest.raises(ModerationFailed):
            c.moderate(b"not an image", "x")
    after = scrape()

    def delta(prefix: str, *labels: str) -> float:
        def total(d: dict[str, float]) -> float:
            return sum(v for k, v in d.items() if k.startswith(prefix) and all(lab in k for lab in labels))
        return total(after) - total(before)

    # labels print in name order: gate_band, route, violation
    assert delta("moderation_requests_total{", 'route="vlm"', 'gate_band="escalate"') == 3
    assert delta("moderation_escalations_total") == 3
    assert delta('moderation_errors_total{code="bad_image"') >= 1
    assert delta('nv_inference_request_success{model="moderate"') >= 3


def test_report_tool_draws_from_the_real_log(ops, tmp_path):
    png = tmp_path / "report.png"
    p = subprocess.run([sys.executable, "-m", "clients.report", str(ops.audit), "--plot", str(png), "--bucket",
                        "minute"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    assert "A/B by language_decoder version" in p.stdout and png.stat().st_size > 10_000


def test_audit_has_a_row_per_request_after_stop(ops):
    """Every request sent (load threads included, failures included) has its row after the server stops."""
    extra = []
    with ModerationClient(ops.grpc_url, retries=0) as c:
        for i, p in enumerate(POSTS):
            rid = f"final-{i}"
            extra.append(rid)
            c.moderate(p.image_bytes(), p.text, request_id=rid)
        with contextlib.suppress(ModerationFailed):
            c.moderate(b"\x89PNG\r\n\x1a\n garbage", "x", request_id="final-bad")
    extra.append("final-bad")
    ops.stop()
    rows = read_rows(ops.audit)
    ids = [r.get("request_id") for r in rows if r.get("stage") != "admin"]
    for rid in ops.sent + extra:
        assert ids.count(rid) == 1, rid
    bad = next(r for r in rows if r.get("request_id") == "final-bad")
    assert bad["error"]["code"] == "bad_image" and len(bad["image_sha256"]) == 64
    raw = ops.audit.read_text()
    assert all(p.text not in raw for p in POSTS if len(p.text) > 6)  # no raw captions in the log
