"""SGNHT as a Pyro MCMC kernel."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from pyro_sgmcmc.kernels.momentum import MomentumKernel
from pyro_sgmcmc.samplers import sgnht


class SGNHTKernel(MomentumKernel):
    r"""Stochastic gradient Nosé-Hoover thermostat as a Pyro MCMC kernel.

    Update rule: :mod:`pyro_sgmcmc.samplers.sgnht`. The thermostat adapts the friction
    to the unknown gradient noise, so ``beta`` defaults to 0 here.

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
        beta: float | str = 0.0,
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
