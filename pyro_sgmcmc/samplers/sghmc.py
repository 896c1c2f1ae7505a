r"""Stochastic gradient Hamiltonian Monte Carlo (Chen, Fox & Guestrin, 2014).

Written so that the step size is an SGD learning rate:

.. math::

    m_{t+1} &= (1 - \epsilon \sigma^{-2} \alpha)\, m_t - \nabla \tilde U(\theta_t)
        + \mathcal N\!\big(0,\; \tau D^{-1} \max(2\alpha - \beta,\, 0)\big), \\
    \theta_{t+1} &= \theta_t + \epsilon \sigma^{-2} D\, m_{t+1},
    \qquad \tau = T / N.

This is the Euler (symplectic) discretisation, one time unit per step, of
underdamped Langevin dynamics with friction :math:`\alpha` and mass
:math:`\sigma^2 D^{-1} / \epsilon` on the per-datum potential at temperature
:math:`\tau`. For a Gaussian target the position's stationary variance is exact
up to :math:`O(\epsilon\sigma^{-2}\lambda)` (:math:`\lambda` the whitened curvature)
for *any* momentum decay :math:`\epsilon\sigma^{-2}\alpha \in (0, 1]`, including the
strongly damped regime that minibatch noise demands; the momenta themselves are
then hotter than their nominal temperature, which does not bias :math:`\theta`.

* ``beta`` (:math:`\beta \ge 0`) is the gradient-noise estimate: the variance of
  :math:`\nabla \tilde U` that the minibatch already adds to the momentum, in the
  same units, :math:`\beta = D\,\mathrm{Var}[\nabla \tilde U] / \tau`. It is
  subtracted from the injected noise so that the total matches the dynamics (Chen et
  al.'s :math:`\hat B`). Noise can only be compensated while
  :math:`\beta \le 2\alpha`: raise ``alpha`` otherwise.
* At :math:`T = 0` no noise is added and, with :math:`D = I` and zero initial
  momentum, the step is exactly ``torch.optim.SGD(lr=γ, momentum=μ)`` with
  :math:`\gamma = \epsilon \sigma^{-2}` and :math:`\mu = 1 - \epsilon\sigma^{-2}\alpha`
  (SGD's buffer is :math:`-m`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from pyro_sgmcmc.samplers._common import (
    beta_of,
    check_step_size,
    check_temperature,
    inv_mass_of,
    normal_like,
    params_and_momenta,
)


class SGHMCState(NamedTuple):
    """Parameters and their persistent momenta."""

    params: dict[str, Tensor]
    momenta: dict[str, Tensor]


def init(params: dict[str, Tensor], momenta: dict[str, Tensor] | None = None) -> SGHMCState:
    """Start at ``params`` with zero momenta (or the given ones)."""
    return SGHMCState(*params_and_momenta(params, momenta))


def momentum_decay(step_size: float, alpha: float, sigma: float = 1.0) -> float:
    """:math:`c = \\epsilon\\sigma^{-2}\\alpha`, the fraction of momentum lost per step.

    Raises if it leaves ``(0, 1]``, where the discretisation would reverse the momentum.
    """
    c = step_size * alpha / sigma**2
    if not 0.0 <= c <= 1.0:
        raise ValueError(
            f"step_size * alpha / sigma**2 = {c:.3g} must lie in [0, 1] (it is SGD's "
            "1 - momentum): lower step_size or alpha"
        )
    return c


def momentum_noise_std(
    temperature: float,
    num_data: float,
    alpha: float,
    beta: float | dict[str, Tensor] = 0.0,
    inv_mass: dict[str, Tensor] | None = None,
    names: list[str] | None = None,
) -> dict[str, Tensor | float]:
    """Per-site sd of the injected momentum noise, :math:`\\sqrt{\\tau\\max(2\\alpha-\\beta,
    0)/D}`.

    :func:`step` computes it itself; callers whose ``beta`` and ``inv_mass`` are frozen
    (the kernels, after warm-up) compute it once and pass it as ``noise_std``.
    """
    tau = check_temperature(temperature, num_data)
    names = names if names is not None else list(inv_mass if inv_mass is not None else beta)
    out = {}
    for name in names:
        b, d = beta_of(beta, name), inv_mass_of(inv_mass, name)
        if isinstance(b, Tensor) or isinstance(d, Tensor):
            out[name] = (tau * torch.clamp(2.0 * alpha - torch.as_tensor(b), min=0.0) / d).sqrt()
        else:
            out[name] = math.sqrt(tau * max(2.0 * alpha - b, 0.0) / d)
    return out


def step(
    state: SGHMCState,
    grad: dict[str, Tensor],
    step_size: float,
    temperature: float = 1.0,
    num_data: float = 1.0,
    alpha: float = 1.0,
    beta: float | dict[str, Tensor] = 0.0,
    sigma: float = 1.0,
    inv_mass: dict[str, Tensor] | None = None,
    generator: torch.Generator | None = None,
    noise_std: dict[str, Tensor | float] | None = None,
) -> SGHMCState:
    """One SGHMC step.

    Args:
        state: current parameters and momenta.
        grad: gradient of the per-datum potential :math:`\\tilde U` at ``state.params``.
        step_size: :math:`\\epsilon`.
        temperature: cold-posterior :math:`T` (0 gives SGD with momentum).
        num_data: :math:`N`.
        alpha: friction :math:`\\alpha`; SGD's momentum is :math:`1-\\epsilon\\alpha/\\sigma^2`.
        beta: gradient-noise estimate :math:`\\beta` (a float, or a dict per site).
        sigma: :math:`\\sigma`, the prior standard deviation of the momenta.
        inv_mass: optional diagonal preconditioner :math:`D`.
        generator: source of the Gaussian noise.
        noise_std: optional precomputed :func:`momentum_noise_std` for these arguments.

    Examples:
        >>> import torch
        >>> from pyro_sgmcmc.samplers import sghmc
        >>> state = sghmc.init({"x": torch.zeros(3)})
        >>> g = torch.Generator().manual_seed(0)
        >>> for _ in range(200):  # U(x) = |x|^2 / 2 with N = 1: samples N(0, I)
        ...     state = sghmc.step(state, {"x": state.params["x"]}, 0.1, alpha=2.0, generator=g)
        >>> state.params["x"].shape
        torch.Size([3])
    """
    check_step_size(step_size)
    tau = check_temperature(temperature, num_data)
    c = momentum_decay(step_size, alpha, sigma)
    lr = step_size / sigma**2
    if tau > 0 and noise_std is None:
        noise_std = momentum_noise_std(
            temperature, num_data, alpha, beta, inv_mass, list(state.params)
        )
    params, momenta = {}, {}
    for name, theta in state.params.items():
        d = inv_mass_of(inv_mass, name)
        # Fused in-place updates on fresh tensors: the inputs are never modified.
        m = state.momenta[name].mul(1.0 - c).sub_(grad[name])
        if tau > 0:
            std = noise_std[name]
            if isinstance(std, Tensor):
                m.addcmul_(std, normal_like(m, generator))
            else:
                m.add_(normal_like(m, generator), alpha=std)
        momenta[name] = m
        if isinstance(d, Tensor):
            params[name] = torch.addcmul(theta, d, m, value=lr)
        else:
            params[name] = theta.add(m, alpha=lr * d)
    return SGHMCState(params, momenta)
