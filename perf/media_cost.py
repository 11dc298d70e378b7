"""What the media people post costs on the gate path, measured against a real server through the gateway: a phone
photo against the same photo at 640x480, a tall screenshot, an animated GIF against its first frame alone, a post of
three images against a post of one; then posts per second on a mix of phone photos, screenshots, GIFs and small
photos sent by several callers at once. Writes perf/results/media_cost.json (raw latencies, each arm's median stage
times from RESULT.latency_ms, ratios, throughput, machine, commit).

Every post is unseen (a patch of its own colour, so no cache answers it); the arms are interleaved post by post, so
background load falls on all of them alike. Policy allow_all (the gate settles every post: no VLM), verdict cache
off, the shipped OCR budget and media settings (media.max_frames 8).

    .venv/bin/python -m perf.media_cost [--n 8] [--mix-posts 48] [--callers 4]
"""
from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from PIL import Image, ImageDraw, ImageFont

from perf.common import BUILD, REPO, RESULTS, dump_json, git_commit, machine
from perf.cost_bounds import _client, _summary, _timed, write_policies
from perf.harness import serve

FONT = "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc"


def _photo(size: tuple[int, int], seed: int, name: str = "astronaut") -> Image.Image:
    from moderation.testing.samples import image_paths

    im = Image.open(image_paths()[name]).convert("RGB").resize(size, Image.BICUBIC)
    ImageDraw.Draw(im).rectangle((8, 8, 8 + size[0] // 40, 8 + size[1] // 40),
                                 fill=((seed * 37) % 256, (seed * 91) % 256, (seed * 53) % 256))
    return im


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _screenshot(seed: int) -> Image.Image:
    """A 1170x2532 phone screenshot: a photo on top, lines of text below."""
    im = Image.new("RGB", (1170, 2532), (250, 250, 250))
    im.paste(_photo((1170, 880), seed, "coffee"), (0, 0))
    draw, font = ImageDraw.Draw(im), ImageFont.truetype(FONT, 44)
    for row in range(12):
        draw.text((60, 960 + row * 120), f"comment {row + 1}: what a lovely morning ☕ 早安 {seed}", font=font,
                  fill=(20, 20, 20))
    return im


def _animation(seed: int, frames: int = 6) -> list[Image.Image]:
    """A 640x480 meme: a dot moving over a photo, a caption drawn in frame 3 only."""
    base, out = _photo((640, 480), seed, "chelsea"), []
    for i in range(frames):
        f = base.copy()
        draw = ImageDraw.Draw(f)
        draw.ellipse((40 + 60 * i, 40, 70 + 60 * i, 70), fill=(255, 0, 0))
        if i == 3:
            draw.rectangle((20, 380, 620, 460), fill=(255, 255, 255))
            draw.text((40, 390), "WHEN THE CODE WORKS", font=ImageFont.truetype(FONT, 48), fill=(0, 0, 0))
        out.append(f)
    return out


def arms(seed: int) -> dict[str, bytes | list[bytes]]:
    anim = _animation(seed)
    return {
        "photo_640x480": _encode(_photo((640, 480), seed), "JPEG", quality=90),
        "photo_4000x3000": _encode(_photo((4000, 3000), seed), "JPEG", quality=90),
        "screenshot_1170x2532_png": _encode(_screenshot(seed), "PNG"),
        "gif_first_frame": _encode(anim[0], "GIF"),
        "gif_6_frames": _encode(anim[0], "GIF", save_all=True, append_images=anim[1:], duration=100, loop=0),
        "post_1_image": _encode(_photo((640, 480), seed, "rocket"), "JPEG", quality=90),
        "post_3_images": [_encode(_photo((640, 480), seed, n), "JPEG", quality=90)
                          for n in ("rocket", "coffee", "horse")],
    }


RATIOS = {  # name: (numerator arm, denominator arm, the goal it is held to)
    "phone_photo_over_640x480": ("photo_4000x3000", "photo_640x480", 1.5),
    "screenshot_over_640x480": ("screenshot_1170x2532_png", "photo_640x480", 2.0),
    "gif_6_frames_over_first_frame": ("gif_6_frames", "gif_first_frame", 2.0),
    "post_3_images_over_1": ("post_3_images", "post_1_image", None),
}


def measure(url: str, n: int) -> dict:
    c = _client(url)
    for warm in arms(10_000).values():
        _timed(c, warm, "a picture", "allow_all")
    served: dict[str, list[float]] = {}
    stages: dict[str, list[dict]] = {}
    frames_read: dict[str, list[int]] = {}
    for i in range(n):
        for arm, data in arms(i).items():
            ms, r = _timed(c, data, "a picture", "allow_all")
            served.setdefault(arm, []).append(ms)
            stages.setdefault(arm, []).append(r["latency_ms"])
            if "media" in r:
                frames_read[arm] = [len(m["read"]) for m in r["media"]["images"]]
    out = {"served": {k: _summary(v) for k, v in served.items()}, "frames_read": frames_read,
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
    out = {"commit": git_commit(), "machine": machine(), "args": vars(args),
           "what": "gate-path latency of unseen posts (allow_all, no VLM), arms interleaved; p50 ratios"}
    with serve(REPO, audit=BUILD / "media_cost_audit.jsonl", log=BUILD / "media_cost.log",
               policy_dir=write_policies(BUILD / "media_cost_policies")) as srv:
        out.update(measure(srv.grpc_url, args.n))
        out["throughput"] = throughput(srv.grpc_url, args.mix_posts, args.callers)
    out["wall_s"] = round(time.time() - t0, 1)
    dump_json(RESULTS / "media_cost.json", out)
    print({k: v["p50_ms"] for k, v in out["served"].items()}, out["ratios_p50"], out["goals"], out["throughput"],
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
