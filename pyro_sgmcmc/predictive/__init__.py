r"""Predictive distributions and their uncertainty: linearised (GLM) and Monte Carlo.

Three ways from a posterior over parameters to predictions at inputs :math:`x`, for a
model function ``fn(params, x)`` whose output :math:`f(x; \theta)` is the likelihood's
natural parameter (logits, mean, log-rate; see :class:`~pyro_sgmcmc.curvature.Likelihood`):

* **Linearised (GLM) predictive** (:func:`linearized_predictive`), from a
  :class:`~pyro_sgmcmc.gaussian.GaussianPosterior` :math:`q = \mathcal N(\mu, \Sigma)`.
  The network is replaced by its first-order Taylor expansion at the mean, so the
  output is Gaussian in function space:

  .. math::

      f(x; \theta) \approx f(x; \mu) + J(x)(\theta - \mu), \qquad
      f(x) \sim \mathcal N\big(f(x; \mu),\; J(x)\, \Sigma\, J(x)^\top\big),

  with :math:`J(x) = \partial f(x; \theta) / \partial \theta` at :math:`\mu`. This is
  the predictive that matches a Laplace/GGN posterior (Immer et al., 2021), and it is
  exact for a model linear in :math:`\theta`. :func:`predictive_distribution` then
  turns that Gaussian over outputs into a distribution over targets.
* **Monte Carlo predictive** (:func:`mc_predictive`): the outputs
  :math:`f(x; \theta_s)` for every draw :math:`\theta_s`: SGMCMC samples, an
  ensemble's members, or draws of a Gaussian posterior.
* **A Pyro model's predictive** (:func:`pyro_predictive_distributions`): the
  distribution of an observation site under every posterior draw.

:func:`decompose_uncertainty` splits the predictive uncertainty of an equally
weighted mixture of :math:`S` members :math:`p(y \mid x, \theta_s)` (draws from any of
the above) into an aleatoric part (noise the members agree on) and an epistemic part
(their disagreement, which more data removes). For classification, in nats:

.. math::

    \underbrace{\mathbb H\Big[\tfrac1S \textstyle\sum_s p_s\Big]}_{\text{total}}
    = \underbrace{\tfrac1S \textstyle\sum_s \mathbb H[p_s]}_{\text{aleatoric}}
    + \underbrace{\mathbb I[y; \theta \mid x]}_{\text{epistemic}},

the epistemic part being the mutual information between the label and the
parameters, :math:`\ge 0` by Jensen's inequality. For Gaussian (and Poisson) outputs,
the law of total variance of the mixture with member means :math:`m_s` and variances
:math:`v_s`:

.. math::

    \underbrace{\mathrm{Var}[y]}_{\text{total}}
    = \underbrace{\tfrac1S \textstyle\sum_s v_s}_{\text{aleatoric}}
    + \underbrace{\tfrac1S \textstyle\sum_s (m_s - \bar m)^2}_{\text{epistemic}}.

Examples:
    A linear model's linearised predictive is exact; its probit approximation is close
    to the Monte Carlo predictive:

    >>> import torch
    >>> from pyro_sgmcmc.gaussian import DiagonalGaussian
    >>> fn = lambda p, x: x @ p["w"]  # logits of a Bernoulli
    >>> q = DiagonalGaussian({"w": torch.tensor([1.0, -1.0])}, {"w": torch.tensor([1.0, 4.0])})
    >>> fg = linearized_predictive(fn, q, torch.tensor([[1.0, 0.0], [1.0, 2.0]]))
    >>> fg.mean, fg.variance  # x^T mu and x^T Sigma x
    (tensor([ 1., -1.]), tensor([1., 2.]))
    >>> predictive_distribution(fg, "bernoulli").probs  # probit approximation
    tensor([0.7000, 0.3212])
    >>> g = torch.Generator().manual_seed(0)
    >>> predictive_distribution(fg, "bernoulli", link_approx="mc", generator=g).probs
    tensor([0.6946, 0.3362])
    >>> u = decompose_uncertainty(fg.sample(10_000, g), "bernoulli", logits=True)
    >>> torch.allclose(u.total, u.aleatoric + u.epistemic), bool((u.epistemic > 0).all())
    (True, True)
"""

from pyro_sgmcmc.predictive.function_space import (
    FunctionGaussian,
    linearized_predictive,
    predictive_distribution,
)
from pyro_sgmcmc.predictive.monte_carlo import (
    MCPredictive,
    mc_predictive,
    pyro_predictive_distributions,
)
from pyro_sgmcmc.predictive.uncertainty import Uncertainty, decompose_uncertainty

__all__ = [
    "FunctionGaussian",
    "MCPredictive",
    "Uncertainty",
    "decompose_uncertainty",
    "linearized_predictive",
    "mc_predictive",
    "predictive_distribution",
    "pyro_predictive_distributions",
]
