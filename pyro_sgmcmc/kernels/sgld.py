"""SGLD as a Pyro MCMC kernel."""

from __future__ import annotations

from pyro_sgmcmc.kernels.base import SGMCMCKernel
from pyro_sgmcmc.samplers import sgld


class SGLDKernel(SGMCMCKernel):
    r"""Stochastic gradient Langevin dynamics as a Pyro MCMC kernel.

    Update rule: :mod:`pyro_sgmcmc.samplers.sgld`. At ``temperature=0`` it is SGD.

    All arguments are those of :class:`~pyro_sgmcmc.kernels.base.SGMCMCKernel`.

    Examples:
        >>> import pyro, pyro.distributions as dist, torch
        >>> from pyro.infer import MCMC
        >>> from pyro_sgmcmc import SGLDKernel
        >>> def model(y):
        ...     mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        ...     with pyro.plate("data", len(y)) as idx:
        ...         pyro.sample("obs", dist.Normal(mu, 1.0), obs=y[idx])
        >>> y = 3.0 + torch.randn(1000)
        >>> mcmc = MCMC(SGLDKernel(model, subsample_size=50, step_size=0.1), num_samples=500,
        ...             warmup_steps=500, disable_progbar=True)
        >>> mcmc.run(y)
        >>> abs(mcmc.get_samples()["mu"].mean() - y.mean()) < 0.1
        tensor(True)
    """

    _sampler = sgld
    #: Relative to the whitened posterior (unit curvature): Euler's variance bias
    #: 1/(1 - step/2), 5% at 0.1, for an autocorrelation time of about 1/step steps.
    default_step_size = 0.1
