"""Lists are cluster state (moderation/core/list_store.py): with MODERATION_REDIS_URL a policy's lists, their revision
and the history of who changed what live in Redis, and every process sees an edit within LISTS_POLL_S; a process that
cannot reach Redis keeps the last lists it loaded and says so; without Redis the lists live in the state directory,
never in the package. Always against a real redis-server started here (never a mock), then real servers: two
replicas on one Redis, and one embedded server on the package's own policies."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from moderation.core import policy as policy_module
from moderation.core.audit import AuditLog, read_rows
from moderation.core.errors import ModerationError
from moderation.core.list_store import (
    LISTS_POLL_S,
    FileListStore,
    ListsUnavailable,
    RedisListStore,
    list_store,
    lists_path,
)
from moderation.core.policy import load_policy
from moderation.core.redis_link import redis_client
from moderation.gateway.health import LISTS_SERVICE
from moderation.launch.processes import grpc_health_serving
from moderation.ops.lists import ListAdmin, ListError
from moderation.testing.policies import derive_policy
from moderation.testing.samples import image_paths, sample_posts
from moderation.testing.waits import wait_until

from .conftest import ADMIN_KEY, REPO, ROOT

HANG_GUARD_S = 120.0  # waits for an event end this long only when it never comes
# what a request to a loaded server may take on top of the propagation bound (2 shared cores, several servers)
REQUEST_MARGIN_S = 30.0
TERM = "click the link in bio"


class Clock:
    """A clock the test moves: the poll interval is decided by it, not by how fast this machine is."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture()
def redis_env(redis_server, tmp_path, monkeypatch):
    """A process configured for lists in Redis: its own key prefix and state directory, a policy `shared`."""
    monkeypatch.setenv("MODERATION_REDIS_URL", redis_server.url)
    monkeypatch.setenv("MODERATION_LISTS_PREFIX", f"t{uuid.uuid4().hex[:8]}")
    monkeypatch.setenv("MODERATION_REDIS_TIMEOUT_MS", "1000")
    monkeypatch.setenv("MODERATION_STATE_DIR", str(tmp_path / "state"))
    policies = tmp_path / "policies"
    policies.mkdir()
    derive_policy(policies, "shared")
    policy_module.forget_loaded()
    yield policies
    policy_module.forget_loaded()


def _admin(policies: Path, audit: Path) -> ListAdmin:
    return ListAdmin(directory=policies, audit=AuditLog(audit), context={"via": "test"})


def _replica(policies: Path, clock: Clock) -> RedisListStore:
    """Another process's view of the same Redis: its own store object, polling by `clock`."""
    env = os.environ
    return RedisListStore(redis_client(env["MODERATION_REDIS_URL"], env, "test-replica"), policies,
                          env["MODERATION_LISTS_PREFIX"], identity=f"replica {uuid.uuid4().hex}", clock=clock)


# unit, against a real redis-server ------------------------------------------------------------------------
def test_the_environment_chooses_the_store(redis_env, monkeypatch):
    assert isinstance(list_store(redis_env), RedisListStore)
    monkeypatch.delenv("MODERATION_REDIS_URL")
    store = list_store(redis_env)
    assert isinstance(store, FileListStore)
    assert store.path("shared").is_relative_to(Path(os.environ["MODERATION_STATE_DIR"]))


def test_an_edit_reaches_another_process_within_the_poll_interval(redis_env, tmp_path):
    clock = Clock()
    replica = _replica(redis_env, clock)
    lists, fault = replica.current("shared")
    assert (lists.revision, fault) == (0, None)
    admin = _admin(redis_env, tmp_path / "audit.jsonl")
    admin.add_term("shared", "block", TERM, label="scam")
    clock.now += LISTS_POLL_S * 0.5
    assert replica.current("shared")[0].revision == 0  # checked less than LISTS_POLL_S ago: not asked again
    clock.now += LISTS_POLL_S * 0.5
    lists, fault = replica.current("shared")
    assert (lists.revision, [t.term for t in lists.terms], fault) == (1, [TERM], None)
    policy_module.forget_loaded()
    pol = load_policy("shared", redis_env)  # a model process that starts now
    assert pol.id.endswith("+lists.1") and pol.lists.terms[0].term == TERM
    unchanged = lists
    clock.now += LISTS_POLL_S
    assert replica.current("shared")[0] is unchanged  # same revision: the lists are not read again


