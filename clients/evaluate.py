"""Measure the service on a labelled set, or on its own audit log joined with reviewers' feedback.

    .venv/bin/python -m clients.evaluate --url 127.0.0.1:8001 labelled.jsonl [--policy default] [--json out.json]
    .venv/bin/python -m clients.evaluate --audit build/audit/audit.jsonl [--target-recall 0.95] [--policy default]
    .venv/bin/python -m clients.evaluate labelled.jsonl --calibrate-gate [--repository model_repository]
        [--policy default] [--target-precision 0.95] [--write-policy PATH]

With --calibrate-gate (the first step after exporting a real CLIP): no server is needed; the labelled posts go
through the repository's served CLIP encoders in this process (the preprocess, onnxruntime and concept-bank code
the server runs) and the gate's raw cosines fit a proposed `gate:` section: concept_center/concept_scale (and
consistency_* when `mismatch` posts are labelled), block_at and allow_below for --target-precision, and
calibrated_for naming the served CLIP. It prints the section and how the labelled posts route now and with it
(wrongly allowed / blocked, escalated). Nothing is applied: paste the section into the policy, or --write-policy
PATH writes the whole policy with it under a new version.

With --audit: every judged post (`stage: moderate` rows) that a reviewer gave feedback on (`clients.admin feedback
REQUEST_ID --verdict violation|ok [--label L]`, joined by request id; the latest feedback wins) is a labelled
example. It prints precision (of block), recall (block or review) and review rate per action, route and deciding
signal. --target-recall R proposes, per label with labelled violations, the review band that catches a fraction R
of them with the least review load (from the per-signal scores the audit row keeps: a trained signal's score on a
label outranks the untrained ones, as in the decision), printed as a diff of the policy (--write-policy PATH
writes the proposed policy).

Each JSONL line is one post: {"image": path, "caption": str, "labels": [label keys that apply]} — an empty
list means the post is safe; relative image paths are read from the JSONL file's folder ("text" is accepted
for "caption"). For every policy label it prints:

  predicted   the label is listed in RESULT.labels (what the service asserts at the policy's thresholds), or an
              operator's block / review list entry under that label (image or term) matched the post
  AUROC       ranking quality of RESULT.scores[label] (the score the post was finally judged by) and of the
              gate's own score RESULT.gate.scores[label] (e.g. the trained nsfw_image signal on `sexual`),
              independent of any threshold — use it to place the policy's thresholds
and, per route (gate / list / vlm / cache: the path a post took) and per gate band (RESULT.gate.band: allow /
block / escalate, what the gate's thresholds said whatever the route), the post-level violation metrics (truth:
any label applies; predicted: RESULT.violation), and per kind of evidence that decided (image_list, terms, cache,
model, policy: clients/evidence.py). Metrics are scikit-learn's; a metric with no positives (or, for AUROC, no
negatives) is reported as null, not as 0 or 1. Exit code 0 when every post was moderated, 1 when any failed
(failed posts are counted and left out of the metrics), 2 for a bad file.
"""
from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from sklearn.metrics import precision_score, recall_score, roc_auc_score

from .client import DEFAULT_URL, ModerationClient, ModerationFailed
from .evidence import decided_text, kind_of
from .jsonl import read_jsonl


def read_labelled(path: Path) -> list[dict]:
    posts = []
    for n, row in read_jsonl(path):
        caption = row.get("caption", row.get("text", "")) if isinstance(row, dict) else None
        if (not isinstance(row, dict) or not isinstance(row.get("image"), str) or not isinstance(caption, str)
                or not isinstance(row.get("labels"), list) or not all(isinstance(x, str) for x in row["labels"])):
            raise ValueError(f'{path}:{n}: expected {{"image": path, "caption": str, "labels": [str, ...]}}')
        image = Path(row["image"])
        posts.append({"line": n, "image": image if image.is_absolute() else Path(path).parent / image,
                      "caption": caption, "labels": sorted(set(row["labels"]))})
    return posts


def _metric(fn, y, pred_or_score, needs_both: bool) -> float | None:
    y = np.asarray(y, dtype=int)
    if y.sum() == 0 or (needs_both and y.sum() == len(y)):
        return None
    return float(fn(y, pred_or_score, **({} if needs_both else {"zero_division": 0})))


def _binary(y, pred, score, gate_score=None) -> dict:
    y, pred = np.asarray(y, int), np.asarray(pred, int)
    out = {"n": int(len(y)), "positives": int(y.sum()), "predicted": int(pred.sum()),
           "precision": None if pred.sum() == 0 else float(precision_score(y, pred, zero_division=0)),
           "recall": _metric(recall_score, y, pred, needs_both=False),
           "auroc": _metric(roc_auc_score, y, score, needs_both=True)}
    if gate_score is not None:
        out["auroc_gate"] = _metric(roc_auc_score, y, gate_score, needs_both=True)
    return out


