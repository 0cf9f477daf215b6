"""Cleaning titles and descriptions into short natural captions, and class names into folder-safe names."""

from __future__ import annotations

import functools
import gzip
import html
import re
import unicodedata
from pathlib import Path

_ARTICLES = {"a", "an", "the", "some", "two", "three", "four", "five", "six", "many", "several"}
_STOP = {"a", "an", "the", "of", "and", "or", "with", "in", "on", "at", "for", "to", "by", "from", "s"}
_CLIPART_BY = re.compile(r"^\s*clip\s*art\s+by\s+[^-]+-\s*", re.I)


@functools.cache
def english_words() -> frozenset[str]:
    """Whole words of the CLIP BPE vocabulary (open_clip's file): a ~34k-word list of common English words."""
    import open_clip

    path = Path(open_clip.__file__).resolve().parent / "bpe_simple_vocab_16e6.txt.gz"
    words = set()
    with gzip.open(path, "rt", encoding="utf-8") as f:
        next(f)
        for i, line in enumerate(f):
            if i >= 49152 - 256 - 2:
                break
            parts = line.split()
            if len(parts) == 2 and parts[1].endswith("</w>"):
                words.add(parts[0] + parts[1][:-4])
    return frozenset(words)


def ascii_fold(text: str) -> str:
    """Unicode to plain ASCII: accents dropped, curly quotes straightened, other symbols removed."""
    text = text.replace("\u2019", "'").replace("\u2018", "'").replace("\u201c", '"').replace("\u201d", '"')
    text = text.replace("\u2013", "-").replace("\u2014", "-")
    text = unicodedata.normalize("NFKD", text)
    return text.encode("ascii", "ignore").decode("ascii")


def normalize_classname(name: str) -> str:
    """A class name as lowercase ASCII with only [a-z0-9 '-] (e.g. 'piñata' -> 'pinata', 'A: B' -> 'a b')."""
    s = ascii_fold(html.unescape(name)).lower()
    s = re.sub(r"[^a-z0-9 '\-]+", " ", s)
    s = re.sub(r"\s*-\s*", lambda m: "-" if m.group(0) == "-" else " ", s)
    return re.sub(r"\s+", " ", s).strip(" -'")


def with_article(phrase: str) -> str:
    """'red apple' -> 'a red apple', 'owl' -> 'an owl'; phrases that already start with a determiner,
    a number or look plural are kept as they are."""
    words = phrase.split()
    if not words:
        return phrase
    first, last = words[0], words[-1]
    if first in _ARTICLES or first.isdigit():
        return phrase
    if len(words) == 1 and last.endswith("s") and not last.endswith(("ss", "us", "is")):
        return phrase
    return ("an " if first[0] in "aeiou" else "a ") + phrase


def _split_words(text: str) -> list[str]:
    text = re.sub(r"([a-z])([A-Z])", r"\1 \2", text)  # camelCase
    text = ascii_fold(html.unescape(text)).lower()
    text = re.sub(r"\([^)]*\)|\[[^\]]*\]", " ", text)
    return [w.strip("'") for w in re.split(r"[^a-z0-9']+", text) if w.strip("'")]


def is_english(words: list[str], min_frac: float = 0.6) -> bool:
    """At least `min_frac` of the words are common English words, one of them a content word of 3+ letters."""
    vocab = english_words()
    long_words = [w for w in words if len(w) >= 3] or words
    known = [w for w in long_words if w in vocab]
    return (bool(words) and len(known) >= min_frac * len(long_words)
            and any(w not in _STOP and len(w) >= 3 for w in known))


def clean_title(title: str, max_words: int = 10) -> str | None:
    """A clip-art title as a caption ('Red Apple' -> 'a red apple'); None when it is garbage or not English."""
    title = _CLIPART_BY.sub("", title or "")
    words = [w for w in _split_words(title) if not any(c.isdigit() for c in w)]
    words = [w for w in words if len(w) > 1 or w in ("a", "i")]
    if not words or len(words) > max_words or not is_english(words):
        return None
    return with_article(" ".join(words))


def clean_filename(stem: str, author: str = "") -> str | None:
    """A caption from a clip-art file name ('big_house_01' -> 'a big house'); author name parts and
    trailing numbers or unknown words (usually author tags) are dropped; None when nothing usable is left."""
    words = [w for w in _split_words(stem.replace("_", " ")) if not any(c.isdigit() for c in w)]
    author_words = [w for w in _split_words(author) if len(w) > 1]
    vocab = english_words()
    words = [w for w in words if len(w) > 1 and not any(a.startswith(w) for a in author_words)]
    while words and words[-1] not in vocab:
        words.pop()
    if not words or len(words) > 8 or not is_english(words):
        return None
    return with_article(" ".join(words))


def clean_sentence(text: str, max_words: int = 16) -> str | None:
    """A short English description ('A “Sierra Beauty” apple.') as a caption ('a sierra beauty apple')."""
    s = ascii_fold(html.unescape(text or "")).lower().replace('"', "").strip()
    s = re.sub(r"\s+", " ", s).strip(" .!?:;,")
    words = re.findall(r"[a-z']+", s)
    if not words or len(s.split()) > max_words or not is_english(words, 0.5):
        return None
    return s
