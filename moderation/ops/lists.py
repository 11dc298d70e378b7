"""Edit a policy's custom lists live (`clients.admin lists ...`): images by PDQ hash, terms. The lists live in
`<policy dir>/<name>.lists.json` beside the policy; the models re-read it when it changes (no restart), and every
result names the lists' revision in its policy id (`default@2026.12.1+lists.3`). An edit needs an admin key the
running server accepts, holds an exclusive lock, writes the file atomically and an audit row (entry ids and
hashes, never the image; a term's sha256, not the term)."""
from __future__ import annotations

import fcntl
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path

from ..core.audit import AuditLog
from ..core.hashing import sha256_hex
from ..core.image_match import entry_hashes
from ..core.imaging import decode_image
from ..core.policy import ImageEntry, PolicyLists, TermEntry, lists_path, load_policy, policy_dir
from ..core.text import fold_caption
from .admin import AdminError, verify_admin_key

KINDS = ("block", "allow", "review")
MIN_PDQ_QUALITY = 50  # below it PDQ's own guidance says the hash carries too little of the image
MIN_SIDE = 32  # a thumbnail-sized image (e.g. 14x25) hashes to noise: re-encoded copies land 50+ bits away


class ListError(AdminError):
    pass


class ListAdmin:
    def __init__(self, url: str | None, key: str, directory: Path | None = None, audit: AuditLog | None = None,
                 verify_key: bool = True):
        self.directory = Path(directory or policy_dir())
        self.audit = audit or AuditLog()
        if verify_key:
            verify_admin_key(url, key)

    def show(self, policy: str) -> dict:
        return load_policy(policy, self.directory).lists.model_dump()

    @contextmanager
    def _edit(self, policy: str, action: str, **fields):
        pol = load_policy(policy, self.directory)  # the policy must exist and load
        path = lists_path(self.directory / f"{policy}.yaml")
        with open(path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            raw = path.read_text(encoding="utf-8") if path.exists() else "{}"
            lists = PolicyLists.model_validate_json(raw)
            data = lists.model_dump()
            try:
                yield pol, data
            except ListError as e:
                self.audit.write({"stage": "admin", "action": f"lists.{action}", "policy": policy, "ok": False,
                                  "error": str(e), **fields})
                raise
            data["revision"] = lists.revision + 1
            new = PolicyLists.model_validate(data)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(new.model_dump(), ensure_ascii=False, indent=1), encoding="utf-8")
            os.replace(tmp, path)
        self.audit.write({"stage": "admin", "action": f"lists.{action}", "policy": policy, "ok": True,
                          "revision": new.revision, **fields})

    def add_image(self, policy: str, list_name: str, image: bytes, label: str | None = None, note: str = "") -> dict:
        decoded = decode_image(image).image
        hashes = entry_hashes(decoded)  # the whole image's first, then its crops' (centred and one-sided)
        digest = sha256_hex(image)
        entry_id = "img-" + digest[:12]
        with self._edit(policy, "add-image", list=list_name, id=entry_id, image_sha256=digest) as (pol, data):
            self._check(pol, list_name, label)
            if min(decoded.size) < MIN_SIDE:
                raise ListError(f"the image is {decoded.size[0]}x{decoded.size[1]}; list images need at least "
                                f"{MIN_SIDE} px per side for a perceptual hash that survives re-encoding")
            if hashes[0][1] < MIN_PDQ_QUALITY:
                raise ListError(f"the image carries too little detail for a perceptual hash (PDQ quality "
                                f"{hashes[0][1]} < {MIN_PDQ_QUALITY})")
            data["images"] = [e for e in data["images"] if e["id"] != entry_id]
            entry = ImageEntry(id=entry_id, list=list_name, label=label, note=note, added=time.time(),
                               pdq=[h for h, _ in hashes], quality=hashes[0][1])
            data["images"].append(entry.model_dump())
        return entry.model_dump()

    def add_term(self, policy: str, list_name: str, term: str, label: str | None = None, note: str = "") -> dict:
        folded = fold_caption(term)
        entry_id = "term-" + sha256_hex(folded.encode())[:12]
        audit = {"list": list_name, "id": entry_id, "term_sha256": sha256_hex(term.encode())}
        with self._edit(policy, "add-term", **audit) as (pol, data):
            self._check(pol, list_name, label)
            if not folded:
                raise ListError("the term is empty once normalised")
            data["terms"] = [e for e in data["terms"] if e["id"] != entry_id]
            entry = TermEntry(id=entry_id, list=list_name, label=label, note=note, added=time.time(), term=term)
            data["terms"].append(entry.model_dump())
        return entry.model_dump()

    def remove(self, policy: str, kind: str, entry_id: str) -> dict:
        key = "images" if kind == "image" else "terms"
        with self._edit(policy, f"remove-{kind}", id=entry_id) as (_, data):
            before = len(data[key])
            data[key] = [e for e in data[key] if e["id"] != entry_id]
            if len(data[key]) == before:
                raise ListError(f"no {kind} entry {entry_id!r} in the lists of {policy!r}")
        return {"removed": entry_id}

    @staticmethod
    def _check(policy, list_name: str, label: str | None) -> None:
        if list_name not in KINDS:
            raise ListError(f"list must be one of {KINDS}, not {list_name!r}")
        if label is not None and label not in policy.label_keys:
            raise ListError(f"label {label!r} is not a label of policy {policy.name!r}: {policy.label_keys}")
