"""Stage contracts with plausible defaults, for unit tests of the stages without a server."""
from __future__ import annotations

import time

from ..core.contracts import GateDecision, RequestRecord


def request_record(**fields) -> RequestRecord:
    now = time.time()
    values = {"request_id": "r1", "policy_id": "default@test", "policy_name": "default", "lang": "en",
              "describe": False, "return_embedding": False, "forget": False, "image_sha256": "a" * 64,
              "text_sha256": "b" * 64, "image_format": "PNG", "image_size": (64, 64), "has_caption": True,
              "caption_key": "c" * 64, "caption_truncated": False, "received_at": now, "preprocessed_at": now,
              "preprocess_ms": 1.0, "preprocess_version": "1"}
    return RequestRecord(**{**values, **fields})


def gate_decision(**fields) -> GateDecision:
    values = {"reason": "", "consistency": None, "signals": {"clip": "untrained"}, "gate_version": "1",
              "gate_started": time.time(), "gate_ms": 1.0}
    return GateDecision(**{**values, **fields})