def test_edits_keep_an_audit_in_redis_and_in_the_service_log(redis_env, tmp_path):
    admin = _admin(redis_env, tmp_path / "audit.jsonl")
    admin.add_term("shared", "review", "加微信")
    entry = admin.add_image("shared", "block", image_paths()["rocket"].read_bytes(), label="scam")
    admin.remove("shared", "image", entry["id"])
    store = list_store(redis_env)
    assert isinstance(store, RedisListStore)
    history = store.history("shared")
    assert [(r["action"], r["revision"], r["via"]) for r in history] == [
        ("lists.remove-image", 3, "test"), ("lists.add-image", 2, "test"), ("lists.add-term", 1, "test")]
    assert "term" not in history[2] and history[2]["term_sha256"] and history[1]["image_sha256"]
    logged = [(r["action"], r["revision"]) for r in read_rows(tmp_path / "audit.jsonl") if r.get("ok")]
    assert logged == [(r["action"], r["revision"]) for r in reversed(history)]


def test_redis_down_keeps_the_last_lists_loaded_and_says_so(redis_env, redis_server, tmp_path):
    clock = Clock()
    admin = _admin(redis_env, tmp_path / "audit.jsonl")
    admin.add_term("shared", "block", TERM, label="scam")
    replica = _replica(redis_env, clock)
    assert replica.current("shared")[0].revision == 1
    redis_server.kill()
    clock.now += LISTS_POLL_S
    lists, fault = replica.current("shared")
    assert lists.revision == 1 and [t.term for t in lists.terms] == [TERM]
    assert "cannot be reached" in fault and "revision 1 stays in force" in fault
    # a process started during the outage: the last good copy a process of this server kept
    fresh = _replica(redis_env, Clock())
    fresh.identity = replica.identity
    lists, fault = fresh.current("shared")
    assert lists.revision == 1 and "revision 1 stays in force" in fault
    # one with no copy at all: no entries, and it says so (never silently empty)
    lists, fault = _replica(redis_env, Clock()).current("shared")
    assert lists.revision == 0 and "no copy of its lists was loaded here" in fault
    # an edit is refused, and the refusal audited
    with pytest.raises(ListsUnavailable, match="cannot be reached"):
        admin.add_term("shared", "block", "another term")
    row = list(read_rows(tmp_path / "audit.jsonl"))[-1]
    assert (row["action"], row["ok"], row["error"]["code"]) == ("lists.add-term", False, "unavailable")


def test_redis_restarted_empty_keeps_the_held_revision_and_the_next_edit_continues_it(redis_env, redis_server,
                                                                                     tmp_path):
    clock = Clock()
    admin = _admin(redis_env, tmp_path / "audit.jsonl")
    admin.add_term("shared", "block", TERM, label="scam")
    replica = _replica(redis_env, clock)
    assert replica.current("shared")[0].revision == 1
    redis_server.kill()
    redis_server.start()  # back, empty

    def reconnected():  # the breaker lets a trial through after its cool-down (real time, at most 5 s)
        clock.now += LISTS_POLL_S
        lists, fault = replica.current("shared")
        return "holds no lists" in (fault or "") and (lists, fault)

    lists, fault = wait_until(reconnected, "the replica reconnected", HANG_GUARD_S)
    assert lists.revision == 1 and "revision 1 stays in force" in fault
    policy_module.forget_loaded()  # the next edit runs in a new editor process, as the gateway starts one
    admin.add_term("shared", "review", "加微信")  # starts from this server's last good copy, not from nothing
    clock.now += LISTS_POLL_S
    lists, fault = replica.current("shared")
    assert lists.revision == 2 and sorted(t.term for t in lists.terms) == sorted([TERM, "加微信"]) and fault is None


