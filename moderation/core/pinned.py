"""The policy a post is judged under, pinned once by preprocess.

A policy's lists can change while a post is in flight (core/list_store.py: each process picks up a new revision on
its own, within LISTS_POLL_S), and its YAML can be edited. Without a pin, read_text, clip_gate, the VLM and
postprocess would each resolve the policy by name when their turn came, and one post could be judged under
revision r by one stage and r+1 by the next while RESULT names r. Preprocess resolves the policy once, names it by
its pin (the YAML's digest, the lists' revision and their digest: `Policy.id` says the first two to people) in the
RequestRecord, and
writes that policy to the state directory the first time it serves it; every later stage judges the post under the
policy of that pin: its own current policy when the pins agree (almost always), else the copy preprocess wrote
(every model process of a server shares the state directory: core/state.py)."""
from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

from .hashing import sha256_hex
from .policy import Policy, PolicyLists, load_policy
from .state import read_state, state_dir, write_state

KEEP = 32  # pinned policies kept per process and written copies kept per policy: far more than are ever in flight

_held: OrderedDict[tuple[str, str], Policy] = OrderedDict()
_lock = threading.Lock()


def pin_of(policy: Policy) -> str:
    """The YAML's digest, the lists' revision and their content's digest (a revision number alone can come back
    with other entries: Redis restarted empty and imported again)."""
    return f"{policy.digest}.{policy.lists.revision}.{_lists_digest(policy.lists)}"


# lists object -> the digest of its entries; lists objects are shared and immutable (core/list_store.py), so this is
# computed once per revision a process loads. The entries hold their objects: no id is reused while cached.
_digests: dict[int, tuple[PolicyLists, str]] = {}


def _lists_digest(lists: PolicyLists) -> str:
    hit = _digests.get(id(lists))
    if hit is not None and hit[0] is lists:
        return hit[1]
    digest = sha256_hex(lists.model_dump_json().encode("utf-8"))[:12]
    with _lock:
        if len(_digests) >= 4 * KEEP:
            _digests.clear()
        _digests[id(lists)] = (lists, digest)
    return digest


def _copy_path(name: str, pin: str) -> Path:
    return state_dir() / "policies" / name / f"{pin}.json"


def _hold(name: str, pin: str, policy: Policy) -> bool:
    """Keep `policy` for its pin; False when it was held already."""
    with _lock:
        key = (name, pin)
        new = key not in _held
        _held[key] = policy
        _held.move_to_end(key)
        while len(_held) > KEEP:
            _held.popitem(last=False)
        return new


def pin_policy(name: str, policy: Policy) -> str:
    """The pin of `policy` (policy file `name`, as preprocess resolved it), written to the state directory the first
    time this process serves it, so every stage after preprocess can judge under it."""
    pin = pin_of(policy)
    if _hold(name, pin, policy):
        path = _copy_path(name, pin)
        if write_state(path, policy.model_dump_json().encode("utf-8")):
            _prune(path.parent)
    return pin


def _prune(directory: Path) -> None:
    """Keep the KEEP newest copies of one policy (a list edited all day writes one copy per revision)."""
    try:
        copies = sorted(directory.glob("*.json"), key=lambda p: p.stat().st_mtime_ns)
        for old in copies[:-KEEP]:
            old.unlink(missing_ok=True)
    except OSError:  # a copy another process pruned first, or a read-only state directory: nothing to keep tidy
        pass


def pinned_policy(name: str, pin: str) -> Policy:
    """The policy file `name` as the post's pin names it: this process's current policy when the pins agree, else
    one it held or preprocess's copy. Without a pin (a record made before pins, a test's record), or when no copy
    can be read (an unwritable state directory), the current policy: its `id` then says which one judged."""
    current = load_policy(name)
    if not pin or pin_of(current) == pin:
        return current
    with _lock:
        held = _held.get((name, pin))
    if held is not None:
        return held
    raw = read_state(_copy_path(name, pin))
    if raw is None:
        return current
    try:
        policy = Policy.model_validate_json(raw)
    except ValueError:  # a damaged copy is no copy
        return current
    _hold(name, pin, policy)
    return policy


def forget_pinned() -> None:
    """What a new process holds: no pinned policy (a later stage of another process reads preprocess's copy)."""
    with _lock:
        _held.clear()
