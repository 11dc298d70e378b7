"""RESULT.action: allow, review (send to a human) or block, who decided it, and each label's severity.

Evidence comes from the gate's signals (clip concept scores, the trained nsfw_image on its label), the VLM's
label scores when it ran, and custom-list hits. A signal's artifact record says whether it is trained; an
untrained signal may escalate a post and may send it to review, but is never the reason a post is allowed or
blocked. In order:

  0. a post whose image text OCR read only in part (its read budget ran out: the unread text may hide the
     violation) is blocked by a block-list hit or a trained block band, else reviewed (a review-list hit names
     itself; otherwise decided_by "ocr_budget"): no allow list, band or default allows it;
  1. a block-list hit blocks; 2. an allow-list hit allows (operators wrote both);
  3. a trained signal at or above its block band blocks (highest score first);
  4. a review-list hit, or 5. a trained signal in its review band, sends to review;
  6. an untrained signal in its review band, on a label no trained signal scored, sends to review: only an
     untrained judge flagged the post;
  7. nothing flagged: allow when a trained judge scored every label (it decided), else the policy's
     default_action (decided_by "policy_default").

Bands per signal: the policy's signal table, signals.<signal>.band (review, block), read through Policy.band, which
the gate routes trained signals by too; blocking needs the label in gate.block_labels;
decisions.labels.<label> overrides the bands and names the signals that may decide it. Among flags of one kind
the highest score decides; among untrained ones the VLM's (it judged the escalated post) before the gate's."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from .contracts import GateDecision
from .policy import Policy

ACTIONS = ("allow", "review", "block")
POLICY_DEFAULT = "policy_default"
OCR_BUDGET = "ocr_budget"


@dataclass(frozen=True)
class Evidence:
    signal: str
    label: str
    score: float
    review_at: float
    block_at: float | None  # None: this signal cannot block on this label
    trained: bool


@dataclass(frozen=True)
class Decision:
    action: str
    decided_by: str
    reason: str
    severity: dict[str, int] = field(default_factory=dict)
    list_hit: dict | None = None  # the entry that decided, for image_list / terms
    evidence: list[Evidence] = field(default_factory=list)  # every score the decision weighed


def _bands(policy: Policy, signal: str, label: str) -> tuple[float, float | None]:
    band = policy.band(signal, label)
    return band.review, band.block if label in policy.gate.block_labels else None


def evidence(policy: Policy, gate: GateDecision) -> list[Evidence]:
    """Every (signal, label) score the post was judged on, with that signal's bands and trained flag."""
    out = []
    for label, score in gate.scores.items():
        if label not in policy.label_keys:
            continue
        signal = gate.sources.get(label, "clip")
        out.append(Evidence(signal, label, float(score), *_bands(policy, signal, label),
                            trained=gate.signals.get(signal) == "trained"))
    if gate.vlm is not None:
        for label, score in gate.vlm.labels.items():
            if label in policy.label_keys:
                out.append(Evidence("vlm", label, float(score), *_bands(policy, "vlm", label),
                                    trained=not gate.vlm.untrained))
    return out


def _may_decide(policy: Policy, ev: Evidence) -> bool:
    own = policy.decisions.labels.get(ev.label)
    return own is None or own.deciders is None or ev.signal in own.deciders


def severity(ev: Evidence) -> int:
    """0 below the review band, 3 at or above the block band, 1 / 2 in the lower / upper half between."""
    if ev.score < ev.review_at:
        return 0
    top = ev.block_at if ev.block_at is not None else 1.0
    if ev.block_at is not None and ev.score >= ev.block_at:
        return 3
    return 1 if ev.score < (ev.review_at + top) / 2 else 2


def _label_severity(policy: Policy, evs: list[Evidence]) -> dict[str, int]:
    """Per label, from its trained evidence when there is any, else from the untrained."""
    out = {}
    for label in policy.label_keys:
        mine = [e for e in evs if e.label == label]
        trained = [e for e in mine if e.trained]
        out[label] = max((severity(e) for e in (trained or mine)), default=0)
    return out


def choose_action(policy: Policy, gate: GateDecision, list_hits: list[dict],
                  image_text_truncated: bool = False) -> Decision:
    evs = evidence(policy, gate)
    return replace(_choose(policy, evs, list_hits, image_text_truncated), evidence=evs)


def _choose(policy: Policy, evs: list[Evidence], list_hits: list[dict], image_text_truncated: bool) -> Decision:
    sev = _label_severity(policy, evs)
    for hit in list_hits:
        if hit["label"] in sev and hit["list"] == "block":
            sev[hit["label"]] = 3

    def by_list(name: str) -> Decision | None:
        hit = next((h for h in list_hits if h["list"] == name), None)
        if hit is None:
            return None
        who = "image_list" if hit["kind"] == "image" else "terms"
        return Decision(name, who, f"{hit['kind']} on the {name} list (entry {hit['id']})", sev, hit)

    def strongest(candidates: list[Evidence]) -> Evidence | None:
        return max(candidates, key=lambda e: e.score, default=None)

    trained = [e for e in evs if e.trained and _may_decide(policy, e)]
    covered = {e.label for e in trained}  # a trained score on a label outranks every untrained one on it
    untrained = [e for e in evs if not e.trained and e.label not in covered]
    if d := by_list("block"):
        return d
    if not image_text_truncated and (d := by_list("allow")):
        return d
    blocking = strongest([e for e in trained if e.block_at is not None and e.score >= e.block_at])
    if blocking:
        return Decision("block", blocking.signal, f"{blocking.label} {blocking.score:.3f} from {blocking.signal} "
                        f">= its block band {blocking.block_at}", sev)
    if d := by_list("review"):
        return d
    if image_text_truncated:
        return Decision("review", OCR_BUDGET, "the image's text was read only in part (the OCR read budget ran "
                        "out): the unread text may hide a violation, so a person decides", sev)
    untrained_vlm = [e for e in untrained if e.signal == "vlm"]
    pools = ((trained, "in its review band"), (untrained_vlm, "in its review band; untrained, so a person decides"),
             (untrained, "in its review band; untrained, so a person decides"))
    for pool, why in pools:
        flagged = strongest([e for e in pool if e.score >= e.review_at])
        if flagged:
            return Decision("review", flagged.signal, f"{flagged.label} {flagged.score:.3f} from {flagged.signal} "
                            f"{why} (>= {flagged.review_at})", sev)
    judges = {e.signal for e in trained}
    for judge in sorted(judges):
        if {e.label for e in trained if e.signal == judge} >= set(policy.label_keys):
            return Decision("allow", judge, f"{judge} scored every label below its review band", sev)
    return Decision(policy.decisions.default_action, POLICY_DEFAULT,
                    "no trained signal flagged the post" + (f" ({', '.join(sorted(judges))} scored "
                                                            f"{'its labels' if len(judges) == 1 else 'theirs'} "
                                                            "below review)" if judges else ""), sev)
