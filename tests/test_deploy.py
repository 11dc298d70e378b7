"""Production deployment, validated offline: the two rendered repositories (structural diff), the packaged
repository and its manifest, the Dockerfile (hadolint), requirements-gpu.txt, compose.yaml, the Kubernetes
manifests (kubernetes-validate against a pinned Kubernetes, yamllint), the container entrypoint (run for real
against the embedded Triton binary), and the GPU measurement script (--tiny smoke run on CPU)."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from fnmatch import fnmatch
from pathlib import Path, PurePosixPath

import pytest
import yaml
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from moderation.repository.render import ALL_MODELS, ENSEMBLES, MODELS, ONNX_ACCELERATORS, render_repository

from .import_graph import imported_names, package_modules

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
VENV_BIN = Path(sys.executable).parent
K8S_VERSION = "1.33.0"  # the oldest Kubernetes the manifests promise to work on
KIND_GPU = model_config_pb2.ModelInstanceGroup.KIND_GPU
KIND_CPU = model_config_pb2.ModelInstanceGroup.KIND_CPU


def parse(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


# --- 1. rendering, not copying -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    out = {}
    for target, acc in (("local", "tensorrt"), ("production", "tensorrt"), ("production", "cuda")):
        d = tmp_path_factory.mktemp(f"{target}-{acc}")
        render_repository(d, target, acc)
        out[(target, acc)] = {m: parse(d / m / "config.pbtxt") for m in ALL_MODELS}
    return out


def _strip_intended(cfg: model_config_pb2.ModelConfig) -> dict:
    """The config minus what the targets are meant to change: backend, instance kind, accelerators, and the
    device/precision/runner parameters."""
    c = model_config_pb2.ModelConfig()
    c.CopyFrom(cfg)
    c.ClearField("backend")
    c.ClearField("optimization")
    for g in c.instance_group:
        g.ClearField("kind")
    for k in ("device", "dtype", "onnx_runner", "intra_op_threads"):
        if k in c.parameters:
            del c.parameters[k]
    return json_format.MessageToDict(c)


@pytest.mark.parametrize("acc", ONNX_ACCELERATORS)
def test_targets_differ_only_where_intended(rendered, acc):
    local, prod = rendered[("local", "tensorrt")], rendered[("production", acc)]
    for name in ALL_MODELS:
        assert local[name].name == prod[name].name == name
        assert _strip_intended(local[name]) == _strip_intended(prod[name]), f"{name}: unintended difference"
        backend = MODELS[name]["backend"]
        if backend == "ensemble":
            assert local[name] == prod[name]
            continue
        lp, pp = dict(local[name].parameters), dict(prod[name].parameters)
        if backend == "onnx":
            assert (local[name].backend, prod[name].backend) == ("python", "onnxruntime")
            assert [g.kind for g in prod[name].instance_group] == [KIND_GPU]
            assert lp["onnx_runner"].string_value == "onnxruntime" and "onnx_runner" not in pp
            accel = prod[name].optimization.execution_accelerators.gpu_execution_accelerator
            assert [a.name for a in accel] == [acc]
            if acc == "tensorrt":
                assert accel[0].parameters["precision_mode"] == "FP16"
                assert accel[0].parameters["trt_engine_cache_enable"] == "1"
            assert not local[name].HasField("optimization")
        elif MODELS[name].get("gpu"):  # the decoder: GPU, bf16, in production only
            assert prod[name].backend == local[name].backend == "python"
            assert [g.kind for g in prod[name].instance_group] == [KIND_GPU]
            assert [g.kind for g in local[name].instance_group] == [KIND_CPU]
            assert (pp["device"].string_value, pp["dtype"].string_value) == ("cuda", "bfloat16")
            assert (lp["device"].string_value, lp["dtype"].string_value) == ("auto", "auto")
        else:  # CPU-side python stages stay on the CPU in both targets
            assert local[name] == prod[name]


def test_committed_local_configs_are_the_local_rendering(rendered):
    for name in ALL_MODELS:
        assert parse(ROOT / "model_repository" / name / "config.pbtxt") == rendered[("local", "tensorrt")][name]


# --- the packaged repository ---------------------------------------------------------------------------------------
def _package(*args):
    return subprocess.run([sys.executable, str(DEPLOY / "package_repository.py"), *args], capture_output=True,
                          text=True, timeout=120)


def test_package_renders_copies_verifies_and_records(tmp_path):
    out = tmp_path / "repo"
    r = _package("--src", str(ROOT / "model_repository"), "--out", str(out))
    assert r.returncode == 0, r.stderr
    manifest = json.loads((out / "MANIFEST.json").read_text())
    assert manifest["target"] == "production" and set(manifest["models"]) == set(ALL_MODELS)
    for name in ALL_MODELS:
        cfg = parse(out / name / "config.pbtxt")
        assert cfg.name == name
        if MODELS[name]["backend"] == "onnx":
            assert cfg.backend == "onnxruntime" and (out / name / "1" / "model.onnx").exists()
            rec = out / name / "1" / "artifact.json"
            assert manifest["models"][name]["versions"]["1"]["artifact_sha256"] == \
                __import__("hashlib").sha256(rec.read_bytes()).hexdigest()
        elif name not in ENSEMBLES:
            assert (out / name / "1" / "model.py").exists()
        assert not list((out / name).rglob("__pycache__"))
    # The checkpoint travels whole: the decoder's record still verifies in the packaged copy.
    from moderation.repository.artifacts import read_artifact_record
    read_artifact_record(out / "language_decoder" / "1", verify=True)


def test_package_refuses_a_tampered_artifact(tmp_path):
    src = tmp_path / "src"
    for name in ALL_MODELS:
        shutil.copytree(ROOT / "model_repository" / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    onnx = src / "clip_text" / "1" / "model.onnx"
    onnx.write_bytes(onnx.read_bytes() + b"\0")
    r = _package("--src", str(src), "--out", str(tmp_path / "out"))
    assert r.returncode != 0 and "does not match" in (r.stderr + r.stdout)


# --- 2. container ----------------------------------------------------------------------------------------------
def _hadolint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "hadolint"), "--no-color", str(path)], capture_output=True, text=True,
                          timeout=60)


def test_dockerfile_passes_hadolint_and_the_linter_bites(tmp_path):
    for dockerfile in ("Dockerfile", "Dockerfile.gateway"):
        r = _hadolint(DEPLOY / dockerfile)
        assert r.returncode == 0, dockerfile + r.stdout + r.stderr
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get install curl\n")
    r = _hadolint(bad)
    assert r.returncode != 0 and "DL3007" in r.stdout  # proves hadolint actually ran on our file above


def test_dockerfile_base_release_user_and_entrypoint():
    text = (DEPLOY / "Dockerfile").read_text()
    image = re.search(r"^ARG TRITON_IMAGE=(\S+)$", text, re.M).group(1)
    m = re.fullmatch(r"nvcr\.io/nvidia/tritonserver:(\d\d)\.(\d\d)-py3", image)
    assert m, image
    assert (int(m.group(1)), int(m.group(2))) >= (26, 7), "below the newest Triton security bulletin floor (r26.07)"
    assert (int(m.group(1)), int(m.group(2))) >= (25, 7), "predates CVE-2025-23319/23320/23334 fixes"
    assert text.count("FROM ${TRITON_IMAGE}") == 1
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and users[-1].split(":")[0].isdigit() and users[-1].split(":")[0] != "0"
    assert "--target production" in text and "-r /tmp/requirements-gpu.txt" in text
    assert 'ENTRYPOINT ["python3", "/opt/moderation/entrypoint.py"]' in text
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    for needed in ("!deploy/entrypoint.py", "!deploy/package_repository.py", "!deploy/requirements-gpu.txt"):
        assert needed in ignore


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and re.fullmatch(r"[0-9][0-9A-Za-z.+]*", version), f"not an exact pin: {line}"
            pins[name.lower().replace("_", "-")] = version
    return pins


def test_gateway_image_pins_match_the_cpu_lock_and_import_nothing_heavy():
    text = (DEPLOY / "Dockerfile.gateway").read_text()
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert 'ENTRYPOINT ["python3", "-m", "moderation.gateway"]' in text
    ignore = (DEPLOY / "Dockerfile.gateway.dockerignore").read_text().split()
    assert "!deploy/requirements-gateway.txt" in ignore and "!moderation/gateway/**" in ignore
    pins = _pins(DEPLOY / "requirements-gateway.txt")
    lock = _pins(ROOT / "requirements.lock")
    assert {"grpcio", "tritonclient", "protobuf", "prometheus-client"} <= set(pins)
    for name, version in pins.items():
        if name in lock:
            assert version == lock[name], f"{name}: gateway image {version} != CPU venv {lock[name]}"
    # The gateway image has none of the model stack: moderation.gateway must not import it.
    code = ("import sys, moderation.gateway.proxy; heavy = {'torch', 'transformers', 'onnxruntime', 'PIL', 'pydantic', "
            "'yaml'} & set(sys.modules); assert not heavy, heavy")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr


def test_requirements_gpu_exact_pins_match_the_cpu_lock():
    pins = _pins(DEPLOY / "requirements-gpu.txt")
    for needed in ("torch", "transformers", "onnxruntime-gpu", "tokenizers", "safetensors", "numpy", "pydantic",
                   "pyyaml", "pillow", "jsonschema", "setuptools", "redis"):
        assert needed in pins, needed
    assert "onnxruntime" not in pins  # the CPU wheel would shadow onnxruntime-gpu's module
    lock = _pins(ROOT / "requirements.lock")
    for same in ("transformers", "tokenizers", "safetensors", "numpy", "pydantic", "pyyaml", "pillow", "jsonschema",
                 "redis"):
        assert pins[same] == lock[same], f"{same}: GPU image {pins[same]} != CPU venv {lock[same]}"
    assert pins["torch"] == lock["torch"].split("+")[0]


# --- the Triton image's python dependencies: what the python-backend models import --------------------------------
# Modules the Triton image itself provides to the python backend's stub, not a pip package.
TRITON_PROVIDED = {"triton_python_backend_utils"}
# Distributions whose module another pinned distribution provides in the Triton image (the CPU venv has the first).
GPU_IMAGE_PROVIDER = {"onnxruntime": "onnxruntime-gpu", "opencv-python": "opencv-python-headless"}


def _normalized(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


def _served_third_party_imports() -> dict[str, set[str]]:
    """Each third-party top-level module the python-backend models and the container's entrypoint import: from
    model_repository/*/<version>/model.py, moderation/serving/*_model.py and deploy/entrypoint.py."""
    known = package_modules()
    starts = [(f"model_repository:{p.parent.parent.name}", p)
              for p in sorted((ROOT / "model_repository").glob("*/[0-9]*/model.py"))]
    starts += [(m, p) for m, p in known.items() if m.startswith("moderation.serving.") and m.endswith("_model")]
    assert len(starts) > 10, starts
    return _third_party_imports(starts + [("deploy.entrypoint", DEPLOY / "entrypoint.py")])


