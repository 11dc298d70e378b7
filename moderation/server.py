"""Run the embedded Triton server (the `tritonserver` binary inside the nvidia-pytriton wheel), CPU-only,
bound to 127.0.0.1, explicit model control, restricted admin protocols.

    .venv/bin/python -m moderation.server            # foreground, Ctrl-C to stop (make serve)

Clients reach gRPC through the audit gateway (moderation/gateway.py) on GRPC_PORT; Triton's own gRPC listens on
TRITON_GRPC_PORT, loopback only (MODERATION_GATEWAY=0: no gateway, Triton on GRPC_PORT).

Environment: GRPC_PORT (8001), TRITON_GRPC_PORT (8011), GATEWAY_METRICS_PORT (8003), HTTP_PORT (8000),
METRICS_PORT (8002), BIND_ADDRESS (127.0.0.1),
MODEL_REPOSITORY (model_repository), MODERATION_ADMIN_KEY (or MODERATION_ADMIN_KEY_FILE) for the
restricted protocols, MODERATION_AUDIT_LOG, MODERATION_POLICY_DIR, TRITON_LOG_VERBOSE."""
from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from .repository import ALL_MODELS

ADMIN_HEADER = "admin-key"
# Triton matches restricted gRPC calls on this metadata key (its prefix + the configured header name);
# HTTP requests send the plain header name.
GRPC_ADMIN_HEADER = "triton-grpc-protocol-" + ADMIN_HEADER


def admin_headers(key: str, protocol: str = "grpc") -> dict[str, str]:
    return {GRPC_ADMIN_HEADER if protocol == "grpc" else ADMIN_HEADER: key}
# Everything that can change or read server state beyond inference and health needs the admin key.
RESTRICTED_GRPC = "model-repository,model-config,shared-memory,statistics,trace,logging"
# HTTP inference too: callers use gRPC through the audit gateway (moderation/gateway.py), which audits what
# Triton refuses itself; HTTP inference (perf_analyzer, operators) needs the key, so nothing unaudited is open.
RESTRICTED_HTTP = "inference,model-repository,model-config,shared-memory,statistics,trace,logging"


def pytriton_dir() -> Path:
    import pytriton

    return Path(pytriton.__file__).parent


def backend_dir(root: Path = Path("build/triton_backends")) -> Path:
    """Triton wants <backend-dir>/python/{libtriton_python.so, stub, utils}; assemble it from the wheel."""
    src = pytriton_dir() / "tritonserver"
    py = root / "python"
    py.mkdir(parents=True, exist_ok=True)
    ver = f"{sys.version_info.major}.{sys.version_info.minor}"
    links = {"libtriton_python.so": src / "backends" / "python" / "libtriton_python.so",
             "triton_python_backend_utils.py": src / "backends" / "python" / "triton_python_backend_utils.py",
             "triton_python_backend_stub": src / "python_backend_stubs" / ver / "triton_python_backend_stub"}
    for name, target in links.items():
        link = py / name
        if link.is_symlink() or link.exists():
            if link.resolve() == target.resolve():
                continue
            link.unlink()
        link.symlink_to(target.resolve())
    return root.resolve()


def admin_key() -> str:
    key = os.environ.get("MODERATION_ADMIN_KEY")
    path = os.environ.get("MODERATION_ADMIN_KEY_FILE")
    if not key and path and Path(path).exists():
        key = Path(path).read_text().strip()
    return key or ""


