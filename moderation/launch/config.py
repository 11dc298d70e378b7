"""How the embedded Triton server (the `tritonserver` binary inside the nvidia-pytriton wheel) and the audit gateway
are started: their configuration, command lines and environment. CPU-only, bound to 127.0.0.1, explicit model
control, restricted admin protocols."""
from __future__ import annotations

import os
import secrets
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from ..core.auth import ADMIN_HEADER, RESTRICTED_HTTP, admin_key, restricted_grpc, without_admin_key
from ..core.state import STATE_DIR_ENV
from ..repository.render import ALL_MODELS


def pytriton_dir() -> Path:
    import pytriton

    return Path(pytriton.__file__).parent


def local_cache_key(path: Path = Path("build/secrets/verdict_cache.key")) -> Path:
    """The shared verdict cache's MAC key for servers started from this checkout (made once, mode 0600); a cluster
    mounts its own secret as MODERATION_CACHE_KEY_FILE instead (docs/deploy.md)."""
    if not path.exists():
        import secrets

        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another server of this checkout made it just now
            return path.resolve()
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return path.resolve()


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


@dataclass
class ServerConfig:
    repository: Path = Path("model_repository")
    grpc_port: int = 8001
    triton_grpc_port: int = 8011
    gateway_metrics_port: int = 8003
    gateway: bool = True
    openai_port: int = 0  # 0: no OpenAI-compatible front end
    http_port: int = 8000
    metrics_port: int = 8002
    address: str = "127.0.0.1"
    models: tuple[str, ...] = ALL_MODELS
    key: str = ""
    cache_bytes: int = 64 * 1024 * 1024
    log_verbose: int = 0
    extra_args: tuple[str, ...] = ()

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides) -> ServerConfig:
        """The configuration the environment names (README: Environment), then `overrides`."""
        env = os.environ if environ is None else environ
        values = {"repository": Path(env.get("MODEL_REPOSITORY", "model_repository")),
                  "grpc_port": int(env.get("GRPC_PORT", 8001)),
                  "triton_grpc_port": int(env.get("TRITON_GRPC_PORT", 8011)),
                  "gateway_metrics_port": int(env.get("GATEWAY_METRICS_PORT", 8003)),
                  "gateway": env.get("MODERATION_GATEWAY", "1") != "0",
                  "openai_port": int(env.get("OPENAI_PORT", 8080)),
                  "http_port": int(env.get("HTTP_PORT", 8000)), "metrics_port": int(env.get("METRICS_PORT", 8002)),
                  "address": env.get("BIND_ADDRESS", "127.0.0.1"), "key": admin_key(),
                  "log_verbose": int(env.get("TRITON_LOG_VERBOSE", 0))}
        return cls(**{**values, **overrides})

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
            f"--grpc-restricted-protocol={restricted_grpc(self.gateway)}:{ADMIN_HEADER}={key}",
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
                "--upstream", self.triton_grpc_url, "--metrics", f"127.0.0.1:{self.gateway_metrics_port}",
                "--triton-metrics", f"http://127.0.0.1:{self.metrics_port}/metrics"]

    def openai_command(self) -> list[str]:
        return [sys.executable, "-m", "moderation.openai", "--listen", f"{self.address}:{self.openai_port}",
                "--upstream", f"127.0.0.1:{self.grpc_port}"]

    def env(self) -> dict[str, str]:
        """The environment of Triton (inherited by every python stub) and of the front ends: no admin key. Triton
        takes it on its command line (its only way; docs/security.md), the gateway through an inherited pipe
        (processes.GatewayProcess)."""
        env = without_admin_key(os.environ)
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
        # State every process of this server shares (the last good copy of each policy's lists: a model instance
        # that never read a good copy falls back to it) lives with this checkout's other build outputs.
        if not env.get(STATE_DIR_ENV, "").strip():
            env[STATE_DIR_ENV] = str(Path("build/state").resolve())
        if env.get("MODERATION_REDIS_URL", "").strip() and not env.get("MODERATION_CACHE_KEY_FILE"):
            env["MODERATION_CACHE_KEY_FILE"] = str(local_cache_key())  # servers of this checkout share entries
        return env