def evaluate(rows: list[tuple[list[str], dict]], label_keys: list[str]) -> dict:
    """rows: (true labels, RESULT) per moderated post -> metrics per label, per route and overall."""
    per_label = {}
    for key in label_keys:
        y = [key in truth for truth, _ in rows]
        pred = [asserts(r, key) for _, r in rows]
        score = [r["scores"].get(key, 0.0) for _, r in rows]
        gate = [r.get("gate", {}).get("scores", {}).get(key, 0.0) for _, r in rows]
        sources = sorted({r.get("gate", {}).get("sources", {}).get(key, "clip_gate") for _, r in rows})
        per_label[key] = _binary(y, pred, score, gate) | {"gate_source": "/".join(sources)}

    def post_level(subset):
        y = [bool(truth) for truth, _ in subset]
        pred = [r["violation"] for _, r in subset]
        score = [max([r["scores"].get(k, 0.0) for k in label_keys] + [r["scores"].get("violation", 0.0)])
                 for _, r in subset]
        return _binary(y, pred, score)

    routes = sorted({r["route"] for _, r in rows})
    per_route = {route: post_level([(t, r) for t, r in rows if r["route"] == route]) for route in routes}
    # a leak through the gate's allow band shows here, whether the post then stopped at the gate or not
    bands = sorted({_band(r) for _, r in rows})
    per_gate_band = {b: post_level([(t, r) for t, r in rows if _band(r) == b]) for b in bands}
    kinds = sorted({kind_of(r) for _, r in rows})
    per_evidence = {k: post_level([(t, r) for t, r in rows if kind_of(r) == k]) for k in kinds}
    signals = sorted({f"{k}:{v}" for _, r in rows for k, v in r.get("signals", {}).items()})
    return {"n": len(rows), "overall": post_level(rows) if rows else None, "per_label": per_label,
            "per_route": per_route, "per_gate_band": per_gate_band, "per_evidence": per_evidence,
            "signals": signals}


def _band(result: dict) -> str:
    return (result.get("gate") or {}).get("band") or "-"


def asserts(result: dict, label: str) -> bool:
    """The service asserts `label` of a post: RESULT.labels lists it (a score at the policy's threshold), or an
    operator's block or review list entry under that label matched the post (an image or a term)."""
    return (any(x["name"] == label for x in result["labels"])
            or any(h.get("label") == label and h.get("list") in ("block", "review")
                   for h in result.get("list_hits") or []))


def _fmt(v) -> str:
    return "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))


def render(report: dict) -> str:
    cols = ["n", "positives", "predicted", "precision", "recall", "auroc"]
    lines = [f"{report['n']} posts moderated; signals: {', '.join(report['signals']) or '-'}", "",
             "per label (predicted = listed in RESULT.labels; auroc_gate = the gate's own score)",
             f"{'label':<12}" + "".join(f"{c:>10}" for c in cols) + f"{'auroc_gate':>12}  gate source"]
    for key, m in report["per_label"].items():
        lines.append(f"{key:<12}" + "".join(f"{_fmt(m[c]):>10}" for c in cols)
                     + f"{_fmt(m['auroc_gate']):>12}  {m['gate_source']}")
    lines += ["", "per route (post level: truth = any label applies, predicted = RESULT.violation)",
              f"{'route':<12}" + "".join(f"{c:>10}" for c in cols)]
    for route, m in list(report["per_route"].items()) + [("ALL", report["overall"])]:
        if m:
            lines.append(f"{route:<12}" + "".join(f"{_fmt(m[c]):>10}" for c in cols))
    lines += ["", "per gate band (RESULT.gate.band: what the gate's thresholds said, whatever the route)",
              f"{'gate band':<12}" + "".join(f"{c:>10}" for c in cols)]
    for band, m in report.get("per_gate_band", {}).items():
        lines.append(f"{band:<12}" + "".join(f"{_fmt(m[c]):>10}" for c in cols))
    lines += ["", "per evidence (what decided: image_list, terms, cache, model, policy)",
              f"{'evidence':<12}" + "".join(f"{c:>10}" for c in cols)]
    for kind, m in report.get("per_evidence", {}).items():
        lines.append(f"{kind:<12}" + "".join(f"{_fmt(m[c]):>10}" for c in cols))
    if any(s.endswith(":untrained") for s in report["signals"]):
        lines += ["", "note: signals marked untrained are random-initialised models; their metrics are noise."]
    return "\n".join(lines)


