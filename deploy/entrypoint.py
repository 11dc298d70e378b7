"""Container entrypoint: exec the NGC image's tritonserver with the production flags.

The restricted-API flags are moderation/core/auth.py's constants (the embedded CPU server and the container
close the same protocols behind the same `admin-key` header); the key is read from a mounted secret file, never
from an image layer. tritonserver replaces this process (exec), so it is PID 1 and gets SIGTERM directly:
Triton stops accepting, drains in-flight requests for up to --exit-timeout-secs, then exits.

Environment (defaults in brackets):
  MODEL_REPOSITORY [/models]          a path, or s3://bucket/prefix, gs://bucket/prefix, as:// (Triton reads them)
  MODERATION_ADMIN_KEY_FILE [/run/secrets/admin_key]   required: no key, no start
  GRPC_PORT [8001] HTTP_PORT [8000] METRICS_PORT [8002] BIND_ADDRESS [0.0.0.0]
  MODERATION_GATEWAY [1]: the audit gateway sidecar (deploy/Dockerfile.gateway) serves gRPC on GRPC_PORT and
      Triton's own gRPC listens on 127.0.0.1:TRITON_GRPC_PORT [8011] only, so every inference is audited;
      0: no gateway, Triton serves gRPC on BIND_ADDRESS:GRPC_PORT itself
  LOAD_MODELS [what the production target loads: every model but language_decoder_int8]   comma-separated,
      explicit model control
  MODERATION_GPU_MEMORY [unset]       the GPU's usable memory (e.g. 22GiB on an A10): the server does not start when
      the memory plan of the models it loads does not fit (moderation.preflight); MODERATION_QWEN_CONFIG and
      MODERATION_CLIP_CONFIG name the checkpoints' configs when MODEL_REPOSITORY is remote
  RESPONSE_CACHE_BYTES [268435456]    Triton's local response cache
  TRITON_REDIS_CACHE_HOST [unset]     Triton's redis response cache instead of the local one (the NGC image ships
      it; Triton 2.51's pip wheel does not): shared by every replica. TRITON_REDIS_CACHE_PORT [6379],
      TRITON_REDIS_CACHE_CONNECT_TIMEOUT_MS [200], TRITON_REDIS_CACHE_SOCKET_TIMEOUT_MS [200] (Triton's own
      default, 0, waits forever), TRITON_REDIS_CACHE_POOL_SIZE [8], TRITON_REDIS_CACHE_DB [unset],
      TRITON_REDIS_CACHE_PASSWORD_FILE [unset: no AUTH]. Triton pings Redis at start and does not start without it;
      its entries have no TTL (point it at a Redis with maxmemory and allkeys-lru, docs/caches.md)
  MODERATION_REDIS_URL [unset]        the verdict cache shared across replicas (read by clip_gate, not here)
  PYTHON_SHM_BYTES [67108864]         python backend shared-memory pool per model instance (/dev/shm)
  TRITONSERVER [/opt/tritonserver/bin/tritonserver]   TRITON_BACKEND_DIR [unset: the image's backends]
  TRITON_LOG_VERBOSE [0]  TRITON_EXTRA_ARGS [""] (shell-split, appended)

    python3 /opt/moderation/entrypoint.py            # exec tritonserver
    python3 /opt/moderation/entrypoint.py --print    # print the command (key redacted) and exit
"""
from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from moderation.core.auth import ADMIN_HEADER, ADMIN_KEY_ENV, RESTRICTED_HTTP, restricted_grpc
from moderation.preflight import PlanDoesNotFit, check_at_start
from moderation.repository.render import default_models

MIN_KEY_CHARS = 16


def read_admin_key(env: dict[str, str]) -> str:
    path = Path(env.get("MODERATION_ADMIN_KEY_FILE", "/run/secrets/admin_key"))
    try:
        key = path.read_text().strip()
    except OSError as e:
        raise SystemExit(f"error: admin key file {path} is unreadable ({e.strerror}); mount the secret "
                         "(compose `secrets:`, Kubernetes Secret volume) — "
                         "the server does not start without it") from None
    if len(key) < MIN_KEY_CHARS or any(c.isspace() for c in key):
        raise SystemExit(f"error: admin key in {path} must be at least {MIN_KEY_CHARS} characters with no spaces")
    return key


