"""`python -m perf <scenario> [scenario options]`: run one perf scenario (perf/scenarios.py); `--list` prints them
all; `python -m perf <scenario> --help` shows that scenario's own options."""
from __future__ import annotations

import sys

from perf.scenarios import SCENARIOS, listing


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip() + "\n\n" + listing())
        return 0 if argv else 2
    if argv[0] == "--list":
        print(listing())
        return 0
    name = argv[0].replace("-", "_")
    if name not in SCENARIOS:
        print(f"error: no scenario {argv[0]!r}; `python -m perf --list` names them", file=sys.stderr)
        return 2
    return SCENARIOS[name].run(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
