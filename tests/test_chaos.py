"""A short fault schedule under load (perf/chaos.py; `make chaos` runs the long one and commits its report): a
stub killed, the audit disk filled and freed, hostile calls, the gateway restarted — and no request lost, every
audit file readable, every answered post audited once, no forged row."""
from __future__ import annotations

import json

from perf import chaos
from perf.common import BUILD


def test_chaos_loses_no_request_and_forges_no_row():
    report = chaos.run(seconds=40, threads=2, log_dir=BUILD / "chaos-test")
    print(json.dumps({k: v for k, v in report.items() if k not in ("machine", "lost_requests")}, default=str))
    assert report["lost"] == 0, report["lost_requests"]
    # how many were answered in the 40 s depends on the machine's load; that every one is accounted for does not
    assert report["answered"] > 0 and report["sent"] == report["answered"] + report["coded_errors_total"]
    audit = report["audit"]
    assert audit["parse_error"] is None and audit["forged_rows"] == 0, audit
    assert audit["answered_without_row"] == 0 and audit["answered_with_several_rows"] == 0, audit
    names = [e["event"] for e in report["events"]]
    assert {"killed_stub", "audit_disk_full", "audit_disk_freed", "hostile_calls", "gateway_restarted"} <= set(names)
    hostile = next(e for e in report["events"] if e["event"] == "hostile_calls")["outcomes"]
    assert hostile["oversized"] == "request_too_large" and hostile["garbage"] == "bad_request", hostile
    assert all(hostile[k] == "model_not_found" for k in hostile if k.startswith("internal_")), hostile
    assert all(hostile[k] != "answered" for k in hostile), hostile
