r"""Online Gaussian posteriors: the extended Kalman filter over static parameters.

The parameters :math:`\theta` are the hidden state of a (trivial) state-space model and
the data arrive in minibatches :math:`y_1, y_2, \dots`; the filter keeps a Gaussian
belief :math:`\mathcal N(\mu_t, \Lambda_t^{-1})` (a
:class:`~pyro_sgmcmc.gaussian.GaussianPosterior`, diagonal or dense) and touches every
datum once. Starting from the prior :math:`\mathcal N(\mu_0, \Lambda_0^{-1})`, each
minibatch does

**predict** (optional; by default the parameters are static and this is the identity):

.. math::

    \Sigma_{t \mid t-1} = \Sigma_{t-1} / \gamma + Q,

with a forgetting factor :math:`\gamma \in (0, 1]` and process noise :math:`Q = qI`
(or a diagonal), so that old data count less and the filter can track drifting
parameters;

**update**: one Newton step on the minibatch log-posterior
:math:`\log p(y_t \mid \theta) - \tfrac12 (\theta - \mu)^\top \Lambda (\theta - \mu)`
from the predicted mean :math:`\mu = \mu_{t \mid t-1}`, with the curvature :math:`F_t` of
the minibatch negative log-likelihood in place of its Hessian:

.. math::

    \Lambda_t = \Lambda_{t \mid t-1} + F_t(\mu), \qquad
    \mu_t = \mu + \Lambda_t^{-1} \nabla_\theta \log p(y_t \mid \theta)\big|_{\theta = \mu}.

This is the standard EKF linearisation (gradient and curvature at the predicted
mean). With ``num_iterations = K > 1`` it is the iterated EKF: Gauss-Newton steps from
:math:`\theta_0 = \mu`,

.. math::

    \theta_{k+1} = \theta_k + \big(\Lambda + F_t(\theta_k)\big)^{-1}
        \big[\nabla \log p(y_t \mid \theta_k) - \Lambda(\theta_k - \mu)\big],

and :math:`\mu_t = \theta_K`, :math:`\Lambda_t = \Lambda + F_t(\theta_{K-1})` (the
curvature of the last step).

Curvatures (sums over the minibatch, as in :mod:`pyro_sgmcmc.curvature`):

* ``"ef"``, the empirical Fisher :math:`\sum_i g_i g_i^\top` from per-example gradients
  (any model: :class:`~pyro_sgmcmc.nn.ModulePotential`,
  :class:`~pyro_sgmcmc.potential.PyroPotential`);
* ``"ggn"``, the exact GGN :math:`\sum_i J_i^\top H_i J_i` (= the Fisher for the
  built-in likelihoods), for ``nn.Module`` models with a
  :class:`~pyro_sgmcmc.curvature.Likelihood`;
* ``"hessian"``, the Hessian of the negative log-likelihood (:math:`P` backward
  passes; may be indefinite away from a mode for non-GLM models).

**Exactness.** For a linear-Gaussian model (Bayesian linear regression with known noise)
the log-likelihood is quadratic and the GGN, Fisher and Hessian are all
:math:`X_t^\top X_t / s^2`, so each dense update is the exact conjugate update and one
pass, in minibatches of any size and order, gives the exact posterior. The diagonal
filter keeps :math:`\mathrm{diag}(F_t)`: its precision after one pass is the prior's
plus :math:`\mathrm{diag}(X^\top X)/s^2`, the mean-field VI precision; its mean is
exact when each minibatch's :math:`X_t^\top X_t` is diagonal, and otherwise each
update is one Jacobi step, which ignores the correlations.

**Temperature.** Dividing the prior precision, every :math:`F_t` and every gradient by
:math:`T` leaves every mean unchanged and divides every precision by :math:`T`, so the
filter for :math:`p(\theta \mid y)^{1/T}` is ``result.tempered(T)``.

Examples:
    One pass of a dense EKF over a linear regression is the exact posterior:

    >>> import torch
    >>> from pyro_sgmcmc.curvature import Likelihood
    >>> from pyro_sgmcmc.gaussian import DenseGaussian
    >>> _ = torch.manual_seed(0)
    >>> X = torch.randn(100, 3, dtype=torch.float64)
    >>> y = X @ torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64) + torch.randn(100).double()
    >>> prior = DenseGaussian({"w": torch.zeros(3).double()}, torch.eye(3).double())
    >>> terms = ggn_terms(lambda p, x: x @ p["w"], Likelihood("normal", scale=1.0))
    >>> batches = [(X[i : i + 16], y[i : i + 16]) for i in range(0, 100, 16)]
    >>> q = run_ekf(prior, terms, batches)
    >>> precision = X.T @ X + torch.eye(3).double()
    >>> torch.allclose(q.precision_matrix(), precision)
    True
    >>> torch.allclose(q.mean["w"], torch.linalg.solve(precision, X.T @ y))
    True
"""

from pyro_sgmcmc.ekf.core import (
    Terms,
    ef_terms,
    ekf_predict,
    ekf_update,
    ggn_terms,
    hessian_terms,
    module_ekf,
    run_ekf,
)
from pyro_sgmcmc.ekf.pyro_models import pyro_ekf, pyro_gaussian_prior

__all__ = [
    "Terms",
    "ef_terms",
    "ekf_predict",
    "ekf_update",
    "ggn_terms",
    "hessian_terms",
    "module_ekf",
    "pyro_ekf",
    "pyro_gaussian_prior",
    "run_ekf",
]
