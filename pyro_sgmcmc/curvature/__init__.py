r"""Curvature of the negative log-likelihood: Hessian, GGN, Fisher, K-FAC, and CG.

One module per job: :mod:`~pyro_sgmcmc.curvature.products` (matrix-free ``hvp``,
``ggnvp``, ``fvp``), :mod:`~pyro_sgmcmc.curvature.per_example` (per-example gradients
and Jacobians), :mod:`~pyro_sgmcmc.curvature.diag_dense` (diagonal and dense GGN, EF
and Monte Carlo Fisher of a batch), :mod:`~pyro_sgmcmc.curvature.accumulate` (the same
over a data loader), :mod:`~pyro_sgmcmc.curvature.kfac` (K-FAC factors),
:mod:`~pyro_sgmcmc.curvature.module_diag` (the fast per-layer diagonal of a network),
:mod:`~pyro_sgmcmc.curvature.cg` (conjugate gradients); the likelihood families are
:mod:`pyro_sgmcmc.likelihoods` and the dict helpers :mod:`pyro_sgmcmc.tree`, both
re-exported here.

Parameters are a flat ``dict[str, Tensor]`` (``module.named_parameters()`` or Pyro's
unconstrained sites), and every function here is pure: parameters and data in,
curvature out. For data :math:`\{(x_i, y_i)\}` and a model whose output (the
likelihood's natural parameter) is :math:`f_i = f(x_i; \theta)`, with
:math:`J_i = \partial f_i / \partial \theta`, :math:`g_i = \nabla_\theta \log p(y_i
\mid x_i, \theta)` and :math:`H_i = \nabla^2_f [-\log p(y_i \mid f)]` at :math:`f_i`:

.. math::

    \text{Hessian:}\quad & \nabla^2_\theta \sum_i -\log p(y_i \mid x_i, \theta)
        = G + \sum_i \sum_k \frac{\partial(-\log p_i)}{\partial f_{ik}}
          \nabla^2_\theta f_{ik}, \\
    \text{GGN:}\quad & G = \sum_i J_i^\top H_i J_i, \\
    \text{empirical Fisher (EF):}\quad & \tilde F = \sum_i g_i g_i^\top, \\
    \text{Fisher:}\quad & F = \sum_i \mathbb{E}_{y \sim p(y \mid x_i, \theta)}
        [g_i(y)\, g_i(y)^\top].

The GGN drops the residual term, so it equals the Hessian when :math:`f` is linear in
:math:`\theta`, and it is positive semi-definite whenever :math:`H_i` is. For an
exponential family in its natural parameter (canonical link) :math:`\nabla_f \log p =
T(y) - \mathbb{E}[T]` and :math:`H_i = \mathrm{Cov}[T]`, so the Fisher equals the GGN
for any network :math:`f`. Built-in likelihoods (:class:`Likelihood`), all canonical:

=============== ============================ ==========================================
name            output :math:`f`             :math:`H = \nabla^2_f(-\log p)`
=============== ============================ ==========================================
``bernoulli``   logits                       :math:`p(1-p)`, :math:`p = \sigma(f)`
``categorical`` logits, classes last         :math:`\mathrm{diag}(p) - pp^\top`,
                                             :math:`p = \mathrm{softmax}(f)`
``normal``      mean, fixed noise :math:`s`  :math:`1/s^2`
``poisson``     log-rate                     :math:`\lambda = e^f`
=============== ============================ ==========================================

Conventions:

* **Sums, not means.** Every curvature here is that of the *summed* negative
  log-likelihood of the examples given (no prior, no :math:`1/N`). Accumulating over a
  ``DataLoader`` that covers the data once gives the full-data curvature; a Laplace
  precision is then ``curvature + prior precision``, and the Hessian of the per-datum
  potential :math:`U = -\frac1N \log p(\theta \mid y)` of the samplers is about
  ``(curvature + prior precision) / N``. Over a subset of :math:`n` of the :math:`N`
  data, scale by :math:`N / n`.
* **Dense** matrices are :math:`(P, P)` over :func:`flatten` (each parameter
  flattened row-major, in dict order); **diagonals** are dicts shaped like the
  parameters.
* **Model functions** are ``fn(params, x) -> output`` with the batch first (e.g.
  :func:`module_fn` of an ``nn.Module``); **log-likelihoods** are
  ``log_lik(params, x, y) -> (B,)`` per-example values, never a reduced loss. Each
  example's output must depend on its own input only (``eval()`` mode for batch norm).
* **K-FAC** factors (:func:`kfac_factors`): :math:`A` is a mean over data and :math:`G`
  a sum, so ``kron(G, A)`` approximates the summed curvature block of
  :math:`\tilde W = [W, b]` flattened row-major (:func:`kfac_to_dense` gives it in the
  ``weight, bias`` order of :func:`flatten`); column-major ``vec`` would read
  :math:`A \otimes G`.

Examples:
    The GGN of a small classifier, as a matrix-free product and as a matrix:

    >>> import torch
    >>> _ = torch.manual_seed(0)
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> fn, params = module_fn(net), dict(net.named_parameters())
    >>> x = torch.randn(16, 3)
    >>> v = {k: torch.randn_like(p) for k, p in params.items()}
    >>> gv = ggnvp(fn, params, x, v, "categorical")
    >>> G = dense_ggn(fn, params, x, "categorical")
    >>> G.shape, torch.allclose(G @ flatten(v), flatten(gv), atol=1e-5)
    (torch.Size([26, 26]), True)
"""

from pyro_sgmcmc.curvature.accumulate import accumulate_ef, accumulate_ggn, accumulate_mc_fisher
from pyro_sgmcmc.curvature.cg import CGInfo, cg
from pyro_sgmcmc.curvature.diag_dense import (
    dense_ef,
    dense_ggn,
    dense_mc_fisher,
    diag_ef,
    diag_ggn,
    diag_mc_fisher,
)
from pyro_sgmcmc.curvature.kfac import KFACFactors, kfac_factors, kfac_to_dense, kron_mvp
from pyro_sgmcmc.curvature.module_diag import module_diag_ggn
from pyro_sgmcmc.curvature.per_example import per_example_grads
from pyro_sgmcmc.curvature.products import fvp, ggnvp, hvp
from pyro_sgmcmc.likelihoods import Likelihood
from pyro_sgmcmc.tree import flatten, module_fn, unflatten

__all__ = [
    "CGInfo",
    "KFACFactors",
    "Likelihood",
    "accumulate_ef",
    "accumulate_ggn",
    "accumulate_mc_fisher",
    "cg",
    "dense_ef",
    "dense_ggn",
    "dense_mc_fisher",
    "diag_ef",
    "diag_ggn",
    "diag_mc_fisher",
    "flatten",
    "fvp",
    "ggnvp",
    "hvp",
    "kfac_factors",
    "kfac_to_dense",
    "kron_mvp",
    "module_diag_ggn",
    "module_fn",
    "per_example_grads",
    "unflatten",
]
