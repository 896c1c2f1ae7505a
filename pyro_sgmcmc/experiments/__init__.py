r"""The experiments behind the ``pyro-sgmcmc`` command: runs, tables and figures.

One module per experiment, each with a ``main(args)`` that the command calls:

* :mod:`~pyro_sgmcmc.experiments.pima` (the seed paper's Table 3 and Figure 11):
  Bayesian logistic regression on the bundled Pima data, NUTS against the package's
  samplers and Gaussian approximations.
* :mod:`~pyro_sgmcmc.experiments.double_well` (the seed paper's Figure 2): a deep
  ensemble, a serial SGHMC chain and parallel SGHMC on a 2-D double well.
* :mod:`~pyro_sgmcmc.experiments.cold_posterior` (the seed paper's section 5.1, Figures
  4, 8 and 9): the cold-posterior effect of a CNN-LSTM on movie reviews, MLE, MAP,
  Laplace, VI and SGHMC over a temperature grid (model, data and methods in
  :mod:`~pyro_sgmcmc.experiments.cold_posterior_methods`).
* :mod:`~pyro_sgmcmc.experiments.continual_lora` (the seed paper's section 5.2, Figures
  5 and 6): LoRA on SmolLM2-135M over a sequence of books, online Laplace (the previous
  posterior as the prior) against online and offline AdamW.
* :mod:`~pyro_sgmcmc.experiments.bayes_llm` (the seed paper's section 5.3, Tables 1-2,
  Figures 7 and 10): a Bayesian SmolLM2-135M (parallel and serial SGHMC over its last
  attention layer, AdamW, the base model) flags out-of-distribution UDHR statements by
  their epistemic uncertainty (pieces in
  :mod:`~pyro_sgmcmc.experiments.bayes_llm_methods`).
* :mod:`~pyro_sgmcmc.experiments.report`: what they share (result records, thinning,
  ESS, timing, CSV/JSON writing, aligned tables, figures).

This package is a leaf: nothing in the library imports it. Importing it is cheap; the
names of the modules above are loaded on first use (``from pyro_sgmcmc.experiments
import run_pima`` works as before).
"""

from __future__ import annotations

import importlib
from typing import Any

#: The method groups of the Pima table, for ``run_pima(methods=...)`` and the
#: command's ``--methods`` (here, free of imports, so that ``--help`` stays fast).
PIMA_GROUPS = ("sgmcmc", "parallel", "laplace", "vi", "ekf")

#: The paper whose tables and figures the experiments reproduce (the "seed paper").
PAPER = 'Duffield et al., "Scalable Bayesian learning with posteriors", ICLR 2025'

#: The modules, in the order a name is looked up in their ``__all__``.
_MODULES = (
    "report",
    "pima",
    "double_well",
    "cold_posterior_methods",
    "cold_posterior",
    "continual_lora",
    "bayes_llm_methods",
    "bayes_llm",
)

__all__ = [
    "PAPER",
    "PIMA_GROUPS",
    "bayes_llm",
    "bayes_llm_methods",
    "cold_posterior",
    "cold_posterior_methods",
    "continual_lora",
    "double_well",
    "pima",
    "report",
]


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    for module_name in _MODULES:
        module = importlib.import_module(f"{__name__}.{module_name}")
        if name in module.__all__:
            value = getattr(module, name)
            globals()[name] = value
            return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
