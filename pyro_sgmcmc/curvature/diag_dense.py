r"""Diagonal and dense GGN, empirical Fisher and Monte Carlo Fisher of one batch."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from pyro_sgmcmc.curvature.per_example import ggn_from_jacobians, per_example_grads
from pyro_sgmcmc.likelihoods import Likelihood
from pyro_sgmcmc.tree import (
    LogLikFn,
    ModelFn,
    Params,
    SampleFn,
    batch_size,
    detached,
    tree_add,
    tree_map,
)

__all__ = [
    "dense_ef",
    "dense_ggn",
    "dense_mc_fisher",
    "diag_ef",
    "diag_ggn",
    "diag_mc_fisher",
    "mc_fisher",
]


def diag_ggn(fn: ModelFn, params: Params, x: Any, likelihood: str | Likelihood) -> Params:
    r"""Exact GGN diagonal :math:`\mathrm{diag}\, G = \sum_i \mathrm{diag}(J_i^\top H_i J_i)`.

    From per-example Jacobians (``vmap(jacrev)``, memory :math:`O(B\,K\,P)` for
    :math:`K` outputs per example); ``categorical`` uses :math:`HJ = p \odot J - p\,
    (p^\top J)`, never a :math:`C \times C` matrix.

    Returns:
        A dict like ``params``.

    Examples:
        >>> fn = lambda p, x: x @ p["w"]
        >>> diag_ggn(fn, {"w": torch.zeros(2)}, torch.tensor([[1.0, 2.0]]), "bernoulli")
        {'w': tensor([0.2500, 1.0000])}
    """
    jac, hjac = ggn_from_jacobians(fn, params, x, likelihood)
    return {
        k: (j * hjac[k]).reshape(-1, j.shape[-1]).sum(0).reshape(params[k].shape)
        for k, j in jac.items()
    }


def dense_ggn(fn: ModelFn, params: Params, x: Any, likelihood: str | Likelihood) -> Tensor:
    r"""The GGN :math:`G = \sum_i J_i^\top H_i J_i` as a :math:`(P, P)` matrix over :func:`flatten`.

    Examples:
        >>> fn = lambda p, x: x @ p["w"]
        >>> dense_ggn(fn, {"w": torch.zeros(2)}, torch.tensor([[1.0, 2.0]]), "bernoulli")
        tensor([[0.2500, 0.5000],
                [0.5000, 1.0000]])
    """
    jac, hjac = ggn_from_jacobians(fn, params, x, likelihood)
    j = torch.cat([t.reshape(-1, t.shape[-1]) for t in jac.values()], dim=1)
    hj = torch.cat([t.reshape(-1, t.shape[-1]) for t in hjac.values()], dim=1)
    return j.T @ hj


def diag_ef(per_example: Mapping[str, Tensor]) -> Params:
    r"""Diagonal of the empirical Fisher, :math:`\sum_i g_i \odot g_i`.

    Args:
        per_example: ``(B, *param.shape)`` gradients per parameter, from
            :func:`per_example_grads`, ``ModulePotential.per_example_grads`` or
            ``PyroPotential.per_example_grads``.

    Examples:
        >>> diag_ef({"w": torch.tensor([[1.0, 2.0], [3.0, 0.0]])})
        {'w': tensor([10.,  4.])}
    """
    return {k: (g * g).sum(0) for k, g in per_example.items()}


def dense_ef(per_example: Mapping[str, Tensor]) -> Tensor:
    r"""The empirical Fisher :math:`\sum_i g_i g_i^\top`, :math:`(P, P)` over :func:`flatten`.

    Examples:
        >>> dense_ef({"w": torch.tensor([[1.0, 2.0], [3.0, 0.0]])})
        tensor([[10.,  2.],
                [ 2.,  4.]])
    """
    g = torch.cat([t.reshape(t.shape[0], -1) for t in per_example.values()], dim=1)
    return g.T @ g


# ---------------------------------------------------------------------- Monte Carlo Fisher
def mc_fisher(
    log_lik: LogLikFn,
    sample_y: SampleFn,
    params: Params,
    x: Any,
    num_samples: int,
    generator: torch.Generator | None,
    diagonal: bool,
    chunk_size: int,
) -> Params | Tensor:
    if num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples}")
    b = batch_size(x)
    per_chunk = max(1, chunk_size // b)
    params = detached(params)
    acc: Any = None
    done = 0
    while done < num_samples:
        s = min(per_chunk, num_samples - done)
        # s copies of the batch, one fresh y per row: all draws in one vmapped pass.
        xs = tree_map(lambda t, s=s: t.repeat(s, *([1] * (t.dim() - 1))), x)
        with torch.no_grad():
            ys = sample_y(params, xs, generator)
        g = per_example_grads(log_lik, params, xs, ys)
        acc = tree_add(acc, diag_ef(g) if diagonal else dense_ef(g))
        done += s
    if diagonal:
        return {k: a / num_samples for k, a in acc.items()}
    return acc / num_samples


def diag_mc_fisher(
    log_lik: LogLikFn,
    sample_y: SampleFn,
    params: Params,
    x: Any,
    num_samples: int = 1,
    generator: torch.Generator | None = None,
    *,
    chunk_size: int = 8192,
) -> Params:
    r"""Monte Carlo diagonal Fisher :math:`\sum_i \frac1S \sum_s g_i(y_s) \odot g_i(y_s)`.

    Targets :math:`y_s \sim p(y \mid x_i, \theta)` come from the model, so this
    estimates the (conditional, expected) Fisher of any likelihood, without bias; for
    exponential families with canonical links it converges to :func:`diag_ggn`.

    Args:
        log_lik: ``(params, x, y) -> (B,)`` per-example log-likelihoods.
        sample_y: ``(params, x, generator) -> y``, one draw per row of ``x``, e.g.
            ``lambda p, x, g: Likelihood("bernoulli").sample(fn(p, x), g)``.
        params: where to evaluate.
        x: the batch of inputs.
        num_samples: :math:`S` draws per example.
        generator: source of the draws.
        chunk_size: at most this many (draw, example) rows per vectorised pass.

    Examples:
        >>> lik, fn = Likelihood("bernoulli"), lambda p, x: x @ p["w"]
        >>> ll = lambda p, x, y: lik.log_prob(fn(p, x), y)
        >>> draw = lambda p, x, g: lik.sample(fn(p, x), g)
        >>> x, w = torch.tensor([[1.0, 2.0]]), {"w": torch.zeros(2)}
        >>> f = diag_mc_fisher(ll, draw, w, x, 1000, torch.Generator().manual_seed(0))
        >>> f["w"]  # g = (y - 1/2) x, so g^2 = x^2 / 4 whatever y is
        tensor([0.2500, 1.0000])
    """
    return mc_fisher(log_lik, sample_y, params, x, num_samples, generator, True, chunk_size)


def dense_mc_fisher(
    log_lik: LogLikFn,
    sample_y: SampleFn,
    params: Params,
    x: Any,
    num_samples: int = 1,
    generator: torch.Generator | None = None,
    *,
    chunk_size: int = 8192,
) -> Tensor:
    r"""Monte Carlo Fisher :math:`\sum_i \frac1S \sum_s g_i(y_s) g_i(y_s)^\top`, :math:`(P, P)`.

    As :func:`diag_mc_fisher`, over :func:`flatten`.

    Examples:
        >>> lik, fn = Likelihood("bernoulli"), lambda p, x: x @ p["w"]
        >>> ll = lambda p, x, y: lik.log_prob(fn(p, x), y)
        >>> draw = lambda p, x, g: lik.sample(fn(p, x), g)
        >>> x, w = torch.tensor([[1.0, 2.0]]), {"w": torch.zeros(2)}
        >>> dense_mc_fisher(ll, draw, w, x, 10, torch.Generator().manual_seed(0))
        tensor([[0.2500, 0.5000],
                [0.5000, 1.0000]])
    """
    return mc_fisher(log_lik, sample_y, params, x, num_samples, generator, False, chunk_size)
