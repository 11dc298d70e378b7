"""Secure defaults on the real server: loopback-only listeners, admin protocols behind the key on gRPC
and HTTP, inference and health open."""
from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from moderation.testing.samples import sample_posts

GRPC_ADMIN_CALLS = {
    "model-repository": lambda c, h: c.get_model_repository_index(headers=h),
    "model-repository/load": lambda c, h: c.load_model("postprocess", headers=h),
    # the entry ensemble's config and statistics (and its steps') are open on the public port (perf_analyzer;
    # docs/security.md): the decoders', reached by BLS, still need the key
    "model-config": lambda c, h: c.get_model_config("language_decoder", headers=h),
    "statistics": lambda c, h: c.get_inference_statistics("language_decoder", headers=h),
    "shared-memory": lambda c, h: c.get_system_shared_memory_status(headers=h),
    "trace": lambda c, h: c.get_trace_settings(headers=h),
    "logging": lambda c, h: c.get_log_settings(headers=h),
}

HTTP_ADMIN_CALLS = [
    ("POST", "/v2/models/moderate/infer"),  # inference is gRPC through the audit gateway; HTTP is for operators
    ("POST", "/v2/repository/index"),
    ("GET", "/v2/models/moderate/config"),
    ("GET", "/v2/models/moderate/stats"),
    ("GET", "/v2/systemsharedmemory/status"),
    ("GET", "/v2/cudasharedmemory/status"),
    ("GET", "/v2/trace/setting"),
    ("GET", "/v2/logging"),
]


@pytest.mark.parametrize("name", list(GRPC_ADMIN_CALLS))
def test_grpc_admin_protocols_need_the_key(triton, name):
    c = grpcclient.InferenceServerClient(triton.grpc_url)
    with pytest.raises(InferenceServerException, match="restricted"):
        GRPC_ADMIN_CALLS[name](c, {})
    with pytest.raises(InferenceServerException, match="restricted"):
        GRPC_ADMIN_CALLS[name](c, {"triton-grpc-protocol-admin-key": "wrong-key"})
    GRPC_ADMIN_CALLS[name](c, triton.admin_headers)  # the right key works


def _http(triton, method, path, headers=None):
    req = urllib.request.Request(f"http://{triton.http_url}{path}", method=method, headers=headers or {},
                                 data=(b'{"inputs": []}' if path.endswith("/infer") else b"{}") if method == "POST"
                                 else None)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.parametrize("method,path", HTTP_ADMIN_CALLS)
def test_http_admin_apis_need_the_key(triton, method, path):
    assert _http(triton, method, path) == 403
    assert _http(triton, method, path, {"admin-key": "wrong-key"}) == 403
    assert _http(triton, method, path, triton.admin_http_headers) in (200, 400)  # 400: no CUDA shm here


def test_the_public_models_config_and_statistics_need_no_key_on_the_public_port(triton):
    c = grpcclient.InferenceServerClient(triton.grpc_url)
    assert c.get_model_config("moderate", as_json=True)["config"]["name"] == "moderate"
    stats = c.get_inference_statistics("moderate", as_json=True)["model_stats"]
    assert [m["name"] for m in stats] == ["moderate"]
    # every model's statistics without a key: the opened models' only
    everyone = {m["name"] for m in c.get_inference_statistics("", as_json=True)["model_stats"]}
    assert "moderate" in everyone and "clip_gate" in everyone and "language_decoder" not in everyone
    # and the models its ensemble composes (perf_analyzer breaks an ensemble down by them); not the decoders
    assert c.get_model_config("clip_gate", as_json=True)["config"]["name"] == "clip_gate"
    with pytest.raises(InferenceServerException, match="restricted"):
        c.get_model_config("language_decoder")
    direct = grpcclient.InferenceServerClient(triton.triton_grpc_url)  # Triton's own port still needs the key
    with pytest.raises(InferenceServerException, match="restricted"):
        direct.get_model_config("moderate")


