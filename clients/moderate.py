"""Moderate posts from the command line.

    .venv/bin/python -m clients.moderate --url 127.0.0.1:8001 --image PATH [--image PATH ...] --text TEXT [--describe]
    .venv/bin/python -m clients.moderate --batch posts.jsonl [--concurrency 8]   # {"image": path or [paths], "text"}

Prints one JSON object (one JSON line per post with --batch); a single post's action and what decided it (an
image- or term-list hit, a model signal, a cached verdict: clients/evidence.py) also go to stderr. Exit code 0
when every post was moderated, 1 when any failed (the error names the problem), 2 for bad arguments or unreadable
files."""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from .client import DEFAULT_URL, AsyncModerationClient, ModerationClient, ModerationFailed
from .evidence import summary
from .jsonl import read_jsonl

UNTRAINED_NOTE = ("note: this result comes from untrained, random-initialised tiny models "
                  "(signals marked 'untrained'); it is noise, not a moderation decision")


def _fail(msg: str, code: int = 2):
    print(f"error: {msg}", file=sys.stderr)
    return code


def _read_batch(path: Path) -> list[dict]:
    posts = []
    for n, post in read_jsonl(path):
        if not isinstance(post, dict) or "image" not in post or not isinstance(post.get("text", ""), str):
            raise ValueError(f'{path}:{n}: expected {{"image": path, "text": str}}')
        posts.append(post)
    return posts


async def _run_batch(args, posts: list[dict]) -> int:
    sem = asyncio.Semaphore(args.concurrency)
    base = args.batch.parent
    failures = 0
    bar = None
    if sys.stderr.isatty():
        from tqdm import tqdm
        bar = tqdm(total=len(posts), unit="post", file=sys.stderr)
    lock = asyncio.Lock()
    async with AsyncModerationClient(args.url, timeout_s=args.timeout) as client:
        async def one(i: int, post: dict):
            nonlocal failures
            paths = [Path(x) for x in (post["image"] if isinstance(post["image"], list) else [post["image"]])]
            paths = [x if x.is_absolute() else base / x for x in paths]
            async with sem:
                try:
                    data = [x.read_bytes() for x in paths]
                    out = await client.moderate(data[0] if len(data) == 1 else data, post.get("text", ""),
                                                describe=args.describe, policy=args.policy,
                                                request_id=post.get("request_id"))
                except (ModerationFailed, OSError) as e:
                    failures += 1
                    code = getattr(e, "code", "unreadable_file")
                    out = {"error": {"code": code, "message": getattr(e, "message", str(e))}}
            out = {"line": i + 1, "image": str(post["image"]), **out}
            async with lock:
                print(json.dumps(out, ensure_ascii=False), flush=True)
                if bar:
                    bar.update(1)
        await asyncio.gather(*(one(i, p) for i, p in enumerate(posts)))
    if bar:
        bar.close()
    if failures:
        print(f"error: {failures} of {len(posts)} posts failed (see their 'error' fields)", file=sys.stderr)
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="clients.moderate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default=DEFAULT_URL, help="gRPC host:port (default %(default)s)")
    ap.add_argument("--image", type=Path, action="append",
                    help="an image of the post; repeat it for a post of several images (judged together, in order)")
    ap.add_argument("--text", default=None)
    ap.add_argument("--batch", type=Path, help="JSONL of posts")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--describe", action="store_true", help="also decode a short description (escalated posts)")
    ap.add_argument("--policy", default=None)
    ap.add_argument("--request-id", default=None)
    ap.add_argument("--timeout", type=float, default=30.0, help="per-request deadline in seconds")
    args = ap.parse_args(argv)

    if args.batch:
        if args.image or args.text is not None:
            return _fail("use either --batch or --image/--text")
        if args.concurrency < 1:
            return _fail("--concurrency must be at least 1")
        try:
            posts = _read_batch(args.batch)
        except (OSError, ValueError) as e:
            return _fail(str(e))
        return asyncio.run(_run_batch(args, posts))

    if not args.image or args.text is None:
        return _fail("give --image PATH and --text TEXT (or --batch FILE)")
    try:
        images = [path.read_bytes() for path in args.image]
    except OSError as e:
        return _fail(f"cannot read image {e.filename}: {e.strerror}")
    image = images[0] if len(images) == 1 else images
    try:
        with ModerationClient(args.url, timeout_s=args.timeout) as client:
            result = client.moderate(image, args.text, describe=args.describe, policy=args.policy,
                                     request_id=args.request_id)
    except ModerationFailed as e:
        print(json.dumps({"error": {"code": e.code, "message": e.message}}, ensure_ascii=False))
        return _fail(f"moderation failed [{e.code}]: {e.message}", 1)
    print(json.dumps(result, ensure_ascii=False, indent=2))
    print(f"decided: {summary(result)}", file=sys.stderr)  # list hits, model signals, cached verdicts alike
    if result.get("untrained"):
        print(UNTRAINED_NOTE, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