# feedback mode -----------------------------------------------------------------------------------------------
def join_feedback(rows: list[dict]) -> list[tuple[dict, dict]]:
    """(judged row, latest feedback row) for every judged post with feedback."""
    judged = {r["request_id"]: r for r in rows if r.get("stage") == "moderate" and r.get("action")}
    feedback = {r["request_id"]: r for r in rows if r.get("stage") == "feedback"}
    return [(judged[rid], fb) for rid, fb in feedback.items() if rid in judged]


def _action_metrics(pairs: list[tuple[dict, dict]]) -> dict:
    """Post level: truth = the reviewer said violation; precision of block, recall of block-or-review."""
    truth = [fb["verdict"] == "violation" for _, fb in pairs]
    action = [r["action"] for r, _ in pairs]
    n, positives = len(pairs), sum(truth)
    blocked, reviewed = action.count("block"), action.count("review")
    true_blocks = sum(t and a == "block" for t, a in zip(truth, action, strict=True))
    caught = sum(t and a in ("block", "review") for t, a in zip(truth, action, strict=True))
    return {"n": n, "positives": positives, "blocked": blocked, "reviewed": reviewed,
            "precision": true_blocks / blocked if blocked else None,
            "recall": caught / positives if positives else None, "review_rate": reviewed / n if n else None}


def evaluate_feedback(pairs: list[tuple[dict, dict]]) -> dict:
    def by(key):
        groups: dict[str, list] = {}
        for r, fb in pairs:
            groups.setdefault(str(r.get(key)), []).append((r, fb))
        return {k: _action_metrics(v) for k, v in sorted(groups.items())}

    evidence: dict[str, list] = {}
    for r, fb in pairs:
        evidence.setdefault(kind_of(r), []).append((r, fb))
    return {"n": len(pairs), "overall": _action_metrics(pairs), "per_action": by("action"), "per_route": by("route"),
            "per_decided_by": by("decided_by"),
            "per_evidence": {k: _action_metrics(v) for k, v in sorted(evidence.items())}}


def label_score(row: dict, label: str) -> float:
    """The post's score on `label` as the decision weighs it: the best trained signal's, else the best untrained."""
    ev = [e for e in row.get("evidence", []) if e[1] == label]
    trained = [e[2] for e in ev if e[3]]
    return max(trained or [e[2] for e in ev] or [0.0])


def propose_bands(pairs: list[tuple[dict, dict]], target_recall: float) -> dict:
    """Per label with labelled violations: the highest review band that still catches `target_recall` of them,
    and the review load it implies on the labelled posts."""
    out = {}
    labels = sorted({fb["label"] for _, fb in pairs if fb["verdict"] == "violation" and fb.get("label")})
    for label in labels:
        pos = sorted((label_score(r, label) for r, fb in pairs if fb["verdict"] == "violation"
                      and fb.get("label") == label), reverse=True)
        need = max(1, int(np.ceil(target_recall * len(pos))))
        band = float(np.floor(pos[need - 1] * 1000) / 1000)
        scores = [label_score(r, label) for r, _ in pairs]
        out[label] = {"review": band, "violations": len(pos), "caught": sum(s >= band for s in pos),
                      "recall": sum(s >= band for s in pos) / len(pos),
                      "review_load": sum(s >= band for s in scores) / len(scores)}
    return out


def policy_diff(policy_path: Path, bands: dict) -> tuple[str, str]:
    """(unified diff, new policy text) with decisions.labels.<label>.review set to each proposed band."""
    import difflib

    import yaml

    before = yaml.safe_load(policy_path.read_text())
    after = json.loads(json.dumps(before))
    labels = after.setdefault("decisions", {}).setdefault("labels", {})
    for label, b in bands.items():
        labels.setdefault(label, {})["review"] = b["review"]
    dump = lambda d: yaml.safe_dump(d, allow_unicode=True, sort_keys=False)  # noqa: E731 - two uses, one line
    diff = "".join(difflib.unified_diff(dump(before).splitlines(True), dump(after).splitlines(True),
                                        f"{policy_path.name} (now)", f"{policy_path.name} (proposed)"))
    return diff, dump(after)


