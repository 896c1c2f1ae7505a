r"""The interface every Gaussian posterior implements (precision form, over
:func:`~pyro_sgmcmc.tree.flatten` order)."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping

import torch
from torch import Tensor

from pyro_sgmcmc.tree import flatten, unflatten

__all__ = ["GaussianPosterior", "Params", "check_temperature"]

Params = dict[str, Tensor]


class GaussianPosterior(ABC):
    """A Gaussian over a flat parameter dict, in precision form (see the module docs)."""

    mean: Params

    @property
    def num_params(self) -> int:
        """The total number of scalar parameters :math:`P`."""
        return sum(m.numel() for m in self.mean.values())

    @abstractmethod
    def variance(self) -> Params:
        """Marginal variances, a dict shaped like :attr:`mean`."""

    def stddev(self) -> Params:
        """Marginal standard deviations, a dict shaped like :attr:`mean`."""
        return {k: v.sqrt() for k, v in self.variance().items()}

    @abstractmethod
    def covariance(self) -> Tensor:
        """The dense :math:`(P, P)` covariance over :func:`flatten` order."""

    @abstractmethod
    def precision_matrix(self) -> Tensor:
        """The dense :math:`(P, P)` precision over :func:`flatten` order."""

    @abstractmethod
    def _whitened_to_flat(self, z: Tensor) -> Tensor:
        """Map standard normal draws ``(S, P)`` to centred draws ``(S, P)``."""

    @abstractmethod
    def _mahalanobis(self, delta: Tensor) -> Tensor:
        r"""``(..., P) -> (...)``: :math:`\delta^\top \Lambda \delta`."""

    @abstractmethod
    def log_det_precision(self) -> Tensor:
        r""":math:`\log\det\Lambda`."""

    @abstractmethod
    def tempered(self, temperature: float) -> GaussianPosterior:
        r"""The Gaussian :math:`\propto q^{1/T}`: the precision divided by ``temperature``."""

    def _flat_mean(self) -> Tensor:
        return flatten(self.mean)

    def sample(
        self, num_samples: int | None = None, generator: torch.Generator | None = None
    ) -> Params:
        """Draws, a dict of ``(num_samples, *shape)`` (no leading dim if ``None``)."""
        s = 1 if num_samples is None else num_samples
        mu = self._flat_mean()
        z = torch.randn(s, mu.numel(), generator=generator, dtype=mu.dtype, device=mu.device)
        draws = unflatten(mu + self._whitened_to_flat(z), self.mean)
        return {k: v[0] for k, v in draws.items()} if num_samples is None else draws

    def log_prob(self, params: Mapping[str, Tensor]) -> Tensor:
        """Log-density at ``params`` (entries may carry the same leading batch shape)."""
        first = next(iter(self.mean))
        batch_dims = params[first].dim() - self.mean[first].dim()
        delta = flatten(params, batch_dims) - self._flat_mean()
        p = self.num_params
        return 0.5 * (self.log_det_precision() - self._mahalanobis(delta)) - 0.5 * p * math.log(
            2 * math.pi
        )

    def penalty(self, params: Mapping[str, Tensor]) -> Tensor:
        r"""The quadratic penalty :math:`\tfrac12(\theta-\mu)^\top\Lambda(\theta-\mu)`.

        The negative log-density up to a constant: add it to the next task's loss (the
        PyTorch path of continual learning); gradients flow into ``params``.
        """
        return 0.5 * self._mahalanobis(flatten(params) - self._flat_mean())

    def to_distribution(self) -> torch.distributions.Distribution:
        """A ``torch.distributions`` object over the flat vector (event shape ``(P,)``)."""
        return torch.distributions.MultivariateNormal(
            self._flat_mean(), precision_matrix=self.precision_matrix()
        )


def check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 for a Gaussian posterior, got {temperature}")
