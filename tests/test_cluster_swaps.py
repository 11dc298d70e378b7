"""Model versions are cluster state (core/version_store.py, ops/versions.py): with MODERATION_REDIS_URL, `clients.admin
swap` / `rollback` set the desired version once, through one gateway, and every replica's follower swaps its own Triton
to it within VERSIONS_POLL_S plus the load; `status` shows each replica's live version and whether it converged; a
replica that cannot swap keeps serving the old version and says why; a server that starts later starts on the desired
version. Against a real redis-server and real servers (two replicas, then a third), never a mock."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from clients.admin import ServiceAdmin, ServiceError
from export.release import release
from moderation.core.audit import AuditLog, read_rows
from moderation.core.version_store import VERSIONS_POLL_S, NothingToRollBack, VersionStore, version_store
from moderation.ops.admin import RepositoryAdmin
from moderation.ops.versions import RETRY_AFTER_S, VersionFollower
from moderation.testing.waits import wait_until

from .conftest import ADMIN_KEY, REPO, ROOT

MODEL = "clip_gate"  # small, and swapped by tests/test_operations.py too
# what the gate path needs to be ready (tests/test_calibration.py): no VLM, so three servers fit on 2 cores
SERVE_MODELS = ("preprocess", "read_text", "clip_image", "clip_text", "nsfw_image", "clip_gate", "postprocess",
                "moderate", "ocr_detect", "ocr_classify", "ocr_recognize")
HANG_GUARD_S = 180.0  # a wait this long ends only when what it waits for never comes


def _until(condition, what: str, limit_s: float = HANG_GUARD_S):
    return wait_until(condition, what, limit_s, every_s=0.2)


# against a real redis-server -------------------------------------------------------------------------------
@pytest.fixture()
def store():
    from moderation.testing.redis_server import RedisServer

    with RedisServer() as srv:
        found = version_store({"MODERATION_REDIS_URL": srv.url, "MODERATION_VERSIONS_PREFIX": "t"})
        assert isinstance(found, VersionStore)
        yield found


def test_no_redis_no_cluster_state():
    assert version_store({}) is None


def test_each_change_bumps_the_revision_and_rollback_walks_back_the_history(store):
    first = store.set_desired(MODEL, "2", "op@host", serving="1")
    assert (first["version"], first["from"], first["history"], first["revision"]) == ("2", "1", ["1"], 1)
    store.set_desired(MODEL, "3", "op@host")
    store.set_desired(MODEL, "3", "op@host")  # the same version again: the history does not repeat it
    back = store.rollback(MODEL, "other@host")
    assert (back["version"], back["from"], back["history"], back["by"]) == ("2", "3", ["1"], "other@host")
    assert store.rollback(MODEL, "op@host")["version"] == "1"
    with pytest.raises(NothingToRollBack):
        store.rollback(MODEL, "op@host")
    revision, desired = store.desired()
    assert revision == 5 and desired[MODEL]["version"] == "1" and desired[MODEL]["revision"] == 5
    assert [(r["version"], r["revision"]) for r in store.history()] == [("1", 5), ("2", 4), ("3", 3), ("3", 2),
                                                                        ("2", 1)]


def test_status_compares_each_replica_with_the_desired_version(store):
    store.set_desired(MODEL, "2", "op@host")
    store.publish("a", {"revision": 1, "live": {MODEL: ["2"]}, "errors": {}, "swapping": {}})
    store.publish("b", {"revision": 1, "live": {MODEL: ["1"]}, "swapping": {},
                        "errors": {MODEL: {"version": "2", "error": "no version 2"}}})
    store.publish("gone", {"revision": 1, "live": {MODEL: ["1"]}, "errors": {}, "swapping": {}}, ttl_s=0.05)
    time.sleep(0.2)  # past the last one's heartbeat
    status = store.status()
    by_id = {r["replica"]: r for r in status["replicas"]}
    assert sorted(by_id) == ["a", "b"]
    assert by_id["a"]["converged"] and not by_id["b"]["converged"]
    assert by_id["b"]["converged_models"] == {MODEL: False} and by_id["b"]["errors"][MODEL]["error"] == "no version 2"


# real servers ----------------------------------------------------------------------------------------------
def _repository(root: Path, versions: int) -> Path:
    """A repository whose models are the built ones (linked) except MODEL, copied with `versions` versions."""
    repo = root / "model_repository"
    repo.mkdir(parents=True)
    for entry in REPO.iterdir():
        if entry.name != MODEL and not entry.name.startswith("."):
            (repo / entry.name).symlink_to(entry)
    shutil.copytree(REPO / MODEL, repo / MODEL, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    for _ in range(versions - 1):
        release(repo, MODEL, from_version="1", note="cluster swap test")
    return repo


def _server(root: Path, name: str, repo: Path, redis_url: str, prefix: str):
    from moderation.testing.server import running_server

    env = {"MODERATION_AUDIT_LOG": str(root / f"audit-{name}.jsonl"),
           "MODERATION_STATE_DIR": str(root / f"state-{name}"),
           "MODERATION_REDIS_URL": redis_url, "MODERATION_REDIS_TIMEOUT_MS": "1000",
           "MODERATION_VERSIONS_PREFIX": prefix, "MODERATION_REPLICA_ID": name}
    srv = running_server(repository=repo, env=env, log_path=root / f"triton-{name}.log", key=ADMIN_KEY,
                         models=SERVE_MODELS)
    srv.name, srv.audit, srv.repo = name, root / f"audit-{name}.jsonl", repo
    return srv


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Redis and two replicas, each with its own repository holding versions 1 and 2 of MODEL (each starts on 2)."""
    from moderation.testing.redis_server import RedisServer

    if not (REPO / MODEL / "1" / "artifact.json").exists():
        pytest.fail("model_repository has no exported models: run `make models`")
    root = tmp_path_factory.mktemp("cluster-swaps")
    repos = {name: _repository(root / f"repo-{name}", 2) for name in ("a", "b")}
    prefix = f"t{uuid.uuid4().hex[:8]}"
    servers = []
    with RedisServer() as redis_srv:
        try:
            for name in ("a", "b"):
                servers.append(_server(root, name, repos[name], redis_srv.url, prefix).__enter__())
            yield {"redis": redis_srv, "prefix": prefix, "root": root, "a": servers[0], "b": servers[1]}
        finally:
            for srv in servers:
                srv.__exit__(None, None, None)


