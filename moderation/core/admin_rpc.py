"""The gateway's admin service: operator actions that change the service's state go to the server, never to files on
the machine that runs the command. `clients.admin lists ...` and `clients.admin feedback` call it; the gateway checks
the admin key, applies the change where the service keeps its state and writes the audit row into the service's own
audit log (moderation/gateway/admin.py).

Wire format: gRPC unary calls on the public port, `/moderation.Admin/<Method>`, whose request and reply are one JSON
object each (UTF-8); an image travels as base64 bytes (`image_b64`), so the server hashes the bytes the operator
holds and never fetches anything. The key is the metadata Triton's restricted protocols take (core/auth.py). A
refused or failed call is a gRPC error whose details read `[code] message` (docs/errors.md)."""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import re

from .errors import BadRequest
from .limits import MAX_IMAGE_BYTES

SERVICE = "moderation.Admin"
LISTS = f"/{SERVICE}/Lists"
FEEDBACK = f"/{SERVICE}/Feedback"
VERSIONS = f"/{SERVICE}/Versions"
METHODS = (LISTS, FEEDBACK, VERSIONS)

LIST_ACTIONS = ("show", "add-image", "remove-image", "add-term", "remove-term", "export", "import")
LIST_KINDS = ("block", "allow", "review")
VERDICTS = ("violation", "ok")
VERSION_ACTIONS = ("swap", "rollback", "status")
# One image at the preprocess limit, base64 (4/3), plus the rest of the request.
MAX_ADMIN_REQUEST_BYTES = MAX_IMAGE_BYTES * 4 // 3 + 64 * 1024
_TEXT_LIMIT = 4096
_PLAIN = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def encode(obj: dict) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8")


def decode(raw: bytes) -> dict:
    """A request or reply body: one JSON object, else BadRequest."""
    if len(raw) > MAX_ADMIN_REQUEST_BYTES:
        raise BadRequest(f"the admin request is {len(raw)} bytes; at most {MAX_ADMIN_REQUEST_BYTES}")
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise BadRequest("the admin request is not a UTF-8 JSON object") from None
    if not isinstance(obj, dict):
        raise BadRequest("the admin request is not a JSON object")
    return obj


def key_matches(offered: str | bytes | None, key: str) -> bool:
    """Constant-time: the caller's key is the server's (no server key: nothing matches)."""
    if not key or not offered:
        return False
    offered = offered.encode("utf-8") if isinstance(offered, str) else offered
    return hmac.compare_digest(offered, key.encode("utf-8"))


def action_name(method: str, request: dict | None) -> str:
    """The audit row's `action` for a call, from what the request says when it says a known action."""
    if method == FEEDBACK:
        return "feedback"
    if method == VERSIONS:
        action = (request or {}).get("action")
        return f"versions.{action}" if action in VERSION_ACTIONS else "versions"
    action = (request or {}).get("action")
    return f"lists.{action}" if action in LIST_ACTIONS else "lists"


def _text(request: dict, field: str, required: bool = False, plain: bool = False) -> str | None:
    value = request.get(field)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value or len(value) > _TEXT_LIMIT:
        raise BadRequest(f"{field} must be a string of 1 to {_TEXT_LIMIT} characters")
    if plain and not _PLAIN.match(value):
        raise BadRequest(f"{field} {value[:64]!r} is not a plain name (letters, digits, _ . -; at most 64)")
    return value


