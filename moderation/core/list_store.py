"""Where a policy's custom lists live, and how every process of every replica comes to see an edit.

Two stores, chosen by the environment (`list_store`):
- MODERATION_REDIS_URL set (the variable the shared verdict cache uses): Redis, shared by every replica. Per policy,
  under MODERATION_LISTS_PREFIX (default `moderation:lists`):
      <prefix>:v1:<policy>          hash: revision, lists (the PolicyLists JSON, its revision included)
      <prefix>:v1:<policy>:audit    the newest AUDIT_KEEP edit rows (JSON, newest first): who changed what
      <prefix>:v1:<policy>:lock     held by one editor at a time (LOCK_TTL_MS)
  A process that needs a policy checks its revision (one HGET) at most every LISTS_POLL_S and reads the lists only
  when the revision moved: every post that starts LISTS_POLL_S after an edit was acknowledged, on any replica, is
  judged with it.
- Unset (the embedded default): one file per policy in the state directory (core/state.py, MODERATION_STATE_DIR),
  `lists/<policy>-<hash of the policy directory>.lists.json`, re-read when it changes; never the package or the image.

A `<policy>.lists.json` an operator places beside the policy YAML is a read-only seed: in force while the store holds
no lists for that policy; the first edit starts from it and writes to the store, never to the seed.

Degrade, don't fail: Redis calls have short timeouts behind a circuit breaker (core/redis_link.py). A process that
cannot reach Redis, or finds a policy's lists gone from it while it held a later revision (Redis restarted empty),
keeps the last lists it loaded, or the newer last good copy a process of this server kept in the state directory,
and says why in `lists_fault` (the moderation_lists_stale gauge, the gateway's `moderation.lists` health service).
Never silently empty: a process that has no copy at all serves without entries and says that in its fault. A lists
file that does not parse (a seed, a state file edited by hand) leaves the last good lists in force the same way; with
no earlier copy that policy's posts fail (`bad_policy`)."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from .errors import BadPolicy, ModerationError
from .hashing import sha256_hex
from .redis_link import CircuitBreaker, redis_client, redis_errors, redis_url
from .state import read_state, state_dir, write_state

# How often a process asks Redis for a policy's lists revision, at most: the propagation bound of an edit.
LISTS_POLL_S = 1.0
LISTS_PREFIX_ENV = "MODERATION_LISTS_PREFIX"
DEFAULT_LISTS_PREFIX = "moderation:lists"
SCHEMA = 1
AUDIT_KEEP = 10_000
LOCK_TTL_MS = 30_000  # far longer than an edit holds it (an image is decoded and hashed before the lock is taken)
LOCK_WAIT_S = 10.0


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ListEntry(_Strict):
    id: str
    list: Literal["block", "allow", "review"]
    label: str | None = None   # the policy label a block/review hit is reported under
    note: str = ""
    added: float = 0.0


class ImageEntry(ListEntry):
    pdq: list[str]             # PDQ hashes (hex) of the image and of crops of it (core/image_match.py)
    quality: int = 0


class TermEntry(ListEntry):
    term: str


class PolicyLists(_Strict):
    """Custom lists of a policy, edited live with `clients.admin lists`."""
    revision: int = 0
    images: list[ImageEntry] = []
    terms: list[TermEntry] = []


EMPTY = PolicyLists()
Lists = tuple[PolicyLists, str | None]  # the lists in force, and why they are not the store's latest (or None)


class ListsUnavailable(ModerationError):
    """The lists store cannot take an edit now (Redis unreachable, another edit holding the lock): retry later."""

    code = "unavailable"


def lists_path(policy_yaml: Path) -> Path:
    """The operator's read-only seed beside a policy: `<name>.lists.json`."""
    return Path(policy_yaml).with_suffix(".lists.json")


def lists_state_path(path: Path) -> Path:
    """Where every process of a server keeps the last good copy of a lists file: a process (a second model instance,
    a restarted server) that never read a good copy itself falls back to it. Named by policy and by the file's path,
    so policy directories of several servers sharing one state directory do not mix."""
    path = Path(path).resolve()
    policy = path.name.removesuffix(".lists.json")
    return state_dir() / "lists" / f"{policy}-{sha256_hex(str(path).encode())[:16]}.json"


