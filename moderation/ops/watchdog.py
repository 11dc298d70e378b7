"""Stub watchdog: Triton 2.51 does not restart a python-backend stub process that died (killed, OOM,
segfault): every request to that model then fails with "Stub process '<model>_0_0' is not healthy"
while /v2/health/ready still answers 200 (measured: tests/test_faults.py). The watchdog watches the
stub processes of one tritonserver and, when one dies, reloads its model through the restricted
model-repository API (a load with the model's current config forces a fresh instance and stub; the live
version is kept). Each reload is written to the audit log.

    .venv/bin/python -m moderation.ops.watchdog --pid <tritonserver pid> --url 127.0.0.1:8011
    (the admin key from MODERATION_ADMIN_KEY or MODERATION_ADMIN_KEY_FILE)
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from ..core.audit import AuditLog
from ..core.auth import admin_headers, admin_key
from ..core.errors import AuditUnavailable

STUB = "triton_python_backend_stub"


@dataclass(frozen=True)
class Stub:
    pid: int
    model: str
    instance: str  # e.g. preprocess_0_0


def stubs(server_pid: int) -> dict[int, Stub]:
    """Live (non-zombie) stub processes of one tritonserver, by pid. argv: stub, <repo>/<model>/<v>/model.py,
    shm region, sizes, parent pid, backend dir, ipc size, <instance name>, <runtime>."""
    out: dict[int, Stub] = {}
    try:
        children = psutil.Process(server_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return out
    for p in children:
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                continue
            argv = p.cmdline()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if argv and Path(argv[0]).name == STUB and len(argv) >= 3:
            out[p.pid] = Stub(p.pid, Path(argv[1]).parts[-3], argv[-2])
    return out


class StubWatchdog(threading.Thread):
    """Polls every `interval` s. A stub we saw is dead when its pid is gone or a zombie and no live stub has
    taken over its instance name (a hot swap replaces stubs itself and triggers nothing)."""

    def __init__(self, server_pid: int, grpc_url: str, key: str, interval: float = 0.5,
                 audit: AuditLog | None = None, log=print):
        super().__init__(daemon=True, name="stub-watchdog")
        import tritonclient.grpc as grpcclient

        self.server_pid, self.interval, self.log = server_pid, interval, log
        self.client = grpcclient.InferenceServerClient(grpc_url)
        self.headers = admin_headers(key, "grpc")
        self.audit = audit or AuditLog()
        self.known: dict[int, Stub] = stubs(server_pid)
        self.events: list[dict] = []  # one per reload: model, dead pid, detected/ready times
        self._halt = threading.Event()

    def halt(self) -> None:
        """Stop after the current check, without waiting (safe from a signal handler)."""
        self._halt.set()

    def stop(self) -> None:
        self.halt()
        self.join(timeout=30)

    def check_once(self) -> list[dict]:
        live = stubs(self.server_pid)
        live_instances = {s.instance for s in live.values()}
        dead = [s for pid, s in self.known.items() if pid not in live and s.instance not in live_instances]
        done, reloaded = [], set()
        for s in dead:
            if s.model in reloaded:
                continue
            reloaded.add(s.model)
            done.append(self.reload(s))
        self.known = stubs(self.server_pid) if done else live
        return done

    def reload(self, dead: Stub) -> dict:
        t0, detected = time.perf_counter(), time.time()
        event = {"model": dead.model, "instance": dead.instance, "dead_pid": dead.pid, "detected": detected}
        try:
            cfg = self.client.get_model_config(dead.model, headers=self.headers, as_json=True)["config"]
            # Triton skips a load whose config is unchanged (measured: a no-op in ~6 ms), so the override carries
            # a fresh `watchdog_reload` parameter (the models ignore it); the rest of the current config, the live
            # version policy included, is kept. Triton serves the old instance until the new one is ready.
            cfg.setdefault("parameters", {})["watchdog_reload"] = {"string_value": f"{dead.pid}@{detected:.3f}"}
            self.client.load_model(dead.model, headers=self.headers, config=json.dumps(cfg))
            event.update(ok=True, reload_ms=round((time.perf_counter() - t0) * 1e3, 1))
        except Exception as e:  # noqa: BLE001 - report and try again on the next poll
            event.update(ok=False, error=str(e))
        self.events.append(event)
        self.log(f"watchdog: stub {dead.instance} (pid {dead.pid}) died; reload of {dead.model}: {event}")
        with contextlib.suppress(AuditUnavailable):  # the reload happened: a log that cannot take it is counted
            self.audit.write({"stage": "watchdog", "action": "reload", **event})
        return event

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            try:
                self.check_once()
            except Exception as e:  # noqa: BLE001 - the watchdog itself must not die
                self.log(f"watchdog: {type(e).__name__}: {e}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pid", type=int, required=True, help="tritonserver's pid")
    ap.add_argument("--url", default="127.0.0.1:8001")
    ap.add_argument("--interval", type=float, default=0.5)
    args = ap.parse_args(argv)
    key = admin_key()
    if not key:
        print("error: set MODERATION_ADMIN_KEY (or MODERATION_ADMIN_KEY_FILE)", file=sys.stderr)
        return 2
    dog = StubWatchdog(args.pid, args.url, key, args.interval, log=lambda m: print(m, flush=True))
    print(f"watching {len(dog.known)} stub processes of pid {args.pid}", flush=True)
    dog.start()
    while psutil.pid_exists(args.pid) and dog.is_alive():
        time.sleep(1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
