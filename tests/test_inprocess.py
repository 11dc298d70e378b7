"""perf/inprocess.py runs the same preprocess, read_text, router and result assembly as the server, in one process:
`python -m perf bench` compares the two ("Triton vs in-process"), so the in-process pipeline must judge a post as
the served ensemble does (it once passed the raw upload where read_text and the VLM take preprocess's decoded frames,
and bench failed). Checked on a still photo, a meme with text and an animated GIF, on the gate path and the VLM's."""
from __future__ import annotations

import io
import itertools

import pytest
from PIL import Image

from moderation.testing.calls import options
from moderation.testing.memes import memes, render
from moderation.testing.samples import sample_posts
from tests.conftest import REPO
from tests.test_frames import _animation, _moving_dot


def _gif() -> bytes:
    """A meme whose caption stays while a dot moves over it."""
    base = Image.open(io.BytesIO(render(memes()[0]))).convert("RGB")
    return _animation([_moving_dot(base, i) for i in range(4)])


def _text(result: dict) -> list[str]:
    return [line["text"] for line in (result.get("image_text") or {}).get("lines", [])]


def test_the_in_process_pipeline_judges_a_post_as_the_server_does(client, policy_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("MODERATION_POLICY_DIR", str(policy_dir))
    from perf.inprocess import InProcessPipeline

    pipe = InProcessPipeline(REPO, tmp_path / "inprocess-audit.jsonl")
    photo = sample_posts()[0]
    posts = {"photo": (photo.image_bytes(), photo.text), "meme": (render(memes()[0]), "so true"),
             "gif": (_gif(), "friday")}
    for (name, (image, caption)), policy in itertools.product(posts.items(), ("allow_all", "escalate_all")):
        served = client.moderate(image, caption, policy=policy)
        local = pipe.moderate(image, caption.encode(), options(policy))
        assert local["route"] == served["route"] == ("gate" if policy == "allow_all" else "vlm"), name
        assert local["action"] == served["action"], name
        if policy == "escalate_all":  # the same prompt, frames and decoder: the same verdict
            assert local["scores"].keys() == served["scores"].keys(), name
            for label, score in served["scores"].items():
                assert local["scores"][label] == pytest.approx(score, abs=1e-3), (name, label)
        assert local["gate"]["band"] == served["gate"]["band"], name
        assert local["gate"]["scores"].keys() == served["gate"]["scores"].keys(), name
        for label, score in served["gate"]["scores"].items():
            assert local["gate"]["scores"][label] == pytest.approx(score, abs=1e-3), (name, label)
        assert _text(local) == _text(served), name
        assert ("media" in local) == ("media" in served), name
    assert _text(local) and "media" in local  # the GIF: its frames read, its caption's words found
    assert len((tmp_path / "inprocess-audit.jsonl").read_text(encoding="utf-8").splitlines()) == 2 * len(posts)
