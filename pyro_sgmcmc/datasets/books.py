"""Seven public-domain novels as plain text: the continual-learning experiment's tasks.

Jane Austen's six completed novels and Herman Melville's *Moby Dick*, Project Gutenberg
e-texts as packaged for R by janeaustenr 1.0.0 (Julia Silge) and tokenizers 0.3.0
(Lincoln Mullen), both MIT-licensed, taken from the Debian packages
``r-cran-janeaustenr`` 1.0.0-1 and ``r-cran-tokenizers`` 0.3.0-1. The novels are in the
public domain. ``scripts/extract_books.py`` rebuilds the shipped
``data/books/<name>.txt.xz`` files from those packages (and ``--check`` verifies them);
it drops *Moby Dick*'s Project Gutenberg header and licence, the only change to the
texts. Provenance in ``pyro_sgmcmc/datasets/data/README.md``.
"""

from __future__ import annotations

import lzma
import re
from importlib import resources

__all__ = ["BOOKS", "load_books", "split_text", "unwrap_lines"]

BOOKS: dict[str, str] = {
    "sense_and_sensibility": "Sense and Sensibility (Austen, 1811)",
    "pride_and_prejudice": "Pride and Prejudice (Austen, 1813)",
    "mansfield_park": "Mansfield Park (Austen, 1814)",
    "emma": "Emma (Austen, 1815)",
    "northanger_abbey": "Northanger Abbey (Austen, 1817)",
    "persuasion": "Persuasion (Austen, 1817)",
    "moby_dick": "Moby Dick; or, The Whale (Melville, 1851)",
}
"""The books in ``load_books`` order (Austen's in publication order, then Melville):
file name -> title."""


def load_books(names: list[str] | tuple[str, ...] | None = None) -> dict[str, str]:
    """The books' full texts, keyed by name, in the order of ``BOOKS`` (or of ``names``).

    The six Austen novels in publication order (*Northanger Abbey* and *Persuasion* both
    appeared in December 1817, in one set), then *Moby Dick* as the out-of-author task.
    Texts keep the e-texts' line breaks (``"\\n"``) and front matter (title, chapter
    headings); each ends with one newline. Sizes, in characters: Sense and Sensibility
    673,688; Pride and Prejudice 684,768; Mansfield Park 883,279; Emma 883,028;
    Northanger Abbey 433,411; Persuasion 466,854; Moby Dick 1,215,776.

    Args:
        names: a subset of ``BOOKS``' keys, in the order wanted; all seven by default.

    Examples:
        >>> books = load_books(["persuasion"])
        >>> list(books), books["persuasion"][:10]
        (['persuasion'], 'Persuasion')
        >>> list(BOOKS)[-1]
        'moby_dick'
    """
    names = list(BOOKS) if names is None else list(names)
    unknown = [n for n in names if n not in BOOKS]
    if unknown:
        raise ValueError(f"unknown book(s) {unknown}; choose from {list(BOOKS)}")
    folder = resources.files(__package__).joinpath("data", "books")
    return {n: lzma.decompress(folder.joinpath(f"{n}.txt.xz").read_bytes()).decode() for n in names}


def split_text(text: str, held_out: float = 0.15) -> tuple[str, str]:
    """``(train, held_out)``: the text's first ``1 - held_out`` and last ``held_out``
    share of characters, cut at the last line break before the boundary, so no line
    is split (the held-out part is then a little over ``held_out``).

    The held-out end of a book follows its training part, so a model is tested on text
    it has not seen, later in the same book; ``train + held_out == text``.

    Examples:
        >>> train, test = split_text("line one\\nline two\\nline three\\n", held_out=0.5)
        >>> train, test
        ('line one\\n', 'line two\\nline three\\n')
    """
    if not 0.0 < held_out < 1.0:
        raise ValueError(f"held_out must be in (0, 1), got {held_out}")
    cut = round(len(text) * (1.0 - held_out))
    newline = text.rfind("\n", 0, cut)
    cut = newline + 1 if newline >= 0 else cut
    return text[:cut], text[cut:]


def unwrap_lines(text: str) -> str:
    r"""The text with its hard line wraps undone: a single line break inside a paragraph
    becomes a space; blank lines (paragraph breaks) stay.

    The e-texts wrap lines at about 70 characters. A language model fine-tuned on them
    learns to expect a line break mid-sentence, which costs it on one-line statements
    (the Bayesian-LLM experiment's task).

    Examples:
        >>> unwrap_lines("It is a truth\nuniversally acknowledged.\n\nHowever little\nknown")
        'It is a truth universally acknowledged.\n\nHowever little known'
    """
    return re.sub(r"(?<!\n)\n(?!\n)", " ", text)
