"""SGMCMC kernels for :class:`pyro.infer.MCMC`.

Swap ``NUTS(model)`` for ``SGHMCKernel(model, subsample_size=32)`` and the rest of a
Pyro workflow (``MCMC``, ``get_samples``, ``summary``, ``arviz.from_pyro``,
``Predictive``) stays as it is. The pieces: :mod:`~pyro_sgmcmc.kernels.base` (the
``MCMCKernel`` glue), :mod:`~pyro_sgmcmc.kernels.init` (initial points),
:mod:`~pyro_sgmcmc.kernels.gradients` (minibatch and control-variate estimators, the
gradient-noise estimate), :mod:`~pyro_sgmcmc.kernels.whitening` (dense or diagonal
preconditioning), :mod:`~pyro_sgmcmc.kernels.mode` (the mode search),
:mod:`~pyro_sgmcmc.kernels.warmup` (the warm-up adapter and its checks), and one
short module per algorithm.
"""

from pyro_sgmcmc.kernels.baoa import BAOAKernel
from pyro_sgmcmc.kernels.base import SGMCMCKernel
from pyro_sgmcmc.kernels.sghmc import SGHMCKernel
from pyro_sgmcmc.kernels.sgld import SGLDKernel
from pyro_sgmcmc.kernels.sgnht import SGNHTKernel
from pyro_sgmcmc.kernels.warmup_control import WarmupError

__all__ = [
    "BAOAKernel",
    "SGHMCKernel",
    "SGLDKernel",
    "SGMCMCKernel",
    "SGNHTKernel",
    "WarmupError",
]