def _third_party_imports(starts: list[tuple[str, Path]]) -> dict[str, set[str]]:
    """Each third-party top-level module the files `starts` import, anywhere in a file (lazy imports too),
    following moderation.* imports (importing a module runs its packages' __init__ too): module -> the modules
    importing it."""
    known = package_modules()
    third_party: dict[str, set[str]] = {}
    seen: set[str] = set()
    todo = list(starts)
    while todo:
        name, path = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        todo += [(".".join(parts[:i]), known[".".join(parts[:i])]) for i in range(1, len(parts))
                 if ".".join(parts[:i]) in known]
        for target in imported_names(name, path):
            top = target.split(".")[0]
            if top == "moderation":
                if target in known:
                    todo.append((target, known[target]))
            elif top and top != "__future__" and top not in sys.stdlib_module_names:
                third_party.setdefault(top, set()).add(name)
    return third_party


def _unpinned(imports: dict[str, set[str]], pins: dict[str, str]) -> dict[str, str]:
    """The imported modules no pinned distribution provides: module -> why."""
    from importlib.metadata import packages_distributions

    providers = packages_distributions()
    missing = {}
    for module, importers in sorted(imports.items()):
        if module in TRITON_PROVIDED:
            continue
        dists = {_normalized(d) for d in providers.get(module, [])}
        dists = {GPU_IMAGE_PROVIDER.get(d, d) for d in dists}
        if not dists:
            missing[module] = f"no distribution in the CPU venv provides it (imported by {sorted(importers)})"
        elif not dists & set(pins):
            missing[module] = f"{sorted(dists)} not pinned (imported by {sorted(importers)})"
    return missing


def test_requirements_gpu_pins_every_module_the_python_backend_models_import():
    """Every third-party module the python-backend models and the entrypoint load (top-level or lazily, through
    moderation.*) comes from a distribution requirements-gpu.txt pins: otherwise the container fails to start, a model
    fails to load, or fails on the first post that needs the module, in the Triton image only."""
    imports = _served_third_party_imports()
    # the graph reaches the lazy imports of the image lists, term lists, OCR, text signals and LoRA
    assert {"torch", "transformers", "onnxruntime", "numpy", "PIL", "cv2", "pdqhash", "ahocorasick", "opencc",
            "pypinyin", "rapidocr_onnxruntime", "profanity_check", "peft", "tritonclient", "google",
            "triton_python_backend_utils"} <= set(imports)
    pins = {_normalized(name): version for name, version in _pins(DEPLOY / "requirements-gpu.txt").items()}
    missing = _unpinned(imports, pins)
    assert not missing, "imported by the models or the entrypoint, not installed in the Triton image:\n" + \
        "\n".join(f"{module}: {why}" for module, why in missing.items())
    # the check bites: without the OpenCV pin, cv2 is reported
    assert "cv2" in _unpinned(imports, {n: v for n, v in pins.items() if n != "opencv-python-headless"})


# The Triton image's interpreter, for evaluating requirement markers.
GPU_IMAGE_MARKERS = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
                     "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
                     "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}


def _unmet_requirements(pins: dict[str, str]) -> tuple[list[str], set[str]]:
    """(requirements of pinned distributions that the pins do not meet, the pinned distributions not checked),
    read from the CPU venv's metadata for every distribution it has at the pinned version."""
    from importlib.metadata import PackageNotFoundError, distribution

    from packaging.requirements import Requirement

    unmet, unchecked = [], set()
    for name, version in pins.items():
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            unchecked.add(name)
            continue
        if dist.version != version:
            unchecked.add(name)
            continue
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker and not req.marker.evaluate(GPU_IMAGE_MARKERS):
                continue
            needed = _normalized(req.name)
            provider = GPU_IMAGE_PROVIDER.get(needed, needed)
            if provider not in pins:
                unmet.append(f"{name} {version} requires {line}: not pinned")
            elif provider == needed and not req.specifier.contains(pins[needed], prereleases=True):
                unmet.append(f"{name} {version} requires {line}: pinned {pins[needed]}")
    return unmet, unchecked


def test_requirements_gpu_is_closed_under_dependencies():
    """The image installs requirements-gpu.txt with --no-deps, so the file must hold every dependency of every
    package it pins, at a version that meets the requirement: checked against the CPU venv's metadata for every
    package the venv has at the same version; the rest is the CUDA stack (torch's cu13 build and its wheels,
    onnxruntime-gpu), which the resolver pinned."""
    pins = {_normalized(n): v for n, v in _pins(DEPLOY / "requirements-gpu.txt").items()}
    unmet, unchecked = _unmet_requirements(pins)
    assert not unmet, "\n".join(unmet)
    cuda_stack = {"torch", "triton", "onnxruntime-gpu"}
    assert {n for n in unchecked if not n.startswith(("nvidia-", "cuda-"))} <= cuda_stack, unchecked
    assert len(pins) - len(unchecked) >= 50
    # the check bites: without scipy, scikit-learn's requirement is reported
    unmet, _ = _unmet_requirements({n: v for n, v in pins.items() if n != "scipy"})
    assert any(line.startswith("scikit-learn ") and "scipy" in line for line in unmet), unmet


