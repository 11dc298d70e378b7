"""python -m moderation.openai --listen 127.0.0.1:8080 --upstream 127.0.0.1:8001: the OpenAI-compatible
moderation endpoint in front of the audit gateway (started by `make serve` on OPENAI_PORT)."""
from __future__ import annotations

import argparse
import os
import sys

from aiohttp import web

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
    web.run_app(build_app(ModerationService(args.upstream)), host=host or "127.0.0.1", port=int(port),
                print=None, access_log=None, shutdown_timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
