r"""Stochastic gradient Nosé-Hoover thermostat (Ding et al., 2014).

SGHMC whose friction :math:`\xi` is a dynamic thermostat: it grows while the
momenta are hotter than the target temperature and shrinks while they are colder,
which absorbs unknown gradient noise without estimating it. With the SGHMC
conventions of :mod:`pyro_sgmcmc.samplers.sghmc`:

.. math::

    m_{t+1} &= (1 - \epsilon\sigma^{-2}\xi_t)\, m_t - \nabla \tilde U(\theta_t)
        + \mathcal N\!\big(0,\; \tau D^{-1} \max(2\alpha - \beta, 0)\big), \\
    \theta_{t+1} &= \theta_t + \epsilon \sigma^{-2} D\, m_{t+1}, \\
    \xi_{t+1} &= \xi_t + \kappa \big((1 - \tfrac12\epsilon\sigma^{-2}\xi_t)\,
        T_{\mathrm{kin}}(m_{t+1}) - T\big),
    \qquad T_{\mathrm{kin}}(m) = N \cdot \mathrm{mean}_i\, \epsilon\sigma^{-2} D_i m_i^2,

where :math:`T_{\mathrm{kin}}` is the kinetic temperature (the factor
:math:`1 - \epsilon\sigma^{-2}\xi/2` corrects it for the Euler scheme, whose stationary
momentum variance is :math:`2\tau/(2 - \epsilon\sigma^{-2}\xi)`: without it every
variance would be :math:`O(\epsilon\xi/2)` too small), :math:`\alpha` the constant
injected diffusion and :math:`\kappa` the
thermostat rate (an inverse thermostat mass; any :math:`\kappa > 0` leaves the
target invariant). :math:`\xi` is capped at :math:`\sigma^2/\epsilon`, where the
momentum decay reaches 1: a far start can otherwise push it past, and the momenta
then oscillate and blow up. The thermostat is shared by all sites of a chain; for
many chains as one batch (parameters with leading chain dimensions), ``init(...,
batch_shape=(C,))`` gives each chain its own thermostat, and the mean in
:math:`T_{\mathrm{kin}}` runs over that chain's coordinates only. At
:math:`T = 0`, SGNHT is SGD with momentum whose friction grows with the kinetic
energy.
"""

from __future__ import annotations

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


class SGNHTState(NamedTuple):
    """Parameters, momenta and the thermostat (one per chain: shape ``batch_shape``)."""

    params: dict[str, Tensor]
    momenta: dict[str, Tensor]
    xi: Tensor


def init(
    params: dict[str, Tensor],
    alpha: float = 1.0,
    momenta: dict[str, Tensor] | None = None,
    batch_shape: tuple[int, ...] = (),
) -> SGNHTState:
    """Start at ``params`` with zero momenta and the thermostat at ``alpha``.

    ``batch_shape`` are the leading dimensions of every parameter that index
    independent chains (e.g. ``(C,)``): each chain gets its own thermostat.

    Examples:
        >>> import torch
        >>> from pyro_sgmcmc.samplers import sgnht
        >>> sgnht.init({"x": torch.zeros(8, 3)}, alpha=2.0, batch_shape=(8,)).xi.shape
        torch.Size([8])
    """
    params, momenta = params_and_momenta(params, momenta)
    first = next(iter(params.values()))
    batch_shape = tuple(batch_shape)
    for name, value in params.items():
        if tuple(value.shape[: len(batch_shape)]) != batch_shape:
            raise ValueError(
                f"params[{name!r}] has shape {tuple(value.shape)}, which does not start with "
                f"batch_shape={batch_shape}"
            )
    xi = torch.full(batch_shape, float(alpha), dtype=first.dtype, device=first.device)
    return SGNHTState(params, momenta, xi)


def step(
    state: SGNHTState,
    grad: dict[str, Tensor],
    step_size: float,
    temperature: float = 1.0,
    num_data: float = 1.0,
    alpha: float = 1.0,
    beta: float | dict[str, Tensor] = 0.0,
    sigma: float = 1.0,
    thermostat_rate: float | None = None,
    inv_mass: dict[str, Tensor] | None = None,
    generator: torch.Generator | None = None,
) -> SGNHTState:
    """One SGNHT step.

    Args:
        state: current parameters, momenta and thermostat.
        grad: gradient of the per-datum potential at ``state.params``.
        step_size: :math:`\\epsilon`.
        temperature: cold-posterior :math:`T`.
        num_data: :math:`N`.
        alpha: the constant diffusion :math:`\\alpha` (Ding et al.'s :math:`A`).
        beta: gradient-noise estimate, as in SGHMC.
        sigma: :math:`\\sigma`, the momenta's prior standard deviation.
        thermostat_rate: :math:`\\kappa`; ``None`` uses ``step_size``.
        inv_mass: optional diagonal preconditioner :math:`D`.
        generator: source of the Gaussian noise.

    Examples:
        >>> import torch
        >>> from pyro_sgmcmc.samplers import sgnht
        >>> state = sgnht.init({"x": torch.zeros(4)}, alpha=1.0)
        >>> g = torch.Generator().manual_seed(0)
        >>> for _ in range(100):
        ...     state = sgnht.step(state, {"x": state.params["x"]}, 0.05, generator=g)
        >>> bool(torch.isfinite(state.xi))
        True
    """
    check_step_size(step_size)
    tau = check_temperature(temperature, num_data)
    kappa = step_size if thermostat_rate is None else thermostat_rate
    lr = step_size / sigma**2
    params, momenta = {}, {}
    kinetic, count = 0.0, 0
    batch = state.xi.dim()  # leading chain dimensions, each chain its own thermostat
    for name, theta in state.params.items():
        d = inv_mass_of(inv_mass, name)
        xi = state.xi.to(theta.dtype).reshape((*state.xi.shape, *([1] * (theta.dim() - batch))))
        m = (1.0 - lr * xi) * state.momenta[name] - grad[name]
        if tau > 0:
            var = tau * torch.clamp(
                torch.as_tensor(2.0 * alpha - beta_of(beta, name), dtype=m.dtype), min=0.0
            )
            m = m + (var / d).sqrt() * normal_like(m, generator)
        momenta[name] = m
        params[name] = theta + lr * d * m
        energy = (lr * d * m.square()).reshape((*state.xi.shape, -1))
        kinetic = kinetic + energy.sum(-1).to(state.xi.dtype)
        count += energy.shape[-1]
    # The Euler scheme's stationary kinetic energy is 2 tau / (2 - eps xi / sigma^2), not
    # tau: pinning the uncorrected one would leave every variance O(eps xi / 2) too small.
    corrected = num_data * kinetic / count * (1.0 - 0.5 * lr * state.xi)
    xi = state.xi + kappa * (corrected - temperature)
    # Past sigma^2 / step_size the momentum decay would turn negative (and the momenta
    # oscillate and blow up), which a far start can provoke: cap the thermostat there.
    return SGNHTState(params, momenta, torch.clamp(xi, max=1.0 / lr))
