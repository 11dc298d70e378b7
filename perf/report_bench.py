"""The audit report at scale: the DuckDB report (clients/report.py) on a generated day of audit rows, with no memory
limit and under a 256 MB one. Writes perf/results/report_bench.json. (The earlier comparison against the report that
read every row into Python, a baseline since deleted, is perf/results/report_duckdb.json at commit 2ca6295.)

    .venv/bin/python -m perf report_bench [--rows 1000000] [--runs 3] [--files 5]

The log: one day (24 h, UTC) of rows in the real shape: every moderate row is built by moderation/core/result.py's
finish_post from contracts (route gate with band allow or block / vlm on two decoder versions (A/B arms) / cache
hits / list hits / INT8 fallback / failed posts), plus preprocess error rows (serving/triton_io.py's shape), gateway
refusals and a few admin / watchdog / feedback rows, with a daily traffic curve and an evening scam wave, split over
the rotated files audit.jsonl.N … audit.jsonl.1, audit.jsonl (oldest first). It is written once per (rows, files,
seed) under build/perf/report_bench/ and reused.

Each run starts each arm in its own process (duckdb, and duckdb under a 256 MB memory limit; the order reversed every
other run); wall time is the whole process (interpreter, imports, reading, counting), peak memory is the child's
ru_maxrss from wait4, and the 1-minute load average before each start is kept (the machine is shared). Every child
writes its summary; the limited arm's aggregates must agree with the unlimited one's (counts exactly, rates and
percentiles to 1e-9) or the benchmark fails.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from perf.common import BUILD, RESULTS, ROOT, dump_json, git_commit, machine

DAY_START = int(datetime(2026, 11, 2, tzinfo=UTC).timestamp())
LABELS = ("violence", "gore", "hate", "sexual", "self_harm", "drugs", "scam", "mismatch", "sarcasm")
# share of rows per kind (the rest of the moderate successes are gate_allow)
MIX = {"gate_block": 0.07, "vlm": 0.18, "cache": 0.05, "list": 0.02, "failed_post": 0.008,
       "preprocess_error": 0.008, "gateway": 0.012, "operator": 0.0005}
DECODER_B_SHARE = 0.2     # A/B: arm b pins decoder version 2 on a fifth of the escalations
FALLBACK_SHARE = 0.03     # escalations sent to the INT8 decoder at peak
TEMPLATES_PER_KIND = 60
LIMITED = "256MB"  # the second arm: the DuckDB report under --memory-limit (the loaded columns spill to disk)
IMPLS = ("duckdb", "duckdb_limited")


def _hex(rng: random.Random) -> str:
    return f"{rng.getrandbits(256):064x}"


def _gate_scores(rng: random.Random, hot: str | None, high: float) -> dict[str, float]:
    scores = {k: rng.betavariate(1.2, 12) for k in LABELS}
    if hot:
        scores[hot] = rng.uniform(high, 0.995)
    return scores


def _templates(seed: int) -> dict[str, list[tuple[str | None, dict]]]:
    """Audit rows built by finish_post, per kind, each tagged with its strongest label (None: a clean post)."""
    from moderation.core.contracts import PostError, VlmVerdict
    from moderation.core.result import finish_post
    from moderation.testing.records import gate_decision, request_record

    rng = random.Random(seed)
    signals = {"clip": "untrained", "nsfw_image": "trained", "profanity": "trained"}
    sources = {"sexual": "nsfw_image", "hate": "profanity"}

    def one(route: str, hot: str | None, version: str = "1", fallback: bool = False, list_kind: str = "",
            error: str = "") -> dict:
        now = DAY_START + 0.0
        pre_ms, enc_ms, gate_ms = rng.uniform(25, 60), rng.uniform(15, 35), rng.uniform(6, 14)
        record = request_record(
            request_id="t", policy_id="default@2026.11.4", policy_name="default", lang=rng.choice(("en", "zh")),
            image_sha256="a" * 64, text_sha256="b" * 64, image_format=rng.choice(("JPEG", "PNG", "WEBP")),
            image_size=(rng.choice((640, 1080, 1280)), rng.choice((480, 720, 1024))),
            caption_truncated=rng.random() < 0.03, preprocess_ms=pre_ms,
            image_text=[{"text": "x", "confidence": 0.9, "box": [[0, 0], [1, 0], [1, 1], [0, 1]]}]
            if rng.random() < 0.3 else [],
            list_hits=[{"kind": list_kind, "list": "block" if hot else "allow", "id": f"e{rng.randrange(40)}",
                        "label": hot, "field": "image" if list_kind == "image" else "caption",
                        **({"distance": rng.randrange(32)} if list_kind == "image"
                           else {"span": [0, 6], "variant": "homophone"})}] if list_kind else [],
            error=PostError(code=error, message=f"{error}: synthetic") if error else None,
            received_at=now, preprocessed_at=now + pre_ms / 1e3)
        vlm = vlm_ms = cache = arm = fb = None
        # the kinds gate_allow / gate_block are the gate's path with that band
        gate_route, band = {"gate_allow": ("gate", "allow"), "gate_block": ("gate", "block"),
                            "list": ("list", "block" if hot else "allow")}.get(route, (route, "escalate"))
        if route in ("vlm", "cache"):
            labels = {k: rng.betavariate(1.1, 9) for k in LABELS}
            if hot:
                labels[hot] = rng.uniform(0.5, 0.95 if version == "2" else 0.99)  # version 2 blocks less
            name = "language_decoder_int8" if fallback else "language_decoder"
            timings = {"prefix": rng.uniform(0.2, 2), "prefill": rng.uniform(150, 260) * (1.12 if version == "2"
                                                                                           else 1.0),
                       "describe": 0.0, "questions": rng.uniform(40, 80)}
            vlm = VlmVerdict(violation=max(labels.values()) if hot else rng.uniform(0.01, 0.3), labels=labels,
                             sentiment={"positive": 0.3, "neutral": 0.5, "negative": 0.2}, description=None,
                             untrained=False, caption_truncated=False, timings_ms={} if route == "cache" else timings,
                             model_versions={"vlm_preprocess": "1", name: version,
                                             f"{name}_device": "cpu:float32" + ("+int8_dynamic" if fallback else "")})
            if route == "vlm":
                vlm_ms = sum(timings.values()) + rng.uniform(20, 60)
                arm = "b" if version == "2" else "a"
            else:
                cache = {"hit": True, "similarity": round(rng.uniform(0.96, 1.0), 6), "source_route": "vlm",
                         "age_s": round(rng.uniform(1, 3000), 3), "lookup_ms": round(rng.uniform(0.05, 0.6), 3)}
            if fallback:
                fb = {"model": name, "reason": "inflight", "inflight": 24, "oldest_wait_ms": 310.0}
        gate = gate_decision(
            route=None if error else gate_route, band=None if error else band, reason=f"synthetic {route}",
            signals=signals, sources=sources,
            consistency=rng.uniform(0.1, 0.4),
            scores=_gate_scores(rng, hot if route in ("gate_block", "list", "gate_allow") else None,
                                {"gate_allow": 0.5, "gate_block": 0.97}.get(route, 0.6)),
            gate_version="1", gate_started=now + (pre_ms + enc_ms) / 1e3, gate_ms=gate_ms, vlm=vlm, vlm_ms=vlm_ms,
            ab_arm=arm, fallback=fb, cache=cache, escalated="gate" if route == "vlm" else None)
        total = pre_ms + enc_ms + gate_ms + (vlm_ms or 0.0) + rng.uniform(1, 4)
        return finish_post(record, gate, "1", now=now + total / 1e3).audit_row

    def hot_of(p: float) -> str | None:
        return rng.choice(LABELS) if rng.random() < p else None

    out: dict[str, list[tuple[str | None, dict]]] = {}
    # gate_allow: mostly clean; some with an untrained clip score in its review band (sent to review by clip)
    out["gate_allow"] = [(h, one("gate_allow", h)) for h in (hot_of(0.15) for _ in range(TEMPLATES_PER_KIND))]
    out["gate_block"] = [(h, one("gate_block", h)) for h in (rng.choice(LABELS) for _ in range(TEMPLATES_PER_KIND))]
    for version, p in (("1", 0.45), ("2", 0.38)):  # version 2 flags a little less often
        out[f"vlm{version}"] = [(h, one("vlm", h, version)) for h in (hot_of(p) for _ in range(TEMPLATES_PER_KIND))]
    out["vlm_int8"] = [(h, one("vlm", h, "1", fallback=True)) for h in (hot_of(0.45) for _ in range(20))]
    out["cache"] = [(h, one("cache", h)) for h in (hot_of(0.5) for _ in range(TEMPLATES_PER_KIND))]
    out["list"] = [(h, one("list", h, list_kind=rng.choice(("image", "term"))))
                   for h in (hot_of(0.8) for _ in range(30))]
    out["failed_post"] = [(None, one("gate_allow", None, error=c))
                          for c in ("bad_image", "image_too_large", "text_too_long", "overloaded") for _ in range(3)]
    # the evening scam wave draws from scam-flagged templates of each kind
    for kind, route, version in (("gate_block", "gate_block", "1"), ("vlm1", "vlm", "1"), ("vlm2", "vlm", "2"),
                                 ("cache", "cache", "1")):
        out[f"{kind}_scam"] = [("scam", one(route, "scam", version)) for _ in range(10)]
    return out


def _gateway_row(rng: random.Random, ts: float) -> dict:
    code, status, msg = rng.choice([
        ("model_not_found", "NOT_FOUND", "model 'clip_image' is not served here; this port serves moderate"),
        ("request_too_large", "RESOURCE_EXHAUSTED", "no request message arrived: over the 168984576-byte limit"),
        ("bad_request", "INVALID_ARGUMENT", "the message is not an inference request"),
        ("unavailable", "UNAVAILABLE", "failed to connect to all addresses"),
        ("deadline_exceeded", "DEADLINE_EXCEEDED", "Deadline Exceeded")])
    row = {"ts": ts, "request_id": f"g-{rng.getrandbits(40):010x}" if code != "bad_request" else None,
           "stage": "gateway", "model": "moderate" if code in ("unavailable", "deadline_exceeded") else None}
    if code in ("model_not_found", "unavailable", "deadline_exceeded"):
        img, txt = _hex(rng), _hex(rng)
        row.update(model_version=None, triton_request_id=None, inputs=[
            {"name": "IMAGE", "datatype": "BYTES", "shape": [1, 1], "bytes": rng.randrange(20_000, 400_000),
             "sha256": [img]},
            {"name": "TEXT", "datatype": "BYTES", "shape": [1, 1], "bytes": rng.randrange(5, 300), "sha256": [txt]}],
            image_sha256=img, text_sha256=txt)
    row.update(grpc_status=status, error={"code": code, "message": msg},
               latency_ms={"total": round(rng.uniform(0.1, 3.0) if code != "deadline_exceeded" else 30000.0, 3)})
    return row


def _preprocess_error_row(rng: random.Random, ts: float) -> dict:
    code = rng.choice(("bad_image", "bad_image", "unsupported_image", "bad_options", "unknown_policy", "bad_text"))
    return {"ts": ts, "request_id": f"r-{rng.getrandbits(48):012x}", "stage": "preprocess",
            "model_versions": {"preprocess": "1"}, "error": {"code": code, "message": f"{code}: synthetic"},
            "image_sha256": _hex(rng), "text_sha256": _hex(rng),
            "latency_ms": {"total": round(rng.uniform(0.3, 8.0), 3)}}


def _operator_row(rng: random.Random, ts: float) -> dict:
    kind = rng.choice(("admin", "watchdog", "feedback"))
    if kind == "admin":
        return {"ts": ts, "stage": "admin", "action": "swap", "model": "language_decoder", "from_version": "1",
                "to_version": "2", "ok": True, "ms": round(rng.uniform(800, 3000), 1)}
    if kind == "watchdog":
        return {"ts": ts, "stage": "watchdog", "action": "reload", "model": "language_decoder", "instance":
                "language_decoder_0_0", "dead_pid": rng.randrange(1000, 60000), "detected": ts, "ok": True,
                "reload_ms": round(rng.uniform(1000, 5000), 1)}
    return {"ts": ts, "stage": "feedback", "request_id": f"r-{rng.getrandbits(48):012x}",
            "verdict": rng.choice(("violation", "ok")), "label": rng.choice(LABELS), "reviewer": "rev-7"}


def _traffic_ts(rng: random.Random, n: int) -> list[float]:
    """n times over the day, denser in the afternoon and evening (UTC), sorted."""
    out = []
    while len(out) < n:
        t = rng.random() * 86400
        if rng.random() < 0.55 + 0.45 * math.sin((t / 86400 - 0.3) * 2 * math.pi):  # peak near 13:00
            out.append(DAY_START + round(t, 6))
    out.sort()
    return out


def generate(n: int, seed: int = 7):
    """n audit rows (dicts, oldest first): the synthetic day."""
    rng = random.Random(seed)
    tpl = _templates(seed)
    kinds = list(MIX) + ["gate_allow"]
    weights = list(MIX.values()) + [1 - sum(MIX.values())]
    for i, ts in enumerate(_traffic_ts(rng, n)):
        kind = rng.choices(kinds, weights)[0]
        if kind == "gateway":
            yield _gateway_row(rng, ts)
            continue
        if kind == "preprocess_error":
            yield _preprocess_error_row(rng, ts)
            continue
        if kind == "operator":
            yield _operator_row(rng, ts)
            continue
        if kind == "vlm":
            r = rng.random()
            kind = "vlm_int8" if r < FALLBACK_SHARE else "vlm2" if r < FALLBACK_SHARE + DECODER_B_SHARE else "vlm1"
        hour = int((ts - DAY_START) // 3600)
        if 19 <= hour <= 23 and f"{kind}_scam" in tpl and rng.random() < 0.25:
            kind = f"{kind}_scam"
        _, t = rng.choice(tpl[kind])
        f = rng.lognormvariate(0, 0.35)
        row = {"ts": ts, **t, "request_id": f"r-{i:08d}-{rng.getrandbits(24):06x}",
               "latency_ms": {k: round(v * f, 3) for k, v in t["latency_ms"].items()}}
        row["image_sha256"], row["text_sha256"] = _hex(rng), _hex(rng)
        yield row


def write_log(directory: Path, n: int, files: int = 5, seed: int = 7) -> Path:
    """The synthetic day as a rotated audit log in `directory` (audit.jsonl.<files-1> oldest … audit.jsonl newest);
    returns the path of audit.jsonl. AuditLog.write's line format (compact JSON, one row a line)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "audit.jsonl"
    names = [directory / f"audit.jsonl.{i}" for i in range(files - 1, 0, -1)] + [path]
    per = math.ceil(n / files)
    outs = [open(p, "w", encoding="utf-8") for p in names]  # noqa: SIM115 - closed below
    try:
        for i, row in enumerate(generate(n, seed)):
            outs[i // per].write(json.dumps(row, ensure_ascii=True, separators=(",", ":")) + "\n")
    finally:
        for f in outs:
            f.close()
    return path


def cached_log(n: int, files: int, seed: int) -> Path:
    d = BUILD / "report_bench" / f"{n}-{files}-{seed}"
    stamp = d / "done.json"
    if not stamp.exists():
        t0 = time.perf_counter()
        write_log(d, n, files, seed)
        stamp.write_text(json.dumps({"rows": n, "files": files, "seed": seed,
                                     "seconds": round(time.perf_counter() - t0, 1)}))
    return d / "audit.jsonl"


# --- the measured children --------------------------------------------------------------------------------------
def _child(impl: str, log: Path, out: Path) -> None:
    from clients.report import summarize_files

    t0 = time.perf_counter()
    s = summarize_files([log], "hour", memory_limit=LIMITED if impl == "duckdb_limited" else None)
    s["_seconds_in_process"] = time.perf_counter() - t0
    out.write_text(json.dumps(s, default=str))


def measure(impl: str, log: Path, out: Path) -> dict:
    """One child process: wall seconds, peak RSS (MB) from wait4, and its summary."""
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "perf", "report_bench", "--child", impl, "--log", str(log),
                          "--out", str(out)], cwd=ROOT)
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise SystemExit(f"{impl} child failed with {p.returncode}")
    s = json.loads(out.read_text())
    return {"seconds": round(wall, 3), "seconds_in_process": round(s.pop("_seconds_in_process"), 3),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "load_average_1m_before": round(load, 2), "summary": s}


