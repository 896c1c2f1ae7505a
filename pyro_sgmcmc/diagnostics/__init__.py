"""Diagnostics: how good is a sample? Kernelized Stein discrepancy against the model's
score (:mod:`~pyro_sgmcmc.diagnostics.ksd`), and ArviZ conversion with a convergence
report including nested R-hat for many short chains (:mod:`~pyro_sgmcmc.diagnostics.arviz`),
trace plots and marginals against a reference (:mod:`~pyro_sgmcmc.diagnostics.plots`).
"""

from pyro_sgmcmc.diagnostics.arviz import Report, nested_rhat, report, to_inference_data
from pyro_sgmcmc.diagnostics.ksd import ksd, median_bandwidth, potential_score, stein_kernel_matrix
from pyro_sgmcmc.diagnostics.plots import plot_marginals, plot_trace

__all__ = [
    "Report",
    "ksd",
    "median_bandwidth",
    "nested_rhat",
    "plot_marginals",
    "plot_trace",
    "potential_score",
    "report",
    "stein_kernel_matrix",
    "to_inference_data",
]