def test_inference_health_and_metadata_need_no_key(triton, client):
    assert _http(triton, "GET", "/v2/health/ready") == 200
    assert _http(triton, "GET", "/v2/models/moderate") == 200
    c = grpcclient.InferenceServerClient(triton.grpc_url)
    assert c.is_server_live() and c.is_model_ready("moderate")
    post = sample_posts()[0]
    assert client.moderate(post.image_bytes(), post.text)["error"] is None


LOOPBACK = {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}


def _listening(port: int) -> set[str]:
    addrs = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            ip, p = local.split(":")
            if state == "0A" and int(p, 16) == port:  # 0A = LISTEN
                addrs.add(ip)
    return addrs


def test_every_listener_is_loopback_only(triton):
    cfg = triton.config  # the gateway's gRPC and metrics, and Triton's own gRPC behind it
    for port in (cfg.grpc_port, cfg.triton_grpc_port, cfg.gateway_metrics_port, cfg.http_port, cfg.metrics_port):
        addrs = _listening(port)
        assert addrs, f"nothing listens on {port}"
        # 127.0.0.1 (or its IPv4-mapped IPv6 form, as gRPC binds it); never 0.0.0.0 or ::
        assert addrs <= LOOPBACK, (port, addrs)


def test_launch_flags_restrict_every_admin_protocol():
    from moderation.launch.config import ServerConfig

    cmd = " ".join(ServerConfig(key="k" * 16).command())
    for proto in ("model-repository", "model-config", "shared-memory", "statistics", "trace", "logging"):
        assert f"{proto}" in cmd.split("--grpc-restricted-protocol=")[1].split(":")[0]
        assert f"{proto}" in cmd.split("--http-restricted-api=")[1].split(":")[0]
    assert "--grpc-address=127.0.0.1" in cmd and "--http-address=127.0.0.1" in cmd
    assert "--metrics-address=127.0.0.1" in cmd
    assert "inference" in cmd.split("--grpc-restricted-protocol=")[1].split(":")[0]  # only the gateway infers
    alone = " ".join(ServerConfig(key="k" * 16, gateway=False).command())
    assert "inference" not in alone.split("--grpc-restricted-protocol=")[1].split(":")[0]
    # without a configured key a random one closes the admin APIs to everyone
    assert ServerConfig(key="").key and ServerConfig(key="").key != ServerConfig(key="").key


def test_the_key_is_on_no_command_line_but_tritons(triton):
    """The gateway reads the key from a pipe it inherits; Triton 2.51 reads it only from its arguments, so its command
    line is the one exposure (docs/security.md: per-start key, hidepid, one tenant per pod). No environment holds it:
    not the gateway's, not Triton's, not a python stub's (they parse untrusted images)."""
    from moderation.ops.watchdog import stubs

    key = triton.config.key.encode()
    assert key not in Path(f"/proc/{triton.gateway.proc.pid}/cmdline").read_bytes()
    assert key in Path(f"/proc/{triton.process.proc.pid}/cmdline").read_bytes()  # the stated exposure
    pids = {"gateway": triton.gateway.proc.pid, "tritonserver": triton.process.proc.pid,
            **{f"stub {s.model}": pid for pid, s in stubs(triton.process.proc.pid).items()}}
    assert len(pids) > 10  # every python model's stub
    for who, pid in pids.items():
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        assert key not in environ, who
        if who != "gateway":  # the gateway's has the number of the descriptor it read the key from
            assert b"MODERATION_ADMIN_KEY" not in environ, who


def test_no_child_but_the_gateway_is_given_the_key(monkeypatch, tmp_path):
    """Exported by the operator (make serve), the key still reaches no environment the launcher hands on."""
    from moderation.launch.config import ServerConfig
    from moderation.launch.processes import GatewayProcess, OpenAIProcess

    monkeypatch.setenv("MODERATION_ADMIN_KEY", "k" * 24)
    monkeypatch.setenv("MODERATION_ADMIN_KEY_FILE", str(tmp_path / "key"))
    cfg = ServerConfig(key="k" * 24)
    for env in (cfg.env(), GatewayProcess(cfg).env, OpenAIProcess(cfg).env):
        assert not {k for k in env if k.startswith("MODERATION_ADMIN_KEY")}
        assert "k" * 24 not in "".join(env.values())
