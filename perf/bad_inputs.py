"""Every case of the bad-input catalogue (moderation/testing/bad_inputs.py) sent to a running server: one line per
case, the error code it must get and the one it got; exit 1 when any differs.

    .venv/bin/python -m perf bad_inputs --url 127.0.0.1:8001
"""
from __future__ import annotations

import argparse

from moderation.testing.bad_inputs import OK, cases, raw_inputs


def main(argv=None) -> int:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    from clients.client import _to_failure

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="127.0.0.1:8001")
    args = ap.parse_args(argv)
    c = grpcclient.InferenceServerClient(args.url)
    bad = 0
    for case in cases():
        try:
            c.infer("moderate", raw_inputs(grpcclient, case, f"catalogue-{case.name}"), client_timeout=60)
            got = OK
        except InferenceServerException as e:
            got = _to_failure(e).code
        bad += got != case.expect
        print(f"{case.name:34s} expect {case.expect:18s} got {got}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
