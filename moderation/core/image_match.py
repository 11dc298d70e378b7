"""What an image list entry stores and how a post's PDQ hash is compared with every entry at once.

PDQ follows re-encoding and resizing but not translation: a copy with 5 % cut from one edge (a watermark, a
border) lands 70-100 bits from the whole image's hash, far past the match distance (31). So an entry stores the
hashes of several windows of its image: the whole image, centred crops (a copy cut on every side), one-sided
crops (a copy cut on one edge) and corner crops (cut on two adjacent edges): a copy's hash lands near one of them.
Measured in perf/studies/pdq_lists.py (docs/quality.md)."""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
from PIL import Image

from .imaging import PDQ_ENTRY_CROPS, centred_crop, pdq_hash

SIDES = ("left", "right", "top", "bottom")
CORNERS = (("left", "top"), ("right", "top"), ("left", "bottom"), ("right", "bottom"))
# Fractions of the width (left/right) or height (top/bottom) cut from one edge. A copy's hash stays within the
# match distance of a window whose edges are ~2 % of the side from its own, so the cuts are 2.5 % apart, up to
# 15 %; corner windows (two adjacent edges cut) cover a copy trimmed on two sides (docs/quality.md).
PDQ_ENTRY_SIDE_CUTS = (0.025, 0.05, 0.075, 0.1, 0.125, 0.15)
PDQ_ENTRY_CORNER_CUTS = (0.05, 0.1)


def one_side_crop(image: Image.Image, side: str, cut: float) -> Image.Image:
    """The image with `cut` of its width (left, right) or height (top, bottom) removed from one edge."""
    w, h = image.size
    dx, dy = int(w * cut), int(h * cut)
    box = {"left": (dx, 0, w, h), "right": (0, 0, w - dx, h),
           "top": (0, dy, w, h), "bottom": (0, 0, w, h - dy)}[side]
    return image.crop(box)


def entry_windows(image: Image.Image) -> list[Image.Image]:
    """The windows a list entry hashes: the whole image first, then centred, one-sided and corner crops."""
    windows = [centred_crop(image, keep) for keep in PDQ_ENTRY_CROPS]
    windows += [one_side_crop(image, side, cut) for cut in PDQ_ENTRY_SIDE_CUTS for side in SIDES]
    windows += [one_side_crop(one_side_crop(image, a, cut), b, cut)
                for cut in PDQ_ENTRY_CORNER_CUTS for a, b in CORNERS]
    return windows


def entry_hashes(image: Image.Image) -> list[tuple[str, int]]:
    """(PDQ hex, quality) of every window of `entry_windows`, the whole image's first."""
    return [pdq_hash(w) for w in entry_windows(image)]


_M1, _M2, _M4 = (np.uint64(0x5555555555555555), np.uint64(0x3333333333333333), np.uint64(0x0F0F0F0F0F0F0F0F))
_H01 = np.uint64(0x0101010101010101)


def _popcount64(x: np.ndarray) -> np.ndarray:
    x = x - ((x >> np.uint64(1)) & _M1)
    x = (x & _M2) + ((x >> np.uint64(2)) & _M2)
    x = (x + (x >> np.uint64(4))) & _M4
    return (x * _H01) >> np.uint64(56)


class PdqIndex:
    """Every stored hash of a list's entries as one (hashes, 4) uint64 array: a post's distance to each entry
    (its nearest stored hash) is one XOR and popcount over the array, not a hex parse per stored hash."""

    def __init__(self, entries: list[list[str]]):
        counts = [len(hashes) for hashes in entries]
        if any(c == 0 for c in counts):
            raise ValueError("every entry needs at least one PDQ hash")
        raw = b"".join(bytes.fromhex(h) for hashes in entries for h in hashes)
        if len(raw) != 32 * sum(counts):
            raise ValueError("a PDQ hash is 256 bits (64 hex digits)")
        self.size = len(entries)
        self._hashes = np.frombuffer(raw, dtype=">u8").astype(np.uint64).reshape(-1, 4)
        self._starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.intp)

    def distances(self, pdq: str) -> np.ndarray:
        """Per entry, the Hamming distance from `pdq` to its nearest stored hash (int array, entry order)."""
        if self.size == 0:
            return np.zeros(0, dtype=np.int64)
        query = np.frombuffer(bytes.fromhex(pdq), dtype=">u8").astype(np.uint64)
        if query.size != 4:
            raise ValueError("a PDQ hash is 256 bits (64 hex digits)")
        bits = _popcount64(self._hashes ^ query).sum(axis=1).astype(np.int64)
        return np.minimum.reduceat(bits, self._starts)


# A loaded list of image entries -> its index. Loaded lists are not edited in place (an edit writes a new file,
# read into new objects), so the list's identity keys the index; the list is held with it, so no id is reused.
_INDEXES: OrderedDict[int, tuple[list, PdqIndex]] = OrderedDict()
_MAX_INDEXES = 32


def index_for(images: list) -> PdqIndex:
    """The cached index of a policy's image entries (`policy.lists.images`: objects with a `pdq` list)."""
    key = id(images)
    hit = _INDEXES.get(key)
    if hit is not None and hit[0] is images and hit[1].size == len(images):
        _INDEXES.move_to_end(key)
        return hit[1]
    index = PdqIndex([e.pdq for e in images])
    _INDEXES[key] = (images, index)
    while len(_INDEXES) > _MAX_INDEXES:
        _INDEXES.popitem(last=False)
    return index
