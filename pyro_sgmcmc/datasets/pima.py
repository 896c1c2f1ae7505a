"""The Pima Indians diabetes data (Smith et al., 1988) in two versions, and the Bayesian
logistic regression benchmark model; provenance in ``pyro_sgmcmc/datasets/data/README.md``.
"""

from __future__ import annotations

import csv
from importlib import resources
from typing import NamedTuple

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor

__all__ = ["Dataset", "load_pima", "logistic_regression_model"]


class Dataset(NamedTuple):
    """Covariates ``X`` (N x D), binary response ``y`` (N,), and the column names."""

    X: Tensor
    y: Tensor
    feature_names: list[str]


def _read_csv(name: str) -> tuple[list[str], list[list[str]]]:
    with resources.files(__package__).joinpath("data", name).open(newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def load_pima(
    version: str = "benchmark",
    standardize: bool = True,
    intercept: bool = False,
    dtype: torch.dtype = torch.float32,
) -> Dataset:
    """Load the Pima Indians diabetes data as tensors.

    Args:
        version: ``"benchmark"``, the 768-row file as in R's mlbench (zeros for missing
            values kept, as the Bayesian logistic regression benchmark does), or
            ``"complete"``, the 532 complete cases of R's MASS ``Pima.tr`` + ``Pima.te``.
        standardize: centre each covariate and divide by its population sd.
        intercept: prepend a column of ones (after standardising).
        dtype: floating dtype of ``X`` and ``y``.

    Examples:
        >>> data = load_pima()
        >>> data.X.shape, int(data.y.sum())
        (torch.Size([768, 8]), 268)
    """
    files = {
        "benchmark": ("pima_indians_diabetes.csv", "pos"),
        "complete": ("pima_mass.csv", "Yes"),
    }
    if version not in files:
        raise ValueError(f"version must be one of {sorted(files)}, got {version!r}")
    name, positive = files[version]
    header, rows = _read_csv(name)
    X = torch.tensor([[float(v) for v in r[:-1]] for r in rows], dtype=torch.float64)
    y = torch.tensor([r[-1] == positive for r in rows], dtype=dtype)
    names = header[:-1]
    if standardize:
        X = (X - X.mean(0)) / X.std(0, unbiased=False)
    if intercept:
        X = torch.cat([torch.ones(len(X), 1, dtype=X.dtype), X], dim=1)
        names = ["intercept", *names]
    return Dataset(X.to(dtype), y, names)


def logistic_regression_model(
    X: Tensor,
    y: Tensor | None = None,
    prior_scale: float = 1.0,
    subsample_size: int | None = None,
):
    """Bayesian logistic regression, the Pima benchmark: ``w ~ N(0, prior_scale^2 I)``,
    ``y_i ~ Bernoulli(logits = x_i . w)``, no intercept unless ``X`` has one.

    Written with the idiomatic data plate, so SGMCMC kernels can subsample it (they pin
    the plate's indices themselves); ``subsample_size`` makes the plate subsample on its
    own, as minibatch SVI wants.

    Examples:
        >>> data = load_pima()
        >>> tr = pyro.poutine.trace(logistic_regression_model).get_trace(data.X, data.y)
        >>> tr.nodes["w"]["value"].shape
        torch.Size([8])
    """
    w = pyro.sample("w", dist.Normal(X.new_zeros(X.shape[1]), prior_scale).to_event(1))
    with pyro.plate("data", X.shape[0], subsample_size=subsample_size) as idx:
        return pyro.sample(
            "obs", dist.Bernoulli(logits=X[idx] @ w), obs=None if y is None else y[idx]
        )
