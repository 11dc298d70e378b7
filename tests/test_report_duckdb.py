"""clients.report on DuckDB: known answers on a small rotated log written by AuditLog (odd stages, a wrong-typed field
and unparsable lines among the rows), the confidence intervals against published values, generated rows counted
alike with and without a memory limit and against a plain count of the rows, and the real audit log of a running
server."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import uuid
from datetime import UTC, datetime

import pytest

from clients import report
from moderation.core.audit import AuditLog

from .conftest import ROOT

HOUR = 1_789_999_200  # a UTC hour boundary
BASE = HOUR + 1600  # the next boundary is 2000 s after BASE
H0, H1 = (datetime.fromtimestamp(t, tz=UTC).strftime("%Y-%m-%d %H:00") for t in (HOUR, HOUR + 3600))


def _moderate(i: int, ts: float, route: str, action: str, decided_by: str, labels: list[str], total: float,
              decoder: str | None = None, score: float = 0.0) -> dict:
    versions = {"preprocess": "1", "clip_gate": "1", "postprocess": "1"}
    latency = {"preprocess": 5.0, "gate": 2.0, "total": total}
    # "gate:allow": route gate with its band; gate_allow / gate_block: a row written before route named the path
    route, _, band = route.partition(":")
    if route in ("vlm", "cache", "list"):
        band = "escalate" if route != "list" else "allow"
    if decoder:
        versions.update(vlm_preprocess="1", language_decoder=decoder)
        latency["vlm"] = total - 10
    return {"ts": ts, "request_id": f"r{i}", "stage": "moderate", "route": route,
            **({"gate_band": band} if band else {}), "action": action,
            "decided_by": decided_by, "severity": {k: 1 for k in labels}, "violation": action == "block",
            "labels": [{"name": n, "score": 0.9, "source": "vlm" if decoder else "clip_gate"} for n in labels],
            "scores": {"scam": 0.1, **({"violation": score} if decoder else {})},
            "evidence": [["clip", "scam", 0.1, False]], "model_versions": versions, "latency_ms": latency,
            "image_sha256": "a" * 64, "text_sha256": "b" * 64, "error": None,
            **({"ab": {"arm": "b" if decoder == "2" else "a", "decoder_version": decoder}} if decoder else {})}


# (ts offset, route, action, decided_by, labels, total ms, decoder, violation score); two rows of the old routes
POSTS = [(0, "gate_allow", "allow", "policy_default", [], 10.0, None, 0),
         (60, "gate:allow", "review", "clip", ["scam"], 20.0, None, 0),
         (120, "gate_block", "block", "nsfw_image", ["sexual"], 30.0, None, 0),
         (180, "vlm", "block", "vlm", ["scam", "hate"], 40.0, "1", 0.95),
         (2100, "vlm", "allow", "vlm", [], 50.0, "1", 0.15),
         (2200, "vlm", "review", "vlm", ["hate"], 60.0, "2", 0.6),
         (2300, "cache", "review", "vlm", ["hate"], 70.0, "1", 0.6),
         (2400, "list", "block", "image_list", ["scam"], 80.0, None, 0)]


@pytest.fixture
def small_log(tmp_path):
    """The posts above plus failures, rows of other stages and bad lines, through AuditLog with a small rotation
    size: the rows end up in audit.jsonl and several rotated backups."""
    log = tmp_path / "audit.jsonl"
    a = AuditLog(log, max_bytes=1500, backups=30)
    rows = [_moderate(i, BASE + dt, *rest) for i, (dt, *rest) in enumerate(POSTS)]
    rows += [
        {"ts": BASE + 300, "request_id": "f1", "stage": "moderate", "error": {"code": "bad_image", "message": "x"},
         "action": None, "model_versions": {"preprocess": "1"}, "latency_ms": {"total": 1.0}},
        {"ts": BASE + 310, "request_id": "f2", "stage": "preprocess", "model_versions": {"preprocess": "1"},
         "error": {"code": "bad_options", "message": "unknown field"}},
        {"ts": BASE + 320, "request_id": None, "stage": "gateway", "model": "clip_image",
         "inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1, 1], "bytes": 10, "sha256": ["c" * 64]}],
         "grpc_status": "NOT_FOUND", "error": {"code": "model_not_found", "message": "not served here"},
         "latency_ms": {"total": 0.4}},
        # operators' rows: a string error, a numeric latency, an action that is not a post's
        {"ts": BASE + 330, "stage": "admin", "action": "swap", "ok": False, "error": "no version 9", "latency_ms": 5},
        {"ts": BASE + 340, "stage": "watchdog", "action": "reload", "model": "language_decoder", "ok": True},
        {"ts": BASE + 350, "stage": "feedback", "request_id": "r3", "verdict": "violation", "label": "scam"},
        {"ts": BASE + 360, "stage": "audit", "event": "retention_deleted", "file": "audit.jsonl.9", "rows": 42,
         "bytes": 9000, "first_ts": BASE - 900, "last_ts": BASE - 800, "reason": "size"},
        {"ts": BASE + 370, "stage": "audit", "event": "spool_dropped", "dropped": 3, "first_ts": BASE, "last_ts": BASE},
        # a post whose latency field has the wrong type: counted, no latency
        {**_moderate(99, BASE + 2500, "gate:allow", "allow", "policy_default", [], 0.0), "latency_ms": "fast"},
    ]
    for r in rows:
        a.write(r)
    with open(log, "a", encoding="utf-8") as f:
        f.write("not json {\n\n")  # an unparsable line and an empty one
        f.write('{"ts": 1, "stage": "moderate", "route": "vl')  # a truncated last line
    assert len(report.log_files(log)) >= 3
    return log


def test_known_answers_on_a_rotated_log(small_log):
    s = report.summarize_files([small_log], "hour")
    assert s["requests"] == 8 + 1 + 3  # posts, the wrong-typed post, three failures; not the operators' rows
    assert s["succeeded"] == 9 and s["failed"] == 3
    # old rows read as route gate with the band their route named
    assert s["routes"] == {"gate": 4, "vlm": 3, "cache": 1, "list": 1}
    assert s["gate_bands"] == {"allow": 4, "block": 1, "escalate": 4}
    assert s["actions"] == {"allow": 3, "review": 3, "block": 3}
    assert s["decided_by"] == {"policy_default": 2, "clip": 1, "nsfw_image": 1, "vlm": 4, "image_list": 1}
    assert s["action_by_decided_by"]["block"] == {"image_list": 1, "nsfw_image": 1, "vlm": 1}
    assert s["errors"] == {"bad_image": 1, "bad_options": 1, "model_not_found": 1}
    assert s["errors_by_stage"] == {"gateway": {"model_not_found": 1}, "moderate": {"bad_image": 1},
                                    "preprocess": {"bad_options": 1}}
    assert s["labels"] == {"scam": 3, "hate": 3, "sexual": 1}
    assert s["other_stages"] == {"admin": 1, "audit": 2, "feedback": 1, "watchdog": 1}
    assert s["audit_events"] == {"retention_deleted": {"events": 1, "rows": 42},
                                 "spool_dropped": {"events": 1, "rows": 3}}
    assert s["unreadable_lines"] == 2
    assert s["violation_rate"] == pytest.approx(3 / 9)
    # totals 10 … 80 (the wrong-typed post has none): linear interpolation, numpy's default
    assert s["latency_ms"]["p50"] == pytest.approx(45.0) and s["latency_ms"]["p99"] == pytest.approx(79.3)
    assert s["latency_by_stage_ms"]["vlm"]["n"] == 4 and s["latency_by_stage_ms"]["vlm"]["p50"] == pytest.approx(45.0)
    assert s["latency_by_stage_ms"]["preprocess"]["n"] == 8
    # trends: hour 14:00 has the posts at +0 … +300 s, hour 15:00 the rest
    assert s["trends"][H0] == {"route:gate": 3, "route:vlm": 1, "action:allow": 1,
                               "action:review": 1, "action:block": 2, "label:scam": 2, "label:sexual": 1,
                               "label:hate": 1}
    assert s["trends"][H1]["route:vlm"] == 2 and s["trends"][H1]["label:hate"] == 2
    ab = s["ab_by_decoder_version"]
    assert set(ab) == {"1", "2"}  # route vlm only: the cache hit is not an A/B post
    v1 = ab["1"]
    assert v1["posts"] == 2 and v1["violations"] == 1 and v1["violation_rate"] == 0.5
    assert v1["mean_violation_score"] == pytest.approx(0.55) and v1["p50_latency_ms"] == pytest.approx(45.0)
    lo, hi = v1["violation_rate_ci95"]  # Wilson, 1 of 2
    assert lo == pytest.approx(0.0945, abs=1e-4) and hi == pytest.approx(0.9055, abs=1e-4)
    assert v1["arms"] == ["a"] and ab["2"]["arms"] == ["b"]
    assert "2 vs 1" in s["ab_comparison"] and not s["ab_comparison"]["2 vs 1"]["significant"]


def test_confidence_intervals_match_published_values():
    # Newcombe (1998), Statistics in Medicine 17: Wilson score interval of 81/263, and the hybrid score interval
    # (method 10) of 56/70 - 48/80.
    lo, hi = report.wilson(81, 263)
    assert (round(lo, 4), round(hi, 4)) == (0.2553, 0.3662)
    lo, hi = report.newcombe(48, 80, 56, 70)
    assert (round(lo, 4), round(hi, 4)) == (0.0524, 0.3339)
    assert report.wilson(0, 0) is None and report.wilson(0, 10)[0] == 0.0


def test_sql_wilson_equals_python(tmp_path):
    log = tmp_path / "audit.jsonl"
    a = AuditLog(log)
    for i in range(263):
        a.write(_moderate(i, BASE + i, "vlm", "block" if i < 81 else "allow", "vlm", [], 10.0 + i, "1", 0.5))
    ab = report.summarize_files([log])["ab_by_decoder_version"]["1"]
    assert ab["violation_rate_ci95"] == pytest.approx(list(report.wilson(81, 263)), rel=1e-12)


def test_cli_text_json_and_plot(small_log, tmp_path):
    png = tmp_path / "r.png"
    p = subprocess.run([sys.executable, "-m", "clients.report", str(small_log), "--plot", str(png), "--bucket",
                        "minute"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "A/B by language_decoder version" in p.stdout and "unreadable lines 2" in p.stdout
    assert "1 retention_deleted row(s), 42 rows not in this report" in p.stdout
    assert png.stat().st_size > 10_000
    p = subprocess.run([sys.executable, "-m", "clients.report", str(small_log), "--json", "--memory-limit", "256MB",
                        "--threads", "1"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["succeeded"] == 9
    p = subprocess.run([sys.executable, "-m", "clients.report", str(tmp_path / "none.jsonl")], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "does not exist" in p.stderr


def test_only_rotated_backups_and_empty_log(tmp_path):
    log = tmp_path / "audit.jsonl"
    AuditLog(log).write(_moderate(0, BASE, "gate:allow", "allow", "policy_default", [], 12.0))
    log.rename(tmp_path / "audit.jsonl.1")  # rotated; the new file not written yet
    assert report.summarize_files([log])["succeeded"] == 1
    log.write_text("")
    s = report.summarize_files([log])
    assert s["requests"] == 1 and report.log_files(log)[-1] == log
    empty = tmp_path / "empty" / "audit.jsonl"
    empty.parent.mkdir()
    empty.write_text("")
    s = report.summarize_files([empty])
    assert s["requests"] == 0 and s["violation_rate"] is None and math.isnan(s["latency_ms"]["p50"])


def test_generated_rows_agree_under_a_memory_limit_and_with_a_plain_count(tmp_path):
    from moderation.core.audit import read_rows
    from perf.report_bench import LIMITED, compare, write_log

    log = write_log(tmp_path, 4000, files=3, seed=11)
    assert len(report.log_files(log)) == 3
    duck = report.summarize_files([log], "hour")
    limited = report.summarize_files([log], "hour", memory_limit=LIMITED)
    assert compare(duck, limited) == []
    rows = list(read_rows(log))
    operators = {"admin", "feedback", "watchdog", "audit"}
    assert duck["requests"] == sum(r.get("stage") not in operators for r in rows)
    assert duck["succeeded"] > 3500 and len(duck["ab_by_decoder_version"]) >= 2 and len(duck["trends"]) == 24
    assert duck["errors"] and duck["other_stages"]
    assert report.summarize_files([log], "minute")["trends"] != duck["trends"]


def test_report_counts_what_a_running_server_wrote(triton, audit_log):
    from clients.client import ModerationClient, ModerationFailed
    from moderation.testing.samples import sample_posts

    def now() -> dict:
        return report.summarize_files([audit_log]) if report.log_files(audit_log) else report.summary_of_nothing()

    before = now()
    posts = sample_posts()[:3]
    tag = uuid.uuid4().hex[:8]
    with ModerationClient(triton.grpc_url, timeout_s=120) as c:
        for i, p in enumerate(posts[:2]):
            c.moderate(p.image_bytes(), f"{p.text} {tag}", policy="allow_all", request_id=f"rep-{tag}-{i}")
        c.moderate(posts[2].image_bytes(), f"{posts[2].text} {tag}", policy="escalate_all", request_id=f"rep-{tag}-v")
        with pytest.raises(ModerationFailed):
            c.moderate(b"not an image", "x", request_id=f"rep-{tag}-bad")
    after = now()

    def delta(key: str) -> dict:
        return {k: after[key].get(k, 0) - before[key].get(k, 0) for k in after[key]
                if after[key].get(k, 0) != before[key].get(k, 0)}

    assert after["requests"] - before["requests"] == 4
    assert after["succeeded"] - before["succeeded"] == 3
    assert delta("routes") == {"gate": 2, "vlm": 1}
    assert delta("gate_bands") == {"allow": 2, "escalate": 1}
    assert delta("errors") == {"bad_image": 1}
    assert sum(delta("actions").values()) == 3
    ab_after, ab_before = after["ab_by_decoder_version"], before["ab_by_decoder_version"]
    assert sum(a["posts"] for a in ab_after.values()) - sum(a["posts"] for a in ab_before.values()) == 1
    assert after["latency_by_stage_ms"]["vlm"]["n"] - before["latency_by_stage_ms"].get("vlm", {"n": 0})["n"] == 1
    assert after["unreadable_lines"] == 0
