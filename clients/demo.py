"""`make demo`: start the embedded Triton server, moderate the sample posts (real photos from installed
wheels, zh and en captions, several deliberately mismatched), print a table, stop the server."""
from __future__ import annotations

import secrets
import shutil
import sys
import time
import unicodedata
from pathlib import Path

from moderation.testing.memes import memes, render
from moderation.testing.samples import sample_posts
from moderation.testing.server import running_server

from .client import ModerationClient, ModerationFailed
from .evidence import decided_text, hits_text, route_text

BANNER = """\
NOTE: the embedded CLIP and Qwen3-VL are tiny and RANDOM-INITIALISED (untrained) versions of the real
architectures: signals marked 'untrained' are noise that shows the service's routes, tensors and latencies,
not real moderation decisions (point export.export_models at real checkpoints for real ones). One signal is
TRAINED: nsfw_image (Yahoo open_nsfw) scores the `sexual` label for real (column nsfw; by its one band, the policy's
signals.nsfw_image.band, it is allowed below review and blocked at block; docs/quality.md: false positives).
Actions: an untrained signal never allows or blocks a post. What only an untrained judge flagged goes to REVIEW
(a person decides); what no trained signal flagged gets the policy's default (ALLOW, decided by policy_default);
BLOCK needs trained evidence: here the operator's lists (image_list: the coins photo, terms: a spam phrase).
Route is the path a post took (gate, list, vlm, cache), never the decision; beside it the gate's own band."""


def _width(s: str) -> int:
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in s)


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(_width(str(r[i])) for r in rows + [header]) for i in range(len(header))]

    def line(r: list[str]) -> str:
        return "  ".join(str(c) + " " * (w - _width(str(c))) for c, w in zip(r, widths, strict=False))

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _demo_policies(root: Path) -> Path:
    """The shipped policies, plus custom lists on `default` as an operator would add them (shown in the table):
    a known scam-ad photo on the block list, a spam phrase on the block list, a phrase sent to review."""
    import shutil

    from moderation.core.policy import PACKAGE_POLICY_DIR

    if root.exists():
        shutil.rmtree(root)
    shutil.copytree(PACKAGE_POLICY_DIR, root)
    return root


def _add_demo_lists(url: str, key: str, policy: str = "default") -> None:
    """Through the server's admin service, as an operator would (`clients.admin lists ...`): the server edits the
    lists where it keeps them (its state directory, or Redis) and audits each edit."""
    from .admin import ServiceAdmin

    with ServiceAdmin(url, key) as lists:
        coins = next(p for p in sample_posts() if p.name == "coins_scam_zh")
        lists.add_image(policy, "block", coins.image_bytes(), label="scam", note="demo: a known scam-ad photo")
        lists.add_term(policy, "block", "click the link in bio", label="scam", note="demo: spam phrase")
        lists.add_term(policy, "review", "deserved everything", label="hate", note="demo: send to a person")
        lists.add_term(policy, "block", "稳赚不赔", label="scam", note="demo: scam slogan (caught in image text too)")
        lists.add_term(policy, "review", "加微信", label="scam", note="demo: contact bait, and its 加V信 variant")


def run(url: str, key: str, policy: str = "default") -> str:
    """Add the demo's lists to `policy`, moderate the memes and the sample posts under it on the server at `url`,
    and return the tables (what `make demo` prints). Every kind of evidence is shown (clients/evidence.py): image-
    and term-list hits, model signals, cached verdicts."""
    _add_demo_lists(url, key, policy)
    rows, meme_rows = [], []
    with ModerationClient(url) as client:
        for meme in memes():
            r = client.moderate(render(meme), meme.caption, policy=policy)
            drawn = " / ".join(x["text"] for x in (r["image_text"] or {}).get("lines", [])) or "-"
            meme_rows.append([meme.name, drawn[:34] + ("…" if len(drawn) > 34 else ""), r["action"].upper(),
                              decided_text(r), route_text(r), hits_text(r), f"{r['latency_ms']['total']:.0f} ms"])
        for post in sample_posts():
            caption = post.text if len(post.text) <= 28 else post.text[:27] + "…"
            try:
                r = client.moderate(post.image_bytes(), post.text, describe=True, policy=policy)
            except ModerationFailed as e:
                rows.append([post.name, caption, "error", e.code, "", "", "", "", "", ""])
                continue
            top = ", ".join(f"{x['name']} {x['score']:.2f} ({x['source']})" for x in r["labels"][:2]) or "-"
            signals = " ".join(f"{k}:{v}" for k, v in sorted(r["signals"].items()))
            trained = [k for k, src in r["gate"].get("sources", {}).items() if src == "nsfw_image"]
            nsfw = f"{r['gate']['scores'][trained[0]]:.4f}" if trained else "-"
            rows.append([post.name, caption, r["action"].upper(), decided_text(r), route_text(r), hits_text(r), top,
                         nsfw, f"{r['latency_ms']['total']:.0f} ms", signals])
    return "\n".join([
        _table(rows, ["post", "caption", "action", "decided by (evidence)", "route", "list hits",
                      "top labels (source)", "nsfw", "latency", "signals"]),
        "\nmemes: the text drawn in the image (PP-OCRv4, trained), matched against the term lists; the photo "
        "against the image lists",
        _table(meme_rows, ["meme", "image text (OCR)", "action", "decided by (evidence)", "route", "list hits",
                           "latency"])])


def main() -> int:
    log = Path("build/logs/demo-server.log")
    policies = _demo_policies(Path("build/demo/policies"))
    key = secrets.token_hex(16)
    print("starting the embedded Triton server (CPU) ...", flush=True)
    t = time.time()
    state = Path("build/demo/state")  # the demo's lists live here: each run starts from none, as its policies do
    shutil.rmtree(state, ignore_errors=True)
    env = {"MODERATION_AUDIT_LOG": "build/audit/demo.jsonl", "MODERATION_POLICY_DIR": str(policies),
           "MODERATION_STATE_DIR": str(state.resolve())}
    with running_server(log_path=log, env=env, key=key) as srv:
        print(f"ready in {time.time() - t:.1f}s on gRPC {srv.grpc_url} (server log: {log})\n", flush=True)
        print(run(srv.grpc_url, key))
        print("\n" + BANNER)
    print("\nserver stopped.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
