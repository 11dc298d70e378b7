"""One profile end to end (prefix saving in-process, the replay on two servers, the summary), and the A10
projection from in-process costs and the tiny profile's server counts."""
from __future__ import annotations

from pathlib import Path

from perf.common import REPO, ROOT

from .prefix import prefix_saving
from .replay import WORK, replay, replay_policies, repo_without_response_cache, vlm_work
from .summary import summarize, vlm_cost


def a10_repository() -> Path:
    """perf.a10_profile's repository, built as this benchmark's own copy (the perf benchmarks use theirs)."""
    from perf.a10_profile import build_repository

    return build_repository(WORK / "repo-a10-profile")


def run_profile(profile: str, trace: list[dict]) -> dict:
    repo = a10_repository() if profile == "a10" else REPO
    prefix = prefix_saving(trace, repo)
    print(profile, "prefix", {k: prefix[k] for k in ("prefill_ms", "prefill_saving", "decoder_call_saving")})
    policy_dir = replay_policies(WORK / "policies")
    off_repo = repo_without_response_cache(WORK / f"repo-no-response-cache-{profile}", repo)
    runs = replay(trace, {"off": (off_repo, "escalate_all"), "on": (repo, "escalate_cached")}, policy_dir)
    work = {k: vlm_work(v) for k, v in runs.items()}
    summary = summarize(work, prefix)
    return {"repository": str(Path(repo).resolve().relative_to(ROOT)), "prefix": prefix, "runs": runs, "work": work,
            "summary": summary}


def a10_projection(data: dict, trace: list[dict], posts: int, rounds: int) -> dict:
    """VLM work saved for the A10 cost profile without a server replay: the decoder-call and vision-encoder costs
    of perf.a10_profile's models measured in-process (prefix reuse vs recompute side by side), applied to the
    decoder / vision-encoder invocation counts the tiny-profile replay of the same trace measured on the server.
    Valid because which posts reach the VLM depends on the gate and the caches, not on the decoder's size."""
    repo = a10_repository()
    prefix = prefix_saving(trace, repo, posts=posts, rounds=rounds)
    w = data["profiles"]["tiny"]["work"]
    p = prefix["decoder_call_saving"]
    d, v = prefix["mean_ms"]["reuse"]["score_ms"], prefix["vision_encoder_ms"]
    off, on = vlm_cost(w["off"], d, v, p), vlm_cost(w["on"], d, v)
    return {"what": a10_projection.__doc__.strip(), "repository": str(repo.relative_to(ROOT)), "prefix": prefix,
            "summary": {"decoder_invocations": {k: w[k]["decoder_invocations"] for k in ("off", "on")},
                        "decoder_call_ms_with_reuse": d, "vision_encoder_call_ms": v,
                        "prefix_prefill_saving": prefix["prefill_saving"], "prefix_decoder_call_saving": p,
                        "vlm_work_saved_exact_near": 1 - vlm_cost(w["on"], d, v) / vlm_cost(w["off"], d, v),
                        "vlm_work_saved_exact_near_prefix": 1 - on / off, "goal": 0.45,
                        "goal_met": 1 - on / off >= 0.45}}
