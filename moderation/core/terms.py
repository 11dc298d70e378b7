"""Variant-proof term matching: a policy's term lists against a caption or the text drawn in an image.

Evasions it undoes, each reported as the hit's `variant`:
  exact        the term as written (case aside)
  normalized   NFKC (full-width letters, compatibility forms) and traditional -> simplified Chinese (OpenCC)
  separator    zero-width characters, spaces, punctuation or emoji between the characters (赌 博, 赌.博, 赌💰博,
               s c a m); OCR also drops the spaces between English words, so matching ignores them
  leetspeak    digits and symbols standing for letters inside a Latin word (fr33, $cam, h4te)
  homophone    the same toneless pinyin (堵博 / du博 for 赌博, 吻赚不赔 for 稳赚不赔)
  letter       one Latin letter standing for a syllable (加V信 for 加微信: a syllable's initial, or v for wei)

Every view keeps, per character, the index of the original character it came from, so a hit reports its span in
the text as sent. One Aho-Corasick automaton per view (pyahocorasick), built once per policy lists revision:
matching costs a pass over the text per view, whatever the number of terms."""
from __future__ import annotations

import functools
import unicodedata
from dataclasses import dataclass

LEET = {"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "8": "b", "$": "s", "@": "a", "!": "i",
        "|": "l", "€": "e"}
# Letters that stand for a syllable they do not start with, as written in Chinese chat (v = 微 in 加V信).
LETTER_ALIASES = {"v": ("wei",), "q": ("qun",)}
SHORT_LATIN = 5
VARIANT_ORDER = ("exact", "normalized", "separator", "leetspeak", "homophone", "letter")
_INVISIBLE = {"\u200b", "\u200c", "\u200d", "\u200e", "\u200f", "\u2060", "\u2061", "\u2062", "\u2063", "\u2064",
              "\ufeff", "\u00ad", "\u202a", "\u202b", "\u202c", "\u202d", "\u202e"}


@functools.lru_cache(maxsize=1)
def _t2s():
    from opencc import OpenCC

    return OpenCC("t2s")


@functools.lru_cache(maxsize=65536)
def _fold_char(ch: str) -> str:
    """One character as matching compares it: NFKC, case-folded, simplified; "" for an invisible one."""
    if ch in _INVISIBLE:
        return ""
    out = unicodedata.normalize("NFKC", ch).casefold()
    return _t2s().convert(out) if any(_is_cjk(c) for c in out) else out


@functools.lru_cache(maxsize=65536)
def _syllable(ch: str) -> str:
    from pypinyin import lazy_pinyin

    return lazy_pinyin(ch)[0].lower()


def _is_cjk(ch: str) -> bool:
    return "\u3400" <= ch <= "\u9fff" or "\uf900" <= ch <= "\ufaff"


def _is_separator(ch: str) -> bool:
    return unicodedata.category(ch)[0] in "ZPSC"


@dataclass(frozen=True)
class View:
    """A rewritten text and, per character, the index of the original character it came from."""
    text: str
    origin: tuple[int, ...]


def folded(text: str) -> View:
    chars, origin = [], []
    for i, ch in enumerate(text):
        for c in _fold_char(ch):
            chars.append(c)
            origin.append(i)
    return View("".join(chars), tuple(origin))


def compact(view: View, leet: bool = False) -> View:
    """Separators dropped; with `leet`, digits and symbols inside a Latin word read as the letters they stand for."""
    text, chars, origin = view.text, [], []
    for k, c in enumerate(text):
        if leet and c in LEET and _in_latin_word(text, k):
            c = LEET[c]
        elif _is_separator(c):
            continue
        chars.append(c)
        origin.append(view.origin[k])
    return View("".join(chars), tuple(origin))


def _in_latin_word(text: str, k: int) -> bool:
    """A leet character counts inside a word: a Latin letter on either side, past other leet characters."""
    for step in (-1, 1):
        j = k + step
        while 0 <= j < len(text) and text[j] in LEET:
            j += step
        if 0 <= j < len(text) and text[j].isascii() and text[j].isalpha():
            return True
    return False


def _word_char(text: str, i: int) -> bool:
    return 0 <= i < len(text) and text[i].isascii() and text[i].isalnum()


