"""The admin key of Triton's restricted protocols: where it comes from and how a call presents it."""
from __future__ import annotations

import os
from collections.abc import Mapping
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


# Where a process may find the key. Only the processes that check it get any of these: the launcher scrubs all three
# from the environment of Triton (and so of every python stub) and of the OpenAI front end (moderation/launch).
ADMIN_KEY_ENV = ("MODERATION_ADMIN_KEY", "MODERATION_ADMIN_KEY_FILE", "MODERATION_ADMIN_KEY_FD")
_KEY_FROM_FD: str | None = None


def admin_key() -> str:
    """MODERATION_ADMIN_KEY, else what the launcher wrote into the inherited descriptor MODERATION_ADMIN_KEY_FD (read
    once, then closed), else the contents of MODERATION_ADMIN_KEY_FILE, else ""."""
    global _KEY_FROM_FD
    key = os.environ.get("MODERATION_ADMIN_KEY")
    fd = os.environ.pop("MODERATION_ADMIN_KEY_FD", None)
    if fd is not None and fd.isdigit():
        with os.fdopen(int(fd), "rb") as pipe:
            _KEY_FROM_FD = pipe.read(4096).decode("utf-8").strip()
    path = os.environ.get("MODERATION_ADMIN_KEY_FILE")
    if not key and _KEY_FROM_FD:
        key = _KEY_FROM_FD
    if not key and path and Path(path).exists():
        key = Path(path).read_text(encoding="utf-8").strip()
    return key or ""


def without_admin_key(env: Mapping[str, str]) -> dict[str, str]:
    """`env` for a process that does not check the key (Triton's stubs parse untrusted images; the OpenAI front end
    faces callers): none of ADMIN_KEY_ENV."""
    return {k: v for k, v in env.items() if k not in ADMIN_KEY_ENV}
