"""Trained signals on the words of a post (caption and image text), computed in preprocess where the text is.

profanity: alt-profanity-check, a linear SVM on TF-IDF of English text trained on offensive / profane language
(MIT). It reads English only and scores insults and profanity, not hate written politely ("go back to your country
you animal" -> 0.06): term lists and the VLM cover that. Scored when the text has enough Latin letters."""
from __future__ import annotations

import functools
import re

PROFANITY = "profanity"
SIGNALS = {PROFANITY: "trained"}  # a released, trained model (no artifact record: it ships inside its wheel)
_LATIN = re.compile(r"[A-Za-z]")
MIN_LATIN_LETTERS = 3


@functools.lru_cache(maxsize=1)
def _profanity():
    from profanity_check import predict_prob  # loads the trained model once per process

    return predict_prob


def text_scores(caption: str, image_text: str) -> dict[str, float]:
    text = " ".join(t for t in (caption, image_text) if t)
    if len(_LATIN.findall(text)) < MIN_LATIN_LETTERS:
        return {}
    return {PROFANITY: float(_profanity()([text])[0])}
