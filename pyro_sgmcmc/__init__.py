"""pyro-sgmcmc: minibatch stochastic-gradient MCMC for Pyro and PyTorch.

Swap ``NUTS(model)`` for ``SGHMCKernel(model, subsample_size=32)`` in
``pyro.infer.MCMC``; PyTorch users call the same samplers from
:mod:`pyro_sgmcmc.samplers` with :class:`pyro_sgmcmc.nn.ModulePotential`.
"""

from pyro_sgmcmc.chains import MCMC
from pyro_sgmcmc.kernels import (
    BAOAKernel,
    SGHMCKernel,
    SGLDKernel,
    SGMCMCKernel,
    SGNHTKernel,
)
from pyro_sgmcmc.potential import ModelError, NonFiniteError, PyroPotential

__version__ = "0.1.0"

__all__ = [
    "BAOAKernel",
    "MCMC",
    "ModelError",
    "NonFiniteError",
    "PyroPotential",
    "SGHMCKernel",
    "SGLDKernel",
    "SGMCMCKernel",
    "SGNHTKernel",
]
