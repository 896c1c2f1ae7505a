"""SGHMC as a Pyro MCMC kernel."""

from __future__ import annotations

from typing import Any

from pyro_sgmcmc.kernels.momentum import MomentumKernel
from pyro_sgmcmc.samplers import sghmc


class SGHMCKernel(MomentumKernel):
    r"""Stochastic gradient Hamiltonian Monte Carlo as a Pyro MCMC kernel.

    Update rule: :mod:`pyro_sgmcmc.samplers.sghmc`. At ``temperature=0`` it is SGD with
    momentum, learning rate :math:`\epsilon/\sigma^2` and momentum
    :math:`1 - \epsilon\alpha/\sigma^2`.

    Args:
        alpha: friction :math:`\alpha`.
        beta: gradient-noise estimate: ``"auto"`` (per-example gradients during
            warm-up) or a float.
        sigma: momenta scale :math:`\sigma`.
        **kwargs: those of :class:`~pyro_sgmcmc.kernels.base.SGMCMCKernel` (``model``,
            ``subsample_size``, ``step_size``, ``temperature``, ``thinning``, ...).

    Examples:
        >>> import pyro, pyro.distributions as dist, torch
        >>> from pyro.infer import MCMC
        >>> from pyro_sgmcmc import SGHMCKernel
        >>> def model(y):
        ...     mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        ...     with pyro.plate("data", len(y)) as idx:
        ...         pyro.sample("obs", dist.Normal(mu, 1.0), obs=y[idx])
        >>> y = 3.0 + torch.randn(1000)
        >>> kernel = SGHMCKernel(model, subsample_size=50)
        >>> mcmc = MCMC(kernel, num_samples=500, warmup_steps=500, disable_progbar=True)
        >>> mcmc.run(y)
        >>> abs(mcmc.get_samples()["mu"].mean() - y.mean()) < 0.1
        tensor(True)
    """

    _sampler = sghmc

    def _sampler_kwargs(self, step_size: float) -> dict[str, Any]:
        kwargs = super()._sampler_kwargs(step_size)
        sghmc.momentum_decay(step_size, kwargs["alpha"], self.sigma)
        # The noise scale only changes with alpha and beta: compute it once per change.
        key = (kwargs["alpha"], id(self._beta))
        if key != getattr(self, "_noise_std_key", None):
            self._noise_std = sghmc.momentum_noise_std(
                self.temperature, self.potential.num_data, kwargs["alpha"], self._beta,
                None, ["z"],
            )  # fmt: skip
            self._noise_std_key = key
        kwargs["noise_std"] = self._noise_std
        return kwargs

    def _step_size(self) -> float:
        """The schedule's step size, shrunk so that the momentum decay
        ``step_size * alpha / sigma^2`` stays <= 1 when the friction had to rise to absorb
        minibatch noise (beta <= 2 alpha); under-compensated noise would heat the chain."""
        step_size = super()._step_size()
        limit = self.sigma**2 / self._alpha
        if self._alpha > self.alpha and step_size > limit and not self._optimising:
            self._step_cut = max(self._step_cut, step_size / limit)
            return limit
        return step_size