def pinyin(view: View) -> View:
    """CJK characters as their toneless pinyin; everything else as it is (compact views only)."""
    chars, origin = [], []
    for c, o in zip(view.text, view.origin, strict=True):
        syllable = _syllable(c) if _is_cjk(c) else c
        chars += list(syllable)
        origin += [o] * len(syllable)
    return View("".join(chars), tuple(origin))


def term_forms(term: str) -> dict[str, set[str]]:
    """The patterns of one term per view: its compact form (exact / normalized / separator / leetspeak views) and,
    for a term with Chinese characters, its pinyin and its one-letter-per-syllable variants."""
    base = compact(folded(term)).text
    forms = {"compact": {base} if base else set(), "pinyin": set(), "letter": set()}
    syllables = [_syllable(c) if _is_cjk(c) else c for c in base]
    if sum(_is_cjk(c) for c in base) >= 2:
        forms["pinyin"].add("".join(syllables))
        for i, s in enumerate(syllables):
            if _is_cjk(base[i]):
                letters = {s[0]} | {k for k, v in LETTER_ALIASES.items() if s in v}
                forms["letter"] |= {"".join(syllables[:i]) + x + "".join(syllables[i + 1:]) for x in letters}
    return forms


@dataclass(frozen=True)
class TermHit:
    entry_id: str
    variant: str
    span: tuple[int, int]  # [start, end) in the original text


class TermMatcher:
    """Every entry's forms in three automata: compact text (leet-read too), pinyin, letter variants."""

    def __init__(self, entries: list[tuple[str, str]]):
        import ahocorasick

        self.size = len(entries)
        self.autos = {}
        # Short Latin terms ("scam", "hate") match whole words only: "scampi" is not a scam. Longer ones match
        # inside runs of letters too, because OCR drops the spaces between words ("YOUANIMAL").
        self.whole_word = {entry_id for entry_id, term in entries
                           if (c := compact(folded(term)).text).isascii() and len(c) <= SHORT_LATIN}
        for view in ("compact", "pinyin", "letter"):
            auto = ahocorasick.Automaton()
            for entry_id, term in entries:
                for form in term_forms(term)[view]:
                    _, ids = auto.get(form, (form, ()))
                    auto.add_word(form, (form, (*ids, entry_id)))
            if len(auto):
                auto.make_automaton()
                self.autos[view] = auto

    def _scan(self, view: str, v: View) -> list[tuple[str, int, int]]:
        auto = self.autos.get(view)
        if auto is None or not v.text:
            return []
        out = []
        for end, (form, ids) in auto.iter(v.text):
            start = end - len(form) + 1
            out += [(entry_id, v.origin[start], v.origin[end] + 1) for entry_id in ids]
        return out

    def match(self, text: str) -> list[TermHit]:
        """One hit per entry found, with the most direct variant it was found as."""
        if not text or not self.autos:
            return []
        fold = folded(text)
        plain = compact(fold)
        best: dict[str, TermHit] = {}

        def keep(entry_id: str, variant: str, start: int, end: int) -> None:
            if entry_id in self.whole_word and (_word_char(text, start - 1) or _word_char(text, end)):
                return
            old = best.get(entry_id)
            if old is None or VARIANT_ORDER.index(variant) < VARIANT_ORDER.index(old.variant):
                best[entry_id] = TermHit(entry_id, variant, (start, end))

        lowered = text.casefold()
        for entry_id, start, end in self._scan("compact", plain):
            span = text[start:end]
            if lowered[start:end] == compact(folded(span)).text and not any(_is_separator(c) for c in span):
                variant = "exact"
            elif any(_is_separator(c) or c in _INVISIBLE for c in span):
                variant = "separator"
            else:
                variant = "normalized"
            keep(entry_id, variant, start, end)
        for entry_id, start, end in self._scan("compact", compact(fold, leet=True)):
            keep(entry_id, "leetspeak", start, end)
        sounds = pinyin(plain)
        for entry_id, start, end in self._scan("pinyin", sounds):
            keep(entry_id, "homophone", start, end)
        for entry_id, start, end in self._scan("letter", sounds):
            keep(entry_id, "letter", start, end)
        return sorted(best.values(), key=lambda h: h.span)
