"""Stage contracts with plausible defaults, for unit tests of the stages without a server."""
from __future__ import annotations

import base64
import time

from PIL import Image

from ..core.contracts import GateDecision, RequestRecord
from ..core.hashing import sha256_hex
from ..core.imaging import local_thumbnail
from ..core.policy import load_policy
from ..core.post import decode_post_images, pack_images


def frames_of(*images: bytes, policy: str = "default") -> bytes:
    """A post's FRAMES element as preprocess writes it (its images decoded under `policy`'s media settings)."""
    return pack_images(decode_post_images(list(images), load_policy(policy)), sha256_hex(images[0]))


def local_thumbnail_b64(image: Image.Image) -> str:
    """RequestRecord.local_thumbnail of an image, as preprocess writes it."""
    return base64.b64encode(local_thumbnail(image)).decode("ascii")


def request_record(**fields) -> RequestRecord:
    now = time.time()
    values = {"request_id": "r1", "policy_id": "default@test", "policy_name": "default", "lang": "en",
              "describe": False, "return_embedding": False, "forget": False, "image_sha256": "a" * 64,
              "text_sha256": "b" * 64, "image_format": "PNG", "image_size": (64, 64), "has_caption": True,
              "caption_key": "c" * 64, "caption_truncated": False, "received_at": now, "preprocessed_at": now,
              "preprocess_ms": 1.0, "preprocess_version": "1"}
    return RequestRecord(**{**values, **fields})


def gate_decision(**fields) -> GateDecision:
    """A GateDecision; without `band`, the one its route implies (escalate for vlm / cache, else allow)."""
    values = {"reason": "", "consistency": None, "signals": {"clip": "untrained"}, "gate_version": "1",
              "gate_started": time.time(), "gate_ms": 1.0,
              "band": "escalate" if fields.get("route") in ("vlm", "cache") else "allow"}
    return GateDecision(**{**values, **fields})
