"""Content hashes: the only way images, captions and files are identified in rows and manifests."""
from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_hex(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def post_hashes(image: object, text: object) -> dict[str, str]:
    """image_sha256 / text_sha256 of a post as sent; "" for a field that is not bytes."""
    def of(x: object) -> str:
        return sha256_hex(bytes(x)) if isinstance(x, (bytes, bytearray, memoryview)) else ""

    return {"image_sha256": of(image), "text_sha256": of(text)}


def unit_interval(*parts: str) -> float:
    """A stable number in [0, 1) from strings (sticky A/B assignment)."""
    return int.from_bytes(hashlib.sha256(":".join(parts).encode()).digest()[:8], "big") / 2**64