@dataclass
class ServerConfig:
    repository: Path = Path(os.environ.get("MODEL_REPOSITORY", "model_repository"))
    grpc_port: int = int(os.environ.get("GRPC_PORT", 8001))
    triton_grpc_port: int = int(os.environ.get("TRITON_GRPC_PORT", 8011))
    gateway_metrics_port: int = int(os.environ.get("GATEWAY_METRICS_PORT", 8003))
    gateway: bool = os.environ.get("MODERATION_GATEWAY", "1") != "0"
    http_port: int = int(os.environ.get("HTTP_PORT", 8000))
    metrics_port: int = int(os.environ.get("METRICS_PORT", 8002))
    address: str = os.environ.get("BIND_ADDRESS", "127.0.0.1")
    models: tuple[str, ...] = ALL_MODELS
    key: str = field(default_factory=admin_key)
    cache_bytes: int = 64 * 1024 * 1024
    log_verbose: int = int(os.environ.get("TRITON_LOG_VERBOSE", 0))
    extra_args: tuple[str, ...] = ()

    def __post_init__(self):
        if not self.key:  # no key configured: a random one nobody is told keeps the admin APIs closed
            self.key = secrets.token_hex(16)

    def command(self) -> list[str]:
        tdir = pytriton_dir() / "tritonserver"
        key = self.key
        args = [
            str(tdir / "bin" / "tritonserver"),
            f"--model-repository={Path(self.repository).resolve()}",
            f"--backend-directory={backend_dir()}",
            f"--cache-directory={tdir / 'caches'}",
            f"--cache-config=local,size={self.cache_bytes}",
            "--model-control-mode=explicit",
            *[f"--load-model={m}" for m in self.models],
            # Behind the gateway Triton's gRPC is loopback-only: every inference passes the audit gateway.
            f"--grpc-address={'127.0.0.1' if self.gateway else self.address}",
            f"--grpc-port={self.triton_grpc_port if self.gateway else self.grpc_port}",
            f"--http-address={self.address}", f"--http-port={self.http_port}",
            f"--metrics-address={self.address}", f"--metrics-port={self.metrics_port}",
            "--allow-metrics=true", "--allow-gpu-metrics=false",
            f"--grpc-restricted-protocol={RESTRICTED_GRPC}:{ADMIN_HEADER}={key}",
            f"--http-restricted-api={RESTRICTED_HTTP}:{ADMIN_HEADER}={key}",
            "--strict-readiness=true", "--exit-timeout-secs=30",
            f"--log-verbose={self.log_verbose}",
            *self.extra_args,
        ]
        return args

    @property
    def triton_grpc_url(self) -> str:
        """Triton's own gRPC endpoint (admin tooling, the watchdog); clients use the gateway on grpc_port."""
        return f"127.0.0.1:{self.triton_grpc_port}" if self.gateway else f"{self.address}:{self.grpc_port}"

    def gateway_command(self) -> list[str]:
        return [sys.executable, "-m", "moderation.gateway", "--listen", f"{self.address}:{self.grpc_port}",
                "--upstream", self.triton_grpc_url, "--metrics", f"127.0.0.1:{self.gateway_metrics_port}"]

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        libs = pytriton_dir().parent / "nvidia_pytriton.libs"
        paths = [str(libs)]
        # The stub links libpython3.X.so dynamically: make it the interpreter's own (the one whose stdlib
        # and extension modules the stub will import), not whichever the system loader finds first.
        libdir = sysconfig.get_config_var("LIBDIR")
        if libdir and Path(libdir, sysconfig.get_config_var("LDLIBRARY") or "").exists():
            paths.insert(0, libdir)
        env["LD_LIBRARY_PATH"] = ":".join(paths + [env.get("LD_LIBRARY_PATH", "")]).rstrip(":")
        # The python stubs must find this venv's packages and this checkout's `moderation` package.
        venv_bin = str(Path(sys.executable).parent)
        env["PATH"] = f"{venv_bin}:{env.get('PATH', '')}"
        env.setdefault("OMP_NUM_THREADS", "1")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        env.setdefault("HF_HUB_OFFLINE", "1")  # local-only inference: never reach a model hub
        env.setdefault("TRANSFORMERS_OFFLINE", "1")
        return env


