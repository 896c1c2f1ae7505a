"""pyro-sgmcmc: minibatch stochastic-gradient MCMC for Pyro and PyTorch.

Swap ``NUTS(model)`` for ``SGHMCKernel(model, subsample_size=32)`` in
``pyro.infer.MCMC``; PyTorch users call the same samplers from
:mod:`pyro_sgmcmc.samplers` with :class:`pyro_sgmcmc.nn.ModulePotential`.

The names below and the subpackages (``pyro_sgmcmc.diagnostics``,
``pyro_sgmcmc.curvature``, ``pyro_sgmcmc.laplace``, ...) are loaded on first use, so
``import pyro_sgmcmc`` itself is cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Public name -> the module that defines it.
_EXPORTS = {
    # samplers as Pyro kernels, and the runner
    "BAOAKernel": "kernels",
    "SGHMCKernel": "kernels",
    "SGLDKernel": "kernels",
    "SGMCMCKernel": "kernels",
    "SGNHTKernel": "kernels",
    "WarmupError": "kernels",
    "MCMC": "chains",
    # potentials
    "ModelError": "potential",
    "NonFiniteError": "potential",
    "PyroPotential": "potential",
    "ModulePotential": "nn",
    "Likelihood": "likelihoods",
    # Gaussian approximations
    "AutoDenseLaplace": "laplace",
    "AutoDiagonalLaplace": "laplace",
    "AutoKFACLaplace": "laplace",
    "LaplaceGuide": "laplace",
    "module_laplace": "laplace",
    "TemperedSTLELBO": "vi",
    "GaussianVI": "vi",
    "fit_svi": "vi",
    "module_ekf": "ekf",
    "pyro_ekf": "ekf",
    "DenseGaussian": "gaussian",
    "DiagonalGaussian": "gaussian",
    "GaussianPosterior": "gaussian",
    "KFACGaussian": "gaussian",
    "GaussianPrior": "continual",
    "prior_from_posterior": "continual",
    # predictions
    "decompose_uncertainty": "predictive",
    "linearized_predictive": "predictive",
    "mc_predictive": "predictive",
    "predictive_distribution": "predictive",
    "pyro_predictive_distributions": "predictive",
}

#: Submodules reachable as attributes after a plain ``import pyro_sgmcmc``.
_SUBMODULES = frozenset(
    {
        "chains",
        "cli",
        "continual",
        "curvature",
        "datasets",
        "diagnostics",
        "distributed",
        "ekf",
        "experiments",
        "gaussian",
        "kernels",
        "laplace",
        "likelihoods",
        "nn",
        "potential",
        "predictive",
        "pyro_model",
        "samplers",
        "store",
        "tree",
        "vi",
    }
)

__all__ = [
    "AutoDenseLaplace",
    "AutoDiagonalLaplace",
    "AutoKFACLaplace",
    "BAOAKernel",
    "DenseGaussian",
    "DiagonalGaussian",
    "GaussianPosterior",
    "GaussianPrior",
    "GaussianVI",
    "KFACGaussian",
    "LaplaceGuide",
    "Likelihood",
    "MCMC",
    "ModelError",
    "ModulePotential",
    "NonFiniteError",
    "PyroPotential",
    "SGHMCKernel",
    "SGLDKernel",
    "SGMCMCKernel",
    "SGNHTKernel",
    "TemperedSTLELBO",
    "WarmupError",
    "decompose_uncertainty",
    "fit_svi",
    "linearized_predictive",
    "mc_predictive",
    "module_ekf",
    "module_laplace",
    "predictive_distribution",
    "prior_from_posterior",
    "pyro_ekf",
    "pyro_predictive_distributions",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | _SUBMODULES)


if TYPE_CHECKING:  # static analysers and IDEs see the names (nothing runs here)
    from pyro_sgmcmc.chains import MCMC
    from pyro_sgmcmc.continual import GaussianPrior, prior_from_posterior
    from pyro_sgmcmc.ekf import module_ekf, pyro_ekf
    from pyro_sgmcmc.gaussian import (
        DenseGaussian,
        DiagonalGaussian,
        GaussianPosterior,
        KFACGaussian,
    )
    from pyro_sgmcmc.kernels import (
        BAOAKernel,
        SGHMCKernel,
        SGLDKernel,
        SGMCMCKernel,
        SGNHTKernel,
        WarmupError,
    )
    from pyro_sgmcmc.laplace import (
        AutoDenseLaplace,
        AutoDiagonalLaplace,
        AutoKFACLaplace,
        LaplaceGuide,
        module_laplace,
    )
    from pyro_sgmcmc.likelihoods import Likelihood
    from pyro_sgmcmc.nn import ModulePotential
    from pyro_sgmcmc.potential import ModelError, NonFiniteError, PyroPotential
    from pyro_sgmcmc.predictive import (
        decompose_uncertainty,
        linearized_predictive,
        mc_predictive,
        predictive_distribution,
        pyro_predictive_distributions,
    )
    from pyro_sgmcmc.vi import GaussianVI, TemperedSTLELBO, fit_svi
