r"""A Gaussian with a diagonal precision, a dict shaped like the parameters."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from pyro_sgmcmc.gaussian.base import GaussianPosterior, Params, check_temperature
from pyro_sgmcmc.tree import check_like, flatten

__all__ = ["DiagonalGaussian"]


class DiagonalGaussian(GaussianPosterior):
    r"""A Gaussian with diagonal precision :math:`\Lambda = \mathrm{diag}(\lambda)`.

    Args:
        mean: the mean, a flat parameter dict.
        precision: :math:`\lambda`, a dict shaped like ``mean``, positive.

    Examples:
        >>> q = DiagonalGaussian({"b": torch.tensor(1.0)}, {"b": torch.tensor(4.0)})
        >>> q.variance(), q.penalty({"b": torch.tensor(2.0)})
        ({'b': tensor(0.2500)}, tensor(2.))
    """

    def __init__(self, mean: Mapping[str, Tensor], precision: Mapping[str, Tensor]) -> None:
        check_like(precision, mean, "precision")
        for k, lam in precision.items():
            if not bool(torch.all(lam > 0)):
                raise ValueError(f"precision[{k!r}] must be positive everywhere")
        # Own copies: a posterior must not change when the tensors it came from do (a
        # guide's loc trained further, a module's parameters updated in place).
        self.mean = {k: v.detach().clone() for k, v in mean.items()}
        self.precision = {k: v.detach().clone() for k, v in precision.items()}

    def variance(self) -> Params:
        return {k: lam.reciprocal() for k, lam in self.precision.items()}

    def covariance(self) -> Tensor:
        return torch.diag(flatten(self.precision).reciprocal())

    def precision_matrix(self) -> Tensor:
        return torch.diag(flatten(self.precision))

    def _whitened_to_flat(self, z: Tensor) -> Tensor:
        return z * flatten(self.precision).rsqrt()

    def _mahalanobis(self, delta: Tensor) -> Tensor:
        return (delta.square() * flatten(self.precision)).sum(-1)

    def log_det_precision(self) -> Tensor:
        return flatten(self.precision).log().sum()

    def tempered(self, temperature: float) -> DiagonalGaussian:
        check_temperature(temperature)
        return DiagonalGaussian(self.mean, {k: v / temperature for k, v in self.precision.items()})

    def to_distribution(self) -> torch.distributions.Distribution:
        scale = flatten(self.precision).rsqrt()
        return torch.distributions.Independent(
            torch.distributions.Normal(self._flat_mean(), scale), 1
        )

    def __repr__(self) -> str:
        return f"DiagonalGaussian(num_params={self.num_params})"
