"""Edit a policy's custom lists live: images by PDQ hash, terms. Operators edit through the service
(`clients.admin lists ...` calls the gateway's admin service, which checks the admin key and runs `python -m
moderation.ops.lists` with the request on stdin: `serve()`), so the edit lands where the server keeps its lists, never
on the machine the command runs on. The lists live in `<policy dir>/<name>.lists.json` beside the policy; the models
re-read it when it changes (no restart), and every result names the lists' revision in its policy id
(`default@2026.12.1+lists.3`). An edit holds an exclusive lock, writes the file atomically and an audit row into
the service's audit log (entry ids and hashes, never the image; a term's sha256, not the term); a refused edit is an
audit row too, with its code."""
from __future__ import annotations

import fcntl
import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from ..core.admin_rpc import LIST_KINDS, decode, lists_request
from ..core.audit import AuditLog
from ..core.errors import AuditUnavailable, BadPolicy, ModerationError
from ..core.hashing import sha256_hex
from ..core.image_match import entry_hashes
from ..core.imaging import decode_image
from ..core.policy import ImageEntry, PolicyLists, TermEntry, lists_path, load_policy, policy_dir
from ..core.text import fold_caption
from .admin import AdminError

KINDS = LIST_KINDS
MIN_PDQ_QUALITY = 50  # below it PDQ's own guidance says the hash carries too little of the image
MIN_SIDE = 32  # a thumbnail-sized image (e.g. 14x25) hashes to noise: re-encoded copies land 50+ bits away


class ListError(AdminError):
    code = "bad_list_entry"


class ListAdmin:
    """Edits of the lists in `directory` (default: the server's policy directory), audited to `audit` (default: the
    service's audit log); `context` fields (who asked, through what) go into every audit row."""

    def __init__(self, directory: Path | None = None, audit: AuditLog | None = None, context: dict | None = None):
        self.directory = Path(directory or policy_dir())
        self.audit = audit or AuditLog()
        self.context = dict(context or {})

    def show(self, policy: str) -> dict:
        with self._audited(policy, "show", {}):
            lists = load_policy(policy, self.directory).lists.model_dump()
        self.audit.write({"stage": "admin", "action": "lists.show", "policy": policy, "ok": True,
                          "revision": lists["revision"], **self.context})
        return lists

    @contextmanager
    def _audited(self, policy: str, action: str, fields: dict):
        """A refused edit is an audit row with its code (a list rule, an unknown policy, an image that does not
        decode), then raises on."""
        try:
            yield
        except (ListError, ModerationError) as e:
            if not isinstance(e, AuditUnavailable):
                code = e.code
                message = e.message if isinstance(e, ModerationError) else str(e)
                self.audit.write({"stage": "admin", "action": f"lists.{action}", "policy": policy, "ok": False,
                                  "error": {"code": code, "message": message}, **fields, **self.context})
            raise

    @contextmanager
    def _edit(self, policy: str, action: str, **fields):
        with self._audited(policy, action, fields):
            pol = load_policy(policy, self.directory)  # the policy must exist and load
            path = lists_path(self.directory / f"{policy}.yaml")
            with open(path.with_suffix(".lock"), "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                raw = path.read_text(encoding="utf-8") if path.exists() else "{}"
                try:
                    lists = PolicyLists.model_validate_json(raw)
                except ValueError as e:  # cut short or of the wrong shape: never edited into an empty list
                    raise BadPolicy(f"the lists file of policy {policy!r} does not parse ({type(e).__name__}); restore "
                                    "it before editing (the models keep its last good copy meanwhile)") from None
                data = lists.model_dump()
                yield pol, data
                data["revision"] = lists.revision + 1
                new = PolicyLists.model_validate(data)
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(new.model_dump(), ensure_ascii=False, indent=1), encoding="utf-8")
                # the row first: an edit the audit log cannot record is not applied (fail_closed raises here)
                self.audit.write({"stage": "admin", "action": f"lists.{action}", "policy": policy, "ok": True,
                                  "revision": new.revision, **fields, **self.context})
                os.replace(tmp, path)

    def add_image(self, policy: str, list_name: str, image: bytes, label: str | None = None, note: str = "") -> dict:
        digest = sha256_hex(image)
        entry_id = "img-" + digest[:12]
        fields = {"list": list_name, "id": entry_id, "image_sha256": digest}
        with self._audited(policy, "add-image", fields):  # decoded and hashed before the lists' lock is taken
            decoded = decode_image(image).image
            hashes = entry_hashes(decoded)  # the whole image's first, then its crops' (centred and one-sided)
        with self._edit(policy, "add-image", **fields) as (pol, data):
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


def serve(request: dict, context: dict | None = None, lists: ListAdmin | None = None) -> dict:
    """One lists call of the gateway's admin service (core/admin_rpc.py shape), applied to the server's lists."""
    req = lists_request(request)
    lists = lists or ListAdmin(context=context)
    action, policy = req["action"], req["policy"]
    if action == "show":
        return lists.show(policy)
    if action == "add-image":
        return lists.add_image(policy, req["list"], req["image"], req["label"], req["note"])
    if action == "add-term":
        return lists.add_term(policy, req["list"], req["term"], req["label"], req["note"])
    return lists.remove(policy, action.split("-", 1)[1], req["id"])


def main() -> int:
    """The gateway's editor process: `{"request": {...}, "context": {...}}` on stdin, one JSON reply on stdout
    (`{"ok": true, "result"}` or `{"ok": false, "code", "message"}`). Runs beside the gateway, which holds the admin
    key and checked it; this process never sees the key."""
    try:
        call = decode(sys.stdin.buffer.read())
        reply = {"ok": True, "result": serve(call.get("request") or {}, call.get("context") or {})}
    except (ListError, ModerationError) as e:
        reply = {"ok": False, "code": e.code, "message": e.message if isinstance(e, ModerationError) else str(e)}
    sys.stdout.write(json.dumps(reply, ensure_ascii=False))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
