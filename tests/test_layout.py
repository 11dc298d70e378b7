"""The package's shape: one-way dependencies between its folders, no import cycle, a gateway that imports nothing
of the model stack (and an image that copies just what it imports), thin model.py adapters, env read late."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from .import_graph import PKG, ROOT, imported_names, package_modules

# Which folders each folder may import (docs/architecture.md). Everything may import core; core imports no folder.
ALLOWED = {
    "core": set(),
    "ocr": {"core"},
    "gate": {"core", "ocr"},
    "vlm": {"core"},
    "repository": {"core"},
    "serving": {"core", "gate", "ocr", "vlm", "repository"},
    "ops": {"core"},
    "gateway": {"core"},
    "openai": {"core"},
    "launch": {"core", "repository", "ops", "preflight"},
    "preflight": {"core", "repository", "vlm"},
    "testing": {"core", "launch", "repository"},
}
MODEL_STACK = {"torch", "transformers", "onnxruntime", "PIL", "pydantic", "yaml", "numpy", "tokenizers", "peft"}


def _imports(name: str, path: Path, known: dict[str, Path]) -> tuple[set[str], set[str]]:
    """(package modules, external top-level packages) `name` imports anywhere in its file, lazy imports too."""
    inside, outside = set(), set()
    for t in imported_names(name, path):
        if t.split(".")[0] == "moderation":
            if t in known:
                inside.add(t)
        elif t and t != "__future__":
            outside.add(t.split(".")[0])
    inside.discard(name)
    return inside, outside


@pytest.fixture(scope="module")
def graph():
    known = package_modules()
    return {n: _imports(n, p, known) for n, p in known.items()}


def _folder(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and (PKG / parts[1]).is_dir()) else None


def test_every_module_lives_in_a_folder_with_a_stated_role(graph):
    loose = [m for m in graph if m != "moderation" and _folder(m) is None]
    assert not loose, f"modules outside the stage folders: {loose}"
    assert {_folder(m) for m in graph if m != "moderation"} <= set(ALLOWED) | {"serving"}


def test_folders_depend_one_way(graph):
    bad = []
    for module, (inside, _) in graph.items():
        src = _folder(module)
        for dep in inside:
            dst = _folder(dep)
            if src and dst and dst != src and dst not in ALLOWED[src]:
                bad.append(f"{module} -> {dep}")
    assert not bad, "imports against the layering of docs/architecture.md:\n" + "\n".join(sorted(bad))


def test_no_import_cycle(graph):
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for dep in sorted(graph[m][0]):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def _closure(graph, start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        parts = m.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # importing a module runs its packages
        todo += graph[m][0]
    return seen


# The lists editor the gateway runs as a child process (`python -m moderation.ops.lists`, gateway/admin.py) needs the
# policy code (pydantic, yaml), image decoding (PIL, numpy) and PDQ hashing, never the model runtime.
LISTS_EDITOR = "moderation.ops.lists"
MODEL_RUNTIME = {"torch", "transformers", "onnxruntime", "tokenizers", "peft"}


def _gateway_image_copies() -> set[str]:
    """The package files deploy/Dockerfile.gateway copies into its image."""
    dockerfile = (ROOT / "deploy" / "Dockerfile.gateway").read_text().replace("\\\n", " ")
    copied = set()
    for line in re.findall(r"^COPY (.+)$", dockerfile, re.M):
        for src in line.split()[:-1]:
            if src.startswith("moderation/"):
                copied |= {str(p.relative_to(ROOT)) for p in (ROOT / src).rglob("*.py")} if src.endswith("/") \
                    else {src}
    return copied


def test_gateway_imports_nothing_of_the_model_stack_and_its_image_copies_just_that(graph):
    """The gateway process (and the version follower) import none of the model stack; the image copies exactly the
    modules they and the lists editor import, lazy imports included."""
    served = _closure(graph, "moderation.gateway.__main__") | _closure(graph, "moderation.gateway.proxy")
    served |= _closure(graph, "moderation.ops.versions")  # the pod's version follower runs from the same image
    heavy = {m: sorted(graph[m][1] & MODEL_STACK) for m in served if graph[m][1] & MODEL_STACK}
    assert not heavy, heavy
    assert LISTS_EDITOR not in served  # a child process: a decoder crash takes down the editor, not the gateway
    editor = _closure(graph, LISTS_EDITOR)
    runtime = {m: sorted(graph[m][1] & MODEL_RUNTIME) for m in editor if graph[m][1] & MODEL_RUNTIME}
    assert not runtime, runtime
    files = {str(package_modules()[m].relative_to(ROOT)) for m in served | editor}
    copied = _gateway_image_copies()
    assert copied == files, f"copied but not imported: {copied - files}; imported but not copied: {files - copied}"
    ignore = (ROOT / "deploy" / "Dockerfile.gateway.dockerignore").read_text().split()
    allowed = {x[1:] for x in ignore if x.startswith("!moderation/")}
    assert all(f in allowed or any(a.endswith("/**") and f.startswith(a[:-2]) for a in allowed) for f in files)


def test_every_model_py_is_a_thin_adapter():
    for p in sorted((ROOT / "model_repository").glob("*/[0-9]*/model.py")):
        lines = p.read_text().splitlines()
        assert len(lines) <= 30, f"{p}: {len(lines)} lines"


def test_server_config_reads_the_environment_when_built(monkeypatch):
    from moderation.launch.config import ServerConfig

    monkeypatch.setenv("GRPC_PORT", "9101")
    monkeypatch.setenv("MODERATION_GATEWAY", "0")
    assert ServerConfig().grpc_port == 8001  # defaults are plain values
    cfg = ServerConfig.from_env()
    assert cfg.grpc_port == 9101 and cfg.gateway is False
    assert ServerConfig.from_env({"GRPC_PORT": "9102"}, http_port=9103).grpc_port == 9102


def test_the_servers_processes_share_one_state_directory(monkeypatch):
    """Triton (so every python stub) and the front ends get the same MODERATION_STATE_DIR: the checkout's
    build/state unless one is set."""
    from moderation.launch.config import ServerConfig

    monkeypatch.delenv("MODERATION_STATE_DIR", raising=False)
    assert ServerConfig().env()["MODERATION_STATE_DIR"] == str((Path("build") / "state").resolve())
    monkeypatch.setenv("MODERATION_STATE_DIR", "/var/lib/moderation/state")
    assert ServerConfig().env()["MODERATION_STATE_DIR"] == "/var/lib/moderation/state"
