"""Our server processes: each in its own session, polled until ready, SIGTERM to stop (it drains first)."""
from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

from .config import ServerConfig


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

    def start(self, env: dict[str, str] | None = None, pass_fds: tuple[int, ...] = ()):
        env = self.env if env is None else env
        if self.log_path:
            with open(self.log_path, "ab") as out:  # the child keeps its own copy of the descriptor
                self.proc = subprocess.Popen(self.command(), env=env, stdout=out, stderr=subprocess.STDOUT,
                                             start_new_session=True, pass_fds=pass_fds)
        else:
            self.proc = subprocess.Popen(self.command(), env=env, start_new_session=True, pass_fds=pass_fds)
        return self

    def exit_code(self) -> int | None:
        """Its exit status once it has ended; None while it runs (or before start())."""
        return self.proc.poll() if self.proc else None

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

    def start(self, env: dict[str, str] | None = None, pass_fds: tuple[int, ...] = ()):
        """The gateway checks the admin key (and presents it to Triton): it reads it from a pipe it inherits, so the
        key is in no environment or command line of it (moderation.core.auth.admin_key)."""
        read, write = os.pipe()
        try:
            os.write(write, self.config.key.encode("utf-8"))
        finally:
            os.close(write)
        try:
            return super().start({**self.env, "MODERATION_ADMIN_KEY_FD": str(read)}, (read,))
        finally:
            os.close(read)

    def command(self) -> list[str]:
        return self.config.gateway_command()

    def where(self) -> str:
        return f"{self.config.address}:{self.config.grpc_port}"

    def ready(self) -> bool:
        """grpc.health.v1 on the public port says SERVING: Triton is ready behind it and the audit log takes rows."""
        return grpc_health_serving(self.where())


def grpc_health_serving(target: str, service: str = "", timeout_s: float = 2.0) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                          timeout=timeout_s)
    return reply.status == health_pb2.HealthCheckResponse.SERVING


class OpenAIProcess(ServerProcess):
    """The OpenAI-compatible /v1/moderations front end (moderation/openai/): HTTP on OPENAI_PORT, calling the
    gateway over gRPC."""

    name = "openai"
    poll_s = 0.2
    stop_timeout_s = 40.0

    def command(self) -> list[str]:
        return self.config.openai_command()

    def where(self) -> str:
        return f"http://{self.config.address}:{self.config.openai_port}/health"

    def ready(self) -> bool:
        with urllib.request.urlopen(self.where(), timeout=2) as r:
            return r.status == 200
