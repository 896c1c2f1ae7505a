"""Effective-sample-size helpers shared by the experiments and the benchmarks."""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

__all__ = ["min_bulk_ess"]


def min_bulk_ess(draws: Tensor) -> float:
    """The smallest bulk ESS (arviz, rank-normalised) over the coordinates of one chain
    of draws ``(num_draws, dim)``; NaN with fewer than 4 draws.

    Examples:
        >>> x = torch.randn(200, 2, generator=torch.Generator().manual_seed(0))
        >>> min_bulk_ess(x) > 100
        True
    """
    import arviz as az

    if draws.shape[0] < 4:
        return math.nan
    x = draws.detach().to(torch.float64).cpu().numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(min(az.ess(x[None, :, i], method="bulk") for i in range(x.shape[1])))
