"""python -m moderation.openai --listen 127.0.0.1:8080 --upstream 127.0.0.1:8001: the OpenAI-compatible
moderation endpoint in front of the audit gateway (started by `make serve` on OPENAI_PORT)."""
from __future__ import annotations

import argparse
import os
import sys

from aiohttp import web

from ..core import memory
from ..core.audit import FAIL_OPEN, AuditLog
from .bounds import FrontEndLimits
from .router import build_app
from .serving import ModerationService


def main(argv: list[str] | None = None) -> int:
    bind = os.environ.get("BIND_ADDRESS", "127.0.0.1")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--listen", default=f"{bind}:{os.environ.get('OPENAI_PORT', '8080')}")
    ap.add_argument("--upstream", default=f"127.0.0.1:{os.environ.get('GRPC_PORT', '8001')}")
    args = ap.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    print(f"openai: POST http://{host}:{port}/v1/moderations -> gRPC {args.upstream}", flush=True)
    memory.tune_allocator()  # 20 MB bodies on their own mappings: memory goes back after a burst
    audit = AuditLog()  # refusals the front end answers itself; the gateway and the models audit the rest
    if audit.mode == FAIL_OPEN:
        audit.start_flusher()
    app = build_app(ModerationService(args.upstream), FrontEndLimits.from_env(), audit)
    web.run_app(app, host=host or "127.0.0.1", port=int(port), print=None, access_log=None, shutdown_timeout=30,
                lingering_time=2.0)  # a refused body is discarded for at most this long, then the connection ends
    return 0


if __name__ == "__main__":
    sys.exit(main())
