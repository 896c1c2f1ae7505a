r"""Conjugate gradients over dicts of tensors or plain tensors."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from pyro_sgmcmc.tree import (
    Params,
    check_like,
)

__all__ = ["CGInfo", "cg"]


class CGInfo(NamedTuple):
    """What :func:`cg` did.

    Attributes:
        iterations: matrix-vector products after the initial residual.
        residual: :math:`\\|b - (A + \\lambda I) x\\|` by the CG recurrence.
        converged: whether ``residual <= max(tol * ||b||, atol)``.
    """

    iterations: int
    residual: float
    converged: bool


def _dot(a: Params | Tensor, b: Params | Tensor) -> Tensor:
    if isinstance(a, Tensor):
        return (a * b).sum()
    return sum((a[k] * b[k]).sum() for k in a)


def _axpy(alpha: Tensor | float, x: Params | Tensor, y: Params | Tensor) -> Params | Tensor:
    """``alpha * x + y``."""
    if isinstance(x, Tensor):
        return alpha * x + y
    return {k: alpha * x[k] + y[k] for k in x}


def cg(
    matvec: Callable[[Any], Any],
    b: Params | Tensor,
    x0: Params | Tensor | None = None,
    *,
    tol: float = 1e-6,
    atol: float = 0.0,
    max_iter: int | None = None,
    damping: float = 0.0,
) -> tuple[Params | Tensor, CGInfo]:
    r"""Conjugate gradients for :math:`(A + \lambda I)\, x = b`, :math:`A` symmetric PSD.

    .. math::

        \alpha_k = \frac{r_k^\top r_k}{p_k^\top (A + \lambda I) p_k},\quad
        x_{k+1} = x_k + \alpha_k p_k,\quad
        r_{k+1} = r_k - \alpha_k (A + \lambda I) p_k,\quad
        p_{k+1} = r_{k+1} + \frac{r_{k+1}^\top r_{k+1}}{r_k^\top r_k} p_k.

    Vectors are dicts of tensors (a direction in parameter space, e.g. with ``matvec =
    lambda v: ggnvp(fn, params, x, v, "categorical")``) or plain tensors. Each iteration
    reads the residual norm on the host (one synchronisation) to test convergence.

    Args:
        matvec: :math:`v \mapsto A v`, same structure in and out.
        b: the right-hand side.
        x0: the starting point (zeros by default).
        tol: relative tolerance: stop when
            :math:`\|r\| \le \max(\mathrm{tol} \|b\|, \mathrm{atol})`.
        atol: absolute tolerance.
        max_iter: at most this many iterations (default ``10 * numel(b)``).
        damping: :math:`\lambda \ge 0`, e.g. the prior precision.

    Returns:
        ``(x, CGInfo)``.

    Raises:
        ValueError: :math:`p^\top (A + \lambda I) p \le 0` (not positive definite: add
            damping).

    Examples:
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]])
        >>> x, info = cg(lambda v: {"w": A @ v["w"]}, {"w": torch.tensor([1.0, 2.0])})
        >>> x["w"], info.converged
        (tensor([0.0909, 0.6364]), True)
    """
    if damping < 0:
        raise ValueError(f"damping must be non-negative, got {damping}")

    def op(v: Any) -> Any:
        av = matvec(v)
        return _axpy(damping, v, av) if damping else av

    zeros = (lambda t: torch.zeros_like(t)) if isinstance(b, Tensor) else None
    if x0 is None:
        x = zeros(b) if zeros else {k: torch.zeros_like(t) for k, t in b.items()}
        r = b
    else:
        if not isinstance(b, Tensor):
            check_like(x0, b, "x0")
        x = x0
        r = _axpy(-1.0, op(x0), b)
    numel = b.numel() if isinstance(b, Tensor) else sum(t.numel() for t in b.values())
    max_iter = 10 * numel if max_iter is None else max_iter
    threshold = max(tol * float(_dot(b, b).sqrt()), atol)
    p, rs = r, _dot(r, r)
    res = float(rs.sqrt())
    it = 0
    while res > threshold and it < max_iter:
        ap = op(p)
        curv = _dot(p, ap)
        if not float(curv) > 0:
            raise ValueError(
                f"cg: p^T A p = {float(curv):.3g} <= 0 at iteration {it}: the operator is not "
                "positive definite; add damping (e.g. the prior precision)"
            )
        alpha = rs / curv
        x = _axpy(alpha, p, x)
        r = _axpy(-alpha, ap, r)
        rs_new = _dot(r, r)
        p = _axpy(rs_new / rs, p, r)
        rs = rs_new
        res = float(rs.sqrt())
        it += 1
    return x, CGInfo(it, res, res <= threshold)
