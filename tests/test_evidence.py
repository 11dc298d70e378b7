"""Every client tool reads every kind of evidence a RESULT or audit row carries: image-list hits (a PDQ distance, no
variant), term hits (variant and field), model signals and cached verdicts. Unit: the shared wording, the report's
counts and evaluate's breakdown on rows of each kind. Integration: the demo's own code path (clients.demo.run, what
`make demo` runs) against the real session server with an image-list entry present."""

from __future__ import annotations

from clients import evaluate, report
from clients.evidence import decided_text, hit_text, hits_text, kind_of, summary
from moderation.core.audit import AuditLog
from moderation.testing.policies import derive_policy

IMAGE_HIT = {
    "kind": "image",
    "list": "block",
    "id": "img-3f2a00112233",
    "label": "scam",
    "field": "image",
    "distance": 4,
}
TERM_HIT = {
    "kind": "term",
    "list": "review",
    "id": "term-1c0000000000",
    "label": "scam",
    "field": "image_text",
    "span": [0, 3],
    "variant": "homophone",
}


def _result(route: str, action: str, decided_by: str, hits=(), cache=None, labels=(), signals=None,
            band: str = "allow") -> dict:
    decision = {"reason": "x"}
    deciding = next((h for h in hits if decided_by == ("image_list" if h["kind"] == "image" else "terms")), None)
    if deciding:
        decision["list_hit"] = deciding
    return {
        "request_id": "r",
        "route": route,
        "action": action,
        "decided_by": decided_by,
        "decision": decision,
        "violation": action == "block",
        "list_hits": list(hits),
        "signals": signals or {"clip": "untrained"},
        "labels": [{"name": n, "score": 0.9, "source": "vlm"} for n in labels],
        "scores": {"scam": 0.2},
        "gate": {"band": band, "scores": {"scam": 0.2}},
        **({"cache": cache} if cache else {}),
    }


IMAGE = _result("list", "block", "image_list", [IMAGE_HIT, TERM_HIT])
TERM = _result("gate", "review", "terms", [TERM_HIT])  # a review-list hit does not settle a post: the gate's path
CACHED = _result(
    "cache",
    "review",
    "vlm",
    cache={"hit": True, "similarity": 0.9912, "age_s": 12.0, "source_route": "vlm"},
    signals={"vlm": "untrained"},
    labels=["hate"],
    band="escalate",
)
MODEL = _result(
    "gate",
    "block",
    "nsfw_image",
    signals={"nsfw_image": "trained"},
    labels=["sexual"],
    cache={"hit": False, "lookup_ms": 0.4},
    band="block",
)
DEFAULT = _result("gate", "allow", "policy_default")


def test_every_kind_is_named_without_a_crash():
    assert hit_text(IMAGE_HIT) == "block:image img-3f2a00112233 d=4 [scam]"
    assert hit_text(TERM_HIT) == "review:term term-1c0000000000 homophone@image_text [scam]"
    assert hit_text({"kind": "audio", "list": "block", "id": "a-1"}) == "block:audio a-1"  # an unknown kind
    assert hit_text({**IMAGE_HIT, "frame": 5}) == "block:image img-3f2a00112233 d=4 frame 5 [scam]"
    assert [kind_of(r) for r in (IMAGE, TERM, CACHED, MODEL, DEFAULT)] == [
        "image_list",
        "terms",
        "cache",
        "model",
        "policy",
    ]
    assert decided_text(IMAGE) == "image_list block:image img-3f2a00112233 d=4 [scam]"
    assert decided_text(TERM).startswith("terms review:term term-1c")
    assert decided_text(CACHED) == (
        "cache: a near-duplicate's stored vlm verdict (similarity 0.991, age 12 s) -> vlm (untrained)"
    )
    assert decided_text(MODEL) == "nsfw_image (trained)" and decided_text(DEFAULT) == "policy_default"
    assert summary(IMAGE) == (
        "BLOCK by image_list block:image img-3f2a00112233 d=4 [scam]; route list (band allow); list hits: "
        "review:term term-1c0000000000 homophone@image_text [scam]"
    )
    assert hits_text(DEFAULT) == "-" and hits_text(TERM) == hit_text(TERM_HIT)
    # an audit row has no `decision`: the deciding hit is found among its list hits
    row = {k: v for k, v in IMAGE.items() if k != "decision"}
    assert decided_text(row) == decided_text(IMAGE)
    assert decided_text({"action": None, "error": {"code": "bad_image"}}) == "error bad_image"


def test_the_report_counts_every_kind(tmp_path):
    log = tmp_path / "audit.jsonl"
    audit = AuditLog(log)
    for i, r in enumerate((IMAGE, TERM, CACHED, MODEL, DEFAULT)):
        row = {k: v for k, v in r.items() if k not in ("decision", "gate", "signals")}
        audit.write(
            {
                **row,
                "stage": "moderate",
                "request_id": f"r{i}",
                "latency_ms": {"total": 1.0},
                "error": None,
                "ts": 1_789_999_200 + i,
            }
        )
    s = report.summarize_files([log])
    assert s["evidence"] == {"cache": 1, "image_list": 1, "model": 1, "policy": 1, "terms": 1}
    assert s["action_by_evidence"]["block"] == {"image_list": 1, "model": 1}
    assert s["list_hits"] == {"term:review": 2, "image:block": 1}
    assert s["term_hits"] == {"homophone@image_text": 2}
    assert s["cache"] == {"lookups": 2, "hits": 1}
    assert report.summary_of_nothing().keys() == s.keys()


def test_evaluate_breaks_down_by_evidence_and_counts_list_labels():
    rows = [(["scam"], IMAGE), (["scam"], TERM), (["hate"], CACHED), ([], MODEL), ([], DEFAULT)]
    m = evaluate.evaluate(rows, ["scam", "hate", "sexual"])
    assert set(m["per_evidence"]) == {"image_list", "terms", "cache", "model", "policy"}
    assert m["per_evidence"]["image_list"]["predicted"] == 1 and m["per_evidence"]["model"]["predicted"] == 1
    # the scam posts were settled by list entries labelled scam: the service asserted scam on both
    assert m["per_label"]["scam"]["predicted"] == 2 and m["per_label"]["scam"]["recall"] == 1.0
    assert "per evidence" in evaluate.render(m)
    fb = evaluate.evaluate_feedback([(r, {"verdict": "violation" if t else "ok"}) for t, r in rows])
    assert fb["per_evidence"]["image_list"]["blocked"] == 1 and fb["per_evidence"]["terms"]["reviewed"] == 1


def test_the_demo_names_an_image_list_hit(triton, policy_dir):
    """The demo's own code path, against the real server, with the demo's lists (an image on the block list among
    them) added to a policy of its own: its tables name the image-list hit instead of failing on it."""
    from clients import demo

    from .conftest import ADMIN_KEY

    derive_policy(policy_dir, "demo_lists")
    out = demo.run(triton.grpc_url, ADMIN_KEY, policy="demo_lists")
    coins = next(line for line in out.splitlines() if line.startswith("coins_scam_zh "))
    assert "BLOCK" in coins and "image_list block:image img-" in coins, coins
    memes = out[out.index("memes:") :]
    assert "block:image img-" in memes and "block:term term-" in memes, memes
