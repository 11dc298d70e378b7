"""Hostile uploads, measured against a real server through the gateway: what a dense-text image and a maximum-size
image cost, whether they starve another client, and whether the stages' memory comes back. Writes
perf/results/cost_bounds.json (raw latencies, summary, machine, commit).

  ocr        p50 over unseen posts (a faint noise seeded per post, so no response cache answers even an OCR
             crop), interleaved: a normal meme (two lines), the dense-text PNG (555 small words in 33 rows,
             480x480: 33 long boxes) and the spaced-words PNG (320 words, a box each), under the shipped OCR
             budget and with it lifted (policy ocr limits at their maximum: what every detected box used to cost);
  fairness   a second client's sequential small posts (sample photos, unseen) alone, then while dense-text and
             spaced-words posts in turn arrive at 2/s on other connections (open loop), under the budget and with
             it lifted;
  decode     p50 of a flat 6324x6324 JPEG, a flat 16384x2441 JPEG and a 4000x3000 photo JPEG, interleaved, each
             post with a patch of its own colour at the centre; and in-process decode_image of each at full size
             vs reduced, side by side;
  memory     RSS of the preprocess, read_text and vlm_preprocess stubs (summed over a stage's instances) after a few
             ordinary posts, at its peak and after each of two bursts of 12 maximum-size images sent at once
             (escalate_all, so vlm_preprocess decodes them too).

All on the gate path's policies derived from the shipped default (allow_all, escalate_all).

    .venv/bin/python -m perf cost_bounds [--n 8] [--seconds 20]
"""
from __future__ import annotations

import argparse
import io
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import tritonclient.grpc as grpcclient

from moderation.core.caller import CLIENT_METADATA
from perf.common import BUILD, REPO, RESULTS, dump_json, git_commit, machine
from perf.harness import UniquePosts, pct, serve

STAGES = ("preprocess", "read_text", "vlm_preprocess")


def write_policies(directory: Path) -> Path:
    """allow_all / escalate_all (verdict cache off) and allow_all_unbounded: allow_all with the OCR budget at its
    policy maximum."""
    from moderation.testing.policies import ALLOW_ALL_GATE, derive_policy, write_fixed_route_policies

    write_fixed_route_policies(directory)
    derive_policy(directory, "allow_all_unbounded", gate=ALLOW_ALL_GATE, cache={"enabled": False},
                  ocr={"max_boxes": 1000, "max_read_area": 10_000.0, "max_read_ms": 60_000.0})
    return directory


def photo_jpeg(size=(4000, 3000)) -> bytes:
    """A shipped photo enlarged to a phone camera's 12 MP, JPEG q90."""
    from PIL import Image

    from moderation.testing.samples import image_paths

    buf = io.BytesIO()
    Image.open(image_paths()["astronaut"]).convert("RGB").resize(size, Image.BICUBIC).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _client(url: str):
    return grpcclient.InferenceServerClient(url)


def _timed(client, image: bytes, text: str, policy: str, caller: str = "cost-bounds") -> tuple[float, dict]:
    """One post as `caller` (the gateway's fair shares are per caller, as the client library names each client
    object; unnamed calls from one host would all be one caller): milliseconds and the validated RESULT."""
    from clients.client import build_inputs, parse_response

    inputs, outputs = build_inputs(grpcclient, image, text, {"policy": policy})
    t0 = time.perf_counter()
    r = client.infer("moderate", inputs, outputs=outputs, client_timeout=300, headers={CLIENT_METADATA: caller})
    ms = (time.perf_counter() - t0) * 1e3
    return ms, parse_response(r)


def _summary(ms: list[float]) -> dict:
    return {"n": len(ms), "p50_ms": round(pct(ms, 50), 1), "p90_ms": round(pct(ms, 90), 1),
            "max_ms": round(max(ms), 1), "ms": [round(x, 1) for x in ms]}


