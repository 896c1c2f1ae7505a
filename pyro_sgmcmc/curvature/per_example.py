r"""Per-example pieces: gradients :math:`g_i` and Jacobians :math:`J_i` (``vmap``, with a
loop where an operation has no batching rule)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.func import grad, jacrev, vmap

from pyro_sgmcmc.likelihoods import Likelihood, as_likelihood
from pyro_sgmcmc.tree import (
    UNSUPPORTED,
    LogLikFn,
    ModelFn,
    Params,
    batch_size,
    detached,
    tree_map,
)

__all__ = ["ggn_from_jacobians", "per_example_grads", "per_example_jacobians"]


def per_example_grads(log_lik: LogLikFn, params: Params, x: Any, y: Any) -> Params:
    r"""Each example's :math:`g_i = \nabla_\theta \log p(y_i \mid x_i, \theta)`.

    ``vmap(grad)`` over examples (a loop where an operation has no batching rule).

    Returns:
        A dict of ``(B, *param.shape)`` tensors.

    Examples:
        >>> ll = lambda p, x, y: -0.5 * (y - x @ p["w"]) ** 2
        >>> x, y = torch.tensor([[1.0], [2.0]]), torch.tensor([1.0, 0.0])
        >>> per_example_grads(ll, {"w": torch.zeros(1)}, x, y)["w"]
        tensor([[1.],
                [0.]])
    """
    params = detached(params)
    b = batch_size(x)

    def one(p: Params, xi: Any, yi: Any) -> Tensor:
        ll = log_lik(p, tree_map(lambda t: t.unsqueeze(0), xi), tree_map(lambda t: t[None], yi))
        return ll.sum()  # (1,) or () on a batch of one

    try:
        return dict(vmap(grad(one), in_dims=(None, 0, 0))(params, x, y))
    except UNSUPPORTED:
        rows = [
            grad(one)(params, tree_map(lambda t, i=i: t[i], x), tree_map(lambda t, i=i: t[i], y))
            for i in range(b)
        ]
        return {k: torch.stack([r[k] for r in rows]) for k in params}


def per_example_jacobians(fn: ModelFn, params: Params, x: Any) -> Params:
    """:math:`J_i` per parameter, shape ``(B, *output_i.shape, P_k)`` (the parameter flattened)."""
    params = detached(params)

    def one(p: Params, xi: Any) -> Tensor:
        return fn(p, tree_map(lambda t: t.unsqueeze(0), xi))[0]

    try:
        jac = vmap(jacrev(one), in_dims=(None, 0))(params, x)
    except UNSUPPORTED:
        rows = [jacrev(one)(params, tree_map(lambda t, i=i: t[i], x)) for i in range(batch_size(x))]
        jac = {k: torch.stack([r[k] for r in rows]) for k in params}
    return {k: j.flatten(j.dim() - params[k].dim()) for k, j in jac.items()}


def ggn_from_jacobians(
    fn: ModelFn, params: Params, x: Any, likelihood: str | Likelihood
) -> tuple[Params, Params]:
    """Per-example Jacobians and :math:`H J`, both ``(B, *output_i.shape, P_k)`` per parameter."""
    lik = as_likelihood(likelihood)
    with torch.no_grad():
        out = fn(detached(params), x)
    jac = per_example_jacobians(fn, params, x)
    return jac, {k: lik.hessian_mvp(out, j) for k, j in jac.items()}
