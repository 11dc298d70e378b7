"""What the gateway reads of a request: a bounded summary for its audit row, and the checks that refuse a request
before Triton sees it. Both are total: any bytes at all give a summary (a body that is not a request is kept by its
hash), and nothing here raises. Caller-chosen strings are capped, at most MAX_SUMMARISED_INPUTS inputs and
MAX_ELEMENT_HASHES element hashes are listed (the rest by count and one hash), so a row stays a few KiB whatever the
request carried. Never content: only names, dtypes, shapes, sizes and sha256."""
from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from tritonclient.grpc import service_pb2
from tritonclient.utils import deserialize_bytes_tensor

from ..core.hashing import sha256_hex
from ..core.limits import MAX_OPTIONS_BYTES, PUBLIC_MODELS

MAX_NAME_CHARS = 128
MAX_SUMMARISED_INPUTS = 8
MAX_ELEMENT_HASHES = 16
# The entry model has three inputs and four outputs; a request naming more is not a client of it.
MAX_INPUTS = 16
MAX_OUTPUTS = 16
_VERSION = re.compile(r"^\d{0,19}$")
_NAME = re.compile(r"^[A-Za-z0-9_.:/-]{1,128}$")


def cap(value: object, limit: int = MAX_NAME_CHARS) -> str | None:
    """A caller-chosen string as a row keeps it: at most `limit` characters, marked when cut."""
    if value is None or value == "":
        return None
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit] + f"…(+{len(text) - limit})"


def parse_request(raw: bytes) -> service_pb2.ModelInferRequest | None:
    try:
        return service_pb2.ModelInferRequest.FromString(raw)
    except Exception:  # noqa: BLE001 - protobuf raises DecodeError, RecursionError or worse on hostile bytes
        return None


def _bytes_elements(raw: bytes) -> list[bytes] | None:
    """Elements of a serialised BYTES tensor, None if the bytes are not one."""
    try:
        return list(deserialize_bytes_tensor(raw))
    except Exception:  # noqa: BLE001 - struct.error, or a length prefix past the end
        return None


def _element_hashes(elements: list[bytes]) -> dict:
    hashes = [sha256_hex(e) for e in elements[:MAX_ELEMENT_HASHES]]
    entry: dict = {"sha256": hashes}
    if len(elements) > MAX_ELEMENT_HASHES:
        rest = hashlib.sha256()
        for e in elements[MAX_ELEMENT_HASHES:]:
            rest.update(hashlib.sha256(e).digest())
        entry |= {"elements": len(elements), "rest_sha256": rest.hexdigest()}
    return entry


def options_request_id(options: bytes) -> str | None:
    """OPTIONS' request_id, read only from a small, shallow JSON object (what preprocess would accept)."""
    if len(options) > MAX_OPTIONS_BYTES:
        return None
    try:
        rid = json.loads(options.decode("utf-8")).get("request_id")
    except (ValueError, AttributeError, RecursionError):
        return None
    return rid if isinstance(rid, str) and 0 < len(rid) <= MAX_NAME_CHARS else None


def request_summary(raw: bytes, req: service_pb2.ModelInferRequest | None = None) -> dict:
    """What the audit row keeps of a request: ids, model, and per input its name, dtype, shape, size and sha256
    (one per element for BYTES tensors, so image_sha256/text_sha256 join with the models' rows)."""
    req = req if req is not None else parse_request(raw)
    if req is None:
        return {"model": None, "request_sha256": sha256_hex(raw), "bytes": len(raw), "parse_error": "not a request"}
    row: dict[str, Any] = {"model": cap(req.model_name), "model_version": cap(req.model_version),
                 "triton_request_id": cap(req.id), "inputs": []}
    for i, t in enumerate(req.inputs[:MAX_SUMMARISED_INPUTS]):
        raw_t = req.raw_input_contents[i] if i < len(req.raw_input_contents) else b""
        elements = _bytes_elements(raw_t) if t.datatype == "BYTES" and raw_t else None
        if elements is None and not raw_t and t.datatype == "BYTES":
            elements = list(t.contents.bytes_contents)
        data = raw_t or t.contents.SerializeToString()
        entry: dict[str, Any] = {"name": cap(t.name), "datatype": cap(t.datatype, 16), "shape": list(t.shape[:8]),
                                 "bytes": len(data)}
        entry |= _element_hashes(elements) if elements is not None else {"sha256": sha256_hex(data)}
        row["inputs"].append(entry)
        if elements is not None and len(elements) >= 1:
            if t.name == "IMAGE":
                row["image_sha256"] = entry["sha256"][0]
            elif t.name == "TEXT":
                row["text_sha256"] = entry["sha256"][0]
            elif t.name == "OPTIONS":
                row["request_id"] = options_request_id(elements[0])
    if len(req.inputs) > MAX_SUMMARISED_INPUTS:
        rest = hashlib.sha256()
        for t in req.inputs[MAX_SUMMARISED_INPUTS:]:
            rest.update(t.SerializeToString())
        for c in req.raw_input_contents[MAX_SUMMARISED_INPUTS:]:
            rest.update(hashlib.sha256(c).digest())
        row["more_inputs"] = {"count": len(req.inputs) - MAX_SUMMARISED_INPUTS, "sha256": rest.hexdigest()}
    # The id the models would log (OPTIONS' request_id), else the caller's Triton request id.
    row["request_id"] = row.get("request_id") or row["triton_request_id"]
    return row


def refusal(req: service_pb2.ModelInferRequest | None, public: tuple[str, ...] = PUBLIC_MODELS) -> tuple[str, str]:
    """(code, message) when the gateway answers the request itself, ("", "") when it goes to Triton."""
    if req is None:
        return "bad_request", "the message is not an inference request"
    if req.model_name not in public:
        return ("model_not_found", f"model {cap(req.model_name, 64)!r} is not served here; "
                                   f"this port serves {', '.join(public)}")
    if not _VERSION.match(req.model_version):
        return "bad_request", f"model_version {cap(req.model_version, 32)!r} is not a version number"
    if len(req.inputs) > MAX_INPUTS or len(req.outputs) > MAX_OUTPUTS:
        return "bad_request", (f"{len(req.inputs)} inputs and {len(req.outputs)} outputs; "
                               f"at most {MAX_INPUTS} and {MAX_OUTPUTS}")
    names = [t.name for t in req.inputs] + [o.name for o in req.outputs]
    if any(not _NAME.match(n) for n in names):
        return "bad_request", "input and output names are 1-128 characters of A-Z a-z 0-9 _ . : / -"
    if len(req.raw_input_contents) > len(req.inputs):
        return "bad_request", f"{len(req.raw_input_contents)} raw contents for {len(req.inputs)} inputs"
    for t in req.inputs:
        if not t.shape or t.shape[0] <= 0 or any(d < 0 for d in t.shape):
            return "bad_request", f"input {t.name!r} has shape {list(t.shape[:8])}: a batch dimension of at least 1"
    return "", ""
