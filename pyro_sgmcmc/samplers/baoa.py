r"""BAOA splitting of underdamped Langevin dynamics (Leimkuhler & Matthews, 2013).

The BAOAB integrator with its two half kicks merged, so one gradient per step. With
the SGHMC conventions of :mod:`pyro_sgmcmc.samplers.sghmc` (step size is a learning
rate, mass :math:`\sigma^2 D^{-1}/\epsilon`, one time unit per step):

.. math::

    \text{B:}\quad m &\leftarrow m - \nabla \tilde U(\theta), \\
    \text{A:}\quad \theta &\leftarrow \theta + \tfrac12 \epsilon\sigma^{-2} D\, m, \\
    \text{O:}\quad m &\leftarrow c\, m + \sqrt{\max\!\big(\tau\sigma^2 (1-c^2)/\epsilon
        - c^2 \beta \tau,\; 0\big) / D}\;\, \xi, \qquad c = e^{-\epsilon\sigma^{-2}\alpha}, \\
    \text{A:}\quad \theta &\leftarrow \theta + \tfrac12 \epsilon\sigma^{-2} D\, m.

The O step is the exact Ornstein-Uhlenbeck flow of the momenta, so the momenta's
stationary law is exact for any step size, and BAOAB's configurational error is
second order. ``beta`` (as in SGHMC) removes the minibatch noise that the B step
put into the momenta before the O step. At :math:`T = 0` BAOA is exactly SGD with
momentum :math:`\mu = c` and learning rate :math:`\tfrac12\epsilon\sigma^{-2}(1 + c)`.
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


class BAOAState(NamedTuple):
    """Parameters and their persistent momenta."""

    params: dict[str, Tensor]
    momenta: dict[str, Tensor]


def init(params: dict[str, Tensor], momenta: dict[str, Tensor] | None = None) -> BAOAState:
    """Start at ``params`` with zero momenta (or the given ones)."""
    return BAOAState(*params_and_momenta(params, momenta))


def step(
    state: BAOAState,
    grad: dict[str, Tensor],
    step_size: float,
    temperature: float = 1.0,
    num_data: float = 1.0,
    alpha: float = 1.0,
    beta: float | dict[str, Tensor] = 0.0,
    sigma: float = 1.0,
    inv_mass: dict[str, Tensor] | None = None,
    generator: torch.Generator | None = None,
) -> BAOAState:
    """One BAOA step.

    Args:
        state: current parameters and momenta.
        grad: gradient of the per-datum potential at ``state.params``.
        step_size: :math:`\\epsilon`.
        temperature: cold-posterior :math:`T`.
        num_data: :math:`N`.
        alpha: friction :math:`\\alpha`.
        beta: gradient-noise estimate, as in SGHMC.
        sigma: :math:`\\sigma`.
        inv_mass: optional diagonal preconditioner :math:`D`.
        generator: source of the Gaussian noise.

    Examples:
        >>> import torch
        >>> from pyro_sgmcmc.samplers import baoa
        >>> state = baoa.init({"x": torch.zeros(2)})
        >>> g = torch.Generator().manual_seed(0)
        >>> for _ in range(100):
        ...     state = baoa.step(state, {"x": state.params["x"]}, 0.1, alpha=1.0, generator=g)
        >>> state.momenta["x"].shape
        torch.Size([2])
    """
    check_step_size(step_size)
    tau = check_temperature(temperature, num_data)
    lr = step_size / sigma**2
    c = math.exp(-lr * alpha)
    params, momenta = {}, {}
    for name, theta in state.params.items():
        d = inv_mass_of(inv_mass, name)
        m = state.momenta[name] - grad[name]
        theta = theta + 0.5 * lr * d * m
        m = c * m
        if tau > 0:
            var = tau * torch.clamp(
                torch.as_tensor(
                    sigma**2 * (1.0 - c**2) / step_size - c**2 * beta_of(beta, name),
                    dtype=m.dtype,
                ),
                min=0.0,
            )
            m = m + (var / d).sqrt() * normal_like(m, generator)
        momenta[name] = m
        params[name] = theta + 0.5 * lr * d * m
    return BAOAState(params, momenta)
