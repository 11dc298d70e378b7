"""Shared fixtures. `triton` starts one real embedded Triton server for the whole session on free
loopback ports, with its own audit log, policy directory (the shipped policies plus test policies) and
admin key, and stops it at the end."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from moderation.testing.policies import derive_policy, write_fixed_route_policies

ROOT = Path(__file__).resolve().parents[1]
REPO = ROOT / "model_repository"
ADMIN_KEY = "test-admin-key"


def write_policy(directory: Path, name: str, **gate_overrides) -> Path:
    """A copy of the default policy under a new name with some gate settings changed (verdict cache off)."""
    return derive_policy(directory, name, gate=gate_overrides, cache={"enabled": False})


@pytest.fixture(scope="session")
def policy_dir(tmp_path_factory) -> Path:
    # The shipped policies (verdict cache off, so repeated sample posts are judged each time) plus
    # escalate_all / block_all / allow_all: routes are forced through thresholds, never per post.
    d = write_fixed_route_policies(tmp_path_factory.mktemp("policies"))
    return d


@pytest.fixture(scope="session")
def audit_log(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("audit") / "audit.jsonl"


@pytest.fixture(scope="session")
def triton(policy_dir, audit_log, tmp_path_factory):
    from moderation.core.auth import admin_headers
    from moderation.testing.server import running_server

    if not (REPO / "language_decoder" / "1" / "artifact.json").exists():
        pytest.fail("model_repository has no exported models: run `make models`")
    log = tmp_path_factory.mktemp("logs") / "triton.log"
    env = {"MODERATION_POLICY_DIR": str(policy_dir), "MODERATION_AUDIT_LOG": str(audit_log)}
    with running_server(repository=REPO, env=env, log_path=log, key=ADMIN_KEY) as srv:
        srv.log = log
        srv.admin_headers = admin_headers(ADMIN_KEY, "grpc")  # for tritonclient.grpc calls
        srv.admin_http_headers = admin_headers(ADMIN_KEY, "http")
        yield srv


@pytest.fixture(scope="session")
def client(triton):
    from clients.client import ModerationClient

    with ModerationClient(triton.grpc_url, timeout_s=60) as c:
        yield c


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "triton" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.integration)


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def redis_or_fail():
    """A real redis-server on a free port (Debian's redis-server, installed by `make setup`); a test that needs one
    fails, never skips, when it is missing."""
    from moderation.testing.redis_server import RedisServer

    try:
        return RedisServer()
    except FileNotFoundError as e:
        pytest.fail(str(e))


@pytest.fixture()
def redis_server():
    with redis_or_fail() as srv:
        yield srv