def test_lists_in_redis_that_do_not_parse_leave_the_last_good_ones_and_refuse_edits(redis_env, tmp_path):
    import redis

    clock = Clock()
    admin = _admin(redis_env, tmp_path / "audit.jsonl")
    admin.add_term("shared", "block", TERM, label="scam")
    replica = _replica(redis_env, clock)
    assert replica.current("shared")[0].revision == 1
    redis.Redis.from_url(os.environ["MODERATION_REDIS_URL"]).hset(replica.key("shared"), mapping={
        "revision": "2", "lists": '{"revision": 2, "terms": ['})  # written by something else, cut short
    clock.now += LISTS_POLL_S
    lists, fault = replica.current("shared")
    assert lists.revision == 1 and "do not parse" in fault and "revision 1 stays in force" in fault
    with pytest.raises(ModerationError, match="lists import"):
        admin.add_term("shared", "block", "another term")
    assert list(read_rows(tmp_path / "audit.jsonl"))[-1]["error"]["code"] == "bad_policy"


def test_without_redis_the_lists_live_in_the_state_directory_and_a_seed_is_read_only(tmp_path, monkeypatch):
    monkeypatch.delenv("MODERATION_REDIS_URL", raising=False)
    monkeypatch.setenv("MODERATION_STATE_DIR", str(tmp_path / "state"))
    policies = tmp_path / "policies"
    policies.mkdir()
    derive_policy(policies, "seeded")
    seed = lists_path(policies / "seeded.yaml")
    seed.write_text(json.dumps({"revision": 4, "terms": [{"id": "t", "list": "review", "term": "seed term"}]}),
                    encoding="utf-8")
    seed_bytes = seed.read_bytes()
    policy_module.forget_loaded()
    try:
        assert load_policy("seeded", policies).id.endswith("+lists.4")  # the seed is in force until an edit
        _admin(policies, tmp_path / "audit.jsonl").add_term("seeded", "block", TERM)
        pol = load_policy("seeded", policies)
        assert pol.id.endswith("+lists.5") and sorted(t.term for t in pol.lists.terms) == sorted(["seed term", TERM])
        assert seed.read_bytes() == seed_bytes and sorted(p.name for p in policies.iterdir()) == [
            "seeded.lists.json", "seeded.yaml"]
        store = list_store(policies)
        assert isinstance(store, FileListStore) and store.path("seeded").is_relative_to(tmp_path / "state")
    finally:
        policy_module.forget_loaded()


def test_export_then_import_restores_the_lists_and_import_checks_every_entry(redis_env, tmp_path):
    audit = tmp_path / "audit.jsonl"
    admin = _admin(redis_env, audit)
    admin.add_term("shared", "block", TERM, label="scam", note="spam phrase")
    image = admin.add_image("shared", "review", image_paths()["rocket"].read_bytes())
    exported = admin.export("shared")
    assert exported["revision"] == 2 and [e["id"] for e in exported["images"]] == [image["id"]]
    admin.remove("shared", "term", exported["terms"][0]["id"])
    assert list_store(redis_env).current("shared", fresh=True)[0].terms == []
    assert admin.import_lists("shared", json.loads(json.dumps(exported))) == {
        "policy": "shared", "revision": 4, "images": 1, "terms": 1}
    restored = admin.export("shared")
    assert {k: restored[k] for k in ("images", "terms")} == {k: exported[k] for k in ("images", "terms")}
    assert restored["revision"] == 4

    def refused(document: dict, why: str) -> None:
        with pytest.raises((ListError, ModerationError), match=why):
            admin.import_lists("shared", document)
        row = list(read_rows(audit))[-1]
        assert (row["action"], row["ok"]) == ("lists.import", False)

    term, img = exported["terms"][0], exported["images"][0]
    refused({"terms": [{**term, "label": "no_such_label"}]}, "no_such_label")
    refused({"terms": [{**term, "term": "   "}]}, "empty once normalised")
    refused({"terms": [{**term, "list": "maybe"}]}, "does not parse")
    refused({"images": [{**img, "pdq": ["not a hash"]}]}, "PDQ hashes")
    refused({"images": [{**img, "quality": 3}]}, "PDQ quality")
    refused({"images": [img, img]}, "same id")
    assert list_store(redis_env).current("shared", fresh=True)[0].revision == 4  # nothing refused was applied


