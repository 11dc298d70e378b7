"""Embedding arithmetic shared by the gate's scoring and the verdict cache."""
from __future__ import annotations

import numpy as np


def l2_normalize(x) -> np.ndarray:
    """Unit length along the last axis (a zero vector stays zero)."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