def ocr_cost(url: str, n: int, n_unbounded: int) -> dict:
    from moderation.testing.hostile_images import dense_text_png, spaced_words_png, unseen_copy
    from moderation.testing.memes import memes, render

    meme, dense = render(next(m for m in memes() if m.name == "cat_joke_en")), dense_text_png()
    words = spaced_words_png()
    c = _client(url)
    for i in range(2):  # warm every path
        _timed(c, unseen_copy(meme, 10_000 + i), "lol", "allow_all")
        _timed(c, unseen_copy(dense, 10_000 + i), "lol", "allow_all")
    arms = {"meme": [], "dense": [], "dense_unbounded": [], "words": [], "words_unbounded": []}
    seen = {arm: [] for arm in arms if arm != "meme"}
    unseen = 0
    for i in range(n):
        for arm, data, policy in (("meme", meme, "allow_all"), ("dense", dense, "allow_all"),
                                  ("dense_unbounded", dense, "allow_all_unbounded"), ("words", words, "allow_all"),
                                  ("words_unbounded", words, "allow_all_unbounded")):
            if arm.endswith("_unbounded") and i >= n_unbounded:
                continue
            unseen += 1
            ms, r = _timed(c, unseen_copy(data, unseen), "lol", policy)
            arms[arm].append(ms)
            if arm in seen:
                latency = r["latency_ms"]
                seen[arm].append({"truncated": r["image_text"]["truncated"], "lines": len(r["image_text"]["lines"]),
                                  "action": r["action"], "decided_by": r["decided_by"],
                                  "read_text_ms": round(latency.get("read_text", 0.0), 1)})
    out = {arm: _summary(ms) for arm, ms in arms.items()}
    out["dense_results"] = seen
    out["bytes"] = {"meme": len(meme), "dense": len(dense), "words": len(words)}
    for arm in seen:
        out[f"{arm}_over_meme_p50"] = round(out[arm]["p50_ms"] / out["meme"]["p50_ms"], 2)
    return out


def fairness(url: str, rate_per_s: float, seconds: float, seconds_unbounded: float) -> dict:
    """The second client alone, then beside dense-text posts arriving at `rate_per_s` for `seconds` (budgeted)
    and for `seconds_unbounded` (budget lifted: the stream's backlog drains before the next arm)."""
    posts = UniquePosts()
    polite_client = _client(url)

    def polite(until: float, n_max: int = 10_000) -> dict:
        ms, errors = [], 0
        while time.perf_counter() < until and len(ms) + errors < n_max:
            image, text = posts.next()
            try:
                ms.append(_timed(polite_client, image, text.decode(), "allow_all", "second-client")[0])
            except Exception:  # noqa: BLE001 - a refused or failed post is counted, not measured
                errors += 1
        return {**_summary(ms), "errors": errors}

    polite(time.perf_counter() + 3.0)
    out = {"rate_per_s": rate_per_s, "alone": polite(time.perf_counter() + seconds)}
    for arm, policy, window in (("with_dense_posts", "allow_all", seconds),
                                ("with_dense_posts_unbounded", "allow_all_unbounded", seconds_unbounded)):
        if window <= 0:
            continue
        t0 = time.perf_counter()
        out[arm] = {**_beside_hostile(url, rate_per_s, policy, window, polite)}
        out[arm]["arm_s"] = round(time.perf_counter() - t0, 1)
        out[f"p50_ratio_{arm}"] = round(out[arm]["second_client"]["p50_ms"] / out["alone"]["p50_ms"], 2)
    return out


def _beside_hostile(url: str, rate_per_s: float, policy: str, seconds: float, polite) -> dict:
    """Dense-text and spaced-words posts in turn, sent open loop at `rate_per_s` (each on its own connection) while
    `polite` runs for
    `seconds`; then the stream stops and what it sent is awaited."""
    from moderation.testing.hostile_images import dense_text_png, spaced_words_png, unseen_copy

    kinds = (dense_text_png(), spaced_words_png())
    hostile_ms, hostile_errors, stop = [], [], threading.Event()
    pool = ThreadPoolExecutor(max_workers=64)
    base = int(time.time() * 1000) % 1_000_000

    def one_hostile(i: int):
        try:
            image = unseen_copy(kinds[i % 2], base + i)
            hostile_ms.append(_timed(_client(url), image, "lol", policy, "hostile-client")[0])
        except Exception as e:  # noqa: BLE001 - refused posts (queue timeouts) are counted
            hostile_errors.append(type(e).__name__)

    def arrivals():
        i, t_next = 0, time.perf_counter()
        t_end = t_next + 2.0 + seconds  # the stream stops on time even while a second-client post still waits
        while not stop.is_set() and time.perf_counter() < t_end:
            pool.submit(one_hostile, i)
            i += 1
            t_next += 1.0 / rate_per_s
            stop.wait(max(0.0, t_next - time.perf_counter()))

    sender = threading.Thread(target=arrivals, daemon=True)
    sender.start()
    time.sleep(2.0)  # the stream is flowing before the second client measures
    second = polite(time.perf_counter() + seconds)
    stop.set()
    sender.join()
    pool.shutdown(wait=True)
    return {"policy": policy, "second_client": second,
            "hostile": {**(_summary(hostile_ms) if hostile_ms else {"n": 0}), "errors": len(hostile_errors)}}


