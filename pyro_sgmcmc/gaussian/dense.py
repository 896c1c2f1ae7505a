r"""A Gaussian with a dense :math:`(P, P)` precision and its cached Cholesky factor."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from pyro_sgmcmc.gaussian.base import GaussianPosterior, Params, check_temperature
from pyro_sgmcmc.tree import unflatten

__all__ = ["DenseGaussian"]


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
        check_temperature(temperature)
        return DenseGaussian(self.mean, self.precision / temperature)

    def __repr__(self) -> str:
        return f"DenseGaussian(num_params={self.num_params})"