def _cli(srv, *args: str) -> subprocess.CompletedProcess:
    """clients.admin as an operator runs it: the admin key, and no server setting of its own (no Redis URL)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODERATION_")}
    env.update(MODERATION_ADMIN_KEY=ADMIN_KEY, PYTHONPATH=os.pathsep.join(
        x for x in (str(ROOT), env.get("PYTHONPATH", "")) if x))
    return subprocess.run([sys.executable, "-m", "clients.admin", "--url", srv.grpc_url, *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=HANG_GUARD_S + 60)


def _serves(srv) -> list[str]:
    """The versions of MODEL Triton itself serves: READY in its repository index, and listed in its metadata."""
    client = srv.direct_client()
    ready = sorted(m["version"] for m in client.get_model_repository_index(as_json=True).get("models", [])
                   if m["name"] == MODEL and m.get("state") == "READY")
    assert sorted(client.get_model_metadata(MODEL, as_json=True)["versions"]) == ready
    assert all(client.is_model_ready(MODEL, v) for v in ready)
    return ready


def _status(srv) -> dict:
    p = _cli(srv, "status", "--json")
    assert p.returncode == 0, p.stderr
    cluster = json.loads(p.stdout)["cluster"]
    cluster["by_replica"] = {r["replica"]: r for r in cluster["replicas"]}
    return cluster


def _converged(srv, version: str, replicas: tuple[str, ...] = ("a", "b")):
    """`status` through `srv`: the desired version is `version` and each of `replicas` reports it converged."""
    def check():
        status = _status(srv)
        rows = status["by_replica"]
        return (status["desired"][MODEL]["version"] == version
                and all(r in rows and rows[r]["converged_models"].get(MODEL) and rows[r]["live"][MODEL] == [version]
                        for r in replicas)
                and status)

    return _until(check, f"{replicas} converged on {MODEL} v{version}")


def _converge_rows(srv) -> list[dict]:
    return [r for r in read_rows(srv.audit) if r.get("stage") == "watchdog" and r.get("action") == "converge"]


@pytest.mark.integration
def test_a_swap_set_once_through_one_server_reaches_every_replica(cluster):
    a, b = cluster["a"], cluster["b"]
    assert _serves(a) == _serves(b) == ["2"]  # no desired version yet: each loaded its latest
    p = _cli(a, "swap", "--model", MODEL, "--version", "1")
    assert p.returncode == 0, p.stderr
    acknowledged = time.monotonic()
    out = json.loads(p.stdout)
    assert (out["model"], out["version"], out["from"], out["revision"]) == (MODEL, "1", "2", 1)
    for srv in (a, b):
        _until(lambda srv=srv: _serves(srv) == ["1"], f"{srv.name} serves v1")
        print(f"{srv.name} serves v1 {time.monotonic() - acknowledged:.1f} s after the swap was acknowledged")
    status = _converged(b, "1")  # asked through the other replica
    assert status["desired"][MODEL]["by"].endswith(f"@{os.uname().nodename}")
    # set once, audited once, by the gateway that took it; each replica audited its own swap
    sets = [r for r in read_rows(a.audit) if r.get("action") == "versions.swap"]
    assert [(r["model"], r["version"], r["ok"], r["revision"]) for r in sets] == [(MODEL, "1", True, 1)]
    assert not [r for r in read_rows(b.audit) if r.get("action") == "versions.swap"]
    for srv in (a, b):
        assert [(r["to_version"], r["ok"]) for r in _converge_rows(srv)] == [("1", True)]
    text = _cli(a, "status")
    assert text.returncode == 0 and f"desired {MODEL}" in text.stdout, text.stderr
    assert sum(f"{MODEL:<18} v1    converged" in line for line in text.stdout.splitlines()) == 2, text.stdout
    # refused, and nothing set: another key, and a model the reached server does not have
    with ServiceAdmin(a.grpc_url, "not-the-key") as service, pytest.raises(ServiceError) as refused:
        service.versions("swap", model=MODEL, version="2")
    assert refused.value.code == "unauthorized"
    row = [r for r in read_rows(a.audit) if r.get("action") == "versions.swap"][-1]
    assert (row["ok"], row["error"]["code"]) == (False, "unauthorized")
    p = _cli(a, "swap", "--model", "no_such_model", "--version", "1")
    assert p.returncode == 1 and "has no model 'no_such_model'" in p.stderr, p.stderr
    status = _status(a)
    assert status["revision"] == 1 and set(status["desired"]) == {MODEL}


@pytest.mark.integration
def test_a_rollback_set_once_returns_every_replica_to_the_previous_version(cluster):
    a, b = cluster["a"], cluster["b"]
    assert _cli(a, "swap", "--model", MODEL, "--version", "1").returncode == 0  # where the test before left it
    _converged(a, "1")
    p = _cli(b, "rollback", "--model", MODEL, "--wait", str(HANG_GUARD_S))
    assert p.returncode == 0, p.stdout + p.stderr
    out = json.loads(p.stdout.splitlines()[0])
    assert (out["version"], out["from"]) == ("2", "1")
    for srv in (a, b):  # --wait returned once every replica reported it
        assert _serves(srv) == ["2"]
    _converged(a, "2")
    rows = [r for r in read_rows(b.audit) if r.get("action") == "versions.rollback"]
    assert [(r["version"], r["from_version"], r["ok"]) for r in rows] == [("2", "1", True)]


@pytest.mark.integration
def test_a_replica_that_cannot_swap_keeps_serving_and_reports_why(cluster):
    a, b = cluster["a"], cluster["b"]
    release(a.repo, MODEL, from_version="1", note="published to a's pod only")
    p = _cli(a, "swap", "--model", MODEL, "--version", "3")
    assert p.returncode == 0, p.stderr
    _until(lambda: _serves(a) == ["3"], "a serves v3")
    failed = _until(lambda: [r for r in _converge_rows(b) if r["to_version"] == "3"], "b tried v3")
    assert failed[0]["ok"] is False and "no version 3" in failed[0]["error"]

    def b_reports_it():
        row = _status(a)["by_replica"].get("b")
        return row and row.get("errors", {}).get(MODEL) and row

    row = _until(b_reports_it, "b reports its failed swap")
    assert row["converged"] is False and row["converged_models"] == {MODEL: False} and row["live"][MODEL] == ["2"]
    assert "no version 3" in row["errors"][MODEL]["error"] and row["errors"][MODEL]["retry_in_s"] >= RETRY_AFTER_S
    assert _status(a)["by_replica"]["a"]["converged"] is True
    assert _serves(b) == ["2"]  # the old version serves on
    # a follower that cannot see the repository (a pod's sidecar): Triton itself refuses the load, v2 serves on
    sidecar = VersionFollower(RepositoryAdmin(b.triton_grpc_url, ADMIN_KEY, None, audit=AuditLog(b.audit)),
                              version_store({"MODERATION_REDIS_URL": cluster["redis"].url,
                                             "MODERATION_VERSIONS_PREFIX": cluster["prefix"]}), "b-sidecar")
    (attempt,) = sidecar.check_once()
    assert attempt["ok"] is False and attempt["error"], attempt
    assert _serves(b) == ["2"] and sidecar.check_once() == []  # and it waits before trying again
    sidecar.store.client.delete(sidecar.store.replica_prefix + "b-sidecar")  # gone, as after its heartbeat
    text = _cli(a, "status").stdout
    assert any("NOT converged" in line and "no version 3" in line for line in text.splitlines()), text
    # several polls later b has not tried again (its next try waits RETRY_AFTER_S)
    seen = _status(a)["by_replica"]["b"]["at"]
    _until(lambda: _status(a)["by_replica"]["b"]["at"] > seen + 2 * VERSIONS_POLL_S, "b reported twice more")
    assert len([r for r in _converge_rows(b) if r["to_version"] == "3" and r["replica"] == "b"]) == 1
    # rolling back converges both again: a swaps back, b already serves it and its error clears
    assert _cli(b, "rollback", "--model", MODEL).returncode == 0
    status = _converged(a, "2")
    assert not status["by_replica"]["b"]["errors"] and _serves(a) == _serves(b) == ["2"]


@pytest.mark.integration
def test_a_server_started_after_a_swap_starts_on_the_desired_version(cluster):
    a = cluster["a"]
    assert _cli(a, "swap", "--model", MODEL, "--version", "1").returncode == 0
    _converged(a, "1")
    # a third replica on b's repository, whose latest version (what it would load by itself) is 2
    with _server(cluster["root"], "c", cluster["b"].repo, cluster["redis"].url, cluster["prefix"]) as c:
        assert _serves(c) == ["1"]  # from its first answer on, it serves the desired version
        assert [(r["to_version"], r["ok"]) for r in _converge_rows(c)] == [("1", True)]
        _converged(a, "1", replicas=("a", "b", "c"))


@pytest.mark.integration
def test_the_follower_runs_on_its_own_and_is_ready_after_its_first_check(cluster, tmp_path):
    """As the pod's version-follower container runs it (deploy/k8s/deployment.yaml), beside a Triton it did not
    start."""
    b = cluster["b"]
    ready = tmp_path / "ready"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODERATION_")}
    env.update(MODERATION_ADMIN_KEY=ADMIN_KEY, MODERATION_REDIS_URL=cluster["redis"].url,
               MODERATION_VERSIONS_PREFIX=cluster["prefix"], MODERATION_AUDIT_LOG=str(b.audit),
               PYTHONPATH=os.pathsep.join(x for x in (str(ROOT), env.get("PYTHONPATH", "")) if x))
    proc = subprocess.Popen([sys.executable, "-m", "moderation.ops.versions", "--url", b.triton_grpc_url,
                             "--replica", "b-container", "--ready-file", str(ready)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _until(lambda: ready.exists() or proc.poll() is not None, "the ready file")
        assert proc.poll() is None and ready.read_text().strip() == "b-container"
        row = _until(lambda: _status(b)["by_replica"].get("b-container"), "its report")
        assert row["live"][MODEL] == _serves(b)
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.integration
def test_replicas_keep_their_versions_while_redis_is_away_and_when_it_comes_back_empty(cluster):
    a, b, redis_srv = cluster["a"], cluster["b"], cluster["redis"]
    assert _cli(a, "swap", "--model", MODEL, "--version", "1").returncode == 0
    _converged(a, "1")
    redis_srv.kill()
    try:
        p = _cli(a, "swap", "--model", MODEL, "--version", "2")
        assert p.returncode == 1 and "[unavailable]" in p.stderr, p.stderr
        _until(lambda: a.follower.fault and b.follower.fault, "both followers saw Redis gone")
        assert _serves(a) == _serves(b) == ["1"]
    finally:
        redis_srv.start()  # back on the same port, empty
    _until(lambda: a.follower.fault is None and b.follower.fault is None, "both followers reached Redis again")
    status = _until(lambda: (s := _status(a)) and {"a", "b"} <= set(s["by_replica"]) and s, "both report again")
    assert status["desired"] == {} and status["by_replica"]["a"]["live"][MODEL] == ["1"]
    assert _serves(a) == _serves(b) == ["1"]  # nothing desired: each keeps what it serves
