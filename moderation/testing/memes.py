"""Memes for tests, benchmarks and the demo: zh / en text drawn on the shipped photos with a CJK font
(Debian's fonts-wqy-microhei, installed by `make setup`), as a meme generator would: a bold line at the top
and/or bottom, white with a black outline."""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from .samples import image_paths

FONT = Path("/usr/share/fonts/truetype/wqy/wqy-microhei.ttc")


@dataclass(frozen=True)
class Meme:
    name: str
    photo: str           # key of samples.image_paths()
    top: str
    bottom: str = ""
    caption: str = "lol"
    note: str = ""

    @property
    def lines(self) -> list[str]:
        return [t for t in (self.top, self.bottom) if t]


def render(meme: Meme, size: tuple[int, int] = (640, 480), quality: int = 92) -> bytes:
    """The meme as JPEG bytes."""
    if not FONT.exists():
        raise FileNotFoundError(f"{FONT} is missing: `apt-get install fonts-wqy-microhei` (make setup does)")
    im = Image.open(image_paths()[meme.photo]).convert("RGB").resize(size, Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(im)
    for text, at_top in ((meme.top, True), (meme.bottom, False)):
        if not text:
            continue
        px = 44
        font = ImageFont.truetype(str(FONT), px)
        while draw.textlength(text, font=font) > size[0] * 0.92 and px > 18:
            px -= 2
            font = ImageFont.truetype(str(FONT), px)
        w = draw.textlength(text, font=font)
        y = int(size[1] * 0.04) if at_top else int(size[1] * 0.96) - px - 6
        draw.text(((size[0] - w) / 2, y), text, font=font, fill="white", stroke_width=3, stroke_fill="black")
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def memes() -> list[Meme]:
    """The meme set: harmless jokes, scams and threats in zh and en, one template with three texts."""
    return [
        Meme("cat_joke_en", "chelsea", "WHEN THE CODE WORKS", "ON THE FIRST TRY", note="harmless, en"),
        Meme("cat_threat_en", "chelsea", "I KNOW WHERE YOU LIVE", "YOU ARE NEXT", note="threat, same template"),
        Meme("cat_slur_en", "chelsea", "GO BACK TO YOUR COUNTRY", "YOU ANIMAL", note="xenophobic, same template"),
        Meme("coffee_joke_zh", "coffee", "周一早上的我", "全靠这杯续命", note="harmless, zh"),
        Meme("scam_ad_zh", "coins", "稳赚不赔 日入过万", "加微信领取内部消息", caption="",
             note="scam ad whose text sits only in the image, zh"),
        Meme("scam_homophone_zh", "coins", "吻赚不赔 日入过万", "加V信 领取内幕", caption="",
             note="the same scam with homophone and letter variants"),
        Meme("rocket_joke_en", "rocket", "ME LEAVING THE MEETING", "THAT COULD HAVE BEEN AN EMAIL", note="harmless"),
        Meme("astronaut_scam_en", "astronaut", "FREE CRYPTO GIVEAWAY", "SEND 1 BTC GET 2 BACK", caption="",
             note="scam ad, en"),
    ]
