"""A caller's name for the gateway's fair shares (gateway/identity.py decides who a call is): the `moderation-client`
metadata a client sends, and how a trusted sender signs it when the gateway has a client key
(MODERATION_GATEWAY_CLIENT_KEY_FILE): `<id>.<hex HMAC-SHA256(key, id)[:32]>`."""
from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

CLIENT_METADATA = "moderation-client"
CLIENT_KEY_FILE_ENV = "MODERATION_GATEWAY_CLIENT_KEY_FILE"
MAX_ID_CHARS = 128
_SIG_HEX = 32


def client_key(environ: dict[str, str] | None = None) -> bytes | None:
    """The key client ids are signed with, or None (ids taken as sent)."""
    env = os.environ if environ is None else environ
    path = env.get(CLIENT_KEY_FILE_ENV, "").strip()
    return Path(path).read_bytes().strip() or None if path else None


def sign_client(key: bytes, client_id: str) -> str:
    """The `moderation-client` value of `client_id` under `key`."""
    return f"{client_id}.{hmac.new(key, client_id.encode(), hashlib.sha256).hexdigest()[:_SIG_HEX]}"


def client_value(client_id: str, key: bytes | None) -> str:
    """What a trusted sender (the OpenAI front end) puts in `moderation-client` for one of its callers."""
    client_id = client_id[:MAX_ID_CHARS]
    return sign_client(key, client_id) if key else client_id


def signed_id(value: str, key: bytes) -> str | None:
    """The client id of a signed `moderation-client` value, or None when its signature is not `key`'s."""
    client_id, _, sig = value.rpartition(".")
    expected = sign_client(key, client_id).rpartition(".")[2]
    return client_id if client_id and hmac.compare_digest(sig, expected) else None
