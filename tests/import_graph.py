"""What the package's files import, read from their source (ast): for the layering tests (test_layout.py) and the
images' dependency checks (test_deploy.py)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "moderation"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    """Every module of the package by its dotted name."""
    return {module_name(p): p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts}


def imported_names(name: str, path: Path) -> list[str]:
    """Every dotted name module `name` (the file `path`) imports anywhere in its file, lazy imports too, relative
    imports resolved: `from a import b` names both `a` and `a.b` (b may be a module or an attribute)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: list[str] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                base = ".".join(anchor[:len(anchor) - node.level + 1] + ([base] if base else []))
            out += [base] + [f"{base}.{a.name}" for a in node.names]
    return out
