"""Variant-proof term matching (moderation/core/terms.py) without a server: every evasion kind is caught with
its span in the text as written, the benign zh / en set matches nothing, and 10 000 terms are matched in one
pass per view."""
from __future__ import annotations

import random

import pytest

from moderation.core.terms import TermMatcher
from moderation.testing.texts import BENIGN, EN_TERMS, ZH_TERMS, homophone_pool, variants

ENTRIES = [(f"t{i}", t) for i, t in enumerate(ZH_TERMS + EN_TERMS)]
MATCHER = TermMatcher(ENTRIES)


@pytest.mark.parametrize("written,term,variant", [
    ("赌博", "赌博", "exact"), ("赌 博", "赌博", "separator"), ("赌.博", "赌博", "separator"),
    ("赌💰博", "赌博", "separator"), ("赌\u200b博", "赌博", "separator"), ("賭博", "赌博", "normalized"),
    ("堵博", "赌博", "homophone"), ("du博", "赌博", "homophone"), ("吻赚不赔", "稳赚不赔", "homophone"),
    ("加V信", "加微信", "letter"), ("fr33 m0ney", "free money", "leetspeak"), ("$cam", "scam", "leetspeak"),
    ("ＳＣＡＭ", "scam", "normalized"), ("s c a m", "scam", "separator"), ("SCAM", "scam", "exact"),
])
def test_every_variant_kind_is_caught_with_its_span(written, term, variant):
    text = f"看 {written} 了"
    hits = [h for h in MATCHER.match(text) if dict(ENTRIES)[h.entry_id] == term]
    assert hits and hits[0].variant == variant, MATCHER.match(text)
    start, end = hits[0].span
    assert text[start:end] == written


def test_generated_variants_are_found_and_the_benign_set_matches_nothing():
    rng, sounds = random.Random(3), homophone_pool()
    found = []
    for entry_id, term in ENTRIES:
        for text in variants(term, rng, sounds).values():
            found.append(any(h.entry_id == entry_id for h in MATCHER.match(f"look {text} now")))
    assert sum(found) / len(found) >= 0.95
    assert [t for t in BENIGN if MATCHER.match(t)] == []
    assert MATCHER.match("I love scampi") == []  # short Latin terms match whole words only


def test_ten_thousand_terms_are_found_where_written_by_one_automaton_per_view():
    """A policy's scale: every sampled term of 10 000 is found with its span, and a post is read once per view (one
    Aho-Corasick automaton each, holding every term's forms), not once per term. The cost per post is measured in
    perf/ocr_bench.py (perf/results/ocr.json)."""
    rng = random.Random(1)
    alphabet = "的一是不了人我在有他这为之大来以个中上们到说国和地也子时道出要于就下得可你年生"
    terms = [(f"b{i}", "".join(rng.choice(alphabet) for _ in range(rng.randint(2, 5)))) for i in range(10_000)]
    m = TermMatcher(terms)
    assert m.size == 10_000 and set(m.autos) == {"compact", "pinyin", "letter"}
    assert len(m.autos["compact"]) == len({term for _, term in terms})  # every distinct term, each form once
    for entry_id, term in rng.sample(terms, 200):
        text = f"看 {term} 了"
        hits = [h for h in m.match(text) if h.entry_id == entry_id]
        assert hits and text[slice(*hits[0].span)] == term, (term, m.match(text))
