"""Run the embedded Triton server and the audit gateway in front of it, supervised (make serve).

    .venv/bin/python -m moderation.launch            # foreground, Ctrl-C to stop

Clients reach gRPC through the audit gateway (moderation/gateway/) on GRPC_PORT; Triton's own gRPC listens on
TRITON_GRPC_PORT, loopback only (MODERATION_GATEWAY=0: no gateway, Triton on GRPC_PORT). Every variable it reads
is listed in the README (Environment)."""
from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from ..core.audit import AuditLog
from ..core.version_store import version_store
from ..ops.admin import STATE_FILE, RepositoryAdmin
from ..ops.versions import VersionFollower, replica_id
from .config import ServerConfig
from .processes import GatewayProcess, OpenAIProcess, TritonProcess


def apply_live_versions(config: ServerConfig) -> list[dict]:
    """Re-apply versions made live by `clients.admin swap` before a restart (<repository>/.live_versions.json)."""
    if not (Path(config.repository) / STATE_FILE).exists():
        return []
    return RepositoryAdmin(config.triton_grpc_url, config.key, config.repository).apply_state()


def version_follower(config: ServerConfig, env: Mapping[str, str] | None = None, audit: AuditLog | None = None,
                     log: Callable[[str], None] = print) -> VersionFollower | None:
    """The follower of the cluster's desired versions for this server (ops/versions.py) when MODERATION_REDIS_URL is
    set; None without Redis, where versions stay the one server's business."""
    env = os.environ if env is None else env
    store = version_store(env, client_name=f"moderation-versions-{config.grpc_port}")
    if store is None:
        return None
    admin = RepositoryAdmin(config.triton_grpc_url, config.key, config.repository, audit=audit)
    return VersionFollower(admin, store, replica_id(config.grpc_port, env), audit=audit, log=log)


def gpu_memory_plan(cfg: ServerConfig, environ: Mapping[str, str] | None = None) -> str | None:
    """The memory plan of the models this server loads when MODERATION_GPU_MEMORY is set (None when it is not);
    raises PlanDoesNotFit, with the numbers, when they cannot fit the GPU."""
    from ..preflight import check_at_start

    plan = check_at_start(os.environ if environ is None else environ, cfg.repository, cfg.models, "local")
    return None if plan is None else f"GPU memory plan: {plan.total / 2**30:.2f} of {plan.gpu_memory / 2**30:.2f} GiB"


def main() -> int:
    cfg = ServerConfig.from_env()
    if not (cfg.repository / "language_decoder" / "1" / "artifact.json").exists():
        print(f"error: {cfg.repository} has no exported models; run `make models` first", file=sys.stderr)
        return 2
    try:
        note = gpu_memory_plan(cfg)
    except (RuntimeError, ValueError) as e:  # PlanDoesNotFit is a RuntimeError
        print(f"error: {e}", file=sys.stderr)
        return 1
    if note:
        print(note, flush=True)
    server = TritonProcess(cfg).start()
    gateway = GatewayProcess(cfg) if cfg.gateway else None
    openai = OpenAIProcess(cfg) if cfg.gateway and cfg.openai_port else None
    watchdog = None
    follower = None
    stopping = False

    def _forward(signum, _frame):
        nonlocal stopping
        stopping = True
        if watchdog:  # stubs exit as Triton unloads: not deaths to repair
            watchdog.halt()
        if follower:
            follower.halt()
        for p in (openai, gateway, server):  # front ends first: they stop taking calls, then Triton drains
            if p and p.proc and p.proc.poll() is None:
                p.proc.send_signal(signal.SIGTERM if signum == signal.SIGINT else signum)

    signal.signal(signal.SIGINT, _forward)
    signal.signal(signal.SIGTERM, _forward)
    try:
        server.wait_ready()
        for swap in apply_live_versions(cfg):
            print(f"live version restored: {swap['model']} v{swap['to']}", flush=True)
        # With Redis the cluster's desired versions win: applied before this replica reports ready, then followed.
        follower = version_follower(cfg, log=lambda m: print(m, flush=True))
        if follower:
            follower.run_checked(once=True)  # a failure is logged; the thread tries again every poll
            follower.start()
        if os.environ.get("MODERATION_WATCHDOG", "1") != "0":
            # Triton 2.51 does not restart a dead python stub: reload its model (moderation/watchdog.py).
            from ..ops.watchdog import StubWatchdog

            watchdog = StubWatchdog(server.proc.pid, cfg.triton_grpc_url, cfg.key)
            watchdog.start()
        if gateway:  # ready: grpc.health.v1 on the public port says SERVING
            gateway.start().wait_ready(60)
        if openai:
            openai.start().wait_ready(60)
        print(f"ready: gRPC {cfg.address}:{cfg.grpc_port}"
              + (f" (audit gateway -> Triton {cfg.triton_grpc_url})" if gateway else "")
              + (f"  OpenAI http://{cfg.address}:{cfg.openai_port}/v1/moderations" if openai else "")
              + f"  HTTP {cfg.address}:{cfg.http_port}  metrics {cfg.address}:{cfg.metrics_port}", flush=True)
    except (RuntimeError, TimeoutError) as e:
        print(f"error: {e}", file=sys.stderr)
        for p in (openai, gateway):
            if p:
                p.stop()
        server.stop()
        return 1
    # Either process ending ends the service: a Triton without its gateway would be unreachable, and a gateway
    # without Triton would answer UNAVAILABLE forever; the orchestrator restarts the pair.
    fronts = [p for p in (gateway, openai) if p]
    while server.exit_code() is None and all(p.exit_code() is None for p in fronts):
        time.sleep(0.5)
    died = [p for p in fronts if p.exit_code() is not None and not stopping]
    gateway_died = bool(died)
    for p in died:
        print(f"error: {p.name} exited with code {p.exit_code()}; stopping the service", file=sys.stderr)
    if watchdog:
        watchdog.halt()
    if follower:
        follower.halt()
    for p in (openai, gateway):
        if p:
            p.stop()
    rc = server.stop() if server.proc.poll() is None else server.proc.returncode
    if gateway_died:
        return 1
    return 0 if rc in (0, -signal.SIGTERM, -signal.SIGINT) else (rc or 1)
