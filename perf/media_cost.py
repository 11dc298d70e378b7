"""What the media people post costs on the gate path, measured against a real server through the gateway: a phone
photo against the same photo at 640x480, a tall screenshot, an animated GIF against its first frame alone, a post of
three images against a post of one; then posts per second on a mix of phone photos, screenshots, GIFs and small
photos sent by several callers at once. Writes perf/results/media_cost.json (raw latencies, each arm's median stage
times from RESULT.latency_ms, ratios, throughput, machine, commit).

Every post is unseen (a patch of its own colour, so no cache answers it); the arms are interleaved post by post, so
background load falls on all of them alike. Policy allow_all (the gate settles every post: no VLM), verdict cache
off, the shipped OCR budget and media settings (media.max_frames 8).

    .venv/bin/python -m perf media_cost [--n 8] [--mix-posts 48] [--callers 4]
"""
from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from moderation.core.policy import load_policy
from moderation.testing.policies import ALLOW_ALL_GATE, derive_policy
from perf.common import BUILD, REPO, RESULTS, dump_json, git_commit, machine
from perf.cost_bounds import _client, _summary, _timed, write_policies
from perf.harness import serve

FONT = "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc"


def _photo(size: tuple[int, int], seed: int, name: str = "astronaut") -> Image.Image:
    from moderation.testing.samples import image_paths

    im = Image.open(image_paths()[name]).convert("RGB").resize(size, Image.BICUBIC)
    ImageDraw.Draw(im).rectangle((8, 8, 8 + size[0] // 40, 8 + size[1] // 40),
                                 fill=tuple(int(c) for c in np.random.default_rng(seed).integers(0, 256, 3)))
    return im


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _screenshot(seed: int, lines: int = 12) -> Image.Image:
    """A 1170x2532 phone screenshot: a photo on top, `lines` lines of text below (0: its size without its text)."""
    im = Image.new("RGB", (1170, 2532), (250, 250, 250))
    im.paste(_photo((1170, 880), seed, "coffee"), (0, 0))
    draw, font = ImageDraw.Draw(im), ImageFont.truetype(FONT, 44)
    for row in range(lines):
        draw.text((60, 960 + row * 120), f"comment {row + 1}: what a lovely morning ☕ 早安 {seed}", font=font,
                  fill=(20, 20, 20))
    return im


def _animation(seed: int, frames: int = 6, caption_in: tuple[int, ...] | None = None) -> list[Image.Image]:
    """A 640x480 meme: a dot moving over a photo, a caption drawn in the frames `caption_in` (None: every frame, as
    a reaction GIF carries its caption; (3,): a caption shown in frame 3 only, hidden from first-frame readers)."""
    base, out = _photo((640, 480), seed, "chelsea"), []
    for i in range(frames):
        f = base.copy()
        draw = ImageDraw.Draw(f)
        draw.ellipse((40 + 60 * i, 40, 70 + 60 * i, 70), fill=(255, 0, 0))
        if caption_in is None or i in caption_in:
            draw.rectangle((20, 380, 620, 460), fill=(255, 255, 255))
            draw.text((40, 390), f"WHEN THE CODE WORKS {seed}", font=ImageFont.truetype(FONT, 40), fill=(0, 0, 0))
        out.append(f)
    return out


def _gif(frames: list[Image.Image]) -> bytes:
    if len(frames) == 1:
        return _encode(frames[0], "GIF")
    return _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def arms(seed: int) -> dict[str, bytes | list[bytes]]:
    """Round `seed`'s post of every arm. Each arm draws its own seed: no two posts share a picture or a line of
    text, so neither the verdict cache nor the OCR and encoder models' response caches answer any of them (a GIF arm
    sharing its first frame with the first-frame arm would have its detection served from the cache)."""
    s = {arm: seed * 16 + k for k, arm in enumerate(ARMS)}
    return {
        "photo_640x480": _encode(_photo((640, 480), s["photo_640x480"]), "JPEG", quality=90),
        "photo_4000x3000": _encode(_photo((4000, 3000), s["photo_4000x3000"]), "JPEG", quality=90),
        "screenshot_1170x2532_png": _encode(_screenshot(s["screenshot_1170x2532_png"]), "PNG"),
        "screenshot_without_text": _encode(_screenshot(s["screenshot_without_text"], lines=0), "PNG"),
        "screenshot_half_ocr_budget": _encode(_screenshot(s["screenshot_half_ocr_budget"]), "PNG"),
        "gif_first_frame": _gif(_animation(s["gif_first_frame"])[:1]),
        "gif_6_frames": _gif(_animation(s["gif_6_frames"])),
        "gif_hidden_caption_first_frame": _gif(_animation(s["gif_hidden_caption_first_frame"], caption_in=(3,))[:1]),
        "gif_hidden_caption_6_frames": _gif(_animation(s["gif_hidden_caption_6_frames"], caption_in=(3,))),
        "post_1_image": _encode(_photo((640, 480), s["post_1_image"], "rocket"), "JPEG", quality=90),
        "post_3_images": [_encode(_photo((640, 480), s["post_3_images"], n), "JPEG", quality=90)
                          for n in ("rocket", "coffee", "horse")],
    }


ARMS = ("photo_640x480", "photo_4000x3000", "screenshot_1170x2532_png", "screenshot_without_text",
        "screenshot_half_ocr_budget", "gif_first_frame", "gif_6_frames", "gif_hidden_caption_first_frame",
        "gif_hidden_caption_6_frames", "post_1_image", "post_3_images")


RATIOS = {  # name: (numerator arm, denominator arm, the goal it is held to)
    "phone_photo_over_640x480": ("photo_4000x3000", "photo_640x480", 1.5),
    "screenshot_over_640x480": ("screenshot_1170x2532_png", "photo_640x480", 2.0),
    # the same screenshot with its 12 lines left out: what its size and PNG decode cost, apart from reading its text
    "screenshot_without_text_over_640x480": ("screenshot_without_text", "photo_640x480", None),
    # the same screenshot under half the shipped OCR read budget (HALF_OCR_POLICY): what meeting 2x would cost in text
    "screenshot_half_ocr_budget_over_640x480": ("screenshot_half_ocr_budget", "photo_640x480", None),
    "gif_6_frames_over_first_frame": ("gif_6_frames", "gif_first_frame", 2.0),
    # the caption only in frame 3: the 6 frames pay for reading a line of text their first frame does not have
    "gif_hidden_caption_over_first_frame": ("gif_hidden_caption_6_frames", "gif_hidden_caption_first_frame", None),
    "post_3_images_over_1": ("post_3_images", "post_1_image", None),
}


HALF_OCR_POLICY = "allow_all_half_ocr"  # allow_all with ocr.max_read_area halved (24 line squares)
ARM_POLICY = {"screenshot_half_ocr_budget": HALF_OCR_POLICY}  # every other arm: allow_all


def measure(url: str, n: int) -> dict:
    c = _client(url)
    for arm, warm in arms(10_000).items():
        _timed(c, warm, "a picture", ARM_POLICY.get(arm, "allow_all"))
    served: dict[str, list[float]] = {}
    stages: dict[str, list[dict]] = {}
    frames_read: dict[str, list[int]] = {}
    lines_read: dict[str, int] = {}
    for i in range(n):
        for arm, data in arms(i).items():
            ms, r = _timed(c, data, "a picture", ARM_POLICY.get(arm, "allow_all"))
            served.setdefault(arm, []).append(ms)
            stages.setdefault(arm, []).append(r["latency_ms"])
            if "media" in r:
                frames_read[arm] = [len(m["read"]) for m in r["media"]["images"]]
            if arm.startswith("screenshot"):
                lines_read[arm] = len((r.get("image_text") or {}).get("lines", []))
    out = {"served": {k: _summary(v) for k, v in served.items()}, "frames_read": frames_read,
           "screenshot_lines_read": lines_read,
           "stage_p50_ms": {arm: {k: round(statistics.median(x.get(k, 0.0) for x in rows), 1) for k in rows[0]}
                            for arm, rows in stages.items()},
           "bytes": {k: (sum(map(len, v)) if isinstance(v, list) else len(v)) for k, v in arms(0).items()}}
    out["ratios_p50"] = {name: round(out["served"][a]["p50_ms"] / out["served"][b]["p50_ms"], 2)
                         for name, (a, b, _) in RATIOS.items()}
    out["goals"] = {f"{name} <= {goal}": out["ratios_p50"][name] <= goal
                    for name, (_, _, goal) in RATIOS.items() if goal is not None}
    return out


MIX = ("photo_4000x3000", "screenshot_1170x2532_png", "gif_6_frames", "photo_640x480")


def throughput(url: str, posts: int, callers: int) -> dict:
    """Posts per second with `callers` clients sending unseen posts of the MIX in turn (each caller its own client),
    and per CPU core of this machine (server, gateway and clients all share its cores)."""
    work = [(k, MIX[k % len(MIX)]) for k in range(posts)]
    batches = {seed: arms(20_000 + seed) for seed in range(posts // len(MIX) + 1)}

    def send(caller: int) -> list[tuple[str, float]]:
        c, done = _client(url), []
        for k, arm in work[caller::callers]:
            ms, _ = _timed(c, batches[k // len(MIX)][arm], "a picture", "allow_all", caller=f"mix-{caller}")
            done.append((arm, ms))
        return done

    t0 = time.perf_counter()
    with ThreadPoolExecutor(callers) as pool:
        results = [x for part in pool.map(send, range(callers)) for x in part]
    wall = time.perf_counter() - t0
    cores = os.cpu_count() or 1
    return {"mix": list(MIX), "posts": len(results), "callers": callers, "wall_s": round(wall, 2),
            "posts_per_s": round(len(results) / wall, 2), "cores": cores,
            "posts_per_s_per_core": round(len(results) / wall / cores, 2),
            "p50_ms_by_arm": {arm: round(statistics.median(ms for a, ms in results if a == arm), 1) for arm in MIX}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=8, help="posts per arm")
    ap.add_argument("--mix-posts", type=int, default=48, help="posts in the throughput mix")
    ap.add_argument("--callers", type=int, default=4, help="concurrent callers in the throughput mix")
    args = ap.parse_args(argv)
    t0 = time.time()
    out = {"commit": git_commit(), "machine": machine(),
           "what": "gate-path latency of unseen posts (allow_all, no VLM), arms interleaved; p50 ratios; a failed call "
                   "ends the run (nothing is written)"}
    policies = write_policies(BUILD / "media_cost_policies")
    derive_policy(policies, HALF_OCR_POLICY, gate=ALLOW_ALL_GATE, cache={"enabled": False},
                  ocr={"max_read_area": load_policy().ocr.max_read_area / 2})
    with serve(REPO, audit=BUILD / "media_cost_audit.jsonl", log=BUILD / "media_cost.log", policy_dir=policies) as srv:
        out.update(measure(srv.grpc_url, args.n))
        out["throughput"] = throughput(srv.grpc_url, args.mix_posts, args.callers)
    out["wall_s"] = round(time.time() - t0, 1)
    dump_json(RESULTS / "media_cost.json", out, settings=args, runs=args.n,
              timings={arm: s["ms"] for arm, s in out["served"].items()})
    print({k: v["p50_ms"] for k, v in out["served"].items()}, out["ratios_p50"], out["goals"], out["throughput"],
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
