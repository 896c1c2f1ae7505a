r"""Matrix-free curvature products: Hessian-, GGN- and empirical-Fisher-vector products.

None forms a matrix: each is one or two forward/backward passes (``jvp`` and
``vjp``), with a reverse-only fallback where an operation has no forward-mode rule.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.func import grad, jvp, vjp

from pyro_sgmcmc.likelihoods import Likelihood, as_likelihood
from pyro_sgmcmc.tree import (
    UNSUPPORTED,
    LogLikFn,
    ModelFn,
    Params,
    batch_size,
    check_like,
    detached,
)

__all__ = ["fvp", "ggnvp", "hvp", "jvp_vjp"]

_MODES = ("auto", "forward", "reverse")


def _forward_first(mode: str, forward: Callable[[], Params]) -> Params | None:
    """``forward()`` unless ``mode`` is ``"reverse"``; ``None`` (use reverse mode) when an
    operation has no forward-mode rule and ``mode`` is ``"auto"``."""
    if mode == "reverse":
        return None
    try:
        return forward()
    except UNSUPPORTED:
        if mode == "forward":
            raise
        return None


def _check_mode(mode: str) -> None:
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")


def hvp(f: Callable[[Params], Tensor], params: Params, v: Params, *, mode: str = "auto") -> Params:
    r"""Hessian-vector product :math:`\nabla^2 f(\theta)\, v` of a scalar function.

    Forward-over-reverse (``jvp`` of ``grad``), one pass of each. ``mode="auto"``
    falls back to double backward (reverse over reverse) when an operation has no
    forward-mode rule; ``"forward"`` / ``"reverse"`` force one.

    Args:
        f: ``params -> scalar``, e.g. a loss over a batch that ``f`` closes over.
        params: where to evaluate, a dict of tensors.
        v: the direction, a dict like ``params``.
        mode: ``"auto"``, ``"forward"`` or ``"reverse"``.

    Returns:
        A dict like ``params``.

    Examples:
        >>> f = lambda p: (p["a"] ** 3).sum()  # Hessian diag(6 a)
        >>> hvp(f, {"a": torch.tensor([1.0, 2.0])}, {"a": torch.tensor([1.0, 1.0])})
        {'a': tensor([ 6., 12.])}
    """
    check_like(v, params, "v")
    _check_mode(mode)
    params, v = detached(params), detached(v)
    forward = _forward_first(mode, lambda: dict(jvp(grad(f), (params,), (v,))[1]))
    if forward is not None:
        return forward
    leaves = {k: p.detach().requires_grad_(True) for k, p in params.items()}
    with torch.enable_grad():
        out = f(leaves)
        grads = torch.autograd.grad(
            out, list(leaves.values()), create_graph=True, allow_unused=True
        )
        gv = sum((g * v[k]).sum() for g, k in zip(grads, leaves, strict=True) if g is not None)
        hv = torch.autograd.grad(gv, list(leaves.values()), allow_unused=True)
    return {
        k: torch.zeros_like(p) if h is None else h
        for (k, p), h in zip(params.items(), hv, strict=True)
    }


def jvp_vjp(
    f: Callable[[Params], Tensor],
    params: Params,
    v: Params,
    middle: Callable[[Tensor, Tensor], Tensor],
    mode: str,
) -> Params:
    """:math:`J^\\top M(f, J v)`, :math:`J` the Jacobian of ``f`` at ``params``, never formed."""
    check_like(v, params, "v")
    _check_mode(mode)
    params, v = detached(params), detached(v)

    def forward_mode() -> Params:
        out, jv = jvp(f, (params,), (v,))
        _, vjp_fn = vjp(f, params)
        return dict(vjp_fn(middle(out, jv))[0])

    forward = _forward_first(mode, forward_mode)
    if forward is not None:
        return forward
    # Reverse only: J v is the gradient wrt u of u^T-weighted vjp (the double-vjp trick).
    leaves = {k: p.detach().requires_grad_(True) for k, p in params.items()}
    with torch.enable_grad():
        out = f(leaves)
        u = torch.zeros_like(out, requires_grad=True)
        jtu = torch.autograd.grad(
            out, list(leaves.values()), u, create_graph=True, allow_unused=True
        )
        dot = sum((g * v[k]).sum() for g, k in zip(jtu, leaves, strict=True) if g is not None)
        (jv,) = torch.autograd.grad(dot, u)
        res = torch.autograd.grad(
            out, list(leaves.values()), middle(out.detach(), jv), allow_unused=True
        )
    return {
        k: torch.zeros_like(p) if r is None else r
        for (k, p), r in zip(params.items(), res, strict=True)
    }


def ggnvp(
    fn: ModelFn,
    params: Params,
    x: Any,
    v: Params,
    likelihood: str | Likelihood,
    *,
    mode: str = "auto",
) -> Params:
    r"""GGN-vector product :math:`G v = \sum_i J_i^\top H_i J_i v` over a batch.

    One ``jvp`` (:math:`Jv`), the output Hessian :math:`H` applied per example, one
    ``vjp``: no Jacobian is formed, memory is that of two forward passes.

    Args:
        fn: ``(params, x) -> output``, the likelihood's natural parameter, batch first.
        params: where to evaluate.
        x: the batch of inputs (anything ``fn`` takes).
        v: the direction, a dict like ``params``.
        likelihood: a :class:`Likelihood` or its name (``"normal"`` has scale 1).
        mode: ``"auto"`` (forward-mode ``jvp``, falling back to reverse-only double
            backward), ``"forward"`` or ``"reverse"``.

    Returns:
        A dict like ``params``.

    Examples:
        >>> fn = lambda p, x: x @ p["w"]  # linear-Gaussian: G = X^T X / s^2
        >>> x = torch.tensor([[1.0, 0.0], [1.0, 2.0]])
        >>> ggnvp(fn, {"w": torch.zeros(2)}, x, {"w": torch.tensor([1.0, 0.0])}, "normal")
        {'w': tensor([2., 2.])}
    """
    lik = as_likelihood(likelihood)
    return jvp_vjp(lambda p: fn(p, x), params, v, lik.hessian_mvp, mode)


def fvp(
    log_lik: LogLikFn, params: Params, x: Any, y: Any, v: Params, *, mode: str = "auto"
) -> Params:
    r"""Empirical Fisher-vector product :math:`\tilde F v = \sum_i g_i (g_i^\top v)`.

    The :math:`g_i^\top v` are one ``jvp`` of the per-example log-likelihood vector and
    the sum one ``vjp``, so the per-example gradients are never stored (memory
    :math:`O(P)`, not :math:`O(BP)`); :func:`dense_ef` of :func:`per_example_grads`
    gives the same matrix.

    Args:
        log_lik: ``(params, x, y) -> (B,)`` per-example log-likelihoods.
        params: where to evaluate.
        x: the batch of inputs.
        y: the batch of targets.
        v: the direction, a dict like ``params``.
        mode: as in :func:`ggnvp`.

    Examples:
        >>> ll = lambda p, x, y: -0.5 * (y - x @ p["w"]) ** 2
        >>> x, y = torch.tensor([[1.0], [2.0]]), torch.tensor([1.0, 0.0])
        >>> fvp(ll, {"w": torch.zeros(1)}, x, y, {"w": torch.ones(1)})  # g = (1, 0)
        {'w': tensor([1.])}
    """
    b = batch_size(x)

    def f(p: Params) -> Tensor:
        ll = log_lik(p, x, y)
        if ll.shape != (b,):
            raise ValueError(
                f"log_lik must return one log-likelihood per example, shape ({b},); got "
                f"{tuple(ll.shape)} (a reduced loss has no per-example gradients)"
            )
        return ll

    return jvp_vjp(f, params, v, lambda out, jv: jv, mode)
