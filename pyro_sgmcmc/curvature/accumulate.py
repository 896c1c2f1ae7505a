r"""Curvature summed over a data loader, one batch in memory at a time."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from pyro_sgmcmc.curvature.diag_dense import dense_ef, dense_ggn, diag_ef, diag_ggn, mc_fisher
from pyro_sgmcmc.likelihoods import Likelihood
from pyro_sgmcmc.tree import (
    LogLikFn,
    ModelFn,
    Params,
    SampleFn,
    device_of,
    split_batch,
    tree_add,
    tree_map,
)

__all__ = ["accumulate_ef", "accumulate_ggn", "accumulate_mc_fisher"]


def accumulate_ggn(
    fn: ModelFn,
    params: Params,
    batches: Iterable[Any],
    likelihood: str | Likelihood,
    *,
    diagonal: bool = True,
) -> Params | Tensor:
    """The GGN summed over batches (:func:`diag_ggn` or :func:`dense_ggn` per batch).

    Args:
        fn: as in :func:`ggnvp`.
        params: as in :func:`ggnvp`.
        likelihood: as in :func:`ggnvp`.
        batches: an iterable of ``(x, y)`` pairs (``y`` unused) or of inputs ``x``, e.g.
            a ``DataLoader``; moved to the parameters' device.
        diagonal: a dict like ``params`` (memory :math:`O(P)` besides one batch's
            Jacobians) or the dense :math:`(P, P)` matrix.

    Returns:
        The sum over every example seen (no mean, no prior).

    Examples:
        >>> fn = lambda p, x: x @ p["w"]
        >>> batches = [(torch.ones(2, 2), None), (torch.ones(3, 2), None)]
        >>> accumulate_ggn(fn, {"w": torch.zeros(2)}, batches, "normal")
        {'w': tensor([5., 5.])}
    """
    device = device_of(params)
    acc: Any = None
    for batch in batches:
        x = tree_map(lambda t: t.to(device), split_batch(batch)[0])
        curv = diag_ggn if diagonal else dense_ggn
        acc = tree_add(acc, curv(fn, params, x, likelihood))
    if acc is None:
        raise ValueError("batches is empty")
    return acc


def accumulate_ef(
    grads_fn: Callable[[Params, Any], Mapping[str, Tensor]],
    params: Params,
    batches: Iterable[Any],
    *,
    diagonal: bool = True,
) -> Params | Tensor:
    r"""The empirical Fisher summed over batches.

    Args:
        grads_fn: ``(params, batch) -> (B, *param.shape)`` per-example gradients, e.g.
            ``ModulePotential.per_example_grads`` (batches ``(x, y)``),
            ``PyroPotential.per_example_grads`` (batches of plate indices), or
            ``lambda p, b: per_example_grads(log_lik, p, *b)``.
        params: where to evaluate.
        batches: an iterable of what ``grads_fn`` takes (tensors are moved to the
            parameters' device).
        diagonal: a dict like ``params`` (memory :math:`O(P)` besides one batch's
            gradients) or the dense :math:`(P, P)` matrix.

    Returns:
        The sum over every example seen (no mean, no prior).

    Examples:
        >>> from pyro_sgmcmc.curvature import per_example_grads
        >>> ll = lambda p, x, y: -0.5 * (y - x @ p["w"]) ** 2
        >>> grads_fn = lambda p, b: per_example_grads(ll, p, *b)
        >>> batches = [(torch.ones(2, 1), torch.ones(2)), (torch.ones(1, 1), 3 * torch.ones(1))]
        >>> accumulate_ef(grads_fn, {"w": torch.zeros(1)}, batches)  # 1 + 1 + 9
        {'w': tensor([11.])}
    """
    device = device_of(params)
    acc: Any = None
    for batch in batches:
        g = grads_fn(params, tree_map(lambda t: t.to(device), batch))
        acc = tree_add(acc, diag_ef(g) if diagonal else dense_ef(g))
    if acc is None:
        raise ValueError("batches is empty")
    return acc


def accumulate_mc_fisher(
    log_lik: LogLikFn,
    sample_y: SampleFn,
    params: Params,
    batches: Iterable[Any],
    num_samples: int = 1,
    generator: torch.Generator | None = None,
    *,
    diagonal: bool = True,
    chunk_size: int = 8192,
) -> Params | Tensor:
    """The Monte Carlo Fisher (:func:`diag_mc_fisher`, :func:`dense_mc_fisher`) over batches.

    Batches are ``(x, y)`` pairs (``y`` unused: targets are drawn from the model) or
    inputs ``x``. Returns the sum over every example seen.

    Examples:
        >>> from pyro_sgmcmc.likelihoods import Likelihood
        >>> lik, fn = Likelihood("normal"), lambda p, x: x @ p["w"]
        >>> ll = lambda p, x, y: lik.log_prob(fn(p, x), y)
        >>> draw = lambda p, x, g: lik.sample(fn(p, x), g)
        >>> batches = [torch.ones(2, 1), torch.ones(3, 1)]
        >>> f = accumulate_mc_fisher(ll, draw, {"w": torch.zeros(1)}, batches, 4000,
        ...                          torch.Generator().manual_seed(0))
        >>> abs(f["w"].item() - 5.0) < 0.2  # the GGN: 5 examples, x^2 / s^2 = 1 each
        True
    """
    device = device_of(params)
    acc: Any = None
    for batch in batches:
        x = tree_map(lambda t: t.to(device), split_batch(batch)[0])
        acc = tree_add(
            acc,
            mc_fisher(log_lik, sample_y, params, x, num_samples, generator, diagonal, chunk_size),
        )
    if acc is None:
        raise ValueError("batches is empty")
    return acc
