"""The words in the image, measured: OCR accuracy and cost, variant-proof term matching, and what OCR adds to the
gate path on a real server. Writes perf/results/ocr.json.

    .venv/bin/python -m perf ocr_bench [--runs 3]

  a. OCR in-process (the reader, the package's own sessions): character error rate on the rendered meme set
     (zh + en text drawn on the shipped photos, moderation/testing/memes.py) and ms per image for memes and for
     the text-free sample photos, at several detection side limits, side by side (runs interleaved).
  b. term matching (core/terms.py): recall on generated variants of every kind, false matches on a benign zh/en
     text set, and ms per post with 10 000 terms.
  c. a real server: gate-path latency of the text-free sample photos with OCR on and off (OPTIONS ocr), and of
     the memes, interleaved in one run; the memes against the CPU-tiny budget (perf/budgets.yaml gate_memes).
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

from perf.common import RESULTS, dump_json, git_commit, machine
from perf.harness import pct

DET_SIDES = (320, 480, 640, 960)


def edit_distance(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            cur = row[j]
            row[j] = min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
            prev = cur
    return row[len(b)]


def _chars(lines: list[str]) -> str:
    return "".join("".join(lines).split())  # PP-OCRv4 drops most spaces between English words: compare without


def ocr_accuracy_and_cost(runs: int) -> dict:
    from moderation.core.imaging import decode_image
    from moderation.ocr.reader import ImageTextReader
    from moderation.testing.memes import memes, render
    from moderation.testing.samples import sample_posts

    meme_set = [(m, decode_image(render(m)).image) for m in memes()]
    photos = [decode_image(p.image_bytes()).image for p in sample_posts()]
    readers = {side: ImageTextReader(det_side=side) for side in DET_SIDES}
    for r in readers.values():  # warm-up
        r.read(meme_set[0][1])
    times = {side: {"memes": [], "photos": []} for side in DET_SIDES}
    reads = {}
    for _ in range(runs):
        for side, reader in readers.items():  # interleaved: every side sees the same machine load
            for kind, images in (("memes", [im for _, im in meme_set]), ("photos", photos)):
                for im in images:
                    t = time.perf_counter()
                    lines = reader.read(im)
                    times[side][kind].append((time.perf_counter() - t) * 1e3)
                    if kind == "memes":
                        reads.setdefault(side, {})[id(im)] = [x.text for x in lines]
    out = {}
    for side in DET_SIDES:
        errors = total = 0
        per_meme = []
        for m, im in meme_set:
            ref, got = _chars(m.lines), _chars(reads[side][id(im)])
            d = edit_distance(ref, got)
            errors, total = errors + d, total + len(ref)
            per_meme.append({"meme": m.name, "expected": m.lines, "read": reads[side][id(im)], "char_errors": d,
                             "chars": len(ref)})
        out[str(side)] = {"cer": errors / total, "chars": total,
                          "memes_ms_p50": statistics.median(times[side]["memes"]),
                          "photos_ms_p50": statistics.median(times[side]["photos"]),
                          "photos_with_any_line": sum(bool(r.read(im)) for im in photos for r in [readers[side]]),
                          "per_meme": per_meme, "raw_ms": times[side]}
    return {"det_sides": out, "memes": len(meme_set), "photos": len(photos), "runs": runs}


# b. terms ---------------------------------------------------------------------------------------------------
def term_matching(rng: random.Random) -> dict:
    from moderation.core.terms import TermMatcher
    from moderation.testing.texts import BENIGN, EN_TERMS, ZH_TERMS, homophone_pool, variants

    entries = [(f"t{i}", t) for i, t in enumerate(ZH_TERMS + EN_TERMS)]
    matcher = TermMatcher(entries)
    sounds = homophone_pool()
    by_kind: dict[str, list[bool]] = {}
    misses = []
    for entry_id, term in entries:
        for kind, text in variants(term, rng, sounds).items():
            post = f"看这里 {text} 快来" if kind != "leetspeak" else f"look {text} now"
            found = any(h.entry_id == entry_id for h in matcher.match(post))
            by_kind.setdefault(kind, []).append(found)
            if not found:
                misses.append({"term": term, "kind": kind, "written": text})
    false = [(t, [h.entry_id for h in matcher.match(t)]) for t in BENIGN if matcher.match(t)]
    recall = {k: sum(v) / len(v) for k, v in by_kind.items()}
    everything = [x for v in by_kind.values() for x in v]
    # 10 000 terms: the policy's scale; cost per post = caption + image text, every view
    alphabet = "的一是不了人我在有他这为之大来以个中上们到说国和地也子时道出要于就下得可你年生自会那后能对着事其里所去"
    big = [(f"b{i}", "".join(rng.choice(alphabet) for _ in range(rng.randint(2, 5)))) for i in range(7000)]
    big += [(f"e{i}", " ".join(rng.choice(["free", "cash", "win", "crypto", "link", "hate", "click", "bonus",
                                           "money", "prize", "send", "now"]) for _ in range(rng.randint(2, 3))))
            for i in range(3000)]
    t = time.perf_counter()
    m10k = TermMatcher(big)
    build_s = time.perf_counter() - t
    posts = [f"{a} {b}" for a, b in zip(BENIGN, reversed(BENIGN), strict=True)]
    for p in posts:
        m10k.match(p)
    samples = []
    for _ in range(5):
        t = time.perf_counter()
        for p in posts:
            m10k.match(p)
        samples.append((time.perf_counter() - t) / len(posts) * 1e3)
    return {"terms": len(entries), "recall_by_kind": recall, "recall_all": sum(everything) / len(everything),
            "variants": len(everything), "misses": misses, "benign_texts": len(BENIGN),
            "false_matches": false, "false_match_rate": len(false) / len(BENIGN),
            "ten_k": {"terms": len(big), "build_s": build_s, "ms_per_post_median": statistics.median(samples),
                      "ms_per_post_runs": samples, "post_chars_mean": statistics.mean(len(p) for p in posts)}}


# c. server --------------------------------------------------------------------------------------------------
def _unseen(image: bytes, k: int) -> bytes:
    """The image with one pixel changed, as PNG: every model's input differs, so no arm is answered from Triton's
    response cache (the encoders' and ocr_detect's) with what another arm or run computed."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(image)) as im:
        im = im.convert("RGB")
        im.putpixel((0, 0), (k % 256, (k // 256) % 256, 7))
        buf = io.BytesIO()
        im.save(buf, format="PNG")
    return buf.getvalue()


def served(runs: int) -> dict:
    from clients.client import ModerationClient
    from moderation.testing.memes import memes, render
    from moderation.testing.samples import sample_posts
    from perf.common import BUILD
    from perf.harness import serve
    from perf.run_perf import load_budgets

    photos = [(p.image_bytes(), p.text) for p in sample_posts()]
    meme_posts = [(render(m), m.caption) for m in memes()]
    arms = {"photos_ocr_on": (photos, True), "photos_ocr_off": (photos, False), "memes": (meme_posts, True)}
    lat = {k: [] for k in arms}
    with serve(None, BUILD / "ocr-bench-audit.jsonl", BUILD / "logs" / "ocr-bench.log") as srv, \
            ModerationClient(srv.grpc_url, timeout_s=120) as c:
        for image, text in photos[:2] + meme_posts[:2]:  # warm-up
            c.moderate(image, text, policy="allow_all")
        for run in range(runs):
            for i in range(max(len(photos), len(meme_posts))):
                for a, (name, (posts, ocr)) in enumerate(arms.items()):  # interleaved arms
                    if i < len(posts):
                        image = _unseen(posts[i][0], (run * len(arms) + a) * 64 + i)
                        t = time.perf_counter()
                        c.moderate_batch([(image, posts[i][1], {"policy": "allow_all", "ocr": ocr})])
                        lat[name].append((time.perf_counter() - t) * 1e3)
    budget = load_budgets()["cpu_tiny"]["gate_memes"]
    out = {k: {"n": len(v), "p50_ms": pct(v, 50), "p99_ms": pct(v, 99), "raw_ms": v} for k, v in lat.items()}
    out["text_free_ratio_p50"] = out["photos_ocr_on"]["p50_ms"] / out["photos_ocr_off"]["p50_ms"]
    out["memes_within_cpu_tiny_budget"] = (out["memes"]["p50_ms"] <= budget["p50_ms"]
                                           and out["memes"]["p99_ms"] <= budget["p99_ms"])
    out["cpu_tiny_budget"] = budget
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS / "ocr.json")
    ap.add_argument("--skip-server", action="store_true")
    args = ap.parse_args(argv)
    res = {"what": __doc__.split("\n\n")[0], "commit": git_commit(), "machine": machine(), "runs": args.runs}
    res["a_ocr"] = ocr_accuracy_and_cost(args.runs)
    res["b_terms"] = term_matching(random.Random(7))
    if not args.skip_server:
        res["c_served"] = served(args.runs)
    dump_json(args.out, res, settings=args)
    for side, r in res["a_ocr"]["det_sides"].items():
        print(f"det side {side}: CER {r['cer']:.3%}, memes p50 {r['memes_ms_p50']:.0f} ms, text-free photos p50 "
              f"{r['photos_ms_p50']:.0f} ms")
    b = res["b_terms"]
    print(f"terms: recall {b['recall_all']:.1%} {b['recall_by_kind']}, false matches {b['false_match_rate']:.1%}, "
          f"10k terms {b['ten_k']['ms_per_post_median']:.3f} ms/post")
    if "c_served" in res:
        c = res["c_served"]
        print(f"served: text-free p50 OCR on/off {c['text_free_ratio_p50']:.2f}x "
              f"({c['photos_ocr_on']['p50_ms']:.0f} / {c['photos_ocr_off']['p50_ms']:.0f} ms); memes p50 "
              f"{c['memes']['p50_ms']:.0f} ms p99 {c['memes']['p99_ms']:.0f} ms, within budget "
              f"{c['memes_within_cpu_tiny_budget']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
