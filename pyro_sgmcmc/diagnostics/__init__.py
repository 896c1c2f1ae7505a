"""Diagnostics: how good is a sample? Kernelized Stein discrepancy against the model's
score (:mod:`~pyro_sgmcmc.diagnostics.ksd`), and ArviZ conversion with a convergence
report including nested R-hat for many short chains (:mod:`~pyro_sgmcmc.diagnostics.arviz`).
"""

from pyro_sgmcmc.diagnostics.arviz import Report, nested_rhat, report, to_inference_data
from pyro_sgmcmc.diagnostics.ksd import ksd, median_bandwidth, potential_score, stein_kernel_matrix

__all__ = [
    "Report",
    "ksd",
    "median_bandwidth",
    "nested_rhat",
    "potential_score",
    "report",
    "stein_kernel_matrix",
    "to_inference_data",
]