def test_repository_stage_pins_what_package_repository_imports():
    """The Dockerfile's repository stage runs deploy/package_repository.py with just requirements-render.txt
    (rendering builds configs as tritonclient's protos): every third-party module of its import graph is pinned
    there, at the CPU venv's versions."""
    imports = _third_party_imports([("deploy.package_repository", DEPLOY / "package_repository.py")])
    assert {"google", "tritonclient"} <= set(imports)
    pins = {_normalized(n): v for n, v in _pins(DEPLOY / "requirements-render.txt").items()}
    missing = _unpinned(imports, pins)
    assert not missing, "\n".join(f"{module}: {why}" for module, why in missing.items())
    lock = {_normalized(n): v for n, v in _pins(ROOT / "requirements.lock").items()}
    for name, version in pins.items():
        assert version == lock[name], f"{name}: repository stage {version} != CPU venv {lock[name]}"
    unmet, _ = _unmet_requirements(pins)
    assert not unmet, "\n".join(unmet)
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    stage = text[text.index(" AS repository\n"):text.rindex("\nFROM ")]
    assert re.search(r"pip install [^\n]*--only-binary=:all: -r /tmp/requirements-render.txt", stage)
    assert "python3 deploy/package_repository.py" in stage
    assert "!deploy/requirements-render.txt" in (DEPLOY / "Dockerfile.dockerignore").read_text().split()


def test_requirements_gpu_shares_the_cpu_lock_versions_and_builds_pdqhash_from_its_hashed_sdist():
    """The Triton image's pins equal the CPU venv's wherever the venv has the package (torch's CUDA build aside);
    pdqhash, sdist only on PyPI, is built in a builder stage from its hash with pinned tools, and the runtime stage
    installs wheels only, without the CPU onnxruntime or opencv-python that rapidocr-onnxruntime names."""
    pins = {_normalized(n): v for n, v in _pins(DEPLOY / "requirements-gpu.txt").items()}
    lock = {_normalized(n): v for n, v in _pins(ROOT / "requirements.lock").items()}
    for name, version in pins.items():
        if name in lock and name != "torch":
            assert version == lock[name], f"{name}: GPU image {version} != CPU venv {lock[name]}"
    for name in ("pdqhash", "pyahocorasick", "opencc-python-reimplemented", "pypinyin", "opencv-python-headless",
                 "rapidocr-onnxruntime", "alt-profanity-check", "scikit-learn", "joblib", "peft"):
        assert name in pins, name
    assert not {"onnxruntime", "opencv-python"} & set(pins)  # their modules come from onnxruntime-gpu, -headless

    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    stages = re.findall(r"^FROM (\S+)(?: AS (\S+))?$", text, re.M)
    assert stages == [("${BUILD_PYTHON_IMAGE}", "pdqhash"), ("${BUILD_PYTHON_IMAGE}", "repository"),
                      ("${TRITON_IMAGE}", "")]
    (built,) = re.findall(r"pdqhash==(\S+) --hash=sha256:[0-9a-f]{64}", text)
    assert built == pins["pdqhash"]
    assert "--no-build-isolation" in text and "--require-hashes" in text  # nothing unpinned is fetched to build it
    build = {_normalized(n): v for n, v in _pins(DEPLOY / "requirements-gpu-build.txt").items()}
    assert build["numpy"] == pins["numpy"] and build["setuptools"] == pins["setuptools"]
    builder = re.search(r"^ARG BUILD_PYTHON_IMAGE=python:(\d+)\.(\d+)-", text, re.M)
    assert builder and builder.group(1, 2) == ("3", "12")  # the Triton image's CPython: the wheel is cp312
    runtime = text[text.rindex("\nFROM "):]
    assert "COPY --from=pdqhash /wheels" in runtime
    install = re.search(r"pip install [^\n]*-r /tmp/requirements-gpu.txt", runtime).group(0)
    assert "--only-binary=:all:" in install and "--no-deps" in install and "--find-links /tmp/wheels" in install
    assert not re.search(r"apt-get install|g\+\+|gcc|build-essential", runtime)  # no compiler in the image
    assert "!deploy/requirements-gpu-build.txt" in (DEPLOY / "Dockerfile.dockerignore").read_text().split()


def _yamllint(*paths) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "yamllint"), "-f", "parsable", "-c", str(DEPLOY / "yamllint.yaml"),
                           *map(str, paths)], capture_output=True, text=True, timeout=60)


def test_yamllint_passes_on_deploy_and_bites(tmp_path):
    r = _yamllint(DEPLOY)
    assert r.returncode == 0, r.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: 1\na: 2\n")
    assert _yamllint(bad).returncode != 0


def test_compose_one_gpu_host():
    c = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    svc = c["services"]["triton"]
    assert svc["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert all(p.startswith("127.0.0.1:") for p in svc["ports"])
    assert {p.split(":")[-1] for p in svc["ports"]} == {"8000", "8001", "8002", "8003"}
    gw = c["services"]["gateway"]  # shares Triton's network namespace: 8001 above is the gateway
    assert gw["network_mode"] == "service:triton" and gw["build"]["dockerfile"] == "deploy/Dockerfile.gateway"
    assert gw["read_only"] is True and gw["user"].split(":")[0] != "0"
    # one audit log, one state directory (the lists editor's last good copy beside the models')
    assert gw["volumes"] == [v for v in svc["volumes"] if v.startswith(("audit:", "state:"))]
    assert svc["secrets"] == [{"source": "admin_key", "target": "admin_key"},
                              {"source": "redis_password", "target": "redis_password"},
                              {"source": "cache_mac_key", "target": "cache_mac_key"}]
    assert svc["environment"]["MODERATION_CACHE_KEY_FILE"] == "/run/secrets/cache_mac_key"
    assert c["secrets"]["admin_key"]["file"] == "./secrets/admin_key"
    assert svc["read_only"] is True and svc["cap_drop"] == ["ALL"] and svc["user"].split(":")[0] != "0"
    assert "/v2/health/ready" in " ".join(svc["healthcheck"]["test"])


def _redis_flags(argv: list[str]) -> dict[str, str]:
    """redis-server's `--name value` flags as a dict."""
    assert len(argv) % 2 == 0, argv
    return {argv[i].removeprefix("--"): argv[i + 1] for i in range(0, len(argv), 2)}


REDIS_IMAGE = re.compile(r"redis:(\d+)\.(\d+)\.(\d+)-alpine")


def test_compose_redis_for_the_shared_verdict_cache():
    import shlex

    c = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    redis, triton = c["services"]["redis"], c["services"]["triton"]
    m = REDIS_IMAGE.fullmatch(redis["image"])
    assert m and int(m.group(1)) >= 7, redis["image"]  # pinned; the Lua scripts need Redis 7 (TIME in scripts)
    assert "ports" not in redis  # the compose network only
    assert redis["read_only"] is True and redis["cap_drop"] == ["ALL"] and redis["user"].split(":")[0] != "0"
    sh = redis["command"]
    assert sh[:2] == ["sh", "-c"] and sh[2].startswith("exec redis-server ")
    argv = shlex.split(sh[2].replace("$$", "$"))[1:]
    flags = _redis_flags(argv[1:])
    assert flags["save"] == "" and flags["appendonly"] == "no"  # a cache: nothing persisted
    assert flags["maxmemory-policy"] == "allkeys-lru" and flags["maxmemory"].endswith("mb")
    assert flags["requirepass"] == "$(cat /run/secrets/redis_password)"
    assert redis["secrets"] == [{"source": "redis_password", "target": "redis_password"}]
    assert c["secrets"]["redis_password"]["file"] == "./secrets/redis_password"
    env = triton["environment"]
    assert env["MODERATION_REDIS_URL"] == "redis://redis:6379/0"
    assert env["MODERATION_REDIS_PASSWORD_FILE"] == "/run/secrets/redis_password"
    assert "redis" in triton["depends_on"]
    assert (DEPLOY / "secrets" / ".gitignore").exists()  # the secret files themselves are never committed


# --- 3. Kubernetes -------------------------------------------------------------------------------------------------
def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _k8s_resources() -> dict[str, list[dict]]:
    return {p.name: _docs(p) for p in sorted(K8S.glob("*.yaml")) if p.name != "kustomization.yaml"}


def test_manifests_validate_against_pinned_kubernetes():
    import kubernetes_validate

    n = 0
    for _name, docs in _k8s_resources().items():
        for doc in docs:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)  # raises on any schema error
            n += 1
    assert n >= 10
    # ... and strict validation rejects what a typo produces.
    dep = _docs(K8S / "deployment.yaml")[0]
    dep["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, K8S_VERSION, strict=True)


def test_kustomization_lists_every_resource():
    k = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "prometheus-adapter-rules.yaml"}
    assert set(k["resources"]) == files
    dep = _docs(K8S / "deployment.yaml")[0]
    assert {i["name"] for i in k["images"]} == {c["image"] for c in dep["spec"]["template"]["spec"]["containers"]}


