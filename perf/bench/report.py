"""The summary table of `make bench` (one row per comparison: goal, measured, runs, spread) and its plot."""
from __future__ import annotations

import csv
import statistics
from pathlib import Path


def _row(comparison: str, goal: str, measured: str, runs: int, spread: str, goal_met: bool) -> dict:
    return {"comparison": comparison, "goal": goal, "measured": measured, "runs": runs, "spread": spread,
            "goal_met": goal_met}


def summary_rows(res: dict) -> list[dict]:
    rows = []
    for path, v in res["a_triton_vs_inprocess"].items():
        s = v["overhead_ms_spread"]
        rows.append(_row(f"a. Triton vs in-process ({path}) p50", "overhead <= 5% + 1 ms",
                         f"{v['triton_p50_ms']:.1f} vs {v['inprocess_p50_ms']:.1f} ms: "
                         f"+{v['overhead_p50_ms']:.1f} ms ({v['overhead_p50_pct']:.0f} %); "
                         f"p99 +{v['overhead_p99_ms']:.1f} ms",
                         s["runs"], f"overhead {s['min']:.1f}..{s['max']:.1f} ms", v["goal_met"]))
    for v in res["b_prefill_vs_generate"]:
        s = v["speedup"]
        rows.append(_row(f"b. one-prefill verdict vs generate-200 ({v['decoder']})", ">= 10x",
                         f"{s['median']:.0f}x ({v['prefill_verdict_ms']['median']:.0f} vs "
                         f"{v['generate200_ms']['median']:.0f} ms)",
                         s["runs"], f"{s['min']:.0f}..{s['max']:.0f}x", v["goal_met"]))
    c = res["c_gated_vs_all_vlm"]
    s = c["ratio"]
    rows.append(_row(f"c. gated vs all-to-VLM at {c['escalation_rate']:.0%} escalation (A10 profile)", ">= 4x",
                     f"{s['median']:.2f}x (R measured {c['R_measured']['median']:.1f}, "
                     f"expected R/(1+0.2R) = {c['ratio_expected_from_R']['median']:.2f}x)",
                     s["runs"], f"{s['min']:.2f}..{s['max']:.2f}x", c["goal_met"]))
    for path, s in res["d_batching"]["ratios"].items():
        rows.append(_row(f"d. dynamic batching vs none, concurrency 16 ({path})", ">= 3x", f"{s['median']:.2f}x",
                         s["runs"], f"{s['min']:.2f}..{s['max']:.2f}x", s["median"] >= 3))
    for path, v in res["e_response_cache"].items():
        s = v["hit_ms"]
        rows.append(_row(f"e. response cache hit vs miss ({path})", ">= 50x",
                         f"{v['speedup']:.0f}x ({v['miss_ms']['median']:.1f} vs {s['median']:.2f} ms); "
                         f"deep caches only {v['deep_speedup']:.2f}x",
                         s["runs"], f"hit {s['min']:.2f}..{s['max']:.2f} ms", v["goal_met"]))
    return rows


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 5, figsize=(19, 3.8))
    a = res["a_triton_vs_inprocess"]
    ax = axes[0]
    data, labels = [], []
    for path_, v in a.items():
        data += [v["inprocess_latencies_ms"], v["triton_latencies_ms"]]
        labels += [f"{path_}\nin-process", f"{path_}\nTriton"]
    ax.boxplot(data, tick_labels=labels, showfliers=True)
    ax.set_yscale("log")
    ax.set_ylabel("ms per request (concurrency 1)")
    ax.set_title("a. Triton vs in-process", fontsize=9)
    ax.tick_params(labelsize=6)
    ax = axes[1]
    for i, v in enumerate(res["b_prefill_vs_generate"]):
        ax.bar([i * 3, i * 3 + 1], [v["prefill_verdict_ms"]["median"], v["generate200_ms"]["median"]],
               color=["tab:green", "tab:red"])
    ax.set_xticks([i * 3 + 0.5 for i in range(len(res["b_prefill_vs_generate"]))],
                  [v["decoder"] for v in res["b_prefill_vs_generate"]], fontsize=7)
    ax.set_yscale("log")
    ax.set_title("b. prefill verdict (green) vs generate-200 (red), ms", fontsize=9)
    ax = axes[2]
    c = res["c_gated_vs_all_vlm"]["per_run"]
    for key, col in (("all_to_vlm", "tab:red"), ("gated", "tab:green"), ("gate_only", "tab:blue")):
        ax.plot(range(1, len(c) + 1), [x[key]["throughput"] for x in c], "o-", color=col, label=key)
    ax.set_yscale("log")
    ax.set_xlabel("run")
    ax.set_ylabel("posts/s")
    ax.legend(fontsize=7)
    ax.set_title("c. throughput, A10 cost profile, 20 % escalation", fontsize=9)
    ax = axes[3]
    d = res["d_batching"]
    for i, p_ in enumerate(("gate_path", "vlm")):
        ax.bar([i * 3, i * 3 + 1], [statistics.median(x["throughput"] for x in d["batched"][p_]),
                                    statistics.median(x["throughput"] for x in d["unbatched"][p_])],
               color=["tab:green", "tab:gray"])
    ax.set_xticks([0.5, 3.5], ["gate path", "vlm ensemble"], fontsize=7)
    ax.set_title("d. throughput at c16: batched (green) vs none", fontsize=9)
    ax = axes[4]
    e = res["e_response_cache"]
    for i, v in enumerate(e.values()):
        ax.bar([i * 4, i * 4 + 1, i * 4 + 2],
               [v["miss_ms"]["median"], v["deep_cache_ms"]["median"], v["hit_ms"]["median"]],
               color=["tab:red", "tab:orange", "tab:green"])
    ax.set_xticks([1, 5], list(e), fontsize=7)
    ax.set_yscale("log")
    ax.set_title("e. miss (red), deep caches (orange), hit (green), ms", fontsize=9)
    fig.suptitle("make bench: CPU 2 cores, random-weight models (untrained); see docs/performance.md", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def print_table(rows: list[dict]) -> None:
    width = max(len(r["comparison"]) for r in rows)
    for r in rows:
        print(f"{r['comparison']:{width}s}  {r['measured']:60s} runs {r['runs']}  {r['spread']:22s} "
              f"goal {r['goal']}: {'met' if r['goal_met'] else 'MISSED'}")
