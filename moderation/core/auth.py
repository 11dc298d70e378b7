"""The admin key of Triton's restricted protocols: where it comes from and how a call presents it."""
from __future__ import annotations

import os
from pathlib import Path

ADMIN_HEADER = "admin-key"
# Triton matches restricted gRPC calls on this metadata key (its prefix + the configured header name);
# HTTP requests send the plain header name.
GRPC_ADMIN_HEADER = "triton-grpc-protocol-" + ADMIN_HEADER
# Everything that can change or read server state beyond inference and health needs the admin key.
RESTRICTED_GRPC = "model-repository,model-config,shared-memory,statistics,trace,logging"
# HTTP inference too: callers use gRPC through the audit gateway, which audits what Triton refuses itself;
# HTTP inference (perf_analyzer, operators) needs the key, so nothing unaudited is open.
RESTRICTED_HTTP = "inference,model-repository,model-config,shared-memory,statistics,trace,logging"


def restricted_grpc(behind_gateway: bool) -> str:
    """The gRPC protocols Triton closes behind the key. Behind the audit gateway inference too: only the gateway,
    which holds the key and forwards inference for the public models alone, reaches the models."""
    return RESTRICTED_GRPC + (",inference" if behind_gateway else "")


def admin_headers(key: str, protocol: str = "grpc") -> dict[str, str]:
    return {GRPC_ADMIN_HEADER if protocol == "grpc" else ADMIN_HEADER: key}


def admin_key() -> str:
    """MODERATION_ADMIN_KEY, else the contents of MODERATION_ADMIN_KEY_FILE, else ""."""
    key = os.environ.get("MODERATION_ADMIN_KEY")
    path = os.environ.get("MODERATION_ADMIN_KEY_FILE")
    if not key and path and Path(path).exists():
        key = Path(path).read_text(encoding="utf-8").strip()
    return key or ""
