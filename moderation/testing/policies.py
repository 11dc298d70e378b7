"""Policies for tests and benchmarks: the shipped ones under new names with some settings changed, so routes
are forced through thresholds, never per post."""
from __future__ import annotations

from pathlib import Path

import yaml

from ..core.policy import PACKAGE_POLICY_DIR

# The CLIP's routing band (derive_policy's `gate`) of the fixed-route policies: nothing allowed and nothing blocked
# (escalate_all), everything blocked, everything allowed.
FIXED_ROUTES = {"escalate_all": {"allow_below": 0.0, "block_at": 1.01},
                "block_all": {"allow_below": 0.0, "block_at": 0.0},
                "allow_all": {"allow_below": 1.01, "block_at": 1.01}}
ALLOW_ALL_GATE = FIXED_ROUTES["allow_all"]


def derive_policy(directory: Path, name: str, base: str = "default", gate: dict | None = None,
                  cache: dict | None = None, decoder: dict | None = None, bands: dict | None = None,
                  ocr: dict | None = None) -> Path:
    """Write `<directory>/<name>.yaml`: the shipped `base` policy under a new name with some gate, cache, decoder,
    ocr settings and signal bands (`bands`: {signal: {"review": r, "block": b}}, over the policy's own) changed
    (tests and benchmarks force routes through thresholds this way, never per post). `gate` may name the CLIP's
    routing band and open_nsfw's band the older way (allow_below / block_at, nsfw_allow_below / nsfw_block_at):
    they go to signals.clip.route and signals.nsfw_image.band."""
    data = yaml.safe_load((PACKAGE_POLICY_DIR / f"{base}.yaml").read_text(encoding="utf-8"))
    data["name"] = name
    gate = dict(gate or {})
    signals = data.setdefault("signals", {})

    def update(signal: str, key: str, values: dict) -> None:
        if values:
            entry = signals.setdefault(signal, {})
            entry[key] = {**(entry.get(key) or {}), **values}

    update("clip", "route", {k: gate.pop(f) for k, f in (("review", "allow_below"), ("block", "block_at"))
                             if f in gate})
    update("nsfw_image", "band", {k: gate.pop(f) for k, f in (("review", "nsfw_allow_below"),
                                                              ("block", "nsfw_block_at")) if f in gate})
    for signal, band in (bands or {}).items():
        update(signal, "band", band)
    data["gate"].update(gate)
    data.setdefault("cache", {}).update(cache or {})
    data.setdefault("decoder", {}).update(decoder or {})
    data.setdefault("ocr", {}).update(ocr or {})
    path = Path(directory) / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


def write_fixed_route_policies(directory: Path, cache_enabled: bool = False) -> Path:
    """A policy directory for tests and benchmarks: the shipped policies plus `escalate_all` (allow_below 0:
    nothing allowed, block_at 1.01: nothing blocked), `block_all` and `allow_all`. The verdict cache is set
    to `cache_enabled` in every one of them, so repeated sample posts are judged, not served from it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for f in PACKAGE_POLICY_DIR.glob("*.yaml"):
        derive_policy(directory, f.stem, base=f.stem, cache={"enabled": cache_enabled})
    for name, gate in FIXED_ROUTES.items():
        derive_policy(directory, name, gate=gate, cache={"enabled": cache_enabled})
    return directory
