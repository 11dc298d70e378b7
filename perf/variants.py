"""Repository copies under build/ for the benchmarks (never committed): the committed configs with one
change each, so a comparison differs in exactly one thing."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

from perf.common import REPO


def strip_block(text: str, block: str) -> str:
    """Remove a top-level `block { ... }` (nested braces allowed) from a config.pbtxt."""
    m = re.search(rf"^{re.escape(block)}\s*{{", text, flags=re.M)
    if not m:
        return text
    depth, i = 0, m.end() - 1
    while i < len(text):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        i += 1
        if depth == 0:
            break
    return text[:m.start()] + text[i:].lstrip("\n")


def copy_repository(dst: Path, src: Path = REPO) -> Path:
    """A full copy (real files, not links: exports write into it and must not touch the original)."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def edit_config(repo: Path, model: str, fn) -> None:
    p = repo / model / "config.pbtxt"
    p.write_text("# benchmark variant (perf/variants.py) of the committed config\n" + fn(p.read_text()))


def without_block(repo: Path, models: list[str], block: str) -> Path:
    """`block { ... }` removed from the config of each of `models`."""
    for m in models:
        edit_config(repo, m, lambda t: strip_block(t, block))
    return repo


def without_dynamic_batching(repo: Path, models: list[str]) -> Path:
    return without_block(repo, models, "dynamic_batching")


def with_response_cache(repo: Path, models: list[str]) -> Path:
    for m in models:
        edit_config(repo, m, lambda t: strip_block(t, "response_cache") + "response_cache { enable: true }\n")
    return repo


def without_response_cache(repo: Path, models: list[str]) -> Path:
    return without_block(repo, models, "response_cache")
