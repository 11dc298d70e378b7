"""Edit a policy's custom lists live: images by PDQ hash, terms. Operators edit through the service
(`clients.admin lists ...` calls the gateway's admin service, which checks the admin key and runs `python -m
moderation.ops.lists` with the request on stdin: `serve()`), so the edit lands where the server keeps its lists, never
on the machine the command runs on. The lists live in the list store (core/list_store.py: Redis shared by every
replica when MODERATION_REDIS_URL is set, else the state directory; never the package); the models see an edit within
LISTS_POLL_S (no restart), and every result names the lists' revision in its policy id (`default@2026.12.1+lists.3`).
An edit holds the store's lock, writes an audit row into the service's audit log (entry ids and hashes, never the
image; a term's sha256, not the term), then the lists (in Redis with the same row in the policy's edit history); a
refused edit is an audit row too, with its code. `export` returns the lists in force as one document, `import`
replaces them with a document's entries, checked as adds are."""
from __future__ import annotations

import json
import re
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from ..core.admin_rpc import LIST_KINDS, decode, lists_request
from ..core.audit import AuditLog
from ..core.errors import AuditUnavailable, ModerationError
from ..core.hashing import sha256_hex
from ..core.image_match import entry_hashes
from ..core.imaging import decode_image
from ..core.list_store import list_store
from ..core.policy import ImageEntry, PolicyLists, TermEntry, load_policy, policy_dir
from ..core.text import fold_caption
from .admin import AdminError

KINDS = LIST_KINDS
MIN_PDQ_QUALITY = 50  # below it PDQ's own guidance says the hash carries too little of the image
MIN_SIDE = 32  # a thumbnail-sized image (e.g. 14x25) hashes to noise: re-encoded copies land 50+ bits away
IMAGE_ID = re.compile(r"^img-[0-9a-f]{12}$")
PDQ_HEX = re.compile(r"^[0-9a-f]{64}$")


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
            load_policy(policy, self.directory)  # the policy must exist and load
            in_force, fault = list_store(self.directory).current(policy, fresh=True)
        lists = in_force.model_dump()
        self.audit.write({"stage": "admin", "action": "lists.show", "policy": policy, "ok": True,
                          "revision": lists["revision"], **self.context})
        # where they live, and why the lists in force are not the store's latest (None when they are)
        return {**lists, "store": list_store(self.directory).kind, "fault": fault}

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
            with list_store(self.directory).editing(policy) as edit:
                data = edit.base.model_dump()
                yield pol, data
                data["revision"] = edit.base.revision + 1
                new = PolicyLists.model_validate(data)
                edit.commit(new, {"stage": "admin", "action": f"lists.{action}", "policy": policy, "ok": True,
                                  "revision": new.revision, **fields, **self.context}, self.audit.write)

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

    def export(self, policy: str) -> dict:
        """The lists in force as one reviewable document (`lists import` takes it back)."""
        with self._audited(policy, "export", {}):
            load_policy(policy, self.directory)
            lists = list_store(self.directory).current(policy, fresh=True)[0].model_dump()
        self.audit.write({"stage": "admin", "action": "lists.export", "policy": policy, "ok": True,
                          "revision": lists["revision"], "images": len(lists["images"]), "terms": len(lists["terms"]),
                          **self.context})
        return {"policy": policy, "exported": time.time(), **lists}

    def import_lists(self, policy: str, document: dict) -> dict:
        """Replace the policy's lists with an exported document's entries, each checked by the rules an add
        follows; the revision moves on from the store's (the document's own is only for the reader)."""
        raw = json.dumps(document, ensure_ascii=False, sort_keys=True).encode()
        fields: dict = {"document_sha256": sha256_hex(raw)}
        with self._audited(policy, "import", fields):
            images, terms = self._imported(load_policy(policy, self.directory), document)
        fields.update(images=len(images), terms=len(terms))
        with self._edit(policy, "import", **fields) as (_, data):
            data["images"] = [e.model_dump() for e in images]
            data["terms"] = [e.model_dump() for e in terms]
        return {"policy": policy, "revision": data["revision"], "images": len(images), "terms": len(terms)}

    def _imported(self, pol, document: dict) -> tuple[list[ImageEntry], list[TermEntry]]:
        try:
            parsed = PolicyLists.model_validate({k: v for k, v in document.items() if k in ("images", "terms")})
        except ValueError as e:
            raise ListError(f"the lists document does not parse: {str(e).splitlines()[0][:200]}") from None
        for image in parsed.images:
            self._check(pol, image.list, image.label)
            _check_image_entry(image)
        terms = []
        for term in parsed.terms:
            self._check(pol, term.list, term.label)
            folded = fold_caption(term.term)
            if not folded:
                raise ListError(f"term entry {term.id!r} is empty once normalised")
            terms.append(term.model_copy(update={"id": "term-" + sha256_hex(folded.encode())[:12]}))
        for kind, entries in (("image", parsed.images), ("term", terms)):
            ids = [e.id for e in entries]
            if len(set(ids)) != len(ids):
                raise ListError(f"the document holds {kind} entries with the same id (or the same folded term)")
        return list(parsed.images), terms

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


def _check_image_entry(entry: ImageEntry) -> None:
    """An imported image entry holds hashes, not the image: what add-image checks that can still be checked."""
    if not IMAGE_ID.match(entry.id):
        raise ListError(f"image entry id {entry.id[:64]!r} is not img- and 12 hex digits (the sha256 of its image)")
    if not entry.pdq or not all(PDQ_HEX.match(h) for h in entry.pdq):
        raise ListError(f"image entry {entry.id!r} needs its PDQ hashes, 64 hex digits each")
    if entry.quality < MIN_PDQ_QUALITY:
        raise ListError(f"image entry {entry.id!r} has PDQ quality {entry.quality} < {MIN_PDQ_QUALITY}: too little "
                        "detail for a perceptual hash")


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
    if action == "export":
        return lists.export(policy)
    if action == "import":
        return lists.import_lists(policy, req["lists"])
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
