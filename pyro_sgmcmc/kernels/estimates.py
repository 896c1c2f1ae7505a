r"""What warm-up measures on the first chain: curvature at the mode, gradient noise,
and which chains ended the mode search far from it. Pure functions of the potential,
the estimator and the whitening.

**Noise basis.** The minibatch noise of :math:`\nabla_z \tilde U` has a full
covariance :math:`L^\top C L` (:math:`C` that of the per-example terms in
:math:`\theta`), but the samplers subtract a diagonal :math:`\beta`. Any rotation
:math:`Q` of :math:`z` keeps the whitening (:math:`L Q Q^\top L^\top = D`), so with a
dense whitening the kernels rotate :math:`z` into the eigenbasis of the noise, where the
diagonal is all of it; otherwise the off-diagonal noise would go uncompensated and
heat the chain (seen on a Poisson GLM: marginal sds 12-18% too wide at batch 100).
"""

from __future__ import annotations

import torch
from torch import Tensor

from pyro_sgmcmc.curvature import hvp
from pyro_sgmcmc.kernels.chain_batch import expand_mask
from pyro_sgmcmc.kernels.whitening import Whitening
from pyro_sgmcmc.minibatch import generator_device
from pyro_sgmcmc.tree import unflatten

#: Rademacher probes of the Hessian's diagonal (models above MAX_DENSE parameters).
CURVATURE_PROBES = 8


def noise_covariance(estimator, whitening: Whitening, theta: dict[str, Tensor], idx) -> Tensor:
    """Covariance of the estimator's per-example terms at ``theta`` in :math:`\\theta`
    coordinates: ``(d, d)`` for a dense whitening, the variances ``(d,)`` otherwise."""
    rows = whitening.flatten(estimator.per_example(theta, idx))
    if whitening.dense:
        return torch.cov(rows.T).reshape(rows.shape[1], rows.shape[1])
    return rows.var(0)


def noise_in_z(whitening: Whitening, cov: Tensor) -> tuple[Tensor, Tensor | None]:
    """The per-coordinate noise variance in :math:`z`, and for a dense whitening the
    rotation :math:`Q` into the noise's eigenbasis (``None`` otherwise)."""
    if not whitening.dense:
        return cov * whitening.scale.square(), None
    m = whitening.scale.T @ cov @ whitening.scale
    evals, q = torch.linalg.eigh(0.5 * (m + m.T))
    return evals.clamp(min=0.0), q


def curvature_diagonal(potential, like, mode: Tensor, idx, rows_idx, generator) -> Tensor:
    r"""Diagonal curvature per datum at ``mode`` for models too large for a dense
    Hessian: the larger of :math:`|\hat h|`, Hutchinson's estimate
    :math:`\mathbb E[v \odot H v]` over 8 Rademacher probes on the data ``idx`` (``None``:
    all), and the empirical Fisher's diagonal :math:`\overline{g_i^2}` on ``rows_idx``
    (plate models): each includes what the other misses (prior curvature; curvature of
    outlying data)."""
    params = unflatten(mode, like)
    total = torch.zeros_like(mode)
    for _ in range(CURVATURE_PROBES):
        v = torch.randint(
            0, 2, mode.shape, generator=generator, device=generator_device(generator)
        ).to(mode) * 2 - 1
        hv = hvp(lambda p: potential.potential(p, idx), params, unflatten(v, like), mode="reverse")
        total = total + v * torch.cat([hv[k].reshape(-1) for k in like])
    h = (total / CURVATURE_PROBES).abs()
    if getattr(potential, "plate_name", None) is not None:
        rows = potential.per_example_grads(params, rows_idx)
        fisher = torch.cat([rows[k].reshape(rows[k].shape[0], -1) for k in like], 1)
        h = torch.maximum(h, fisher.square().mean(0))
    return h


def far_chains(potential, like, flat: Tensor, mode: Tensor, idx, temperature: float) -> Tensor:
    r"""Which chains (rows of ``flat``) lie far above the mode in energy:
    :math:`N (U_c - U_\mathrm{mode}) / T > d/2 + 10\sqrt d` (the typical set lies within
    :math:`d/2 \pm \sqrt{d/2}`); a non-finite energy counts as far. Chains in other
    modes of similar height are not far."""
    u, _ = potential.batched_potential_and_grad(unflatten(flat, like), idx)
    u_mode = potential.potential(unflatten(mode, like), idx)
    d = mode.numel()
    excess = (u - u_mode) * potential.num_data / max(temperature, 1e-12)
    return ~(excess <= d / 2 + 10 * d**0.5)


def laplace_draws(whitening: Whitening, shape, temperature: float, num_data: int, generator):
    """Draws of the Laplace approximation :math:`\\mathcal N(\\mu, (T/N) D)` in
    :math:`\\theta`, flat ``shape``."""
    tau = temperature / num_data
    noise = torch.randn(
        shape, generator=generator, dtype=whitening.shift.dtype,
        device=generator_device(generator),
    )  # fmt: skip
    noise = noise.to(whitening.shift.device)
    return whitening.to_flat(noise * tau**0.5)


def replace_rows(mask: Tensor, new: Tensor, old: Tensor) -> Tensor:
    return torch.where(expand_mask(mask, old), new, old)