class ServerProcess:
    """One of our server processes: its own session, polled until ready, SIGTERM to stop (it drains first)."""

    name = "server"
    poll_s = 0.5
    stop_timeout_s = 60.0

    def __init__(self, config: ServerConfig, log_path: Path | None = None):
        self.config, self.log_path = config, log_path
        self.env = config.env()  # taken now: MODERATION_AUDIT_LOG etc. as the caller set them, even if started later
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def where(self) -> str:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    def start(self):
        out = open(self.log_path, "ab") if self.log_path else None
        self.proc = subprocess.Popen(self.command(), env=self.env, stdout=out or None,
                                     stderr=subprocess.STDOUT if out else None, start_new_session=True)
        return self

    def wait_ready(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc and self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with code {self.proc.returncode} before it was ready"
                                   + (f"; see {self.log_path}" if self.log_path else ""))
            try:
                if self.ready():
                    return
            except Exception:  # noqa: BLE001 - not listening yet
                pass
            time.sleep(self.poll_s)
        raise TimeoutError(f"{self.name} not ready after {timeout:.0f}s ({self.where()})")

    def stop(self, timeout: float | None = None) -> int | None:
        if not self.proc or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout or self.stop_timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait()


class TritonProcess(ServerProcess):
    """tritonserver: on SIGTERM it drains in-flight requests (--exit-timeout-secs=30), then unloads."""

    name = "tritonserver"

    def command(self) -> list[str]:
        return self.config.command()

    def where(self) -> str:
        return self.ready_url()

    def ready_url(self) -> str:
        return f"http://{self.config.address}:{self.config.http_port}/v2/health/ready"

    def ready(self) -> bool:
        with urllib.request.urlopen(self.ready_url(), timeout=2) as r:
            return r.status == 200


class GatewayProcess(ServerProcess):
    """The audit gateway as its own process (its event loop never competes with a caller for a GIL); on SIGTERM
    it finishes in-flight calls (30 s grace), then exits."""

    name = "gateway"
    poll_s = 0.2
    stop_timeout_s = 40.0

    def command(self) -> list[str]:
        return self.config.gateway_command()

    def where(self) -> str:
        return f"{self.config.address}:{self.config.grpc_port}"

    def ready(self) -> bool:  # ServerReady passes through: the gateway and Triton behind it both answer
        import tritonclient.grpc as grpcclient

        return grpcclient.InferenceServerClient(self.where()).is_server_ready(client_timeout=2)


def apply_live_versions(config: ServerConfig) -> list[dict]:
    """Re-apply versions made live by `clients.admin swap` before a restart (<repository>/.live_versions.json)."""
    from .admin import STATE_FILE, RepositoryAdmin

    if not (Path(config.repository) / STATE_FILE).exists():
        return []
    return RepositoryAdmin(config.triton_grpc_url, config.key, config.repository).apply_state()


