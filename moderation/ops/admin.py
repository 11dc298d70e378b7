"""Model-repository operations through Triton's restricted APIs: status, load, unload, swap (make one
version live, waiting until it is ready) and rollback. Every action is written to the audit log.

Live versions are set by loading the model with a config override whose version_policy names exactly
that version; Triton keeps serving the old version until the new one is ready, then unloads it after its
in-flight requests finish. The chosen versions and their history are kept in `<repository>/.live_versions.json`
so a restarted server comes back with the same versions (moderation/launch/serve.py applies it)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from ..core.audit import AuditLog
from ..core.auth import admin_headers

STATE_FILE = ".live_versions.json"


class AdminError(Exception):
    pass


class RepositoryAdmin:
    def __init__(self, url: str, key: str, repository: Path | None = None, audit: AuditLog | None = None):
        self.client = grpcclient.InferenceServerClient(url)
        self.headers = admin_headers(key, "grpc")
        self.repository = Path(repository) if repository else None
        self.audit = audit or AuditLog()

    # state -----------------------------------------------------------------------------------
    def _state_path(self) -> Path | None:
        return self.repository / STATE_FILE if self.repository else None

    def load_state(self) -> dict:
        p = self._state_path()
        return json.loads(p.read_text(encoding="utf-8")) if p and p.exists() else {}

    def _save_state(self, state: dict) -> None:
        p = self._state_path()
        if p:
            tmp = p.with_suffix(".tmp")
            tmp.write_text(json.dumps(state, indent=2, sort_keys=True), encoding="utf-8")
            tmp.replace(p)

    def _log(self, action: str, **fields) -> None:
        self.audit.write({"stage": "admin", "action": action, **fields})

    # queries ---------------------------------------------------------------------------------
    def status(self) -> list[dict]:
        index = self.client.get_model_repository_index(headers=self.headers, as_json=True).get("models", [])
        out = []
        for m in index:
            ready = False
            if m.get("state") == "READY":
                ready = self.client.is_model_ready(m["name"], m.get("version", ""))
            out.append({"model": m["name"], "version": m.get("version", ""), "state": m.get("state", "UNAVAILABLE"),
                        "reason": m.get("reason", ""), "ready": ready})
        available = {}
        if self.repository:
            for d in sorted(self.repository.iterdir()):
                if (d / "config.pbtxt").exists():
                    versions = (v.name for v in d.iterdir() if v.is_dir() and v.name.isdigit())
                    available[d.name] = sorted(versions, key=int)
        for row in out:
            row["available_versions"] = available.get(row["model"], [])
        return out

    def live_versions(self, model: str) -> list[str]:
        return [r["version"] for r in self.status() if r["model"] == model and r["state"] == "READY"]

    # actions ---------------------------------------------------------------------------------
    def load(self, model: str, versions: list[str] | None = None) -> None:
        t = time.perf_counter()
        try:
            if versions:
                self.client.load_model(model, headers=self.headers, config=self._config_with_versions(model, versions))
            else:
                self.client.load_model(model, headers=self.headers)
        except InferenceServerException as e:
            self._log("load", model=model, versions=versions, ok=False, error=e.message())
            raise AdminError(f"load {model} failed: {e.message()}") from None
        self._log("load", model=model, versions=versions, ok=True, duration_ms=(time.perf_counter() - t) * 1e3)

    def unload(self, model: str) -> None:
        try:
            self.client.unload_model(model, headers=self.headers)
        except InferenceServerException as e:
            self._log("unload", model=model, ok=False, error=e.message())
            raise AdminError(f"unload {model} failed: {e.message()}") from None
        self._log("unload", model=model, ok=True)

    def _config_with_versions(self, model: str, versions: list[str]) -> str:
        cfg = self.client.get_model_config(model, headers=self.headers, as_json=True)["config"]
        cfg["version_policy"] = {"specific": {"versions": [int(v) for v in versions]}}
        return json.dumps(cfg)

    def swap(self, model: str, version: str, timeout: float = 300.0, _record: bool = True) -> dict:
        version = str(version)
        if self.repository and not (self.repository / model / version).is_dir():
            self._log("swap", model=model, to_version=version, ok=False, error="no such version directory")
            raise AdminError(f"{model} has no version {version} in {self.repository}")
        before = self.live_versions(model)
        t = time.perf_counter()
        try:
            self.client.load_model(model, headers=self.headers, config=self._config_with_versions(model, [version]))
            deadline = time.monotonic() + timeout
            while not self.client.is_model_ready(model, version):
                if time.monotonic() > deadline:
                    raise AdminError(f"{model} version {version} not ready after {timeout:.0f}s")
                time.sleep(0.2)
        except (InferenceServerException, AdminError) as e:
            msg = e.message() if isinstance(e, InferenceServerException) else str(e)
            self._log("swap", model=model, from_versions=before, to_version=version, ok=False, error=msg)
            raise AdminError(f"swap {model} -> {version} failed: {msg}") from None
        took = (time.perf_counter() - t) * 1e3
        if _record:
            state = self.load_state()
            entry = state.setdefault(model, {"history": []})
            if before and (not entry["history"] or entry["history"][-1] != before[-1]):
                entry["history"].append(before[-1])
            entry["live"] = version
            self._save_state(state)
        self._log("swap", model=model, from_versions=before, to_version=version, ok=True, duration_ms=took)
        return {"model": model, "from": before, "to": version, "ms": took}

    def rollback(self, model: str, timeout: float = 300.0) -> dict:
        state = self.load_state()
        history = state.get(model, {}).get("history", [])
        if not history:
            raise AdminError(f"no earlier live version of {model} is recorded; nothing to roll back to")
        previous = history.pop()
        result = self.swap(model, previous, timeout, _record=False)
        state[model]["live"] = previous
        self._save_state(state)
        self._log("rollback", model=model, to_version=previous, ok=True)
        return result

    def apply_state(self) -> list[dict]:
        """Bring the recorded live versions back after a restart."""
        return [self.swap(m, e["live"], _record=False) for m, e in self.load_state().items() if e.get("live")]
