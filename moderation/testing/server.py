"""A real server for tests and benchmarks: Triton and the audit gateway on free loopback ports."""
from __future__ import annotations

import os
import socket
from pathlib import Path

from ..core.audit import AuditLog
from ..launch.config import ServerConfig
from ..launch.processes import GatewayProcess, OpenAIProcess, TritonProcess
from ..launch.serve import VersionFollower, apply_live_versions, version_follower
from ..repository.render import ALL_MODELS


def free_port() -> int:
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
                 extra_args: tuple[str, ...] = (), timeout: float = 300.0, gateway: bool | None = None,
                 openai: bool = False):
        self.config = ServerConfig.from_env(
            repository=Path(repository or os.environ.get("MODEL_REPOSITORY", "model_repository")),
            grpc_port=free_port(), http_port=free_port(), metrics_port=free_port(), triton_grpc_port=free_port(),
            gateway_metrics_port=free_port(), models=models, key=key, extra_args=extra_args, address="127.0.0.1",
            openai_port=free_port() if openai else 0)
        if gateway is not None:
            self.config.gateway = gateway
        self.extra_env = env or {}
        self.log_path = log_path
        self.timeout = timeout
        self.process: TritonProcess | None = None
        self.gateway: GatewayProcess | None = None
        self.openai: OpenAIProcess | None = None
        self.follower: VersionFollower | None = None

    @property
    def grpc_url(self) -> str:
        """Where clients connect: the audit gateway (or Triton itself when the gateway is off)."""
        return f"127.0.0.1:{self.config.grpc_port}"

    @property
    def triton_grpc_url(self) -> str:
        return self.config.triton_grpc_url

    def direct_client(self):
        """A tritonclient gRPC client on Triton's own port, behind the gateway: its inference needs the key."""
        import tritonclient.grpc as grpcclient

        from ..core.auth import admin_headers

        return KeyedClient(grpcclient.InferenceServerClient(self.triton_grpc_url), admin_headers(self.config.key))

    @property
    def gateway_metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.config.gateway_metrics_port}/metrics"

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.config.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.config.metrics_port}/metrics"

    def __enter__(self) -> running_server:
        saved = {k: os.environ.get(k) for k in self.extra_env}
        os.environ.update(self.extra_env)
        try:
            if self.log_path:
                Path(self.log_path).parent.mkdir(parents=True, exist_ok=True)
            self.process = TritonProcess(self.config, self.log_path).start()
            if self.config.gateway:  # same environment (audit log path) as the models
                glog = Path(self.log_path).with_suffix(".gateway.log") if self.log_path else None
                self.gateway = GatewayProcess(self.config, glog)
            if self.config.gateway and self.config.openai_port:
                olog = Path(self.log_path).with_suffix(".openai.log") if self.log_path else None
                self.openai = OpenAIProcess(self.config, olog)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        try:
            self.process.wait_ready(self.timeout)
            apply_live_versions(self.config)
            env = {**os.environ, **self.extra_env}  # with Redis: follow the cluster's versions, as the launcher does
            audit = AuditLog(Path(env["MODERATION_AUDIT_LOG"])) if env.get("MODERATION_AUDIT_LOG") else None
            self.follower = version_follower(self.config, env, audit)
            if self.follower:
                self.follower.run_checked(once=True)
                self.follower.start()
            if self.gateway:
                self.gateway.start().wait_ready(60)
            if self.openai:
                self.openai.start().wait_ready(60)
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def openai_url(self) -> str:
        return f"http://127.0.0.1:{self.config.openai_port}/v1"

    def stop(self) -> int | None:
        if self.follower:
            self.follower.stop()
        if self.openai:
            self.openai.stop()
        if self.gateway:
            self.gateway.stop()
        return self.process.stop() if self.process else None

    def __exit__(self, *exc) -> None:
        self.stop()


class KeyedClient:
    """A tritonclient client whose every call carries `headers` (the admin key), otherwise the client itself."""

    def __init__(self, client, headers: dict[str, str]):
        self.client, self.headers = client, headers

    def __getattr__(self, name):
        attr = getattr(self.client, name)
        if not callable(attr):
            return attr

        def with_headers(*args, **kwargs):
            kwargs["headers"] = {**self.headers, **(kwargs.get("headers") or {})}
            return attr(*args, **kwargs)

        return with_headers