def main_feedback(args) -> int:
    from moderation.core.audit import read_rows
    from moderation.core.policy import policy_dir

    pairs = join_feedback(read_rows(args.audit))
    if not pairs:
        print(f"error: no judged post in {args.audit} has feedback (clients.admin feedback REQUEST_ID ...)",
              file=sys.stderr)
        return 2
    report = evaluate_feedback(pairs)
    cols = ["n", "positives", "blocked", "reviewed", "precision", "recall", "review_rate"]
    lines = [f"{report['n']} judged posts with reviewer feedback", ""]
    for title, key in (("per action", "per_action"), ("per route", "per_route"),
                       ("per deciding signal", "per_decided_by"), ("per evidence", "per_evidence")):
        lines += [title, f"{'':<16}" + "".join(f"{c:>12}" for c in cols)]
        for name, m in list(report[key].items()) + ([("ALL", report["overall"])] if key == "per_action" else []):
            lines.append(f"{name:<16}" + "".join(f"{_fmt(m[c]):>12}" for c in cols))
        lines.append("")
    print("\n".join(lines))
    if args.target_recall is not None:
        bands = propose_bands(pairs, args.target_recall)
        report["proposed_bands"] = bands
        if not bands:
            print("no labelled violations (feedback --label L) to propose bands from", file=sys.stderr)
        else:
            path = Path(args.policy_dir or policy_dir()) / f"{args.policy}.yaml"
            diff, text = policy_diff(path, bands)
            report["policy_diff"] = diff
            print(f"proposed review bands for recall >= {args.target_recall}:")
            for label, b in bands.items():
                print(f"  {label}: review >= {b['review']} catches {b['caught']}/{b['violations']}, "
                      f"review load {b['review_load']:.1%} of the labelled posts")
            print(diff)
            if args.write_policy:
                args.write_policy.write_text(text)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, ensure_ascii=False))
    return 0


# gate calibration ------------------------------------------------------------------------------------------------
def calibrated_policy_text(policy_path: Path, section: dict) -> str:
    """The policy file with its gate section replaced, the CLIP's routing band set (signals.clip.route) and a
    version naming the CLIP it was calibrated for."""
    import yaml

    data = yaml.safe_load(policy_path.read_text(encoding="utf-8"))
    data["gate"] = section["gate"]
    signals = data.get("signals") or {}
    data["signals"] = {**signals, "clip": {**(signals.get("clip") or {}), **section["signals"]["clip"]}}
    data["version"] = f"{data['version']}-clip.{section['gate']['calibrated_for']['clip_image'][:8]}"
    return yaml.safe_dump(data, allow_unicode=True, sort_keys=False)


def render_calibration(fit, policy, served) -> str:
    import yaml

    now = policy.gate.calibrated_for
    state = ("calibrated for it" if now is not None and now.same_clip(served) else
             f"calibrated for {now.name or now.clip_image[:12]}" if now is not None else "names no CLIP")
    cols = ["n", "allowed", "wrongly_allowed", "blocked", "wrongly_blocked", "escalated", "escalated_clean",
            "escalated_violating"]
    lines = [f"served CLIP: {served.name} (clip_image {served.clip_image[:12]}…, clip_text {served.clip_text[:12]}…)",
             f"policy {policy.id}: gate {state}",
             f"labels the CLIP alone scores: {', '.join(fit.labels)} (truth: one of them applies)", "",
             f"{'gate':<10}" + "".join(f"{c:>21}" for c in cols)]
    for name, m in (("now", fit.now), ("proposed", fit.proposed)):
        lines.append(f"{name:<10}" + "".join(f"{m[c]:>21}" for c in cols))
    lines += [f"note: {n}" for n in fit.notes]
    lines += ["", "proposed gate section and CLIP route (paste into the policy; nothing is applied):", "",
              yaml.safe_dump(fit.section(), allow_unicode=True, sort_keys=False)]
    return "\n".join(lines)