def main() -> int:
    cfg = ServerConfig()
    if not (cfg.repository / "language_decoder" / "1" / "artifact.json").exists():
        print(f"error: {cfg.repository} has no exported models; run `make models` first", file=sys.stderr)
        return 2
    server = TritonProcess(cfg).start()
    gateway = GatewayProcess(cfg) if cfg.gateway else None
    watchdog = None
    stopping = False

    def _forward(signum, _frame):
        nonlocal stopping
        stopping = True
        if watchdog:  # stubs exit as Triton unloads: not deaths to repair
            watchdog.halt()
        for p in (gateway, server):  # the gateway first: it stops taking calls, then Triton drains
            if p and p.proc and p.proc.poll() is None:
                p.proc.send_signal(signal.SIGTERM if signum == signal.SIGINT else signum)

    signal.signal(signal.SIGINT, _forward)
    signal.signal(signal.SIGTERM, _forward)
    try:
        server.wait_ready()
        for swap in apply_live_versions(cfg):
            print(f"live version restored: {swap['model']} v{swap['to']}", flush=True)
        if os.environ.get("MODERATION_WATCHDOG", "1") != "0":
            # Triton 2.51 does not restart a dead python stub: reload its model (moderation/watchdog.py).
            from .watchdog import StubWatchdog

            watchdog = StubWatchdog(server.proc.pid, cfg.triton_grpc_url, cfg.key)
            watchdog.start()
        if gateway:
            gateway.start().wait_ready(60)
        print(f"ready: gRPC {cfg.address}:{cfg.grpc_port}"
              + (f" (audit gateway -> Triton {cfg.triton_grpc_url})" if gateway else "")
              + f"  HTTP {cfg.address}:{cfg.http_port}  metrics {cfg.address}:{cfg.metrics_port}", flush=True)
    except (RuntimeError, TimeoutError) as e:
        print(f"error: {e}", file=sys.stderr)
        if gateway:
            gateway.stop()
        server.stop()
        return 1
    # Either process ending ends the service: a Triton without its gateway would be unreachable, and a gateway
    # without Triton would answer UNAVAILABLE forever; the orchestrator restarts the pair.
    while server.proc.poll() is None and (not gateway or gateway.proc.poll() is None):
        time.sleep(0.5)
    gateway_died = bool(gateway and gateway.proc.poll() is not None and not stopping)
    if gateway_died:
        print(f"error: gateway exited with code {gateway.proc.returncode}; stopping Triton", file=sys.stderr)
    if watchdog:
        watchdog.halt()
    if gateway:
        gateway.stop()
    rc = server.stop() if server.proc.poll() is None else server.proc.returncode
    if gateway_died:
        return 1
    return 0 if rc in (0, -signal.SIGTERM, -signal.SIGINT) else (rc or 1)


if __name__ == "__main__":
    sys.exit(main())


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class running_server:
    """Context manager: an embedded Triton on free loopback ports, ready on entry, stopped on exit.

        with running_server(env={"MODERATION_AUDIT_LOG": "..."}) as srv:
            ModerationClient(srv.grpc_url)
    """

    def __init__(self, repository: Path | None = None, env: dict[str, str] | None = None,
                 log_path: Path | None = None, models: tuple[str, ...] = ALL_MODELS, key: str = "",
                 extra_args: tuple[str, ...] = (), timeout: float = 300.0, gateway: bool | None = None):
        self.config = ServerConfig(repository=Path(repository or os.environ.get("MODEL_REPOSITORY",
                                                                                 "model_repository")),
                                   grpc_port=free_port(), http_port=free_port(), metrics_port=free_port(),
                                   triton_grpc_port=free_port(), gateway_metrics_port=free_port(),
                                   models=models, key=key, extra_args=extra_args)
        if gateway is not None:
            self.config.gateway = gateway
        self.extra_env = env or {}
        self.log_path = log_path
        self.timeout = timeout
        self.process: TritonProcess | None = None
        self.gateway: GatewayProcess | None = None

    @property
    def grpc_url(self) -> str:
        """Where clients connect: the audit gateway (or Triton itself when the gateway is off)."""
        return f"127.0.0.1:{self.config.grpc_port}"

    @property
    def triton_grpc_url(self) -> str:
        return self.config.triton_grpc_url

    @property
    def gateway_metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.config.gateway_metrics_port}/metrics"

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.config.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.config.metrics_port}/metrics"

    def __enter__(self) -> "running_server":
        saved = {k: os.environ.get(k) for k in self.extra_env}
        os.environ.update(self.extra_env)
        try:
            if self.log_path:
                Path(self.log_path).parent.mkdir(parents=True, exist_ok=True)
            self.process = TritonProcess(self.config, self.log_path).start()
            if self.config.gateway:  # same environment (audit log path) as the models
                glog = Path(self.log_path).with_suffix(".gateway.log") if self.log_path else None
                self.gateway = GatewayProcess(self.config, glog)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        try:
            self.process.wait_ready(self.timeout)
            apply_live_versions(self.config)
            if self.gateway:
                self.gateway.start().wait_ready(60)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> int | None:
        if self.gateway:
            self.gateway.stop()
        return self.process.stop() if self.process else None

    def __exit__(self, *exc) -> None:
        self.stop()
