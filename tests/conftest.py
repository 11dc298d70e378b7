"""Shared fixtures. `triton` starts one real embedded Triton server for the whole session on free
loopback ports, with its own audit log, policy directory (the shipped policies plus test policies) and
admin key, and stops it at the end."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml

from moderation.policy import PACKAGE_POLICY_DIR

ROOT = Path(__file__).resolve().parents[1]
REPO = ROOT / "model_repository"
ADMIN_KEY = "test-admin-key"


def write_policy(directory: Path, name: str, **gate_overrides) -> Path:
    """A copy of the default policy under a new name with some gate settings changed."""
    data = yaml.safe_load((PACKAGE_POLICY_DIR / "default.yaml").read_text())
    data["name"] = name
    data["gate"].update(gate_overrides)
    path = Path(directory) / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def policy_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("policies")
    for f in PACKAGE_POLICY_DIR.glob("*.yaml"):
        shutil.copy(f, d / f.name)
    # Routes are forced through thresholds, never per post: allow_below=0 allows nothing, block_at=1.01
    # blocks nothing, block_at=0 blocks everything the policy may block.
    write_policy(d, "escalate_all", allow_below=0.0, block_at=1.01)
    write_policy(d, "block_all", allow_below=0.0, block_at=0.0)
    write_policy(d, "allow_all", allow_below=1.01, block_at=1.01)
    return d


@pytest.fixture(scope="session")
def audit_log(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("audit") / "audit.jsonl"


@pytest.fixture(scope="session")
def triton(policy_dir, audit_log, tmp_path_factory):
    from moderation.server import admin_headers, running_server

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
