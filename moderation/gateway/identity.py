"""Who a call at the public port is, for fair shares: the caller, not its connection.

  1. MODERATION_GATEWAY_CLIENT_HEADER, when set: the value a trusted front proxy put in that header.
  2. The `moderation-client` metadata (core/caller.py): a client id the caller names (the client library sends one
     per client object; the OpenAI front end one per HTTP caller). With a client key configured
     (MODERATION_GATEWAY_CLIENT_KEY_FILE) the id must carry its signature (`clients.admin client-token --id ID`
     prints one; the OpenAI front end signs its callers' ids with the same key); an unsigned or badly signed id
     then counts for nothing. Without a key ids are taken as sent.
  3. Otherwise the peer's address without its port: a caller that opens 16 connections is one client, not 16.
"""
from __future__ import annotations

from ..core.caller import CLIENT_METADATA, MAX_ID_CHARS, signed_id


def peer_host(peer: str) -> str:
    """gRPC's peer string without the port: ipv4:10.0.0.7:51234 -> ipv4:10.0.0.7, ipv6:[::1]:5 -> ipv6:[::1]."""
    kind, sep, rest = peer.partition(":")
    host, _, port = rest.rpartition(":")
    if not sep or kind not in ("ipv4", "ipv6") or not host or not port.isdigit():
        return peer  # unix sockets and the like have no port
    return f"{kind}:{host}"


class ClientIdentity:
    def __init__(self, key: bytes | None = None, trusted_header: str = ""):
        self.key, self.trusted_header = key, trusted_header.lower()

    def _named(self, value: str) -> str | None:
        return signed_id(value, self.key) if self.key else (value[:MAX_ID_CHARS] or None)

    def resolve(self, peer: str, metadata: tuple[tuple[str, str | bytes], ...]) -> str:
        named = None
        for k, v in metadata:
            value = v if isinstance(v, str) else v.decode("latin-1")
            if self.trusted_header and k == self.trusted_header and value:
                return f"header:{value[:200]}"
            if k == CLIENT_METADATA and value:
                named = self._named(value)
        return f"client:{named}" if named else f"peer:{peer_host(peer)}"
