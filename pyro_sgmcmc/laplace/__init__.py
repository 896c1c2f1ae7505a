r"""Laplace approximations: Pyro autoguides, curvature of Pyro models, evidence tuning.

* :mod:`~pyro_sgmcmc.laplace.autoguide`: :class:`AutoDiagonalLaplace` and
  :class:`AutoDenseLaplace`, MAP guides for SVI whose ``laplace_approximation(*args)``
  returns a Gaussian :class:`LaplaceGuide`.
* :mod:`~pyro_sgmcmc.laplace.mode`: :func:`find_mode`, the full-data mode search
  (damped Newton or L-BFGS) that centres every Laplace guide, and its
  :class:`ModeReport`.
* :mod:`~pyro_sgmcmc.laplace.pyro_curvature`: GGN, Monte Carlo Fisher, empirical
  Fisher and Hessian of a Pyro model's log-likelihood over its unconstrained latents,
  accumulated over the whole data plate in chunks.
* :mod:`~pyro_sgmcmc.laplace.marglik`: the Laplace log marginal likelihood and the
  prior precision that maximises it.
* :mod:`~pyro_sgmcmc.laplace.kfac`: :class:`KFACGaussian` and :class:`AutoKFACLaplace`,
  Kronecker-factored posteriors for networks.
* :mod:`~pyro_sgmcmc.laplace.module`: :func:`module_laplace`, Laplace for a plain
  ``nn.Module`` (the PyTorch path).

The Gaussian posteriors are :mod:`pyro_sgmcmc.gaussian` objects; :mod:`pyro_sgmcmc.continual`
turns any of them into the next episode's prior.
"""

from pyro_sgmcmc.laplace.autoguide import (
    AutoDenseLaplace,
    AutoDiagonalLaplace,
    AutoLaplace,
    GaussianPosteriorDistribution,
    LaplaceError,
    LaplaceGuide,
    LaplaceModeWarning,
)
from pyro_sgmcmc.laplace.kfac import AutoKFACLaplace, KFACGaussian
from pyro_sgmcmc.laplace.marglik import log_marginal_likelihood, optimize_prior_precision
from pyro_sgmcmc.laplace.mode import ModeReport, find_mode
from pyro_sgmcmc.laplace.module import module_laplace
from pyro_sgmcmc.laplace.pyro_curvature import (
    CurvatureResult,
    likelihood_curvature,
    log_joint_and_grad,
    log_prior_hessian,
)

__all__ = [
    "AutoDenseLaplace",
    "AutoDiagonalLaplace",
    "AutoKFACLaplace",
    "AutoLaplace",
    "CurvatureResult",
    "GaussianPosteriorDistribution",
    "KFACGaussian",
    "LaplaceError",
    "LaplaceGuide",
    "LaplaceModeWarning",
    "ModeReport",
    "find_mode",
    "likelihood_curvature",
    "log_joint_and_grad",
    "log_marginal_likelihood",
    "log_prior_hessian",
    "module_laplace",
    "optimize_prior_precision",
]