def decode_cost(url: str, n: int) -> dict:
    from moderation.core.imaging import decode_image
    from moderation.testing.hostile_images import flat_jpeg, stamped_copy

    sources = {"flat_6324x6324": flat_jpeg(6324, 6324), "flat_16384x2441": flat_jpeg(16384, 2441),
               "photo_4000x3000": photo_jpeg()}
    posts = {k: [stamped_copy(v, 100 + i) for i in range(n + 1)] for k, v in sources.items()}
    c = _client(url)
    for k in posts:
        _timed(c, posts[k][n], "a picture", "allow_all")  # warm
    served = {k: [] for k in posts}
    for i in range(n):
        for k in posts:
            served[k].append(_timed(c, posts[k][i], "a picture", "allow_all")[0])
    inproc = {k: {"full": [], "reduced": []} for k in sources}
    for _ in range(3):
        for k, data in sources.items():
            for arm, side in (("full", None), ("reduced", 1024)):
                t0 = time.perf_counter()
                decode_image(data, decode_side=side)
                inproc[k][arm].append((time.perf_counter() - t0) * 1e3)
    out = {"bytes": {k: len(v) for k, v in sources.items()}, "served": {k: _summary(v) for k, v in served.items()},
           "decode_image_in_process_p50_ms": {k: {arm: round(statistics.median(v), 1) for arm, v in d.items()}
                                              for k, d in inproc.items()}}
    photo = out["served"]["photo_4000x3000"]["p50_ms"]
    out["flat_6324_over_photo_p50"] = round(out["served"]["flat_6324x6324"]["p50_ms"] / photo, 2)
    out["flat_16384_over_photo_p50"] = round(out["served"]["flat_16384x2441"]["p50_ms"] / photo, 2)
    return out


def stage_pids(triton_pid: int) -> dict[str, list[int]]:
    """The python backend stubs of STAGES (one per instance), found by the model file on their command line."""
    import psutil

    out: dict[str, list[int]] = {stage: [] for stage in STAGES}
    for p in psutil.Process(triton_pid).children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
        except psutil.Error:
            continue
        for stage in STAGES:
            if f"/{stage}/1/model.py" in cmd:
                out[stage].append(p.pid)
    return out


def rss_mb(pids: dict[str, list[int]]) -> dict[str, float]:
    """Each stage's RSS, summed over its instances."""
    import psutil

    return {k: round(sum(psutil.Process(pid).memory_info().rss for pid in v) / 2**20, 1) for k, v in pids.items()}