def test_deployment_gpu_probes_security_and_rollout():
    res = _k8s_resources()
    dep = res["deployment.yaml"][0]
    spec, pod = dep["spec"], dep["spec"]["template"]["spec"]
    assert "replicas" not in spec  # the HPA owns it
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    containers = {c["name"]: c for c in pod["containers"]}
    assert set(containers) == {"triton", "gateway", "version-follower"}
    c, gw = containers["triton"], containers["gateway"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"cpu", "memory"} <= set(c["resources"]["limits"]) and {"cpu", "memory"} <= set(gw["resources"]["limits"])
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"http": 8000, "metrics": 8002}
    assert {p["name"]: p["containerPort"] for p in gw["ports"]} == {"grpc": 8001, "gateway-metrics": 8003}
    ports = {p["name"]: p["containerPort"] for cont in pod["containers"] + pod.get("initContainers", [])
             for p in cont.get("ports", [])}
    # The gateway forwards to Triton's loopback gRPC (the entrypoint's default) and shares the models' audit file.
    assert "127.0.0.1:8011" in gw["args"] and "0.0.0.0:8001" in gw["args"]
    audit = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}["/var/log/moderation"]
    assert {m["mountPath"]: m["name"] for m in gw["volumeMounts"]}["/var/log/moderation"] == audit
    assert gw["securityContext"]["readOnlyRootFilesystem"] is True
    # The pod is ready when the public port's grpc.health.v1 says SERVING (Triton ready behind it, audit writable),
    # and the gateway holds the key Triton's inference protocol needs, from the secret file (never an argument).
    assert gw["readinessProbe"]["grpc"]["port"] == 8001
    gw_env = {e["name"]: e.get("value") for e in gw["env"]}
    assert gw_env["MODERATION_ADMIN_KEY_FILE"] == "/run/secrets/moderation/admin_key"
    assert {m["mountPath"]: m["name"] for m in gw["volumeMounts"]}["/run/secrets/moderation"] == "admin-key"
    assert not any("key" in a.lower() for a in gw["args"])
    assert c["readinessProbe"]["httpGet"]["path"] == c["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert {"/tmp", "/dev/shm", "/cache/trt", "/var/log/moderation"} <= mounts  # writable under a read-only root
    key_file = next(e["value"] for e in c["env"] if e["name"] == "MODERATION_ADMIN_KEY_FILE")
    assert any(key_file.startswith(m["mountPath"]) and m.get("readOnly") for m in c["volumeMounts"])
    cm = res["configmap.yaml"][0]
    assert cm["data"]["MODEL_REPOSITORY"].startswith("s3://")
    assert c["envFrom"][0]["configMapRef"]["name"] == cm["metadata"]["name"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    for svc in res["service.yaml"]:
        assert svc["spec"]["selector"].items() <= labels.items()
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in ports
    assert res["pdb.yaml"][0]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    np_ = res["networkpolicy.yaml"][0]
    assert np_["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    assert {p["port"] for rule in np_["spec"]["ingress"] for p in rule["ports"]} == set(ports)


def test_redis_for_the_shared_verdict_cache_is_pinned_unpersisted_and_reachable_only_from_triton():
    by_kind = {d["kind"]: d for d in _docs(K8S / "redis.yaml")}
    assert set(by_kind) == {"Deployment", "Service", "NetworkPolicy"}
    dep, svc, netpol = by_kind["Deployment"], by_kind["Service"], by_kind["NetworkPolicy"]
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"
    pod = dep["spec"]["template"]["spec"]
    (redis,) = pod["containers"]
    m = REDIS_IMAGE.fullmatch(redis["image"])
    assert m and int(m.group(1)) >= 7, redis["image"]
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert compose["services"]["redis"]["image"] == redis["image"]  # one Redis version in both
    assert redis["command"] == ["redis-server"]
    flags = _redis_flags(redis["args"])
    assert flags["save"] == "" and flags["appendonly"] == "no"  # no persistence (docs/caches.md says why)
    assert flags["maxmemory-policy"] == "allkeys-lru"
    assert flags["requirepass"] == "$(REDIS_PASSWORD)"
    env = {e["name"]: e for e in redis["env"]}
    for name in ("REDIS_PASSWORD", "REDISCLI_AUTH"):
        assert env[name]["valueFrom"]["secretKeyRef"] == {"name": "moderation-redis", "key": "password"}
    limit = _quantity(redis["resources"]["limits"]["memory"])
    assert int(flags["maxmemory"].removesuffix("mb")) * 2**20 < limit  # room for the server itself
    assert {"cpu", "memory"} <= set(redis["resources"]["requests"])
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert pod["automountServiceAccountToken"] is False
    sc = redis["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert {m["mountPath"] for m in redis["volumeMounts"]} == {flags["dir"]}  # its only writable path
    assert redis["readinessProbe"]["exec"]["command"] == ["redis-cli", "ping"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    ports = {p["name"]: p["containerPort"] for p in redis["ports"]}
    (svc_port,) = svc["spec"]["ports"]
    assert svc_port["targetPort"] in ports and svc_port["port"] == ports[svc_port["targetPort"]] == 6379
    # only the Triton pods reach it: a stored verdict answers later posts
    assert netpol["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    (rule,) = netpol["spec"]["ingress"]
    triton_labels = _docs(K8S / "deployment.yaml")[0]["spec"]["template"]["metadata"]["labels"]
    (peer,) = rule["from"]
    assert peer["podSelector"]["matchLabels"].items() <= triton_labels.items() and "namespaceSelector" not in peer
    assert [p["port"] for p in rule["ports"]] == [svc_port["targetPort"]]

    # The Triton container finds it by the Service's DNS name, with the password from the same Secret, read-only.
    tpod = _docs(K8S / "deployment.yaml")[0]["spec"]["template"]["spec"]
    triton = {c["name"]: c for c in tpod["containers"]}["triton"]
    tenv = {e["name"]: e.get("value") for e in triton["env"]}
    ns = svc["metadata"]["namespace"]
    assert tenv["MODERATION_REDIS_URL"] == f"redis://{svc['metadata']['name']}.{ns}.svc.cluster.local:6379/0"
    pw = PurePosixPath(tenv["MODERATION_REDIS_PASSWORD_FILE"])
    mount = _mount_for(triton, str(pw))
    assert mount.get("readOnly") is True
    volume = {v["name"]: v for v in tpod["volumes"]}[mount["name"]]
    assert volume["secret"]["secretName"] == "moderation-redis"
    mac = PurePosixPath(tenv["MODERATION_CACHE_KEY_FILE"])  # the cache entries' signing key, same Secret
    assert mac.parent == pw.parent and [i["path"] for i in volume["secret"]["items"]] == [pw.name, mac.name]
    assert 0 < float(tenv["MODERATION_REDIS_TIMEOUT_MS"]) <= 1000  # short: an outage costs misses, not latency


def test_hpa_scales_on_the_adapter_queue_metric():
    hpa = _docs(K8S / "hpa.yaml")[0]
    dep = _docs(K8S / "deployment.yaml")[0]
    assert hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    assert hpa["spec"]["minReplicas"] >= 2
    (metric,) = hpa["spec"]["metrics"]
    rules = yaml.safe_load(_docs(K8S / "prometheus-adapter-rules.yaml")[0]["data"]["config.yaml"])["rules"]
    names = {r["name"]["as"]: r for r in rules}
    rule = names[metric["pods"]["metric"]["name"]]
    assert "nv_inference_queue_duration_us" in rule["seriesQuery"]
    assert "nv_inference_queue_duration_us" in rule["metricsQuery"] and "nv_inference_count" in rule["metricsQuery"]
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}


# --- the audit shipper: Fluent Bit sidecar shipping audit.jsonl* off the machine --------------------------------
SHIPPER = "audit-shipper"
SHIPPER_CONFIG_MAP = "moderation-audit-shipper"


def _shipper_config() -> tuple[str, Path]:
    """(the ConfigMap key, the file) kustomize generates the shipper's ConfigMap from."""
    k = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    (gen,) = [g for g in k.get("configMapGenerator", []) if g["name"] == SHIPPER_CONFIG_MAP]
    (entry,) = gen["files"]
    key, _, rel = entry.partition("=")
    return key, K8S / rel


def _lower(d: dict) -> dict:
    return {str(k).lower(): v for k, v in d.items()}  # Fluent Bit keys are case-insensitive


def _fluent_bit(path: Path) -> tuple[dict, dict, dict, list[dict]]:
    """(service, tail input, output, parsers) of a Fluent Bit YAML config."""
    cfg = yaml.safe_load(path.read_text())
    assert set(cfg) <= {"service", "parsers", "pipeline"}, set(cfg)
    (tail,) = [_lower(i) for i in cfg["pipeline"]["inputs"] if i["name"] == "tail"]
    (out,) = [_lower(o) for o in cfg["pipeline"]["outputs"]]
    return _lower(cfg["service"]), tail, out, [_lower(p) for p in cfg.get("parsers", [])]


def _size(text) -> int:  # Fluent Bit's sizes are decimal (flb_utils_size_to_bytes)
    m = re.fullmatch(r"(\d+)([KMG]?)B?", str(text).upper())
    assert m, text
    return int(m.group(1)) * {"": 1, "K": 10**3, "M": 10**6, "G": 10**9}[m.group(2)]


def _quantity(text: str) -> int:
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi)", text)
    assert m, text
    return int(m.group(1)) * {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}[m.group(2)]


def _mount_for(container: dict, path: str) -> dict:
    """The volume mount of a container that holds path (the longest mountPath above it)."""
    above = [m for m in container["volumeMounts"]
             if PurePosixPath(path) == PurePosixPath(m["mountPath"])
             or PurePosixPath(m["mountPath"]) in PurePosixPath(path).parents]
    assert above, f"{path} is on no volume of {container['name']}"
    return max(above, key=lambda m: len(m["mountPath"]))


def test_audit_shipper_sidecar_tails_the_models_audit_log_read_only():
    pod = _docs(K8S / "deployment.yaml")[0]["spec"]["template"]["spec"]
    sidecars = {c["name"]: c for c in pod.get("initContainers", [])}
    ship = sidecars[SHIPPER]
    # A native sidecar: started before Triton and the gateway, stopped after them (the drain's rows ship too).
    assert ship["restartPolicy"] == "Always"
    image, _, tag = ship["image"].rpartition(":")
    assert image == "fluent/fluent-bit" and re.fullmatch(r"\d+\.\d+\.\d+", tag), ship["image"]
    assert int(tag.split(".")[0]) >= 5, "Fluent Bit 3.2 and 4.x are end-of-life (its SECURITY.md)"
    assert {"cpu", "memory"} <= set(ship["resources"]["requests"])
    assert {"cpu", "memory"} <= set(ship["resources"]["limits"])
    sc = ship["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert ship["livenessProbe"]["httpGet"]["path"] == "/api/v1/uptime"  # not /api/v1/health: an outage is no crash

    containers = {c["name"]: c for c in pod["containers"]}
    triton = containers["triton"]
    log = PurePosixPath({e["name"]: e.get("value") for e in triton["env"]}["MODERATION_AUDIT_LOG"])
    assert f"MODERATION_AUDIT_LOG={log}" in (DEPLOY / "Dockerfile").read_text()  # the image's default, the same
    audit = _mount_for(triton, str(log))
    assert audit["mountPath"] == str(log.parent) and not audit.get("readOnly")
    shipped = _mount_for(ship, str(log))
    assert shipped["name"] == audit["name"] and shipped["mountPath"] == audit["mountPath"]
    assert shipped["readOnly"] is True  # the shipper never writes the audit log

    # The config: the file kustomize turns into the ConfigMap the sidecar mounts and names on its command line.
    key, path = _shipper_config()
    volumes = {v["name"]: v for v in pod["volumes"]}
    (config_arg,) = [a.split("=", 1)[1] for a in ship["args"] if a.startswith("--config=")]
    config_mount = _mount_for(ship, config_arg)
    assert volumes[config_mount["name"]]["configMap"]["name"] == SHIPPER_CONFIG_MAP
    assert PurePosixPath(config_arg) == PurePosixPath(config_mount["mountPath"]) / key
    service, tail, out, parsers = _fluent_bit(path)

    # tail: the live file and every backup (audit.jsonl.1 newest ... .N), not the flock file.
    assert tail["path"] == f"{log}*"
    for name in (log.name, *(f"{log.name}.{i}" for i in range(1, 10))):
        assert fnmatch(str(log.parent / name), tail["path"])
    assert fnmatch(f"{log}.lock", tail["exclude_path"])
    assert tail["read_from_head"] is True and tail["skip_long_lines"] is False
    assert _size(tail["buffer_max_size"]) > 256 * 1024  # above the largest audit row
    # A rotated backup stays watched until it is deleted: a finite rotate_wait would forget its offset and the
    # glob would read it again from the head (duplicates). It outlives any backup.
    assert int(tail["rotate_wait"]) >= 30 * 24 * 3600
    assert tail["storage.type"] == "filesystem"
    (parser,) = [p for p in parsers if p["name"] == tail["parser"]]
    assert parser["format"] == "json" and "time_format" not in parser  # rows keep their own ts, untouched

    # Offsets and buffered rows live on a writable volume of their own, not in the container or the audit log.
    state_paths = [tail["db"], service["storage.path"]]
    for p in state_paths:
        m = _mount_for(ship, p)
        assert m["name"] not in (audit["name"], config_mount["name"]) and not m.get("readOnly"), p
        assert "emptyDir" in volumes[m["name"]] or "persistentVolumeClaim" in volumes[m["name"]]
    state = volumes[_mount_for(ship, tail["db"])["name"]]
    assert _size(out["storage.total_limit_size"]) < _quantity(state["emptyDir"]["sizeLimit"])

    # output: retried for ever, acknowledged by the collector, to the collector the env names.
    assert str(out["retry_limit"]).lower() in ("false", "no_limits", "off")
    assert out["require_ack_response"] is True
    env = {e["name"]: e for e in ship["env"]}
    for var in re.findall(r"\$\{(\w+)\}", path.read_text()):
        assert var in env, f"{var} is used by the config but not set on the sidecar"
    assert fnmatch(tail["tag"].replace("${AUDIT_SOURCE}", "pod-1"), out["match"])

    # Shutdown: Triton's preStop (10 s) and drain (30 s), then the shipper's grace, inside the pod's grace period.
    assert pod["terminationGracePeriodSeconds"] >= 10 + 30 + int(service["grace"])


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (kustomize) is not installed")
def test_kustomize_renders_the_shipper_config_map_and_wires_it():
    """`kubectl apply -k` as the docs say: the generated ConfigMap holds the file byte for byte, its hashed name is
    the one the Deployment mounts, and every rendered object validates."""
    import kubernetes_validate

    r = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    docs = [d for d in yaml.safe_load_all(r.stdout) if d]
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    key, path = _shipper_config()
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith(SHIPPER_CONFIG_MAP)]
    assert cm["data"][key] == path.read_text() and cm["metadata"]["namespace"] == "moderation"
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    assert set(deployments) == {"moderation-triton", "moderation-redis"}  # redis.yaml: the shared verdict cache
    dep = deployments["moderation-triton"]
    names = {v["configMap"]["name"] for v in dep["spec"]["template"]["spec"]["volumes"] if "configMap" in v}
    assert cm["metadata"]["name"] in names


def test_audit_shipper_in_compose_reads_the_same_config_and_volume():
    c = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    ship = c["services"][SHIPPER]
    pod = _docs(K8S / "deployment.yaml")[0]["spec"]["template"]["spec"]
    (k8s_ship,) = [s for s in pod["initContainers"] if s["name"] == SHIPPER]
    assert ship["image"] == k8s_ship["image"]
    audit = next(v for v in c["services"]["triton"]["volumes"] if v.startswith("audit:"))
    assert f"{audit}:ro" in ship["volumes"]
    _, path = _shipper_config()
    (config_arg,) = [a.split("=", 1)[1] for a in ship["command"] if a.startswith("--config=")]
    binds = {v.split(":")[1]: v.split(":")[0] for v in ship["volumes"]}
    assert (DEPLOY / binds[config_arg]).resolve() == path.resolve()  # one config for both
    service, tail, _, _ = _fluent_bit(path)
    state = {v.split(":")[1]: v.split(":")[0] for v in ship["volumes"]}
    for p in (tail["db"], service["storage.path"]):
        (vol,) = [name for mp, name in state.items() if p.startswith(mp + "/")]
        assert vol in c["volumes"]  # a named volume: survives a restart of the container
    assert set(ship["depends_on"]) == {"triton", "gateway"}  # stopped after the writers
    assert ship["read_only"] is True and ship["cap_drop"] == ["ALL"]
    assert all(p.startswith("127.0.0.1:") for p in ship["ports"])


# --- entrypoint: the production flags, run for real on the embedded binary ----------------------------------
def _entrypoint_module():
    """deploy/entrypoint.py, imported as the container runs it (a script beside the package, not part of it)."""
    sys.path.insert(0, str(DEPLOY))
    try:
        import entrypoint
    finally:
        sys.path.remove(str(DEPLOY))
    return entrypoint


def _entrypoint_env(tmp_path, key="k" * 32, **extra) -> dict:
    keyfile = tmp_path / "admin_key"
    keyfile.write_text(key + "\n")
    return {"MODERATION_ADMIN_KEY_FILE": str(keyfile), **extra}


def test_entrypoint_uses_server_restrictions_and_requires_a_key(tmp_path):
    entrypoint = _entrypoint_module()
    from moderation.core.auth import ADMIN_HEADER, RESTRICTED_GRPC, RESTRICTED_HTTP

    args = entrypoint.command(_entrypoint_env(tmp_path, MODEL_REPOSITORY="s3://bucket/repo"))
    # behind the gateway inference on Triton's port needs the key as well: the gateway holds it
    assert f"--grpc-restricted-protocol={RESTRICTED_GRPC},inference:{ADMIN_HEADER}={'k' * 32}" in args
    assert f"--http-restricted-api={RESTRICTED_HTTP}:{ADMIN_HEADER}={'k' * 32}" in args
    assert "--model-repository=s3://bucket/repo" in args and "--model-control-mode=explicit" in args
    # behind the gateway Triton's gRPC is loopback-only; without it, Triton serves gRPC itself
    assert "--grpc-address=127.0.0.1" in args and "--grpc-port=8011" in args
    alone = entrypoint.command(_entrypoint_env(tmp_path, MODERATION_GATEWAY="0"))
    assert "--grpc-address=0.0.0.0" in alone and "--grpc-port=8001" in alone
    assert f"--grpc-restricted-protocol={RESTRICTED_GRPC}:{ADMIN_HEADER}={'k' * 32}" in alone
    # the INT8 twin is not loaded beside the bf16 decoder on a GPU (moderation.preflight)
    assert {a.split("=", 1)[1] for a in args if a.startswith("--load-model=")} == \
        set(ALL_MODELS) - {"language_decoder_int8"}
    assert all("k" * 32 not in a for a in entrypoint.redact(args))
    with pytest.raises(SystemExit):
        entrypoint.command({"MODERATION_ADMIN_KEY_FILE": str(tmp_path / "missing")})
    with pytest.raises(SystemExit):
        entrypoint.command(_entrypoint_env(tmp_path, key="short"))


def test_entrypoint_uses_tritons_redis_response_cache_when_asked(tmp_path):
    entrypoint = _entrypoint_module()

    local = entrypoint.command(_entrypoint_env(tmp_path, RESPONSE_CACHE_BYTES="1024"))
    assert [a for a in local if a.startswith("--cache-config")] == ["--cache-config=local,size=1024"]
    pw = tmp_path / "redis_password"
    pw.write_text("p" * 32 + "\n")
    args = entrypoint.command(_entrypoint_env(tmp_path, TRITON_REDIS_CACHE_HOST="moderation-redis",
                                              TRITON_REDIS_CACHE_PASSWORD_FILE=str(pw)))
    cache = [a.removeprefix("--cache-config=") for a in args if a.startswith("--cache-config")]
    settings = dict(c.removeprefix("redis,").split("=", 1) for c in cache)
    assert all(c.startswith("redis,") for c in cache)  # one key=value per flag, as Triton's redis cache reads them
    assert settings["host"] == "moderation-redis" and settings["port"] == "6379" and settings["password"] == "p" * 32
    assert int(settings["connect_timeout"]) > 0 and int(settings["socket_timeout"]) > 0  # 0 would wait forever
    assert int(settings["pool_size"]) >= 1 and "db" not in settings
    assert "--cache-config=redis,password=***" in entrypoint.redact(args)
    assert all("p" * 32 not in a for a in entrypoint.redact(args))
    with pytest.raises(SystemExit):
        entrypoint.command(_entrypoint_env(tmp_path, TRITON_REDIS_CACHE_HOST="a,b"))
    with pytest.raises(SystemExit):
        entrypoint.command(_entrypoint_env(tmp_path, TRITON_REDIS_CACHE_HOST="h",
                                           TRITON_REDIS_CACHE_PASSWORD_FILE=str(tmp_path / "missing")))


def _get(url: str, headers: dict | None = None, data: bytes | None = None) -> int:
    req = urllib.request.Request(url, data=data, headers=headers or {}, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:  # a hang guard: a slow answer is still an answer
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:  # not listening yet
        return 0


@pytest.mark.integration
def test_entrypoint_runs_triton_with_probes_and_locked_admin_api(tmp_path):
    """The container's entrypoint exec's the embedded tritonserver (same flags; the NGC binary is not here):
    the probe endpoints answer, the admin API refuses without the key from the secret file, accepts with it,
    and SIGTERM drains to a clean exit."""
    from moderation.core.auth import ADMIN_HEADER
    from moderation.launch.config import ServerConfig, backend_dir, pytriton_dir
    from moderation.testing.server import free_port

    key = "s" * 40
    http, grpc, metrics = free_port(), free_port(), free_port()
    env = ServerConfig().env()
    env.update(_entrypoint_env(tmp_path, key=key), BIND_ADDRESS="127.0.0.1", HTTP_PORT=str(http),
               GRPC_PORT=str(grpc), METRICS_PORT=str(metrics), MODEL_REPOSITORY=str(ROOT / "model_repository"),
               LOAD_MODELS="clip_text,clip_image", RESPONSE_CACHE_BYTES=str(1 << 20),
               TRITONSERVER=str(pytriton_dir() / "tritonserver" / "bin" / "tritonserver"),
               TRITON_BACKEND_DIR=str(backend_dir()), TRITON_CACHE_DIR=str(pytriton_dir() / "tritonserver" / "caches"),
               TRITON_EXTRA_ARGS="--allow-gpu-metrics=false")
    with open(tmp_path / "triton.log", "wb") as log:  # the child writes through its own copy of the descriptor
        proc = subprocess.Popen([sys.executable, str(DEPLOY / "entrypoint.py")], env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{http}"
    try:
        deadline = time.monotonic() + 120
        while _get(f"{base}/v2/health/ready") != 200:
            assert proc.poll() is None, (tmp_path / "triton.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "not ready in 120 s"
            time.sleep(0.5)
        assert _get(f"{base}/v2/health/live") == 200
        assert _get(f"{base}/v2/models/clip_text/ready") == 200
        assert _get(f"{base}/v2/repository/index", data=b"{}") in (401, 403)
        assert _get(f"{base}/v2/repository/index", headers={ADMIN_HEADER: "wrong" * 8}, data=b"{}") in (401, 403)
        assert _get(f"{base}/v2/repository/index", headers={ADMIN_HEADER: key}, data=b"{}") == 200
        assert _get(f"http://127.0.0.1:{metrics}/metrics") == 200
        proc.send_signal(signal.SIGTERM)  # the entrypoint exec'd: this is tritonserver itself
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# --- 4. the GPU measurement script, smoke-run on CPU --------------------------------------------------------------
def test_measure_8b_tiny_runs_on_cpu(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "perf" / "gpu" / "measure_8b.py"), "--tiny", "--device", "cpu",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    (path,) = tmp_path.glob("measure_8b-tiny-*.json")
    rep = json.loads(path.read_text())
    assert rep["untrained"] is True and rep["results"]["decoder_device"] == "cpu:float32"
    assert set(rep["results"]["vision"]) == set(rep["results"]["verdict"]) == {"1", "2"}
    for _b, v in rep["results"]["verdict"].items():
        assert v["runs"] == len(v["raw_ms"]) and v["median_ms"] > 0 and v["body_tokens"] > 196
    assert rep["int8_weight_only"]["method"] and rep["int8_weight_only"]["decode"]["1"]["median_ms_per_token"] > 0


def test_a10_projection_arithmetic():
    sys.path.insert(0, str(ROOT / "perf" / "gpu"))
    try:
        import measure_8b as m
    finally:
        sys.path.remove(str(ROOT / "perf" / "gpu"))
    assert m.peaks_for("NVIDIA H100 80GB HBM3") == m.GPU_PEAKS["H100"]
    assert m.peaks_for("NVIDIA H100 PCIe") == m.GPU_PEAKS["H100 PCIe"]
    res = {"vision": {"1": {"median_ms": 2.0}},
           "verdict": {"8": {"median_ms": 40.0, "body_tokens": 220, "questions": 10, "question_tokens_max": 3}},
           "decode": {"1": {"median_ms_per_token": 7.0}}}
    p = m.project(res, m.GPU_PEAKS["H100"], text_params=8_200_000_000, vision_params=580_000_000,
                  weight_bytes_per_param=2.0)["stages"]
    assert p["verdict_b8"]["scaled_ms"] == pytest.approx(40.0 * 989 / 125)
    assert p["decode_b1"]["scaled_ms"] == pytest.approx(7.0 * 3350 / 600)
    # decode can never beat reading 16.4 GB of bf16 weights at 600 GB/s
    assert p["decode_b1"]["a10_ms"] >= 8.2e9 * 2 / 600e9 * 1e3


def test_state_directory_is_a_writable_volume_in_every_deploy():
    """MODERATION_STATE_DIR (the last good policy lists every model process falls back to) is a volume, not the
    read-only root, wherever the models run."""
    text = (DEPLOY / "Dockerfile").read_text()
    assert "MODERATION_STATE_DIR=/var/lib/moderation/state" in text
    assert re.search(r"chown 1000:1000 [^\n]*/var/lib/moderation/state", text)
    svc = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]["triton"]
    state = svc["environment"]["MODERATION_STATE_DIR"]
    assert any(v.split(":")[1] == state and not v.endswith(":ro") for v in svc["volumes"])
    c = next(c for c in _k8s_resources()["deployment.yaml"][0]["spec"]["template"]["spec"]["containers"]
             if c["name"] == "triton")
    state = {e["name"]: e.get("value") for e in c["env"]}["MODERATION_STATE_DIR"]
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == state)
    assert not mount.get("readOnly")
    volumes = {v["name"]: v for v in _k8s_resources()["deployment.yaml"][0]["spec"]["template"]["spec"]["volumes"]}
    assert "emptyDir" in volumes[mount["name"]] or "persistentVolumeClaim" in volumes[mount["name"]]


# --- 5. the gateway's lists editor --------------------------------------------------------------------------------
# What `python -m moderation.ops.lists` (run by the gateway's admin service) reads from its environment, and where
# the models read the same thing: an edit through any pod's gateway must land where every replica's models look.
LISTS_EDITOR_ENV = ("MODERATION_REDIS_URL", "MODERATION_REDIS_PASSWORD_FILE", "MODERATION_LISTS_PREFIX",
                    "MODERATION_POLICY_DIR", "MODERATION_STATE_DIR", "MODERATION_AUDIT_LOG")


def _dockerfile_env(name: str) -> dict[str, str]:
    text = (DEPLOY / name).read_text().replace("\\\n", " ")
    env = {}
    for line in re.findall(r"^ENV (.+)$", text, re.M):
        env.update(dict(pair.split("=", 1) for pair in line.split()))
    return env


def _copied_to(name: str, src: str) -> str:
    """Where a Dockerfile's COPY puts `src` (a COPY from the build context, not from a stage)."""
    text = (DEPLOY / name).read_text().replace("\\\n", " ")
    (dest,) = [line.split()[-1] for line in re.findall(r"^COPY (.+)$", text, re.M) if src in line.split()[:-1]]
    return dest


def test_both_images_keep_the_policies_at_the_path_the_manifests_name():
    """The Triton image and the gateway image hold the same policy files at the same path, their
    MODERATION_POLICY_DIR: the editor checks an edit against what the models judge with, and the state directory's
    lists files are named by that path."""
    policy_dir = _dockerfile_env("Dockerfile")["MODERATION_POLICY_DIR"]
    assert _dockerfile_env("Dockerfile.gateway")["MODERATION_POLICY_DIR"] == policy_dir
    for name in ("Dockerfile", "Dockerfile.gateway"):
        assert _copied_to(name, "moderation/core/policies/").rstrip("/") == policy_dir
    assert "!moderation/core/policies/**" in (DEPLOY / "Dockerfile.gateway.dockerignore").read_text().split()
    gw_image = _dockerfile_env("Dockerfile.gateway")
    assert gw_image["MODERATION_STATE_DIR"] == _dockerfile_env("Dockerfile")["MODERATION_STATE_DIR"]
    assert re.search(r"chown 1000:1000 [^\n]*" + re.escape(gw_image["MODERATION_STATE_DIR"]),
                     (DEPLOY / "Dockerfile.gateway").read_text())


def test_gateway_container_has_what_the_lists_editor_needs():
    """Kubernetes and compose: the gateway container (so its lists editor) names the Triton container's Redis, lists
    prefix, policy directory, state directory and audit log, and mounts them from the same volumes and secret."""
    res = _k8s_resources()
    pod = res["deployment.yaml"][0]["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in pod["containers"]}
    triton, gw = containers["triton"], containers["gateway"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    env = {name: {e["name"]: e.get("value") for e in c["env"]} for name, c in containers.items()}
    for var in LISTS_EDITOR_ENV:
        assert env["gateway"].get(var) == env["triton"].get(var), var
    # the cluster's Redis (redis.yaml), reached by its Service
    by_kind = {d["kind"]: d for d in _docs(K8S / "redis.yaml")}
    svc = by_kind["Service"]
    (port,) = svc["spec"]["ports"]
    assert env["gateway"]["MODERATION_REDIS_URL"] == \
        f"redis://{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc.cluster.local:{port['port']}/0"
    # the Redis password, the state directory and the audit log: the same volume, at the path the env names
    for var in ("MODERATION_REDIS_PASSWORD_FILE", "MODERATION_STATE_DIR", "MODERATION_AUDIT_LOG"):
        path = env["gateway"][var]
        assert _mount_for(gw, path)["name"] == _mount_for(triton, path)["name"], var
    for var in ("MODERATION_STATE_DIR", "MODERATION_AUDIT_LOG"):  # the editor writes both
        assert not _mount_for(gw, env["gateway"][var]).get("readOnly"), var
    state = volumes[_mount_for(gw, env["gateway"]["MODERATION_STATE_DIR"])["name"]]
    assert "emptyDir" in state or "persistentVolumeClaim" in state
    assert _mount_for(gw, env["gateway"]["MODERATION_REDIS_PASSWORD_FILE"]).get("readOnly")
    # the policies: the image's (nothing mounted over them), the path both images keep them at
    policy_dir = env["gateway"]["MODERATION_POLICY_DIR"]
    assert policy_dir == _dockerfile_env("Dockerfile.gateway")["MODERATION_POLICY_DIR"]
    for c in (gw, triton):
        assert not any(policy_dir.startswith(m["mountPath"].rstrip("/") + "/") or m["mountPath"] == policy_dir
                       for m in c["volumeMounts"])
    # the admin key as before: the gateway checks it; the editor never gets it (gateway/admin.py drops it)
    assert _mount_for(gw, env["gateway"]["MODERATION_ADMIN_KEY_FILE"])["name"] == "admin-key"
    # Redis lets the pod in: the gateway shares the Triton container's pod, so its NetworkPolicy peer
    labels = res["deployment.yaml"][0]["spec"]["template"]["metadata"]["labels"]
    peers = [p["podSelector"]["matchLabels"] for rule in by_kind["NetworkPolicy"]["spec"]["ingress"]
             for p in rule.get("from", []) if "podSelector" in p]
    assert any(sel.items() <= labels.items() for sel in peers)

    c = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    svc_triton, svc_gw = c["services"]["triton"], c["services"]["gateway"]
    t_env, g_env = svc_triton["environment"], svc_gw["environment"]
    for var in LISTS_EDITOR_ENV:
        assert g_env.get(var) == t_env.get(var) or (var == "MODERATION_AUDIT_LOG" and var not in g_env), var
    assert g_env["MODERATION_REDIS_URL"] == "redis://redis:6379/0" and "redis" in svc_gw["depends_on"]
    assert {"source": "redis_password", "target": "redis_password"} in svc_gw["secrets"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in svc_gw["volumes"]}
    triton_mounts = {v.split(":")[1]: v.split(":")[0] for v in svc_triton["volumes"]}
    assert mounts[g_env["MODERATION_STATE_DIR"]] == triton_mounts[t_env["MODERATION_STATE_DIR"]]
    assert not any(v.endswith(":ro") for v in svc_gw["volumes"])
    assert g_env["MODERATION_POLICY_DIR"] == _dockerfile_env("Dockerfile.gateway")["MODERATION_POLICY_DIR"]


def test_gateway_image_builds_pdqhash_from_pinned_sources_and_installs_wheels_only():
    text = (DEPLOY / "Dockerfile.gateway").read_text().replace("\\\n", " ")
    pins, build = _pins(DEPLOY / "requirements-gateway.txt"), _pins(DEPLOY / "requirements-gateway-build.txt")
    # the lists editor's dependencies, at the CPU venv's versions (test above), and none of the model runtime
    assert {"pydantic", "pyyaml", "pillow", "numpy", "pdqhash", "redis"} <= set(pins)
    assert not {"torch", "transformers", "onnxruntime", "onnxruntime-gpu", "tritonserver", "tokenizers"} & set(pins)
    assert not any(n.startswith(("nvidia-", "cuda-")) for n in pins)
    (built,) = re.findall(r"pdqhash==(\S+) --hash=sha256:[0-9a-f]{64}", text)
    assert built == pins["pdqhash"]
    assert "--no-build-isolation" in text and "--require-hashes" in text  # nothing unpinned is fetched to build it
    assert build["numpy"] == pins["numpy"] and build["setuptools"] == pins["setuptools"]
    lock = _pins(ROOT / "requirements.lock")
    for name, version in build.items():
        if name in lock:
            assert version == lock[name], f"{name}: gateway build {version} != CPU venv {lock[name]}"
    assert "--only-binary=:all:" in text and "-r /tmp/requirements-gateway.txt" in text
    assert text.count("FROM ${PYTHON_IMAGE}") == 2 and "COPY --from=pdqhash /wheels" in text
    ignore = (DEPLOY / "Dockerfile.gateway.dockerignore").read_text().split()
    assert "!deploy/requirements-gateway-build.txt" in ignore


_EDITOR_WRAPPER = """
import atexit, json, runpy, sys
site, report = sys.argv[1], sys.argv[2]
sys.argv = sys.argv[:1]
sys.path.insert(0, site)
atexit.register(lambda: open(report, "w").write(json.dumps(
    {name: getattr(m, "__file__", None) for name, m in list(sys.modules.items())})))
runpy.run_module("moderation.ops.lists", run_name="__main__", alter_sys=True)
"""


def _image_tree(root: Path) -> Path:
    """The gateway image's package and policies, as its COPY lines lay them out, under `root`: (site, policies)."""
    text = (DEPLOY / "Dockerfile.gateway").read_text().replace("\\\n", " ")
    site = root / "site"
    for line in re.findall(r"^COPY (.+)$", text, re.M):
        *srcs, dest = line.split()
        for src in srcs:
            if not src.startswith("moderation/"):
                continue
            if dest.startswith("/opt/moderation/src/"):
                target = site / dest.removeprefix("/opt/moderation/src/")
            else:
                target = root / dest.lstrip("/")
            if src.endswith("/"):
                shutil.copytree(ROOT / src, target, dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / src, target / Path(src).name)
    return site


def test_gateway_image_runs_the_lists_editor_into_the_clusters_redis(tmp_path, monkeypatch):
    """The editor run from just the files the gateway image copies (no checkout on the path), against a real
    redis-server with a password, as the manifests configure it: it adds an image and a term, shows and removes; it
    loads only package modules of the image and third-party packages requirements-gateway.txt pins (no model
    runtime); and the models' store, in another process, sees every edit from Redis."""
    import base64
    import io
    import sysconfig

    import numpy as np
    from PIL import Image

    from moderation.core import list_store as list_store_module
    from moderation.testing.redis_server import RedisServer

    site = _image_tree(tmp_path / "image")
    policies = tmp_path / "image" / _dockerfile_env("Dockerfile.gateway")["MODERATION_POLICY_DIR"].lstrip("/")
    assert (policies / "default.yaml").exists()
    (tmp_path / "wrapper.py").write_text(_EDITOR_WRAPPER)
    password = tmp_path / "redis_password"
    password.write_text("r" * 32 + "\n")
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(7).random((96, 96, 3)) * 255).astype("uint8")).save(buf, "PNG")

    def edit(env: dict, request: dict) -> tuple[dict, dict]:
        report = tmp_path / "modules.json"
        r = subprocess.run([sys.executable, str(tmp_path / "wrapper.py"), str(site), str(report)], env=env,
                           cwd=tmp_path, input=json.dumps({"request": request, "context": {"via": "test"}}),
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and r.stdout, r.stderr[-3000:]
        return json.loads(r.stdout), json.loads(report.read_text())

    with RedisServer(password="r" * 32) as redis_server:
        env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "MODERATION_REDIS_URL": redis_server.url,
               "MODERATION_REDIS_PASSWORD_FILE": str(password), "MODERATION_REDIS_TIMEOUT_MS": "1000",
               "MODERATION_POLICY_DIR": str(policies), "MODERATION_STATE_DIR": str(tmp_path / "state"),
               "MODERATION_AUDIT_LOG": str(tmp_path / "audit.jsonl")}
        image, modules = edit(env, {"action": "add-image", "policy": "default", "list": "block",
                                    "image_b64": base64.b64encode(buf.getvalue()).decode()})
        assert image["ok"], image
        term, more = edit(env, {"action": "add-term", "policy": "default", "list": "review", "term": "gateway edit"})
        assert term["ok"], term
        modules.update(more)
        shown, _ = edit(env, {"action": "show", "policy": "default"})
        assert shown["ok"] and shown["result"]["store"] == "redis" and shown["result"]["revision"] == 2
        assert [e["id"] for e in shown["result"]["images"]] == [image["result"]["id"]]

        # the models' view: another process's store on the same Redis (the Triton container's environment)
        for name, value in env.items():
            if name.startswith("MODERATION_"):
                monkeypatch.setenv(name, value)
        monkeypatch.setattr(list_store_module, "_STORES", {})
        store = list_store_module.list_store(policies)
        lists, fault = store.current("default", fresh=True)
        assert fault is None and lists.revision == 2
        assert {e.id for e in lists.terms} == {term["result"]["id"]}
        # the editor's last good copy is where the models' processes fall back to (the shared state volume)
        assert list_store_module.PolicyLists.model_validate_json(
            (store.state_path("default")).read_bytes()).revision == 2

        removed, _ = edit(env, {"action": "remove-term", "policy": "default", "id": term["result"]["id"]})
        assert removed["ok"], removed
        assert store.current("default", fresh=True)[0].terms == []
    rows = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [r["action"] for r in rows if r.get("ok")] == ["lists.add-image", "lists.add-term", "lists.show",
                                                            "lists.remove-term"]

    # package modules: only the image's copies
    ours = {n: f for n, f in modules.items() if n.split(".")[0] == "moderation"}
    assert ours and all(f and Path(f).is_relative_to(site) for f in ours.values()), ours
    # third-party: only what requirements-gateway.txt installs (beyond what a bare interpreter start loads)
    bare = subprocess.run([sys.executable, "-c", "import sys, json; print(json.dumps(sorted(sys.modules)))"],
                          capture_output=True, text=True, cwd=tmp_path, env={"PATH": env["PATH"]}, timeout=60)
    baseline = set(json.loads(bare.stdout))
    from importlib.metadata import packages_distributions

    dists = packages_distributions()
    pins = _pins(DEPLOY / "requirements-gateway.txt")
    installed = {Path(sysconfig.get_paths()[k]) for k in ("purelib", "platlib")}
    tops = {n.split(".")[0] for n, f in modules.items()
            if n not in baseline and f and any(Path(f).is_relative_to(d) for d in installed)}
    assert {"pdqhash", "PIL", "pydantic", "yaml", "redis"} <= tops  # what an image and a term edit need
    unpinned = {top: dists.get(top) for top in tops
                if not {d.lower().replace("_", "-") for d in dists.get(top, [])} & set(pins)}
    assert not unpinned, f"imported by the editor but not installed in the gateway image: {unpinned}"
    assert not {"torch", "transformers", "onnxruntime", "tokenizers", "cv2"} & tops

