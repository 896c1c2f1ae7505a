r"""Stochastic gradient Langevin dynamics (Welling & Teh, 2011).

.. math::

    \theta_{t+1} = \theta_t - \epsilon D \nabla \tilde U(\theta_t)
        + \mathcal N\!\left(0,\; 2 \epsilon \tau D\right),
    \qquad \tau = T / N,

with step size :math:`\epsilon`, diagonal inverse mass :math:`D` (identity by
default) and cold-posterior temperature :math:`T`. At :math:`T = 0` this is exactly
``torch.optim.SGD(lr=epsilon)`` on :math:`U` (preconditioned by :math:`D`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from pyro_sgmcmc.samplers._common import (
    check_step_size,
    check_temperature,
    copy_params,
    inv_mass_of,
    normal_like,
)


class SGLDState(NamedTuple):
    """SGLD carries nothing but the parameters."""

    params: dict[str, Tensor]


def init(params: dict[str, Tensor]) -> SGLDState:
    """Start SGLD at ``params`` (copied, so the caller's tensors are never modified)."""
    return SGLDState(copy_params(params))


def step(
    state: SGLDState,
    grad: dict[str, Tensor],
    step_size: float,
    temperature: float = 1.0,
    num_data: float = 1.0,
    inv_mass: dict[str, Tensor] | None = None,
    generator: torch.Generator | None = None,
) -> SGLDState:
    """One SGLD step.

    Args:
        state: current state.
        grad: gradient of the per-datum potential :math:`\\tilde U` at ``state.params``.
        step_size: :math:`\\epsilon`, an SGD learning rate.
        temperature: cold-posterior :math:`T` (0 gives SGD).
        num_data: :math:`N`, the number of data the potential averages over.
        inv_mass: optional diagonal preconditioner :math:`D`.
        generator: source of the Gaussian noise.

    Examples:
        >>> import torch
        >>> from pyro_sgmcmc.samplers import sgld
        >>> state = sgld.init({"x": torch.zeros(2)})
        >>> g = torch.Generator().manual_seed(0)
        >>> for _ in range(100):  # U(x) = |x|^2 / 2, N = 1: samples N(0, I)
        ...     state = sgld.step(state, {"x": state.params["x"]}, 0.1, generator=g)
        >>> state.params["x"].shape
        torch.Size([2])
    """
    check_step_size(step_size)
    tau = check_temperature(temperature, num_data)
    new = {}
    for name, theta in state.params.items():
        d = inv_mass_of(inv_mass, name)
        theta = theta - step_size * d * grad[name]
        if tau > 0:
            theta = theta + (2.0 * step_size * tau * d) ** 0.5 * normal_like(theta, generator)
        new[name] = theta
    return SGLDState(new)
