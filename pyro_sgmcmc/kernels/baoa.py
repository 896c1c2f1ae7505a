"""BAOA as a Pyro MCMC kernel."""

from __future__ import annotations

from pyro_sgmcmc.kernels.momentum import MomentumKernel
from pyro_sgmcmc.samplers import baoa


class BAOAKernel(MomentumKernel):
    r"""BAOA-split underdamped Langevin dynamics as a Pyro MCMC kernel.

    Update rule: :mod:`pyro_sgmcmc.samplers.baoa` (exact momentum refresh; second-order
    configurational accuracy). Arguments as
    :class:`~pyro_sgmcmc.kernels.sghmc.SGHMCKernel`.
    """

    _sampler = baoa
