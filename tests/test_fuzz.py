"""Property-based tests of the decoding/normalisation library on arbitrary and mutated bytes: only
ModerationError subclasses escape, within a memory bound (a hang guard catches a call that never returns); declared
bombs are refused before any pixel is decoded; plus a bounded fuzz run
against the live server (every answer a result or a coded error, the server still ready after)."""
from __future__ import annotations

import io
import random
import re
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from moderation.core.errors import ModerationError
from moderation.core.imaging import decode_image
from moderation.core.options import parse_options
from moderation.core.text import decode_caption
from moderation.testing.bad_inputs import gif_claiming, png_claiming

HANG_GUARD_S = 60.0  # per call: only a decoder stuck in a loop takes this long (measured calls take milliseconds)
RSS_GROWTH_LIMIT_MB = 600  # peak RSS may not grow past this over a whole property (40 MP RGB is 120 MB)


def _seed_images() -> list[bytes]:
    out = []
    im = Image.new("RGB", (48, 32), (40, 90, 200))
    for fmt, kw in (("PNG", {}), ("JPEG", {"quality": 80}), ("GIF", {}), ("WEBP", {}), ("BMP", {})):
        buf = io.BytesIO()
        im.save(buf, fmt, **kw)
        out.append(buf.getvalue())
    return out + [png_claiming(64, 64, b"\x00" * (64 * 193)), gif_claiming(64, 64)]


SEEDS = _seed_images()


def _rss_mb(field: str = "VmHWM") -> float:
    """This process's VmHWM (peak RSS since it started or since _reset_peak_rss) or VmRSS (now), in MiB."""
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1)) / 1024


def _reset_peak_rss() -> float:
    """Measure the peak afresh from now (Linux: 5 in clear_refs sets VmHWM to the current RSS) and return the RSS.
    A high-water mark since the process started (ru_maxrss) would hide any growth below the peak an earlier test
    module reached (torch, the decoders of other tests), so the bound could never fail."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _rss_mb("VmRSS")


def _only_coded(fn, data):
    t = time.perf_counter()
    try:
        fn(data)
    except ModerationError as e:
        assert e.code and e.message, e
    elapsed = time.perf_counter() - t
    assert elapsed < HANG_GUARD_S, f"{fn.__name__} took {elapsed:.2f}s on {len(data)} bytes"


@st.composite
def mutated_image(draw):
    """A valid small image of an accepted format with bytes flipped, inserted, cut or header fields rewritten:
    these reach far deeper into the decoders than uniformly random bytes."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "insert", "cut", "dims"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(max_size=64))
        elif op == "cut":
            del data[pos:pos + draw(st.integers(1, 256))]
        elif op == "dims" and len(data) > 24:  # PNG IHDR / GIF screen / BMP header size fields
            at = draw(st.sampled_from([16, 20, 6, 18]))
            data[at:at + 4] = draw(st.binary(min_size=4, max_size=4))
    return bytes(data)


@pytest.fixture(scope="module")
def rss_baseline():
    """Every property below requests it, so the first of them takes it, before any of them has run."""
    return _reset_peak_rss()


def test_the_peak_rss_measure_sees_growth_below_an_earlier_peak():
    """The memory bound can fail: after a reset, 64 MiB touched counts as growth although the process peaked higher
    before (runs before the properties, and before their baseline is taken)."""
    # filled with 1s, so every page is written (zeroed memory from calloc may never be touched)
    earlier = b"\x01" * (256 * 2**20)
    del earlier
    start = _reset_peak_rss()
    block = b"\x01" * (64 * 2**20)
    grown = _rss_mb("VmHWM") - start
    del block
    assert grown >= 60, grown


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=4096))
def test_decode_image_arbitrary_bytes(rss_baseline, data):
    _only_coded(decode_image, data)


@FUZZ
@given(mutated_image())
def test_decode_image_mutated_images(rss_baseline, data):
    _only_coded(decode_image, data)


