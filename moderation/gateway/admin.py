"""The gateway's admin service (`/moderation.Admin/*`, core/admin_rpc.py): operator actions that change the service's
state arrive here, on the public port, instead of editing files on the machine that runs `clients.admin`.

Every call is checked against the admin key the gateway holds (the launcher's inherited pipe, or the mounted secret),
in constant time; a call without it, or with another, is refused `[unauthorized]` (PERMISSION_DENIED) and audited.
Then:
- Feedback: the reviewer's row is written into the service's audit log (the file the models and this gateway append
  to, MODERATION_AUDIT_LOG), where clients.evaluate --audit and the log shipper read it.
- Lists: the edit runs in a child process, `python -m moderation.ops.lists`, with the request on stdin and without
  the admin key in its environment. The child has what an edit needs (the policy code, image decoding and PDQ
  hashing); the gateway process keeps none of the model stack, and an image that crashes a decoder takes down
  only that child. It edits the lists where the models read them (core/list_store.py: Redis shared by every replica
  when MODERATION_REDIS_URL is set, else the state directory; they see an edit within LISTS_POLL_S) under the
  lists' lock and writes the audit row (ok or refused, with its code) into the same audit log. The sidecar image
  carries the editor's code (deploy/Dockerfile.gateway); a gateway installed without it answers `[unavailable]`.
- Versions: with MODERATION_REDIS_URL, `swap` and `rollback` set the model version every replica should serve
  (core/version_store.py; each replica's follower, ops/versions.py, converges to it) and are audited here; `status`
  reads the desired versions and every replica's report. Without Redis the call is refused `[not_clustered]` and
  clients.admin swaps the one server it reaches, as before.
Every failure is a coded gRPC error (`[code] message`, docs/errors.md) and an audit row; no traceback reaches the
caller (the child's goes to this process's log)."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from ..core import admin_rpc
from ..core.audit import AuditLog
from ..core.auth import GRPC_ADMIN_HEADER, without_admin_key
from ..core.errors import AuditUnavailable, ModerationError

if TYPE_CHECKING:
    from ..core.version_store import VersionStore

EDITOR_MODULE = "moderation.ops.lists"
EDITOR_TIMEOUT_S = 120.0
# Edits serialise on the lists' lock anyway; this bounds the child processes (memory of a decoded image each).
EDITORS_AT_ONCE = 2
STATUS = {
    "unauthorized": grpc.StatusCode.PERMISSION_DENIED,
    "bad_request": grpc.StatusCode.INVALID_ARGUMENT,
    "bad_list_entry": grpc.StatusCode.INVALID_ARGUMENT,
    "unknown_policy": grpc.StatusCode.INVALID_ARGUMENT,
    "bad_policy": grpc.StatusCode.FAILED_PRECONDITION,
    "bad_image": grpc.StatusCode.INVALID_ARGUMENT,
    "image_too_large": grpc.StatusCode.INVALID_ARGUMENT,
    "unsupported_image": grpc.StatusCode.INVALID_ARGUMENT,
    "audit_unavailable": grpc.StatusCode.UNAVAILABLE,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
    "not_clustered": grpc.StatusCode.FAILED_PRECONDITION,
}
UNAUTHORIZED = (
    "the admin key is missing or wrong: operator calls need the server's admin key "
    "(MODERATION_ADMIN_KEY or MODERATION_ADMIN_KEY_FILE)"
)


class Failed(Exception):
    """A coded failure of an admin call; `audited`: its row is written already (by the editor)."""

    def __init__(self, code: str, message: str, audited: bool = False):
        super().__init__(message)
        self.code, self.message, self.audited = code, message, audited


class AdminService:
    def __init__(
        self,
        key: str,
        audit: AuditLog,
        observe: Callable[[str, grpc.StatusCode, float], None] | None = None,
        editor: list[str] | None = None,
        timeout_s: float = EDITOR_TIMEOUT_S,
    ):
        self.key, self.audit, self.observe = key, audit, observe
        self.editor = editor or [sys.executable, "-m", EDITOR_MODULE]
        self.timeout_s = timeout_s
        self._slots: asyncio.Semaphore | None = None
        self._versions_store: VersionStore | None = None

    def handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        return {
            admin_rpc.LISTS: self._handler(admin_rpc.LISTS, self._lists),
            admin_rpc.FEEDBACK: self._handler(admin_rpc.FEEDBACK, self._feedback),
            admin_rpc.VERSIONS: self._handler(admin_rpc.VERSIONS, self._versions),
        }

    def _handler(self, method: str, apply: Callable[[dict, dict], Awaitable[dict]]) -> grpc.RpcMethodHandler:
        name = method.rsplit("/", 1)[1]

        async def handler(raw: bytes, context) -> bytes:
            started = time.perf_counter()
            peer = (context.peer() or "")[:256]
            request, bad = None, None
            try:
                request = admin_rpc.decode(raw)
            except ModerationError as e:
                bad = e
            action = admin_rpc.action_name(method, request)
            offered = next((v for k, v in context.invocation_metadata() or () if k == GRPC_ADMIN_HEADER), None)
            try:
                if not admin_rpc.key_matches(offered, self.key):
                    raise Failed("unauthorized", UNAUTHORIZED)
                if bad is not None:
                    raise Failed(bad.code, bad.message)
                assert request is not None  # decode returned it, or set bad
                result = await apply(request, {"via": "gateway", "peer": peer})
            except (Failed, ModerationError) as e:
                failed = e if isinstance(e, Failed) else Failed(e.code, e.message)
                if not failed.audited:
                    await self._write_refusal(action, failed, peer, started)
                status = STATUS.get(failed.code, grpc.StatusCode.INTERNAL)
                self._observe(name, status, started)
                await context.abort(status, f"[{failed.code}] {failed.message}")
            self._observe(name, grpc.StatusCode.OK, started)
            return admin_rpc.encode(result)

        return grpc.unary_unary_rpc_method_handler(handler)

    def _observe(self, name: str, status: grpc.StatusCode, started: float) -> None:
        if self.observe:
            self.observe(name, status, started)

    async def _write_refusal(self, action: str, failed: Failed, peer: str, started: float) -> None:
        row = {
            "stage": "admin",
            "action": action,
            "ok": False,
            "via": "gateway",
            "peer": peer,
            "error": {"code": failed.code, "message": failed.message[:512]},
            "latency_ms": {"total": round((time.perf_counter() - started) * 1e3, 3)},
        }
        try:
            await asyncio.to_thread(self.audit.write, row)
        except Exception as e:  # noqa: BLE001 - counted by the audit log's hook; the caller still hears the refusal
            print(f"gateway: admin audit write failed: {type(e).__name__}", file=sys.stderr, flush=True)

    async def _feedback(self, request: dict, _context: dict) -> dict:
        row = admin_rpc.feedback_row(request)
        try:
            await asyncio.to_thread(self.audit.write, row)
        except AuditUnavailable as e:
            raise Failed(e.code, e.message) from None
        return row

    async def _versions(self, request: dict, context: dict) -> dict:
        call = admin_rpc.versions_request(request)
        store = self._version_store()
        if call["action"] == "status":
            return await asyncio.to_thread(store.status)
        model, by = call["model"], call["operator"] or context["peer"]
        if call["action"] == "swap":
            entry = await asyncio.to_thread(store.set_desired, model, call["version"], by, context["peer"],
                                            call["serving"])
        else:
            entry = await asyncio.to_thread(store.rollback, model, by, context["peer"])
        row = {"stage": "admin", "action": f"versions.{call['action']}", "ok": True, "model": model,
               "version": entry["version"], "from_version": entry["from"], "revision": entry["revision"], "by": by,
               **context}
        try:
            await asyncio.to_thread(self.audit.write, row)
        except AuditUnavailable as e:
            raise Failed(e.code, f"{e.message} (the desired version was set: revision {entry['revision']})") \
                from None
        return {"model": model, **entry}

    def _version_store(self):
        if self._versions_store is None:
            try:
                from ..core.version_store import version_store

                self._versions_store = version_store(os.environ, client_name="moderation-gateway-versions")
            except ImportError:
                raise Failed("unavailable", "this gateway cannot keep cluster versions: the redis client is not "
                             "installed beside it") from None
            if self._versions_store is None:
                # clients.admin asks this before every one-server swap: a question, not a refused change to audit
                raise Failed("not_clustered", "this server keeps no cluster versions (MODERATION_REDIS_URL is not "
                             "set): swap the server itself", audited=True)
        return self._versions_store

    async def _lists(self, request: dict, context: dict) -> dict:
        admin_rpc.lists_request(request)  # shape first: a malformed call never starts an editor
        if self._slots is None:
            self._slots = asyncio.Semaphore(EDITORS_AT_ONCE)
        async with self._slots:
            proc = await asyncio.create_subprocess_exec(
                *self.editor,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=self._editor_env(),
            )
            try:
                out, err = await asyncio.wait_for(
                    proc.communicate(admin_rpc.encode({"request": request, "context": context})), self.timeout_s
                )
            except TimeoutError:
                proc.kill()
                await proc.wait()
                raise Failed("internal", f"the lists editor did not finish within {self.timeout_s:.0f} s") from None
        if err:
            sys.stderr.write(err.decode("utf-8", "replace"))
            sys.stderr.flush()
        try:
            reply = admin_rpc.decode(out)
        except ModerationError:
            reply = None
        if proc.returncode != 0 or not isinstance(reply, dict) or "ok" not in reply:
            if b"No module named" in err:
                raise Failed(
                    "unavailable",
                    f"this gateway cannot edit lists: {EDITOR_MODULE} (the policy code, "
                    "image decoding and hashing) is not installed beside it",
                )
            last = err.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no output"]
            raise Failed(
                "internal",
                f"the lists editor failed ({last[0].split(':', 1)[0][:80]}; exit code "
                f"{proc.returncode}); the gateway's log has its traceback",
            )
        if not reply["ok"]:
            raise Failed(
                str(reply.get("code") or "internal"),
                str(reply.get("message") or ""),
                audited=reply.get("code") != "audit_unavailable",
            )
        return reply["result"]

    @staticmethod
    def _editor_env() -> dict[str, str]:
        """The gateway's environment (audit log, policy directory) without the admin key; the package the gateway
        runs from first on the path, so the editor runs the same code."""
        env = without_admin_key(os.environ)
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
        return env
