r"""Gaussian posteriors over a flat parameter dict: what Laplace, VI and the EKF return.

A posterior :math:`q(\theta) = \mathcal N(\mu, \Lambda^{-1})` over :func:`flatten`
``(params)`` is stored in *precision* form, because every method here builds a precision
(curvature plus prior precision) and continual learning adds precisions:

.. math::

    \log q(\theta) = -\tfrac12 (\theta - \mu)^\top \Lambda (\theta - \mu)
        + \tfrac12 \log\det\Lambda - \tfrac P2 \log 2\pi .

Three structures share one interface (:class:`GaussianPosterior`, in
:mod:`~pyro_sgmcmc.gaussian.base`):

* :class:`DiagonalGaussian`: :math:`\Lambda` diagonal, a dict shaped like the parameters.
* :class:`DenseGaussian`: :math:`\Lambda` a :math:`(P, P)` matrix over :func:`flatten`
  order, with its Cholesky factor :math:`\Lambda = LL^\top` cached; a draw is
  :math:`\mu + L^{-\top} z`.
* :class:`KFACGaussian` (:mod:`~pyro_sgmcmc.gaussian.kronecker`): Kronecker-factored
  per layer, diagonal elsewhere (K-FAC Laplace).

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

from pyro_sgmcmc.gaussian.base import GaussianPosterior, check_temperature
from pyro_sgmcmc.gaussian.dense import DenseGaussian
from pyro_sgmcmc.gaussian.diagonal import DiagonalGaussian
from pyro_sgmcmc.gaussian.kronecker import (
    KFACBlock,
    KFACGaussian,
    PriorPrecision,
    blocks_from_factors,
)

__all__ = [
    "DenseGaussian",
    "DiagonalGaussian",
    "GaussianPosterior",
    "KFACBlock",
    "KFACGaussian",
    "PriorPrecision",
    "blocks_from_factors",
    "check_temperature",
]