def main_calibrate(args) -> int:
    import os

    if args.policy_dir:  # preprocess reads the policy by name, as the server does
        os.environ["MODERATION_POLICY_DIR"] = str(args.policy_dir)
    from moderation.core.errors import ModerationError
    from moderation.core.policy import load_policy, policy_dir
    from moderation.gate.calibration import CalibrationError, ServedClip, fit_gate
    from moderation.repository.served import served_clip_identity, served_version_dirs

    try:
        posts = read_labelled(args.labelled)
        policy = load_policy(args.policy)
        unknown = sorted({x for p in posts for x in p["labels"]} - set(policy.label_keys))
        if unknown:
            raise ValueError(f"labels {unknown} are not in policy {args.policy!r} ({policy.label_keys})")
        dirs = served_version_dirs(args.repository, ServedClip.MODELS)
        identity = served_clip_identity(args.repository)
        if identity is None:
            raise CalibrationError(f"{args.repository}: clip_image / clip_text have no artifact record naming "
                                   "their model.onnx (export them with export.export_models)")
        clip = ServedClip(dirs, identity)
        bank = clip.bank(policy)
        cosines = [clip.cosines(policy, bank, p["image"].read_bytes(), p["caption"], p["labels"]) for p in posts]
        fit = fit_gate(policy, cosines, clip.identity, args.target_precision)
    except (OSError, ValueError, ModerationError) as e:  # CalibrationError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(render_calibration(fit, policy, clip.identity))
    if args.write_policy:
        path = Path(args.policy_dir or policy_dir()) / f"{args.policy}.yaml"
        args.write_policy.write_text(calibrated_policy_text(path, fit.section()), encoding="utf-8")
        print(f"wrote {args.write_policy} (review it, then put it in the policy directory)")
    if args.json:
        args.json.write_text(json.dumps({"policy": policy.id, "served_clip": clip.identity.model_dump(),
                                         "labels": fit.labels, "now": fit.now, "proposed": fit.proposed,
                                         "notes": fit.notes, **fit.section(),
                                         "posts": [{"line": p["line"], "labels": p["labels"], "concept": c.concept,
                                                    "consistency": c.consistency}
                                                   for p, c in zip(posts, cosines, strict=True)]},
                                        indent=2, ensure_ascii=False))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("labelled", type=Path, nargs="?", help="JSONL: {image, caption, labels} per line")
    ap.add_argument("--audit", type=Path, help="evaluate the audit log joined with reviewers' feedback instead")
    ap.add_argument("--target-recall", type=float, default=None, help="with --audit: propose review bands")
    ap.add_argument("--policy-dir", type=Path, default=None)
    ap.add_argument("--write-policy", type=Path, default=None,
                    help="with --target-recall or --calibrate-gate: write the proposed policy here")
    ap.add_argument("--calibrate-gate", action="store_true",
                    help="fit the gate's thresholds for the served CLIP from the labelled posts (no server)")
    ap.add_argument("--repository", type=Path, default=Path("model_repository"),
                    help="with --calibrate-gate: the model repository whose served CLIP is calibrated")
    ap.add_argument("--target-precision", type=float, default=0.95,
                    help="with --calibrate-gate: precision of the gate's blocks and of its allows")
    ap.add_argument("--url", default=DEFAULT_URL, help="gRPC address of the server")
    ap.add_argument("--policy", default="default")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--json", type=Path, help="also write the metrics and every post's outcome here")
    args = ap.parse_args(argv)
    if args.audit:
        return main_feedback(args)
    if not args.labelled:
        ap.error("give a labelled JSONL file, or --audit AUDIT.jsonl")
    if args.calibrate_gate:
        return main_calibrate(args)
    try:
        posts = read_labelled(args.labelled)
        images = [p["image"].read_bytes() for p in posts]
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from moderation.core.policy import load_policy

    label_keys = load_policy(args.policy).label_keys  # the local copy names the labels; the server judges
    unknown = sorted({x for p in posts for x in p["labels"]} - set(label_keys))
    if unknown:
        print(f"error: labels {unknown} are not in policy {args.policy!r} ({label_keys})", file=sys.stderr)
        return 2

    def one(i):
        with ModerationClient(args.url, timeout_s=args.timeout) as c:
            try:
                return c.moderate(images[i], posts[i]["caption"], policy=args.policy, request_id=f"eval-{i}")
            except ModerationFailed as e:
                return e

    with ThreadPoolExecutor(max(1, args.concurrency)) as pool:
        results = list(pool.map(one, range(len(posts))))
    failed = [(p, r) for p, r in zip(posts, results, strict=False) if isinstance(r, ModerationFailed)]
    rows = [(p["labels"], r) for p, r in zip(posts, results, strict=False) if not isinstance(r, ModerationFailed)]
    report = evaluate(rows, label_keys) | {"failed": len(failed), "policy": args.policy}
    print(render(report))
    for p, e in failed:
        print(f"failed: line {p['line']} ({p['image']}): [{e.code}] {e.message}", file=sys.stderr)
    if args.json:
        outcomes = [{"line": p["line"], "labels": p["labels"],
                     **({"error": {"code": r.code, "message": r.message}} if isinstance(r, ModerationFailed) else
                        {"route": r["route"], "gate_band": _band(r), "violation": r["violation"], "action": r["action"],
                         "decided_by": r["decided_by"], "evidence": kind_of(r), "decided": decided_text(r),
                         "list_hits": r.get("list_hits") or [], "scores": r["scores"],
                         "predicted_labels": [x["name"] for x in r["labels"]],
                         "gate_scores": r["gate"]["scores"]})} for p, r in zip(posts, results, strict=False)]
        args.json.write_text(json.dumps(report | {"posts": outcomes}, indent=2, ensure_ascii=False))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
