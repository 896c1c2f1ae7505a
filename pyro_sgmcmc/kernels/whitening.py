r"""The affine map in which the kernels run their samplers.

The kernels do not hand the sampler the model's unconstrained sites :math:`\theta`
but whitened coordinates :math:`z`,

.. math::

    \theta = \mu + L z, \qquad L L^\top = D,

with :math:`D` the preconditioner (the inverse mass matrix) and :math:`\mu` a shift
(the mode found during warm-up). A constant :math:`D` leaves every SGMCMC target
invariant (Ma, Chen & Fox, 2015), and running the sampler on :math:`z` with identity
mass is the same as running it on :math:`\theta` with mass :math:`D^{-1}`: the
gradient becomes :math:`L^\top \nabla_\theta U` and the injected noise
:math:`L\xi` in :math:`\theta`. So a diagonal and a dense mass matrix (NUTS's
``full_mass``) are one mechanism, and the sampler steps stay elementwise.

:math:`D` is in per-datum units: for a Gaussian posterior at temperature :math:`T`,
:math:`D = (N/T)\,\mathrm{Cov}[\theta]` is the inverse Hessian of the per-datum
potential, so that :math:`z` has unit curvature and step sizes are relative to it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from pyro_sgmcmc.tree import flatten, unflatten


class Whitening:
    """:math:`\\theta = \\mu + L z` over a dict of sites, diagonal or dense.

    Args:
        like: one chain's parameters (site shapes, dtype, device).
        shift: :math:`\\mu`, shape ``(d,)``.
        scale: :math:`L`: ``(d,)`` for a diagonal map, ``(d, d)`` for a dense one.
        inv_scale: :math:`L^{-1}` of a dense ``scale`` (computed when ``None``).

    Examples:
        >>> import torch
        >>> w = Whitening.from_precision({"x": torch.zeros(2)}, torch.zeros(2),
        ...                              torch.tensor([[4.0, 0.0], [0.0, 0.25]]))
        >>> w.to_params(torch.ones(2))["x"]
        tensor([0.5000, 2.0000])
        >>> w.to_z({"x": torch.tensor([0.5, 2.0])})
        tensor([1., 1.])
    """

    def __init__(
        self,
        like: dict[str, Tensor],
        shift: Tensor,
        scale: Tensor,
        inv_scale: Tensor | None = None,
    ) -> None:
        self.like = {k: torch.zeros_like(v) for k, v in like.items()}
        self.shift = shift
        self.scale = scale
        self.dense = scale.dim() == 2
        if self.dense and inv_scale is None:
            inv_scale = torch.linalg.inv(scale)
        self.inv_scale = inv_scale

    # ------------------------------------------------------------------ constructors
    @classmethod
    def identity(cls, like: dict[str, Tensor]) -> Whitening:
        """:math:`z = \\theta` (no preconditioning)."""
        flat = flatten(like)
        return cls(like, torch.zeros_like(flat), torch.ones_like(flat))

    @classmethod
    def from_precision(
        cls, like: dict[str, Tensor], shift: Tensor, precision: Tensor, floor: float = 1e-8
    ) -> Whitening:
        r"""Whitening for the curvature ``precision`` (per datum): :math:`D = H^{-1}`.

        A dense :math:`H` is symmetrised and its eigenvalues replaced by
        :math:`\max(|\lambda|, \text{floor}\cdot\max|\lambda|)`, so a saddle or a flat
        direction still gives a valid (positive-definite) mass matrix:
        :math:`L = Q \Lambda^{-1/2}`, :math:`L^{-1} = \Lambda^{1/2} Q^\top`.
        """
        if precision.dim() == 1:
            h = precision.abs()
            h = torch.clamp(h, min=float(h.max()) * floor + torch.finfo(h.dtype).tiny)
            return cls(like, shift, h.rsqrt())
        sym = 0.5 * (precision + precision.T)
        evals, evecs = torch.linalg.eigh(sym)
        lam = evals.abs()
        lam = torch.clamp(lam, min=float(lam.max()) * floor + torch.finfo(lam.dtype).tiny)
        return cls(like, shift, evecs * lam.rsqrt(), (evecs * lam.sqrt()).T)

    @classmethod
    def from_covariance(
        cls, like: dict[str, Tensor], shift: Tensor, cov: Tensor, floor: float = 1e-8
    ) -> Whitening:
        """Whitening with :math:`D =` ``cov`` (``(d,)`` variances or a ``(d, d)`` matrix)."""
        if cov.dim() == 1:
            c = torch.clamp(cov, min=float(cov.max()) * floor + torch.finfo(cov.dtype).tiny)
            return cls(like, shift, c.sqrt())
        return cls.from_precision(like, shift, _pinv_sym(cov, floor), floor)

    # ------------------------------------------------------------------ maps
    def to_flat(self, z: Tensor) -> Tensor:
        """:math:`\\theta = \\mu + L z` as one ``(..., d)`` tensor."""
        return (z @ self.scale.T if self.dense else z * self.scale) + self.shift

    def to_params(self, z: Tensor) -> dict[str, Tensor]:
        """:math:`\\theta = \\mu + L z` as a dict (leading dims of ``z`` kept)."""
        return unflatten(self.to_flat(z), self.like)

    def to_z(self, params: dict[str, Tensor]) -> Tensor:
        """:math:`z = L^{-1}(\\theta - \\mu)`, ``(..., d)``."""
        flat = self.flatten(params) - self.shift
        return flat @ self.inv_scale.T if self.dense else flat / self.scale

    def flatten(self, params: dict[str, Tensor]) -> Tensor:
        """The sites as one ``(..., d)`` tensor (leading chain/batch dims kept)."""
        first = next(iter(params))
        lead = params[first].dim() - self.like[first].dim()
        return flatten({k: params[k] for k in self.like}, batch_dims=lead)

    def grad_to_z(self, grads: dict[str, Tensor] | Tensor) -> Tensor:
        """:math:`L^\\top \\nabla_\\theta`: gradients (or per-example rows) in ``z``."""
        g = grads if isinstance(grads, Tensor) else self.flatten(grads)
        return g @ self.scale if self.dense else g * self.scale

    def inverse_mass(self) -> dict[str, Tensor] | Tensor:
        """:math:`D = L L^\\top`: per-site diagonals, or the dense ``(d, d)`` matrix."""
        if self.dense:
            return self.scale @ self.scale.T
        return unflatten(self.scale.square(), self.like)

    def rotated(self, q: Tensor) -> Whitening:
        """The same :math:`D` with :math:`L Q` (``q`` orthogonal): :math:`z' = Q^\top z`."""
        return Whitening(self.like, self.shift, self.scale @ q, q.T @ self.inv_scale)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"shift": self.shift, "scale": self.scale, "inv_scale": self.inv_scale}

    @classmethod
    def from_state_dict(cls, like: dict[str, Tensor], state: dict[str, Any]) -> Whitening:
        return cls(like, state["shift"], state["scale"], state["inv_scale"])


def _pinv_sym(matrix: Tensor, floor: float) -> Tensor:
    """Inverse of a symmetric positive semi-definite matrix, small eigenvalues floored."""
    sym = 0.5 * (matrix + matrix.T)
    evals, evecs = torch.linalg.eigh(sym)
    lam = torch.clamp(evals, min=float(evals.max()) * floor + torch.finfo(evals.dtype).tiny)
    return (evecs / lam) @ evecs.T
