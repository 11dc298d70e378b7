"""Every perf scenario by name: the module whose main(argv) runs it, what it is (a benchmark rerun to measure the
current code, a study that once informed a constant or a design, or a tool the others use) and one line on what it
does. `python -m perf <name> [its options]` runs one; `python -m perf --list` prints them all."""
from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Scenario:
    name: str
    module: str  # has main(argv); the scenario's own options are parsed there
    kind: str  # benchmark | study | tool
    description: str

    def run(self, argv: list[str]) -> int:
        sys.argv[0] = f"python -m perf {self.name}"  # argparse's usage line names the command that was run
        status = importlib.import_module(self.module).main(argv)
        # most mains return an exit status; a few return their result (a dict) or nothing, which is success
        return status if isinstance(status, int) else 0


SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario("run_perf", "perf.run_perf", "benchmark",
             "perf_analyzer on every target of perf/targets.yaml, checked against perf/budgets.yaml (make perf)"),
    Scenario("bench", "perf.bench.__main__", "benchmark",
             "side-by-side ratios: Triton vs in-process, prefill vs generate, gated vs all-VLM, batching, caches"),
    Scenario("soak", "perf.soak", "benchmark",
             "bounded soak: mixed good and bad requests, stub memory sampled against its bound (make soak)"),
    Scenario("chaos", "perf.chaos", "benchmark",
             "a fault schedule under load: no request lost, every audit row readable (make chaos)"),
    Scenario("front_door", "perf.front_door", "benchmark",
             "the public port under oversized messages and a greedy client (make bench-front-door)"),
    Scenario("gateway_overhead", "perf.gateway_overhead", "benchmark",
             "the audit gateway's cost: Triton's own gRPC port and the gateway side by side"),
    Scenario("cost_bounds", "perf.cost_bounds", "benchmark",
             "dense-text and maximum-size uploads: their cost, starvation of others, memory coming back"),
    Scenario("media_cost", "perf.media_cost", "benchmark",
             "phone photos, screenshots, animations and multi-image posts on the gate path"),
    Scenario("openai_burst", "perf.openai_burst", "benchmark",
             "/v1/moderations under a burst of large legal posts: front-end memory and refusals"),
    Scenario("shared_cache", "perf.shared_cache", "benchmark",
             "the verdict cache shared through Redis vs one per replica, and a Redis outage under load"),
    Scenario("cache_savings", "perf.cache_savings.__main__", "benchmark",
             "VLM work the caches save on a trace with a stated duplicate mix (tiny and A10-like profiles)"),
    Scenario("int8_bench", "perf.int8_bench", "benchmark",
             "INT8 vs full precision: agreement and speed of the encoders and the decoder (make bench-int8)"),
    Scenario("ocr_bench", "perf.ocr_bench", "benchmark",
             "OCR accuracy and cost, variant-proof term matching, OCR on/off on a server (make bench-ocr)"),
    Scenario("report_bench", "perf.report_bench", "benchmark",
             "the DuckDB audit report on a generated day of rows: time and peak memory (make bench-report)"),
    Scenario("measure_8b", "perf.gpu.measure_8b", "benchmark",
             "Qwen3-VL-8B-shaped latency and memory on a lent GPU, projected to an A10"),
    Scenario("decode_ratios", "perf.studies.decode_ratios", "study",
             "pixels declared per encoded byte of legitimate images: the evidence for MAX_PIXELS_PER_BYTE"),
    Scenario("cache_local", "perf.studies.cache_local", "study",
             "the verdict cache's local check: copies that must hit, patched posts that must miss"),
    Scenario("pdq_lists", "perf.studies.pdq_lists", "study",
             "image-list matching: PDQ entry windows against copies and other photos (the entry crops)"),
    Scenario("prompt_tokens", "perf.studies.prompt_tokens", "study",
             "the verdict prompt's token counts with Qwen's real vocabulary, per language"),
    Scenario("export_memory", "perf.studies.export_memory", "study",
             "host memory of exporting the Qwen3-VL vision tower, with the parity each export reached"),
    Scenario("quality_report", "perf.studies.quality_report", "study",
             "false positives of the trained nsfw_image signal on every shipped safe-for-work image"),
    Scenario("bad_inputs", "perf.bad_inputs", "tool",
             "send every case of the bad-input catalogue to a running server: expected vs got"),
    Scenario("make_inputs", "perf.make_inputs", "tool",
             "perf_analyzer --input-data files from the sample posts, one per target"),
    Scenario("a10_profile", "perf.a10_profile", "tool",
             "build the A10-like decoder profile and its repository under build/bench/ (used by bench)"),
)}


def listing() -> str:
    """One line per scenario, grouped by kind: name, then what it does."""
    width = max(len(n) for n in SCENARIOS)
    lines = []
    for kind, heading in (("benchmark", "benchmarks"), ("study", "studies"), ("tool", "tools")):
        lines.append(f"{heading}:")
        lines += [f"  {s.name:{width}s}  {s.description}" for s in SCENARIOS.values() if s.kind == kind]
    return "\n".join(lines)