def _parsed_copy(raw: bytes | None) -> PolicyLists | None:
    if raw is None:
        return None
    try:
        return PolicyLists.model_validate(json.loads(raw))
    except ValueError:  # a damaged copy is no copy
        return None


# lists file -> the last lists read from it that parsed and validated: a file cut short by a crash or a bad edit
# leaves these in force instead of failing every post of the policy
_LAST_GOOD_LISTS: dict[str, PolicyLists] = {}
# lists file -> (mtime, what reading it gave): a file is parsed again only when it changes
_READ_FILES: dict[str, tuple[int, Lists]] = {}


def read_lists_file(path: Path) -> Lists:
    """A lists file's lists and, when it failed to parse, why (the last good lists are returned then)."""
    try:
        text = path.read_text(encoding="utf-8")
        lists = PolicyLists.model_validate(json.loads(text))
    except (OSError, ValueError) as e:  # JSONDecodeError and pydantic's ValidationError are ValueErrors
        reason = f"{path.name} cannot be read: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
        # The state copy is the newest good one any process read; this process's own copy wins only when it is
        # newer (the state copy could not be written).
        mine, shared = _LAST_GOOD_LISTS.get(str(path)), _parsed_copy(read_state(lists_state_path(path)))
        good = shared if shared is not None and (mine is None or shared.revision >= mine.revision) else mine
        if good is None:
            raise BadPolicy(f"policy {path.name.split('.')[0]!r}: {reason}, and no earlier copy was loaded") from None
        return good, f"{reason}; revision {good.revision} stays in force"
    _LAST_GOOD_LISTS[str(path)] = lists
    write_state(lists_state_path(path), text.encode("utf-8"))
    return lists, None


def _cached_file(path: Path) -> Lists | None:
    """read_lists_file(path), parsed again only when the file changed; None when there is no file."""
    try:
        mtime = path.stat().st_mtime_ns
    except OSError:  # absent, or under a state directory that cannot exist (a file in its way)
        return None
    hit = _READ_FILES.get(str(path))
    if hit is not None and hit[0] == mtime:
        return hit[1]
    got = read_lists_file(path)
    _READ_FILES[str(path)] = (mtime, got)
    return got


def _strict_file(path: Path, policy: str) -> PolicyLists | None:
    """An editor's read: the file's lists, None without a file, BadPolicy when it does not parse (an edit never
    starts from a guess)."""
    if not path.exists():
        return None
    try:
        return PolicyLists.model_validate_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BadPolicy(f"the lists file {path.name} of policy {policy!r} does not parse ({type(e).__name__}); "
                        "restore it before editing (the models keep its last good copy meanwhile)") from None


class Edit:
    """One edit under the store's lock: `base` is what it starts from; commit() writes the audit row, then the lists
    (an edit the audit log cannot record is not applied)."""

    def __init__(self, base: PolicyLists, apply: Callable[[PolicyLists, dict], None]):
        self.base, self._apply = base, apply

    def commit(self, new: PolicyLists, row: dict, write_audit: Callable[[dict], None]) -> None:
        write_audit(row)
        self._apply(new, row)


def _dump(lists: PolicyLists) -> str:
    return json.dumps(lists.model_dump(), ensure_ascii=False, indent=1)


class FileListStore:
    """The lists of the policies in `directory`, one file each in the state directory."""

    kind = "state"

    def __init__(self, directory: Path):
        self.directory = Path(directory).resolve()

    def path(self, policy: str) -> Path:
        return state_dir() / "lists" / f"{policy}-{sha256_hex(str(self.directory).encode())[:16]}.lists.json"

    def seed(self, policy: str) -> Path:
        return lists_path(self.directory / f"{policy}.yaml")

    def current(self, policy: str, fresh: bool = False) -> Lists:
        return _cached_file(self.path(policy)) or _cached_file(self.seed(policy)) or (EMPTY, None)

    @contextlib.contextmanager
    def editing(self, policy: str) -> Iterator[Edit]:
        path = self.path(policy)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            base = _strict_file(path, policy) or _strict_file(self.seed(policy), policy) or EMPTY

            def apply(new: PolicyLists, _row: dict) -> None:
                if not write_state(path, _dump(new).encode("utf-8")):
                    raise ModerationError(f"the lists of policy {policy!r} cannot be written under {path.parent}")

            yield Edit(base, apply)