def command(env: dict[str, str] | None = None) -> list[str]:
    env = dict(os.environ if env is None else env)
    key = read_admin_key(env)
    addr = env.get("BIND_ADDRESS", "0.0.0.0")  # inside a pod/container network namespace, not the host's
    models = [m for m in env.get("LOAD_MODELS", ",".join(default_models("production"))).split(",") if m]
    gpu_memory_plan(env, models)
    args = [
        env.get("TRITONSERVER", "/opt/tritonserver/bin/tritonserver"),
        f"--model-repository={env.get('MODEL_REPOSITORY', '/models')}",
        "--model-control-mode=explicit",
        *[f"--load-model={m}" for m in models],
        *grpc_listener(env, addr),
        f"--http-address={addr}", f"--http-port={env.get('HTTP_PORT', '8000')}",
        f"--metrics-address={addr}", f"--metrics-port={env.get('METRICS_PORT', '8002')}",
        "--allow-metrics=true",
        f"--grpc-restricted-protocol={restricted_grpc(env.get('MODERATION_GATEWAY', '1') != '0')}:{ADMIN_HEADER}={key}",
        f"--http-restricted-api={RESTRICTED_HTTP}:{ADMIN_HEADER}={key}",
        *response_cache(env),
        f"--backend-config=python,shm-default-byte-size={env.get('PYTHON_SHM_BYTES', str(64 << 20))}",
        "--strict-readiness=true", "--exit-timeout-secs=30",
        f"--log-verbose={env.get('TRITON_LOG_VERBOSE', '0')}",
    ]
    if env.get("TRITON_BACKEND_DIR"):
        args.append(f"--backend-directory={env['TRITON_BACKEND_DIR']}")
    if env.get("TRITON_CACHE_DIR"):
        args.append(f"--cache-directory={env['TRITON_CACHE_DIR']}")
    args += shlex.split(env.get("TRITON_EXTRA_ARGS", ""))
    return args


def gpu_memory_plan(env: dict[str, str], models: list[str]) -> None:
    """Refuse to start what the GPU memory plan says cannot fit (checked when MODERATION_GPU_MEMORY is set)."""
    try:
        plan = check_at_start(env, env.get("MODEL_REPOSITORY", "/models"), tuple(models), "production")
    except (PlanDoesNotFit, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    if plan is not None:
        print(f"GPU memory plan: {plan.total / 2**30:.2f} of {plan.gpu_memory / 2**30:.2f} GiB", file=sys.stderr)


def grpc_listener(env: dict[str, str], addr: str) -> list[str]:
    if env.get("MODERATION_GATEWAY", "1") != "0":  # only the gateway in this pod's network namespace reaches it
        return ["--grpc-address=127.0.0.1", f"--grpc-port={env.get('TRITON_GRPC_PORT', '8011')}"]
    return [f"--grpc-address={addr}", f"--grpc-port={env.get('GRPC_PORT', '8001')}"]


def response_cache(env: dict[str, str]) -> list[str]:
    """Triton's response cache: `local` (in this process), or `redis` shared by every replica when
    TRITON_REDIS_CACHE_HOST is set (one `--cache-config=redis,<key>=<value>` per setting, as the cache reads them)."""
    host = env.get("TRITON_REDIS_CACHE_HOST", "").strip()
    if not host:
        return [f"--cache-config=local,size={env.get('RESPONSE_CACHE_BYTES', str(256 << 20))}"]
    settings = {"host": host, "port": env.get("TRITON_REDIS_CACHE_PORT", "6379"),
                "connect_timeout": env.get("TRITON_REDIS_CACHE_CONNECT_TIMEOUT_MS", "200"),
                "socket_timeout": env.get("TRITON_REDIS_CACHE_SOCKET_TIMEOUT_MS", "200"),
                "pool_size": env.get("TRITON_REDIS_CACHE_POOL_SIZE", "8")}
    if env.get("TRITON_REDIS_CACHE_DB"):
        settings["db"] = env["TRITON_REDIS_CACHE_DB"]
    if env.get("TRITON_REDIS_CACHE_PASSWORD_FILE"):
        path = Path(env["TRITON_REDIS_CACHE_PASSWORD_FILE"])
        try:
            settings["password"] = path.read_text().strip()
        except OSError as e:
            raise SystemExit(f"error: Redis password file {path} is unreadable ({e.strerror})") from None
    for k, v in settings.items():
        if not v or any(c.isspace() or c == "," for c in v):
            raise SystemExit(f"error: Triton's redis cache setting {k}={v!r} is empty or has a space or comma")
    return [f"--cache-config=redis,{k}={v}" for k, v in settings.items()]


def redact(args: list[str]) -> list[str]:
    out = []
    for a in args:
        if f":{ADMIN_HEADER}=" in a:
            a = a.split(f":{ADMIN_HEADER}=")[0] + f":{ADMIN_HEADER}=***"
        elif a.startswith("--cache-config=redis,password="):
            a = "--cache-config=redis,password=***"
        out.append(a)
    return out


# Inherited by the python-backend stubs, as moderation/launch/config.py sets them for the embedded server.
STUB_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def main(argv: list[str]) -> int:
    for k, v in STUB_ENV.items():
        os.environ.setdefault(k, v)  # local-only inference: never reach a model hub
    args = command()
    if "--print" in argv:
        print(shlex.join(redact(args)))
        return 0
    sys.stdout.flush()
    for k in ADMIN_KEY_ENV:  # Triton has the key on its command line; its python stubs parse untrusted images
        os.environ.pop(k, None)
    os.execv(args[0], args)
    return 127  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