@FUZZ
@given(st.one_of(st.binary(max_size=20000), st.text(max_size=2000).map(lambda s: s.encode("utf-8", "surrogatepass"))))
def test_decode_caption(rss_baseline, data):
    _only_coded(decode_caption, data)
    try:
        text = decode_caption(data)
    except ModerationError:
        return
    assert "\u200b" not in text and "\x00" not in text and text == text.strip()


@FUZZ
@given(st.one_of(st.binary(max_size=5000), st.text(max_size=5000),
                 st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                              lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=12), c, max_size=4),
                              max_leaves=30).map(lambda v: __import__("json").dumps(v))))
def test_parse_options(rss_baseline, raw):
    _only_coded(parse_options, raw)


def test_deep_nesting_and_bombs_are_coded_and_refused_before_decoding(rss_baseline, monkeypatch):
    for raw in (b"[" * 2000 + b"]" * 2000, "{\"a\":" * 1500 + "1" + "}" * 1500):
        with pytest.raises(ModerationError) as e:
            parse_options(raw)
        assert e.value.code == "bad_options"
    decodes = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decodes.append(self) or None)
    for data in (png_claiming(50000, 50000), png_claiming(16384, 16384), gif_claiming(65535, 65535)):
        with pytest.raises(ModerationError) as e:
            decode_image(data)
        assert e.value.code == "image_too_large"
    assert not decodes  # refused from the header: no pixel decoded


def test_memory_stayed_bounded(rss_baseline):
    """Runs after the properties in this module: the process's peak RSS since before the first of them grew by less
    than the bound."""
    grown = _rss_mb("VmHWM") - rss_baseline
    assert grown < RSS_GROWTH_LIMIT_MB, f"peak RSS grew {grown:.0f} MiB over the properties"


# --- bounded fuzz against the live server -------------------------------------------------------------------
FUZZ_REQUESTS = 60


def _random_payload(rng: random.Random) -> tuple[bytes, bytes, bytes | None]:
    kind = rng.randrange(4)
    seed = bytearray(rng.choice(SEEDS))
    if kind == 0:
        image = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 2048)))
    else:
        for _ in range(rng.randint(0, 4)):
            if seed:
                seed[rng.randrange(len(seed))] = rng.randrange(256)
        image = bytes(seed)
    text = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 64))) if kind == 2 else "fuzz 测试 ok".encode()
    options = None
    if kind == 3:
        options = rng.choice([b"{", b"[]", b'{"policy": 5}', b'{"describe": true}',
                              bytes(rng.randrange(256) for _ in range(20))])
    return image, text, options


def test_live_server_fuzz(triton):
    import numpy as np
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    from clients.client import _to_failure
    from moderation.core.result import validate_result


    rng = random.Random(20261125)
    c = grpcclient.InferenceServerClient(triton.grpc_url)
    codes = {}
    for _i in range(FUZZ_REQUESTS):
        image, text, options = _random_payload(rng)
        inputs = []
        for name, value in (("IMAGE", image), ("TEXT", text), ("OPTIONS", options)):
            if value is not None:
                t = grpcclient.InferInput(name, [1, 1], "BYTES")
                t.set_data_from_numpy(np.array([[value]], dtype=np.object_))
                inputs.append(t)
        try:
            resp = c.infer("moderate", inputs, client_timeout=60)
            validate_result(__import__("json").loads(resp.as_numpy("RESULT").reshape(-1)[0]))
            code = "ok"
        except InferenceServerException as e:
            f = _to_failure(e)
            assert e.status() == "StatusCode.INVALID_ARGUMENT" and f"[{f.code}]" in e.message(), e.message()
            assert f.code in {"bad_image", "image_too_large", "unsupported_image", "bad_text", "bad_options",
                              "unknown_policy"}, f.code
            code = f.code
        codes[code] = codes.get(code, 0) + 1
    assert c.is_server_ready() and c.is_model_ready("moderate")
    assert len(codes) >= 3, codes  # the generator really mixes good, broken and hostile posts