# KEYS: lists audit; ARGV: expected revision ('' = none stored), revision, lists JSON, audit row, rows kept -> 1 / 0
_COMMIT = """
local cur = redis.call('HGET', KEYS[1], 'revision') or ''
if cur ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'revision', ARGV[2], 'lists', ARGV[3])
redis.call('LPUSH', KEYS[2], ARGV[4])
redis.call('LTRIM', KEYS[2], 0, tonumber(ARGV[5]) - 1)
return 1
"""
_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class _Skipped(Exception):
    """The breaker is open: Redis was not asked."""


@dataclass
class _Known:
    lists: PolicyLists
    fault: str | None
    checked: float
    stored: bytes | None = None  # the revision Redis held when these lists were read from it


class RedisListStore:
    """The lists of every policy in Redis (module doc); `directory` holds the policies and their seeds."""

    kind = "redis"

    def __init__(self, client, directory: Path, prefix: str = DEFAULT_LISTS_PREFIX, identity: str = "",
                 breaker: CircuitBreaker | None = None, clock=time.monotonic, poll_s: float = LISTS_POLL_S):
        self.redis, self.directory = client, Path(directory).resolve()
        self.root = f"{prefix}:v{SCHEMA}"
        self.identity = identity or prefix
        self.breaker = breaker or CircuitBreaker()
        self.clock, self.poll_s = clock, poll_s
        self.errors = redis_errors()
        self._down: tuple[type[BaseException], ...] = (_Skipped, *self.errors)
        self._known: dict[str, _Known] = {}
        self._lock = threading.Lock()
        self._commit = client.register_script(_COMMIT)
        self._unlock = client.register_script(_UNLOCK)

    def key(self, policy: str) -> str:
        return f"{self.root}:{policy}"

    def seed(self, policy: str) -> Path:
        return lists_path(self.directory / f"{policy}.yaml")

    def state_path(self, policy: str) -> Path:
        """This server's last good copy of a policy's lists from this Redis (and prefix)."""
        return state_dir() / "lists" / f"{policy}-redis-{sha256_hex(self.identity.encode())[:16]}.json"

    def current(self, policy: str, fresh: bool = False) -> Lists:
        """The lists in force; Redis is asked when the last check is LISTS_POLL_S old (`fresh`: now)."""
        now = self.clock()
        known = self._known.get(policy)
        if known is not None and now - known.checked < self.poll_s and not fresh:
            return known.lists, known.fault
        checked = self._refresh(policy, known, now)
        with self._lock:
            self._known[policy] = checked
        return checked.lists, checked.fault

    def _refresh(self, policy: str, known: _Known | None, now: float) -> _Known:
        key = self.key(policy)
        try:
            if not self.breaker.allow():
                raise _Skipped()
            stored = self.redis.hget(key, "revision")
            if known is not None and stored is not None and stored == known.stored:
                self.breaker.success()
                return _Known(known.lists, None, now, stored)
            stored, doc = self.redis.hmget(key, "revision", "lists") if stored is not None else (None, None)
            self.breaker.success()
        except self._down as e:
            if not isinstance(e, _Skipped):
                self.breaker.failure()
            return self._held(policy, known, now, f"the lists store (Redis) cannot be reached ({type(e).__name__})")
        if doc is None:  # no lists stored for this policy: its seed, unless this server held later lists
            seed, seed_fault = _cached_file(self.seed(policy)) or (EMPTY, None)
            held = self._best_copy(policy, known)
            if held is not None and held.revision > seed.revision:
                return _Known(held, f"Redis holds no lists for policy {policy!r} (restarted empty?); revision "
                                    f"{held.revision} stays in force until an edit or `lists import` writes them",
                              now)
            return _Known(seed, seed_fault, now)
        try:
            lists = PolicyLists.model_validate_json(doc)
        except ValueError as e:
            return self._held(policy, known, now, f"the lists in Redis do not parse ({type(e).__name__})")
        write_state(self.state_path(policy), doc)
        return _Known(lists, None, now, stored)

    def _best_copy(self, policy: str, known: _Known | None) -> PolicyLists | None:
        """The newest lists this process or (through the state directory) this server held."""
        copies = [c for c in (known.lists if known else None,
                              _parsed_copy(read_state(self.state_path(policy)))) if c is not None]
        return max(copies, key=lambda c: c.revision) if copies else None

    def _held(self, policy: str, known: _Known | None, now: float, reason: str) -> _Known:
        held = self._best_copy(policy, known)
        if held is None:
            seed, _ = _cached_file(self.seed(policy)) or (EMPTY, None)
            return _Known(seed, f"{reason}, and no copy of its lists was loaded here: "
                                f"{'its seed file' if seed.revision else 'no entries'} in force", now)
        return _Known(held, f"{reason}; revision {held.revision} stays in force", now,
                      known.stored if known is not None and known.lists is held else None)

    @contextlib.contextmanager
    def editing(self, policy: str) -> Iterator[Edit]:
        key, lock, token = self.key(policy), f"{self.key(policy)}:lock", secrets.token_hex(16)
        unreachable = f"the lists store (Redis) cannot be reached; the lists of policy {policy!r} were not changed"
        try:
            deadline = time.monotonic() + LOCK_WAIT_S
            while not self.redis.set(lock, token, nx=True, px=LOCK_TTL_MS):
                if time.monotonic() > deadline:
                    raise ListsUnavailable(f"another edit of policy {policy!r}'s lists held the lock for "
                                           f"{LOCK_WAIT_S:.0f} s; retry")
                time.sleep(0.05)
            stored, doc = self.redis.hmget(key, "revision", "lists")
        except self.errors:
            raise ListsUnavailable(unreachable) from None
        try:
            if doc is None:  # never edited here (or Redis lost it): the seed, or this server's newer copy
                seed = _strict_file(self.seed(policy), policy) or EMPTY
                held = self._best_copy(policy, None)
                base = held if held is not None and held.revision > seed.revision else seed
            else:
                try:
                    base = PolicyLists.model_validate_json(doc)
                except ValueError as e:
                    raise BadPolicy(f"the lists of policy {policy!r} in Redis do not parse ({type(e).__name__}); "
                                    "`lists import` a backup to replace them") from None

            def apply(new: PolicyLists, row: dict) -> None:
                text = _dump(new)
                try:
                    done = self._commit(keys=[key, f"{key}:audit"],
                                        args=[stored.decode() if stored is not None else "", new.revision, text,
                                              json.dumps({"ts": time.time(), **row}, ensure_ascii=False), AUDIT_KEEP])
                except self.errors:
                    raise ListsUnavailable(unreachable) from None
                if not int(done):
                    raise ListsUnavailable(f"the lists of policy {policy!r} changed during this edit; retry")
                write_state(self.state_path(policy), text.encode("utf-8"))

            yield Edit(base, apply)
        finally:
            with contextlib.suppress(*self.errors):
                self._unlock(keys=[lock], args=[token])

    def history(self, policy: str, n: int = 100) -> list[dict]:
        """The newest `n` edit rows of a policy, newest first."""
        try:
            rows = self.redis.lrange(f"{self.key(policy)}:audit", 0, n - 1)
        except self.errors:
            raise ListsUnavailable("the lists store (Redis) cannot be reached") from None
        return [json.loads(r) for r in rows]


_STORES: dict[tuple[str, ...], FileListStore | RedisListStore] = {}


def list_store(directory: Path) -> FileListStore | RedisListStore:
    """The store of the lists of the policies in `directory`, as this process's environment names it (read at each
    call; one store object per configuration, so a process polls each policy's revision once per LISTS_POLL_S)."""
    env = os.environ
    url = redis_url(env)
    prefix = env.get(LISTS_PREFIX_ENV, "").strip() or DEFAULT_LISTS_PREFIX
    config = (url, prefix if url else "", str(directory))  # each store resolves its directory once
    store = _STORES.get(config)
    if store is None:
        if url:
            client = redis_client(url, env, "moderation-lists")
            store = RedisListStore(client, Path(directory), prefix, identity=f"{url} {prefix}")
        else:
            store = FileListStore(Path(directory))
        _STORES[config] = store
    return store


def forget_loaded() -> None:
    """What a new process holds: no lists read, no stores opened."""
    _LAST_GOOD_LISTS.clear()
    _READ_FILES.clear()
    _STORES.clear()