def _close(a, b, tol=1e-9) -> bool:
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):  # an interval: its ends, each to tol
        return len(a) == len(b) and all(_close(x, y, tol) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) or isinstance(b, float):
        if a is None or b is None:
            return a is b
        if math.isnan(a) and math.isnan(b):
            return True
        return math.isclose(a, b, rel_tol=tol, abs_tol=1e-12)
    return a == b


def compare(first: dict, second: dict) -> list[str]:
    """Differences between two report summaries on the aggregates every report has."""
    diffs = []
    for key in ("requests", "succeeded", "failed", "routes", "actions", "decided_by", "errors", "labels", "trends"):
        if first[key] != second[key]:
            diffs.append(key)
    if not _close(first["violation_rate"], second["violation_rate"]):
        diffs.append("violation_rate")
    for q in ("p50", "p99"):
        if not _close(first["latency_ms"][q], second["latency_ms"][q]):
            diffs.append(f"latency_ms.{q}")
    if set(first["ab_by_decoder_version"]) != set(second["ab_by_decoder_version"]):
        diffs.append("ab_by_decoder_version (versions)")
    for v, a in first["ab_by_decoder_version"].items():
        b = second["ab_by_decoder_version"].get(v, {})
        for k, x in a.items():
            if not _close(x, b.get(k)):
                diffs.append(f"ab_by_decoder_version.{v}.{k}")
    return diffs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--files", type=int, default=5, help="audit.jsonl plus files-1 rotated backups")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", type=Path, default=RESULTS / "report_bench.json")
    ap.add_argument("--child", choices=IMPLS, help=argparse.SUPPRESS)
    ap.add_argument("--log", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        _child(args.child, args.log, args.out)
        return 0

    started = machine()
    t0 = time.perf_counter()
    log = cached_log(args.rows, args.files, args.seed)
    files = sorted(log.parent.glob("audit.jsonl*"))
    print(f"log: {args.rows} rows in {len(files)} files, {sum(f.stat().st_size for f in files) / 2**20:.0f} MiB "
          f"({time.perf_counter() - t0:.0f} s to have it)", flush=True)
    tmp = BUILD / "report_bench" / "summaries"
    tmp.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict]] = {impl: [] for impl in IMPLS}
    summaries = {}
    for i in range(args.runs):
        for impl in (IMPLS if i % 2 == 0 else IMPLS[::-1]):
            m = measure(impl, log, tmp / f"{impl}.json")
            summaries[impl] = m.pop("summary")
            runs[impl].append(m)
            print(f"run {i + 1} {impl:<14} {m['seconds']:8.2f} s  {m['peak_rss_mb']:8.1f} MB  "
                  f"(load {m['load_average_1m_before']})", flush=True)
    diffs = [f"duckdb_limited: {d}" for d in compare(summaries["duckdb"], summaries["duckdb_limited"])]
    s = summaries["duckdb"]

    def med(impl: str, key: str) -> float:
        xs = sorted(r[key] for r in runs[impl])
        return xs[len(xs) // 2]

    result = {
        "what": "clients.report (DuckDB SQL over the rotated JSONL files; duckdb_limited: the same under "
                f"--memory-limit {LIMITED}), same synthetic day, one process per run",
        "machine": started, "commit": git_commit(), "duckdb": __import__("duckdb").__version__,
        "rows": args.rows, "files": [f.name for f in files],
        "bytes": sum(f.stat().st_size for f in files),
        "raw": runs,
        "median": {impl: {"seconds": med(impl, "seconds"), "peak_rss_mb": med(impl, "peak_rss_mb")} for impl in runs},
        "agree": not diffs, "differences": diffs,
        "report_totals": {k: s[k] for k in ("requests", "succeeded", "failed", "routes", "actions", "errors",
                                            "unreadable_lines", "other_stages")},
        "ab_by_decoder_version": s["ab_by_decoder_version"], "ab_comparison": s["ab_comparison"],
        "latency_by_stage_ms": s["latency_by_stage_ms"],
    }
    dump_json(args.out, result, settings=args, runs=args.runs,
              timings={f"{impl}_seconds": [r["seconds"] for r in rs] for impl, rs in runs.items()},
              failed=len(diffs))
    print(json.dumps({k: result[k] for k in ("median", "agree", "differences")}, indent=2))
    print(f"wrote {args.out}")
    return 0 if not diffs else 1


if __name__ == "__main__":
    sys.exit(main())
