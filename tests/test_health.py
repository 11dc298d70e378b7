"""grpc.health.v1 on the public port: Check and Watch answer SERVING for the service, the inference service and
`moderate` while Triton is ready; in fail_closed audit mode a full audit disk turns them (and ServerReady) off
until it is freed. The last part runs a second gateway in front of the session's Triton, its audit log on a tmpfs
this test mounts."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import grpc
import pytest
import tritonclient.grpc as grpcclient
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moderation.launch.processes import grpc_health_serving
from moderation.testing.faults import fill, tmpfs
from moderation.testing.server import free_port

SERVING = health_pb2.HealthCheckResponse.SERVING


def test_check_and_watch_say_serving(triton):
    for service in ("", "inference.GRPCInferenceService", "moderate"):
        assert grpc_health_serving(triton.grpc_url, service, timeout_s=60), service  # 60 s: a hang guard
    with grpc.insecure_channel(triton.grpc_url) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            stub.Check(health_pb2.HealthCheckRequest(service="preprocess"), timeout=60)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND  # internal models are not services of this port
        watch = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
        assert next(watch).status == SERVING
        watch.cancel()


def _wait(predicate, timeout_s: float = 60.0) -> bool:
    """Polls until `predicate` holds; the timeout is a hang guard, not a bound on how fast readiness follows."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def test_fail_closed_audit_turns_readiness_off_while_the_disk_is_full(triton):
    with tmpfs("512k") as (disk, mounted):
        if not mounted:
            pytest.skip("mounting a tmpfs needs root (CI and this machine run as root)")
        port = free_port()
        env = {**os.environ, "MODERATION_AUDIT_LOG": str(disk / "audit.jsonl"),
               "MODERATION_AUDIT_ON_FAILURE": "fail_closed", "MODERATION_ADMIN_KEY": triton.config.key}
        gw = subprocess.Popen([sys.executable, "-m", "moderation.gateway", "--listen", f"127.0.0.1:{port}",
                               "--upstream", triton.triton_grpc_url, "--metrics", ""], env=env)
        url = f"127.0.0.1:{port}"
        try:
            assert _wait(lambda: _serving(url)), "the gateway never became ready"
            assert grpcclient.InferenceServerClient(url).is_server_ready()
            filler = fill(disk)
            assert _wait(lambda: not _serving(url)), "a full audit disk left the port SERVING"
            assert not grpcclient.InferenceServerClient(url).is_server_ready()
            filler.unlink()
            assert _wait(lambda: _serving(url)), "readiness did not come back when the disk was freed"
            assert grpcclient.InferenceServerClient(url).is_server_ready()
        finally:
            gw.terminate()
            gw.wait(30)


def _serving(url: str) -> bool:
    try:
        return grpc_health_serving(url)
    except grpc.RpcError:
        return False
