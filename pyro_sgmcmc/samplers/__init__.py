r"""Pure functional stochastic-gradient MCMC steps.

Every sampler here is an ``init(params) -> State`` / ``step(state, grad, ...) -> State``
pair. ``params`` is a flat ``dict[str, Tensor]``; ``grad`` is the gradient of the
**per-datum potential**

.. math::

    U(\theta) = -\frac{1}{N} \log p(\theta \mid y), \qquad
    \tilde U(\theta) = -\frac{1}{N}\Big[\log p(\theta)
        + \frac{N}{B} \sum_{i \in \text{batch}} \log p(y_i \mid \theta)\Big],

an unbiased minibatch estimate of it. Step sizes are therefore in per-datum units,
like an SGD learning rate, and the same step size works across data sizes.

Temperature
-----------
``temperature`` is the cold-posterior :math:`T`: the samplers target
:math:`p(\theta \mid y)^{1/T} \propto \exp(-N U(\theta) / T)`. Writing
:math:`\tau = T / N` (the *per-datum temperature*), every sampler injects Gaussian
noise whose variance is proportional to :math:`\tau`:

* :math:`T = 1`: the Bayesian posterior;
* :math:`T < 1`: a "cold" posterior, covariance shrunk by :math:`T` for a Gaussian;
* :math:`T = 0`: no noise at all, and each sampler is *exactly* an optimiser:
  SGLD is SGD, SGHMC is SGD with (heavy-ball) momentum, BAOA is SGD with momentum
  at a rescaled learning rate, SGNHT is SGD with an adaptive momentum.

Preconditioning
---------------
Each step accepts an optional diagonal inverse mass ``inv_mass`` (a dict of tensors
broadcastable to the parameters, or ``None`` for the identity). It is a constant
change of variables :math:`\theta = D^{1/2} z`, which keeps every sampler's
stationary distribution exact (Ma et al., 2015). Adapt it during warm-up only
(see :mod:`pyro_sgmcmc.samplers.adaptation`), never during sampling.

Randomness comes from an explicit ``torch.Generator`` (``None`` uses torch's global
generator), so that runs are reproducible; a list of generators, one per chain of a
leading chain dimension, gives each chain the stream it would have alone. The steps
never call ``.item()``; their operations are elementwise, so parameters with leading
chain dimensions work as is.
"""

from pyro_sgmcmc.samplers import baoa, schedules, sghmc, sgld, sgnht
from pyro_sgmcmc.samplers.adaptation import WelfordVariance, adaptation_windows

__all__ = [
    "WelfordVariance",
    "adaptation_windows",
    "baoa",
    "schedules",
    "sghmc",
    "sgld",
    "sgnht",
]
