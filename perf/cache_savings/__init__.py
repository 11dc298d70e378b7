"""How much VLM work the caches save on a trace with a stated duplicate mix.

    .venv/bin/python -m perf cache_savings              # calibrate, then prefix + replay for profiles tiny and a10
                                         # (--profile tiny|a10|both); writes perf/results/cache_savings.json
    .venv/bin/python -m perf cache_savings resummarize  # recompute the summaries from the raw numbers in that file
    .venv/bin/python -m perf cache_savings calibrate    # only the in-process threshold check

Three parts, all in one run:

  calibrate  in-process, the served ONNX clip_image and the cache's fingerprint: cosine of near copies (JPEG
             quality 50, 0.7x resize, 5 % crop) of every sample photo vs cosine between different photos; the
             thresholds of the `cache` policy section must separate them (they are checked here, not assumed).
  prefix     in-process, the served language_decoder checkpoint: the same posts scored with the policy-prefix
             KV reused vs recomputed, alternating, side by side (prefill saving of prompt-prefix reuse).
  replay     two real Triton servers up at once, caches off and on (policy `escalate_all` without / with the
             verdict cache; repository without / with Triton's response cache on the pure encoders); each trace
             post goes to both, in alternating order, one request at a time (concurrency 1), so both share the
             machine's load. language_decoder and vision_encoder invocations and compute_infer time come from
             Triton's statistics API (admin key) before and after the replay.

  a10        the same with perf/a10_profile.py's decoder (an A10-like gate/VLM cost ratio): `--a10-projection`
             measures its per-call costs in-process (prefix reuse vs recompute) and applies them to the call counts
             the tiny replay measured on the server, because a server replay at ~7 s a decoder call does not fit on
             2 shared cores.

Trace (make_trace, moderation/testing/traces.py): N posts, of which `dup_rate` (30 %) are copies of earlier
"popular" posts -- 40 % of the copies exact (same bytes, same caption), 60 % near (a JPEG q50 re-encode, a 0.7x
resize or a 5 % crop, in turn, with the caption re-typed: other case and spacing). The other posts are unique:
distinct crops of the sample photos with their own captions. Every post goes through policy `escalate_all` (the gate
escalates everything, so the VLM's work is what is measured). The tiny random models are untrained: the numbers are
work counts and CPU times, not quality.
"""
from __future__ import annotations

from moderation.testing.traces import NEAR_KINDS, make_trace, near_copy, retyped, trace_mix, unique_image
from perf.cache_savings.calibrate import calibrate
from perf.cache_savings.prefix import prefix_saving
from perf.cache_savings.profiles import a10_projection, a10_repository, run_profile
from perf.cache_savings.replay import ADMIN_KEY, WORK, replay, replay_policies, repo_without_response_cache, vlm_work
from perf.cache_savings.summary import RESULTS, markdown, resummarize, summarize, vlm_cost

__all__ = ["ADMIN_KEY", "NEAR_KINDS", "RESULTS", "WORK", "a10_projection", "a10_repository", "calibrate",
           "make_trace", "markdown", "near_copy", "prefix_saving", "replay", "replay_policies",
           "repo_without_response_cache", "resummarize", "retyped", "run_profile", "summarize", "trace_mix",
           "unique_image", "vlm_cost", "vlm_work"]
