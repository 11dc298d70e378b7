"""One-off studies: each measured something once to set a constant or settle a design (the comment beside the
constant names its study); rerun one with `python -m perf <study>` when what it measured changes."""
