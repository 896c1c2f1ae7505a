r"""Gaussian posteriors over a flat parameter dict: what Laplace, VI and the EKF return.

A posterior :math:`q(\theta) = \mathcal N(\mu, \Lambda^{-1})` over :func:`flatten`
``(params)`` is stored in *precision* form, because every method here builds a precision
(curvature plus prior precision) and continual learning adds precisions:

.. math::

    \log q(\theta) = -\tfrac12 (\theta - \mu)^\top \Lambda (\theta - \mu)
        + \tfrac12 \log\det\Lambda - \tfrac P2 \log 2\pi .

Two structures share one interface (:class:`GaussianPosterior`):

* :class:`DiagonalGaussian`: :math:`\Lambda` diagonal, a dict shaped like the parameters.
* :class:`DenseGaussian`: :math:`\Lambda` a :math:`(P, P)` matrix over :func:`flatten`
  order, with its Cholesky factor :math:`\Lambda = LL^\top` cached; a draw is
  :math:`\mu + L^{-\top} z`.

Every posterior can be *tempered* (the target :math:`q^{1/T}` has precision
:math:`\Lambda / T`), drawn from with an explicit ``torch.Generator``, turned into a
``torch.distributions`` object over the flat vector, and used as the next episode's prior
(:meth:`GaussianPosterior.penalty` is its negative log-density up to a constant, the
quadratic penalty of Laplace continual learning).

Examples:
    >>> import torch
    >>> q = DiagonalGaussian({"w": torch.zeros(2)}, {"w": torch.tensor([4.0, 1.0])})
    >>> q.stddev()
    {'w': tensor([0.5000, 1.0000])}
    >>> q.sample(3, torch.Generator().manual_seed(0))["w"].shape
    torch.Size([3, 2])
    >>> d = DenseGaussian({"w": torch.zeros(2)}, torch.tensor([[2.0, 1.0], [1.0, 2.0]]))
    >>> d.covariance()
    tensor([[ 0.6667, -0.3333],
            [-0.3333,  0.6667]])
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping

import torch
from torch import Tensor

from pyro_sgmcmc.curvature import _check_like, flatten, unflatten

__all__ = ["DenseGaussian", "DiagonalGaussian", "GaussianPosterior"]

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
        _check_like(precision, mean, "precision")
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
        _check_temperature(temperature)
        return DiagonalGaussian(self.mean, {k: v / temperature for k, v in self.precision.items()})

    def to_distribution(self) -> torch.distributions.Distribution:
        scale = flatten(self.precision).rsqrt()
        return torch.distributions.Independent(
            torch.distributions.Normal(self._flat_mean(), scale), 1
        )

    def __repr__(self) -> str:
        return f"DiagonalGaussian(num_params={self.num_params})"


class DenseGaussian(GaussianPosterior):
    r"""A Gaussian with a full precision matrix :math:`\Lambda = LL^\top`.

    Args:
        mean: the mean, a flat parameter dict.
        precision: :math:`\Lambda`, ``(P, P)`` over :func:`flatten` order, symmetric
            positive definite.

    Examples:
        >>> q = DenseGaussian({"w": torch.zeros(2)}, torch.eye(2) * 4.0)
        >>> q.stddev()
        {'w': tensor([0.5000, 0.5000])}
    """

    def __init__(self, mean: Mapping[str, Tensor], precision: Tensor) -> None:
        self.mean = {k: v.detach().clone() for k, v in mean.items()}
        p = self.num_params
        if precision.shape != (p, p):
            raise ValueError(f"precision must be ({p}, {p}), got {tuple(precision.shape)}")
        precision = precision.detach()
        self.precision = 0.5 * (precision + precision.T)
        chol, info = torch.linalg.cholesky_ex(self.precision)
        if int(info) != 0:
            raise ValueError(
                "precision is not positive definite: add a prior precision (or jitter) "
                "to the curvature"
            )
        self.scale_tril_precision = chol

    def variance(self) -> Params:
        eye = torch.eye(self.num_params, dtype=self.precision.dtype, device=self.precision.device)
        linv = torch.linalg.solve_triangular(self.scale_tril_precision, eye, upper=False)
        return unflatten(linv.square().sum(0), self.mean)

    def covariance(self) -> Tensor:
        return torch.cholesky_inverse(self.scale_tril_precision)

    def precision_matrix(self) -> Tensor:
        return self.precision

    def _whitened_to_flat(self, z: Tensor) -> Tensor:
        # x = L^{-T} z  <=>  L^T x = z; rows are draws, so solve on the transpose.
        return torch.linalg.solve_triangular(self.scale_tril_precision.T, z.T, upper=True).T

    def _mahalanobis(self, delta: Tensor) -> Tensor:
        return ((delta @ self.scale_tril_precision) ** 2).sum(-1)

    def log_det_precision(self) -> Tensor:
        return 2 * self.scale_tril_precision.diagonal().log().sum()

    def tempered(self, temperature: float) -> DenseGaussian:
        _check_temperature(temperature)
        return DenseGaussian(self.mean, self.precision / temperature)

    def __repr__(self) -> str:
        return f"DenseGaussian(num_params={self.num_params})"


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 for a Gaussian posterior, got {temperature}")