def feedback_row(request: dict) -> dict:
    """A reviewer's decision on a judged post as its audit row, joined to the post's row by request id (no content):
    `{"stage": "feedback", "request_id", "verdict", "label"[, "reviewer"]}`. BadRequest when a field is wrong."""
    unknown = set(request) - {"request_id", "verdict", "label", "reviewer"}
    if unknown:
        raise BadRequest(f"unknown feedback fields: {sorted(unknown)}")
    request_id = request.get("request_id")
    if not isinstance(request_id, str) or not 1 <= len(request_id) <= 128:
        raise BadRequest("a request id of 1 to 128 characters is required")
    if request.get("verdict") not in VERDICTS:
        raise BadRequest(f"verdict must be 'violation' or 'ok', not {request.get('verdict')!r}")
    label = _text(request, "label", plain=True)
    reviewer = _text(request, "reviewer")
    return {
        "stage": "feedback",
        "request_id": request_id,
        "verdict": request["verdict"],
        "label": label,
        **({"reviewer": reviewer} if reviewer else {}),
    }


def lists_request(request: dict) -> dict:
    """A lists call, checked for shape (the policy's own rules are checked where the lists are edited):
    `{"action", "policy", "list"?, "image_b64"?, "term"?, "label"?, "note"?, "id"?, "lists"?}` (`lists`: import's
    document, as export returned it). BadRequest when it is wrong."""
    unknown = set(request) - {"action", "policy", "list", "image_b64", "term", "label", "note", "id", "lists"}
    if unknown:
        raise BadRequest(f"unknown lists fields: {sorted(unknown)}")
    action = request.get("action")
    if action not in LIST_ACTIONS:
        raise BadRequest(f"action must be one of {LIST_ACTIONS}, not {action!r}")
    out = {"action": action, "policy": _text(request, "policy", required=True, plain=True)}
    if action.startswith("add-"):
        if request.get("list") not in LIST_KINDS:
            raise BadRequest(f"{action} needs list block|allow|review, not {request.get('list')!r}")
        out.update(list=request["list"], label=_text(request, "label", plain=True), note=_text(request, "note") or "")
    if action == "add-image":
        data = request.get("image_b64")
        if not isinstance(data, str) or not data:
            raise BadRequest("add-image needs the image's bytes (image_b64); the server never fetches a URL")
        try:
            image = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest("image_b64 is not base64") from None
        if len(image) > MAX_IMAGE_BYTES:
            raise BadRequest(f"the image is {len(image)} bytes; at most {MAX_IMAGE_BYTES}")
        out["image"] = image
    elif action == "add-term":
        out["term"] = _text(request, "term", required=True)
    elif action.startswith("remove-"):
        out["id"] = _text(request, "id", required=True, plain=True)
    elif action == "import":
        document = request.get("lists")
        if not isinstance(document, dict) or not isinstance(document.get("images", []), list) \
                or not isinstance(document.get("terms", []), list):
            raise BadRequest("import needs the lists document (an object with images and terms, as export wrote it)")
        out["lists"] = document
    return out


def versions_request(request: dict) -> dict:
    """A cluster-versions call: `{"action": "swap", "model", "version", "operator"?, "serving"?}`, `{"action":
    "rollback", "model", "operator"?}` or `{"action": "status"}` (`operator`: who asks, recorded with the change;
    `serving`: the version the caller sees served, what a first rollback returns to). BadRequest when it is wrong."""
    unknown = set(request) - {"action", "model", "version", "operator", "serving"}
    if unknown:
        raise BadRequest(f"unknown versions fields: {sorted(unknown)}")
    action = request.get("action")
    if action not in VERSION_ACTIONS:
        raise BadRequest(f"action must be one of {VERSION_ACTIONS}, not {action!r}")
    out: dict = {"action": action}
    if action == "status":
        return out
    out["model"] = _text(request, "model", required=True, plain=True)
    out["operator"] = _text(request, "operator") or ""
    if action == "swap":
        version = request.get("version")
        if not isinstance(version, str | int) or not str(version).isdigit() or len(str(version)) > 18:
            raise BadRequest(f"version must be a version number (digits), not {version!r}")
        out["version"] = str(int(version))
        serving = request.get("serving")
        if serving is not None and (not isinstance(serving, str) or not serving.isdigit() or len(serving) > 18):
            raise BadRequest(f"serving must be a version number (digits), not {serving!r}")
        out["serving"] = serving
    return out
