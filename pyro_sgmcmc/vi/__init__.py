r"""Gaussian variational inference with a temperature and the sticking-the-landing gradient.

A Gaussian :math:`q_\lambda(\theta) = \mathcal N(\mu, LL^\top)` over the flat parameters
(diagonal :math:`L = \mathrm{diag}(\sigma)` or a dense Cholesky factor) is fitted to the
tempered posterior :math:`p_T(\theta) \propto p(\theta \mid y)^{1/T}` by maximising the
tempered ELBO

.. math::

    \mathcal L_T(\lambda) = \mathbb E_{q_\lambda}\big[\log p(y \mid \theta)
        + \log p(\theta)\big] + T\, \mathbb H[q_\lambda]
    = -T\, \mathrm{KL}\big(q_\lambda \,\|\, p_T\big) + \text{const}.

:math:`T = 1` is ordinary VI, :math:`T < 1` a cold posterior, and :math:`T = 0` drops the
entropy (the mean goes to the MAP and the scale shrinks without end). For a Gaussian
target the optimum is exact: a dense :math:`q` equals :math:`p_T`, whose covariance is
:math:`T` times the posterior's; a diagonal :math:`q` is the mean-field solution, the
exact mean with variances :math:`T / \mathrm{diag}(\Lambda)`, :math:`\Lambda` the
posterior precision.

**Sticking the landing** (Roeder, Wu and Duvenaud, 2017). With the reparameterisation
:math:`\theta = \mu + L\epsilon`, :math:`\epsilon \sim \mathcal N(0, I)`, the gradient of
one draw is

.. math::

    \hat g_{\mathrm{STL}} = \nabla_\lambda \Big[\log p(y, \theta_\lambda(\epsilon))
        - T \log q_{\bar\lambda}(\theta_\lambda(\epsilon))\Big]_{\bar\lambda = \lambda},

where :math:`\bar\lambda` is held fixed (a stop-gradient): the score term
:math:`T \nabla_\lambda \log q_\lambda(\theta)|_\theta` is dropped, which is unbiased
because a score has mean zero. When :math:`q = p_T` the bracket is constant in
:math:`\theta`, so *every* draw's gradient is exactly zero: the estimator's variance
vanishes at the optimum, and a constant step size converges there instead of jittering
around it. The usual estimator (analytic entropy, or the total derivative of
:math:`\log q`) keeps a noisy gradient there (0.05 to 0.4 per datum on the test's linear
regression, where every STL gradient is below :math:`10^{-15}`).

Two ways in:

* **Pyro**: :class:`TemperedSTLELBO` is a ``pyro.infer.ELBO`` for ``SVI`` with any
  reparameterised guide (``AutoNormal``, ``AutoDiagonalNormal``,
  ``AutoMultivariateNormal``, ...), subsampled plates included (Pyro's ``N / B`` scale);
  :func:`fit_svi` runs it on a model written with the idiomatic data plate, feeding
  minibatches of the plate's indices as the kernels do, and :func:`gaussian_from_guide`
  reads a fitted autoguide as a :class:`~pyro_sgmcmc.gaussian.GaussianPosterior` over the
  unconstrained latent sites. Here the ELBO is Pyro's: summed over the data, not per datum.
* **PyTorch**: pure functions (:func:`vi_init`, :func:`vi_loss`, :func:`vi_posterior`)
  over any potential ``potential(params, batch)`` in the per-datum units of
  :class:`~pyro_sgmcmc.nn.ModulePotential` and :class:`~pyro_sgmcmc.potential.PyroPotential`,
  and :class:`GaussianVI`, which holds the optimiser and steps over a ``DataLoader``. The
  loss is :math:`-\mathcal L_T / N`, estimated on a minibatch:

  .. math::

      \ell(\lambda) = \frac1S \sum_{s=1}^S \Big[\tilde U(\theta_s)
          + \frac TN \log q_{\bar\lambda}(\theta_s)\Big], \qquad
      \theta_s = \mu + L\epsilon_s,

  with :math:`\tilde U` the minibatch potential (a mean loss plus
  :math:`-\log p(\theta)/N`), so learning rates are those of the MAP problem.

Both return :class:`~pyro_sgmcmc.gaussian.DiagonalGaussian` or
:class:`~pyro_sgmcmc.gaussian.DenseGaussian`, which the predictive and continual-learning
code take as they take a Laplace approximation.

Examples:
    Dense VI of a Bayesian linear regression matches the exact posterior:

    >>> import torch
    >>> _ = torch.manual_seed(0)
    >>> X = torch.randn(200, 2, dtype=torch.float64)
    >>> y = X @ torch.tensor([1.0, -1.0], dtype=torch.float64) + torch.randn(200).double()
    >>> def potential(p, batch):  # y ~ N(Xw, 1), w ~ N(0, I), per datum
    ...     x, t = batch
    ...     return 0.5 * ((t - x @ p["w"]) ** 2).mean() + 0.5 * (p["w"] ** 2).sum() / 200
    >>> vi = GaussianVI(potential, {"w": torch.zeros(2, dtype=torch.float64)}, num_data=200,
    ...                 dense=True, lr=0.05, generator=torch.Generator().manual_seed(1))
    >>> losses = vi.fit([(X, y)], num_epochs=1500)
    >>> q = vi.posterior()
    >>> exact = X.T @ X + torch.eye(2, dtype=torch.float64)
    >>> torch.allclose(q.precision_matrix(), exact, rtol=1e-3)
    True
    >>> torch.allclose(q.mean["w"], torch.linalg.solve(exact, X.T @ y), atol=1e-4)
    True
"""

from pyro_sgmcmc.vi.gaussian_vi import (
    GaussianVI,
    VIState,
    vi_entropy,
    vi_init,
    vi_log_prob,
    vi_loss,
    vi_posterior,
    vi_sample,
)
from pyro_sgmcmc.vi.svi import SVIResult, TemperedSTLELBO, fit_svi, gaussian_from_guide

__all__ = [
    "GaussianVI",
    "SVIResult",
    "TemperedSTLELBO",
    "VIState",
    "fit_svi",
    "gaussian_from_guide",
    "vi_entropy",
    "vi_init",
    "vi_log_prob",
    "vi_loss",
    "vi_posterior",
    "vi_sample",
]
