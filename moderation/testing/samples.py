"""Sample posts made of real photos that ship inside installed wheels (scikit-image, scikit-learn,
matplotlib), with zh and en captions, several deliberately mismatched with their image."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path


def _pkg_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.origin:
        raise FileNotFoundError(f"package {name} is not installed")
    return Path(spec.origin).parent


@dataclass(frozen=True)
class SamplePost:
    name: str
    image_path: Path
    text: str
    note: str

    def image_bytes(self) -> bytes:
        return self.image_path.read_bytes()


def image_paths() -> dict[str, Path]:
    sk = _pkg_dir("skimage") / "data"
    return {
        "rocket": sk / "rocket.jpg",
        "coffee": sk / "coffee.png",
        "chelsea": sk / "chelsea.png",
        "astronaut": sk / "astronaut.png",
        "hubble": sk / "hubble_deep_field.jpg",
        "coins": sk / "coins.png",
        "horse": sk / "horse.png",
        "gif": sk / "no_time_for_that_tiny.gif",
        "china": _pkg_dir("sklearn") / "datasets" / "images" / "china.jpg",
        "flower": _pkg_dir("sklearn") / "datasets" / "images" / "flower.jpg",
        "grace_hopper": _pkg_dir("matplotlib") / "mpl-data" / "sample_data" / "grace_hopper.jpg",
    }


def sample_posts() -> list[SamplePost]:
    p = image_paths()
    return [
        SamplePost("rocket_en", p["rocket"], "Launch day! So proud of the team 🚀", "matching, en"),
        SamplePost("coffee_zh", p["coffee"], "早安，来杯咖啡☕", "matching, zh"),
        SamplePost("cat_en", p["chelsea"], "My cat judging me again 😂", "matching, en"),
        SamplePost("china_zh", p["china"], "岁月静好", "matching, zh"),
        SamplePost("hubble_scam", p["hubble"], "Buy 10k followers now!! click the link in bio $$$",
                   "mismatch: space photo with a spam caption"),
        SamplePost("coins_scam_zh", p["coins"], "快速致富，私信我领取内部消息", "scam-style caption, zh"),
        SamplePost("hopper_attack", p["grace_hopper"], "she deserved everything that happened to her lol",
                   "mismatch: portrait with a veiled attack"),
        SamplePost("flower_threat", p["flower"], "this is what happens to people like you",
                   "mismatch: flower with a threat"),
        SamplePost("astronaut_mix", p["astronaut"], "Houston 我们有麻烦了 😱🔥", "mixed zh/en/emoji"),
        SamplePost("horse_gif_zh", p["gif"], "今天好开心，哈哈哈", "animated GIF, read frame by frame"),
    ]