# real servers ---------------------------------------------------------------------------------------------
def _require_models() -> None:
    if not (REPO / "language_decoder" / "1" / "artifact.json").exists():
        pytest.fail("model_repository has no exported models: run `make models`")


def _cli(srv, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODERATION_")}
    env.update(MODERATION_ADMIN_KEY=ADMIN_KEY, PYTHONPATH=os.pathsep.join(
        x for x in (str(ROOT), env.get("PYTHONPATH", "")) if x))
    return subprocess.run([sys.executable, "-m", "clients.admin", "--url", srv.grpc_url, *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=180)


def _moderate(srv, image: bytes, caption: str, policy: str) -> dict:
    from clients.client import ModerationClient

    with ModerationClient(srv.grpc_url, timeout_s=120) as c:
        return c.moderate(image, caption, policy=policy)


def _gauge(srv, name: str, policy: str) -> float | None:
    text = urllib.request.urlopen(srv.metrics_url, timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith(name + "{") and f'policy="{policy}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return None


def _lists_stale(srv, policy: str) -> float | None:
    return _gauge(srv, "moderation_lists_stale", policy)


def _package_files() -> dict[str, float]:
    """Every file under moderation/ that is not Python's bytecode, with its mtime."""
    root = ROOT / "moderation"
    return {str(p.relative_to(root)): p.stat().st_mtime for p in root.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts}


@pytest.mark.integration
def test_list_edits_on_a_server_of_the_package_policies_leave_the_package_alone(tmp_path):
    """A server on the shipped policies (no MODERATION_POLICY_DIR), lists edited through its gateway: the lists land in
    its state directory; no file under moderation/ is added or written, and git sees the policies unchanged."""
    from moderation.core.policy import PACKAGE_POLICY_DIR
    from moderation.testing.server import running_server

    _require_models()
    policy = "default"
    env = {"MODERATION_STATE_DIR": str(tmp_path / "state"), "MODERATION_AUDIT_LOG": str(tmp_path / "audit.jsonl")}
    saved = os.environ.pop("MODERATION_POLICY_DIR", None)
    git = ["git", "status", "--porcelain", "--untracked-files=all", "--", str(PACKAGE_POLICY_DIR)]
    status_before = subprocess.run(git, capture_output=True, text=True, cwd=ROOT, check=True).stdout
    files_before = _package_files()
    try:
        with running_server(repository=REPO, env=env, log_path=tmp_path / "triton.log", key=ADMIN_KEY) as srv:
            term = _cli(srv, "lists", "add-term", "--policy", policy, "--list", "block", "--term", TERM,
                        "--label", "scam")
            assert term.returncode == 0, term.stderr
            image = _cli(srv, "lists", "add-image", "--policy", policy, "--list", "review",
                         "--image", str(image_paths()["rocket"]))
            assert image.returncode == 0, image.stderr
            hubble = next(p for p in sample_posts() if p.name == "hubble_scam")
            r = _moderate(srv, hubble.image_bytes(), hubble.text, policy)
            assert r["action"] == "block" and r["decided_by"] == "terms" and r["policy"].endswith("+lists.2"), r
    finally:
        if saved is not None:
            os.environ["MODERATION_POLICY_DIR"] = saved
    files_after = _package_files()
    added = sorted(set(files_after) - set(files_before))
    written = sorted(f for f in files_before if f in files_after and files_after[f] != files_before[f]
                     and f.startswith("core/policies/"))
    assert not [f for f in added if "lists" in f or f.startswith("core/policies/")] and not written, (added, written)
    assert subprocess.run(git, capture_output=True, text=True, cwd=ROOT, check=True).stdout == status_before
    assert list((tmp_path / "state" / "lists").glob("default-*.lists.json"))  # where they went


SHARED = "cluster_lists"


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    """Redis, and two embedded servers (two replicas) on it, with the same policies."""
    from moderation.testing.redis_server import RedisServer
    from moderation.testing.server import running_server

    _require_models()
    policies = tmp_path_factory.mktemp("cluster-policies")
    for name in ("default", SHARED):
        derive_policy(policies, name, cache={"enabled": False})
    logs = tmp_path_factory.mktemp("cluster-logs")
    servers = []
    with RedisServer() as redis_srv:
        try:
            for name in ("a", "b"):
                env = {"MODERATION_POLICY_DIR": str(policies),
                       "MODERATION_AUDIT_LOG": str(logs / f"audit-{name}.jsonl"),
                       "MODERATION_REDIS_URL": redis_srv.url, "MODERATION_REDIS_TIMEOUT_MS": "1000",
                       "MODERATION_STATE_DIR": str(logs / f"state-{name}")}
                srv = running_server(repository=REPO, env=env, log_path=logs / f"triton-{name}.log", key=ADMIN_KEY)
                servers.append(srv.__enter__())
            yield redis_srv, servers[0], servers[1], logs
        finally:
            for srv in servers:
                srv.__exit__(None, None, None)


@pytest.mark.integration
def test_a_term_and_an_image_added_on_one_replica_are_enforced_by_the_other(replicas):
    _, a, b, logs = replicas
    hubble = next(p for p in sample_posts() if p.name == "hubble_scam")
    coins = image_paths()["coins"].read_bytes()
    before = _moderate(b, hubble.image_bytes(), hubble.text, SHARED)
    assert before["decided_by"] != "terms" and not before["list_hits"]

    term = _cli(a, "lists", "add-term", "--policy", SHARED, "--list", "block", "--term", TERM, "--label", "scam")
    assert term.returncode == 0, term.stderr
    acknowledged, posts = time.monotonic(), []

    def judged_on_b():
        posts.append(_moderate(b, hubble.image_bytes(), hubble.text, SHARED))
        return posts[-1]["decided_by"] == "terms" and posts[-1]

    blocked = wait_until(judged_on_b, "the term added on a, on b", LISTS_POLL_S + REQUEST_MARGIN_S)
    print(f"term in force on b {time.monotonic() - acknowledged:.2f} s after a acknowledged it, post {len(posts)}")
    assert blocked["action"] == "block" and blocked["policy"].endswith("+lists.1")

    image = _cli(a, "lists", "add-image", "--policy", SHARED, "--list", "block", "--image",
                 str(image_paths()["coins"]), "--label", "scam")
    assert image.returncode == 0, image.stderr
    entry = json.loads(image.stdout)
    acknowledged, posts = time.monotonic(), []

    def listed_on_b():
        posts.append(_moderate(b, coins, "nice coins", SHARED))
        return posts[-1]["decided_by"] == "image_list" and posts[-1]

    listed = wait_until(listed_on_b, "the image added on a, on b", LISTS_POLL_S + REQUEST_MARGIN_S)
    print(f"image in force on b {time.monotonic() - acknowledged:.2f} s after a acknowledged it, post {len(posts)}")
    assert listed["action"] == "block" and listed["decision"]["list_hit"]["id"] == entry["id"]
    assert listed["policy"].endswith("+lists.2")
    assert _gauge(b, "moderation_lists_revision", SHARED) == 2.0 and _lists_stale(b, SHARED) == 0.0
    # the edits are a's audit rows (the server that took them), and Redis keeps the history
    rows = [r for r in read_rows(logs / "audit-a.jsonl") if r.get("stage") == "admin" and r.get("policy") == SHARED]
    assert [(r["action"], r["ok"]) for r in rows] == [("lists.add-term", True), ("lists.add-image", True)]
    shown = json.loads(_cli(b, "lists", "show", "--policy", SHARED).stdout)
    assert (shown["revision"], shown["store"], shown["fault"]) == (2, "redis", None)


@pytest.mark.integration
def test_export_from_one_replica_and_import_on_the_other(replicas, tmp_path):
    _, a, b, _ = replicas
    policy = "default"
    assert _cli(a, "lists", "add-term", "--policy", policy, "--list", "review", "--term", "加微信").returncode == 0
    exported = _cli(a, "lists", "export", "--policy", policy)
    assert exported.returncode == 0, exported.stderr
    backup = tmp_path / "default.lists.json"
    backup.write_text(exported.stdout, encoding="utf-8")
    document = json.loads(exported.stdout)
    assert document["policy"] == policy and [t["term"] for t in document["terms"]] == ["加微信"]
    removed = _cli(b, "lists", "remove-term", "--policy", policy, "--id", document["terms"][0]["id"])
    assert removed.returncode == 0, removed.stderr
    imported = _cli(b, "lists", "import", "--policy", policy, str(backup))
    assert imported.returncode == 0, imported.stderr
    assert json.loads(imported.stdout)["revision"] == document["revision"] + 2
    again = json.loads(_cli(a, "lists", "export", "--policy", policy).stdout)
    assert again["terms"] == document["terms"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**document, "terms": [{**document["terms"][0], "label": "nope"}]}), encoding="utf-8")
    refused = _cli(a, "lists", "import", "--policy", policy, str(bad))
    assert refused.returncode == 1 and "[bad_list_entry]" in refused.stderr, refused.stderr


@pytest.mark.integration
def test_redis_killed_leaves_both_replicas_serving_their_last_lists_and_reporting_it(replicas):
    redis_srv, a, b, _ = replicas
    hubble = next(p for p in sample_posts() if p.name == "hubble_scam")
    policy = SHARED
    if json.loads(_cli(a, "lists", "show", "--policy", policy).stdout)["revision"] == 0:  # run alone
        assert _cli(a, "lists", "add-term", "--policy", policy, "--list", "block", "--term", TERM,
                    "--label", "scam").returncode == 0
    for srv in (a, b):
        wait_until(lambda srv=srv: _moderate(srv, hubble.image_bytes(), hubble.text, policy)["decided_by"] == "terms",
               "the term in force before the outage", LISTS_POLL_S + REQUEST_MARGIN_S)
    revision = json.loads(_cli(a, "lists", "show", "--policy", policy).stdout)["revision"]
    # an edit in flight when Redis dies is applied or refused, never half: its reply says which
    pending = subprocess.Popen([sys.executable, "-m", "clients.admin", "--url", a.grpc_url, "lists", "add-term",
                                "--policy", policy, "--list", "review", "--term", "during the outage"],
                               env={**os.environ, "MODERATION_ADMIN_KEY": ADMIN_KEY}, cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    redis_srv.kill()
    out, err = pending.communicate(timeout=180)
    assert pending.returncode == 0 or "[unavailable]" in err, (out, err)
    kept = revision + (pending.returncode == 0)
    for srv in (a, b):
        r = wait_until(lambda srv=srv: (r := _moderate(srv, hubble.image_bytes(), hubble.text, policy)) and (
            _lists_stale(srv, policy) == 1.0) and r, "the stale lists reported", HANG_GUARD_S)
        assert r["action"] == "block" and r["decided_by"] == "terms" and r["error"] is None, r
        assert r["policy"].endswith(f"+lists.{revision}") or r["policy"].endswith(f"+lists.{kept}"), r["policy"]
        # readiness detail: the `moderation.lists` health service says so; the service itself stays SERVING
        wait_until(lambda srv=srv: not grpc_health_serving(srv.grpc_url, LISTS_SERVICE), "moderation.lists NOT_SERVING",
               HANG_GUARD_S)
        assert grpc_health_serving(srv.grpc_url)
    refused = _cli(b, "lists", "add-term", "--policy", policy, "--list", "block", "--term", "while down")
    assert refused.returncode == 1 and "[unavailable]" in refused.stderr, refused.stderr
    shown = json.loads(_cli(a, "lists", "show", "--policy", policy).stdout)
    assert shown["revision"] in (revision, kept) and "cannot be reached" in shown["fault"]


def test_the_admin_rpc_takes_export_and_import_calls():
    """Import takes export's document back as it is (no image bytes in it: image entries carry their hashes)."""
    from moderation.core.admin_rpc import lists_request

    document = {"policy": "p", "revision": 3, "images": [], "terms": []}
    assert lists_request({"action": "import", "policy": "p", "lists": document})["lists"] == document
    assert lists_request({"action": "export", "policy": "p"}) == {"action": "export", "policy": "p"}
    with pytest.raises(ModerationError, match="lists document"):
        lists_request({"action": "import", "policy": "p", "lists": ["not", "a", "document"]})