def memory(url: str, triton_pid: int, burst: int) -> dict:
    """Stage RSS after a few ordinary posts, then around two bursts of `burst` maximum-size images at once."""
    from PIL import Image

    from moderation.testing.hostile_images import flat_jpeg, stamped_copy

    buf = io.BytesIO()
    Image.new("RGB", (6000, 6000), (90, 90, 200)).save(buf, "PNG")
    kinds = [flat_jpeg(6324, 6324), flat_jpeg(16384, 2441), buf.getvalue()]
    pids = stage_pids(triton_pid)
    posts, warm = UniquePosts(), _client(url)
    for _ in range(4):  # every stage has run and imported what it needs
        image, text = posts.next()
        _timed(warm, image, text.decode(), "escalate_all")
    rss = {"before": rss_mb(pids)}
    peak, stop = dict(rss["before"]), threading.Event()

    def sample():
        while not stop.is_set():
            for k, v in rss_mb(pids).items():
                peak[k] = max(peak[k], v)
            stop.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    bursts = []
    for b in range(2):
        images = [stamped_copy(kinds[i % 3], 1000 * b + i, "PNG" if i % 3 == 2 else "JPEG")
                  for i in range(burst)]
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=burst) as pool:
            answers = list(pool.map(lambda im: _timed(_client(url), im, "a picture", "escalate_all"), images))
        bursts.append({"s": round(time.perf_counter() - t0, 2), "routes": sorted({r["route"] for _, r in answers}),
                       "errors": sum(r.get("error") is not None for _, r in answers)})
        time.sleep(3.0)
        rss[f"after_burst_{b + 1}"] = rss_mb(pids)
    stop.set()
    sampler.join()
    rss["peak"] = peak
    return {"burst": burst, "instances": {k: len(v) for k, v in pids.items()},
            "kinds": ["flat JPEG 6324x6324", "flat JPEG 16384x2441", "flat PNG 6000x6000"],
            "bursts": bursts, "rss_mb": rss,
            "growth_mb": {k: {"after_burst_1": round(rss["after_burst_1"][k] - rss["before"][k], 1),
                              "after_burst_2": round(rss["after_burst_2"][k] - rss["before"][k], 1),
                              "peak": round(peak[k] - rss["before"][k], 1)} for k in rss["before"]}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=8, help="posts per arm (ocr, decode)")
    ap.add_argument("--unbounded", type=int, default=3, help="dense posts with the budget lifted")
    ap.add_argument("--seconds", type=float, default=20.0, help="second client alone and beside budgeted posts")
    ap.add_argument("--seconds-unbounded", type=float, default=4.0, help="... beside posts with the budget lifted")
    ap.add_argument("--burst", type=int, default=12)
    ap.add_argument("--parts", default="memory,ocr,decode,fairness", help="comma-separated; the result file is "
                    "written only for all four")
    args = ap.parse_args(argv)
    parts = set(args.parts.split(","))
    t_start = time.time()
    out = {"commit": git_commit(), "machine": machine(), "args": vars(args)}
    policies = write_policies(BUILD / "cost_bounds_policies")
    audit = BUILD / "cost_bounds_audit.jsonl"
    with serve(REPO, audit=audit, log=BUILD / "cost_bounds.log", policy_dir=policies) as srv:
        if "memory" in parts:
            out["memory"] = memory(srv.grpc_url, srv.process.proc.pid, args.burst)  # first: a fresh server's stubs
            print("memory", out["memory"]["growth_mb"], flush=True)
        if "ocr" in parts:
            out["ocr"] = ocr_cost(srv.grpc_url, args.n, args.unbounded)
            print("ocr", {k: v["p50_ms"] for k, v in out["ocr"].items() if isinstance(v, dict) and "p50_ms" in v},
                  flush=True)
        if "decode" in parts:
            out["decode"] = decode_cost(srv.grpc_url, args.n)
            print("decode", {k: v["p50_ms"] for k, v in out["decode"]["served"].items()},
                  out["decode"]["decode_image_in_process_p50_ms"], flush=True)
        if "fairness" in parts:
            out["fairness"] = f = fairness(srv.grpc_url, 2.0, args.seconds, args.seconds_unbounded)
            print("fairness", f["alone"]["p50_ms"], {k: f[k] for k in f if k.startswith("p50_ratio")}, flush=True)
    if parts != {"memory", "ocr", "decode", "fairness"}:
        return 0
    out["goals"] = {
        "dense_over_meme_p50 <= 3": out["ocr"]["dense_over_meme_p50"] <= 3,
        "words_over_meme_p50 <= 3": out["ocr"]["words_over_meme_p50"] <= 3,
        "second_client_p50_ratio <= 2": out["fairness"]["p50_ratio_with_dense_posts"] <= 2,
        "flat_6324_over_photo_p50 <= 2": out["decode"]["flat_6324_over_photo_p50"] <= 2,
    }
    out["wall_s"] = round(time.time() - t_start, 1)
    dump_json(RESULTS / "cost_bounds.json", out, settings=args)
    print(out["goals"], f"{out['wall_s']} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
