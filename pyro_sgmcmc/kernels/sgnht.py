"""SGNHT as a Pyro MCMC kernel."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from pyro_sgmcmc.kernels.momentum import MomentumKernel
from pyro_sgmcmc.samplers import sgnht


class SGNHTKernel(MomentumKernel):
    r"""Stochastic gradient Nosé-Hoover thermostat as a Pyro MCMC kernel.

    Update rule: :mod:`pyro_sgmcmc.samplers.sgnht`. The thermostat adapts one friction
    per chain to the gradient noise it does not know; the minibatch noise it does know
    (``beta="auto"``, measured as for SGHMC) is compensated per coordinate first,
    since a single thermostat cannot absorb noise that differs between coordinates.

    Args:
        alpha: the constant diffusion :math:`\alpha` and the thermostat's start.
        thermostat_rate: :math:`\kappa` (``None``: the step size).
        **kwargs: as :class:`~pyro_sgmcmc.kernels.sghmc.SGHMCKernel`.
    """

    _sampler = sgnht

    def __init__(
        self,
        model: Callable | None = None,
        potential_fn: Callable | None = None,
        *,
        alpha: float = 2.0,
        thermostat_rate: float | None = None,
        beta: float | str = "auto",
        **kwargs,
    ) -> None:
        super().__init__(model, potential_fn, alpha=alpha, beta=beta, **kwargs)
        self.thermostat_rate = thermostat_rate

    def _init_state(self, z: Tensor):
        # Vectorised chains: one thermostat per chain.
        batch_shape = () if self.num_chains is None else (self.num_chains,)
        return sgnht.init({"z": z}, alpha=self.alpha, batch_shape=batch_shape)

    def _sampler_kwargs(self, step_size: float) -> dict[str, Any]:
        return {**super()._sampler_kwargs(step_size), "thermostat_rate": self.thermostat_rate}
