r"""Finding the mode during warm-up: Adam on minibatches, then a full-data polish.

Warm-up starts far from the posterior (a uniform draw in the prior's box), where
gradients can be :math:`10^{10}` times those near the mode and curvature differs by
orders of magnitude between coordinates. Adam's step is about its learning rate in
every coordinate whatever the gradient's scale, so it neither overflows on stiff
coordinates nor stalls on flat ones. Its end point is then polished on the full-data
potential by damped Newton steps with a backtracking line search (small models:
the Hessian is also the preconditioner's starting point) or by L-BFGS.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

#: Largest number of parameters for which the exact Hessian is formed.
MAX_DENSE = 200


class AdamState(NamedTuple):
    """First and second moment estimates and the step count."""

    m: Tensor
    v: Tensor
    t: int


def adam_init(z: Tensor) -> AdamState:
    return AdamState(torch.zeros_like(z), torch.zeros_like(z), 0)


def adam_step(
    z: Tensor, grad: Tensor, state: AdamState, lr: float, b1: float = 0.9, b2: float = 0.999
) -> tuple[Tensor, AdamState]:
    r"""One Adam step (Kingma & Ba, 2015):
    :math:`z \leftarrow z - \eta\, \hat m / (\sqrt{\hat v} + 10^{-8})`, elementwise, so
    vectorised chains each get their own moments."""
    t = state.t + 1
    m = b1 * state.m + (1 - b1) * grad
    v = b2 * state.v + (1 - b2) * grad.square()
    m_hat = m / (1 - b1**t)
    v_hat = v / (1 - b2**t)
    return z - lr * m_hat / (v_hat.sqrt() + 1e-8), AdamState(m, v, t)


def adam_lr(t: int, total: int, lr0: float = 0.1, lr1: float = 1e-3) -> float:
    """Cosine decay from ``lr0`` to ``lr1`` over ``total`` steps."""
    frac = min(t / max(total - 1, 1), 1.0)
    return lr1 + 0.5 * (lr0 - lr1) * (1 + math.cos(math.pi * frac))


def dense_hessian(fn: Callable[[Tensor], Tensor], z: Tensor) -> Tensor:
    """:math:`\\nabla^2 f(z)` of a scalar function of a vector, by reverse over reverse
    (one batched backward pass over the identity; a loop where that is unsupported)."""
    z = z.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(z), z, create_graph=True)
    eye = torch.eye(z.numel(), dtype=z.dtype, device=z.device)
    try:
        (h,) = torch.autograd.grad(g, z, eye, is_grads_batched=True, retain_graph=True)
    except RuntimeError:
        h = torch.stack([torch.autograd.grad(g, z, e, retain_graph=True)[0] for e in eye])
    return 0.5 * (h + h.T).detach()


class Polish(NamedTuple):
    """The polished point, its curvature (dense Hessian, or ``None``), the final
    gradient norm and whether the tolerance was met."""

    z: Tensor
    hessian: Tensor | None
    grad_norm: float
    converged: bool


def value_and_grad(fn: Callable[[Tensor], Tensor], z: Tensor) -> tuple[Tensor, Tensor]:
    z = z.detach().requires_grad_(True)
    u = fn(z)
    (g,) = torch.autograd.grad(u, z)
    return u.detach(), g.detach()


def newton(
    fn: Callable[[Tensor], Tensor], z: Tensor, max_iter: int = 50, tol: float = 1e-6
) -> Polish:
    r"""Damped Newton on ``fn`` from ``z``: solves :math:`(H + \lambda I)\,\delta = -g`
    with :math:`H` made positive definite (eigenvalues :math:`|\lambda_i|`, floored)
    and backtracks until ``fn`` decreases. Stops when the Newton decrement
    :math:`g^\top H^{-1} g` is below ``tol`` (the distance to the mode, measured in the
    curvature's own units, so it does not depend on how the model is scaled)."""
    u, g = value_and_grad(fn, z)
    h = dense_hessian(fn, z)
    decrement = float("inf")
    for _ in range(max_iter):
        evals, evecs = torch.linalg.eigh(h)
        floor = float(evals.abs().max()) * torch.finfo(evals.dtype).eps
        lam = torch.clamp(evals.abs(), min=floor + torch.finfo(evals.dtype).tiny)
        step = -(evecs @ ((evecs.T @ g) / lam))
        decrement = float(g @ -step)
        if not math.isfinite(decrement):
            break
        if decrement < tol:
            break
        t, moved = 1.0, False
        for _ in range(30):
            z_new = z + t * step
            u_new = fn(z_new.detach()).detach()
            if torch.isfinite(u_new) and u_new <= u + 1e-4 * t * float(g @ step):
                moved = True
                break
            t *= 0.5
        if not moved:
            break
        z = z_new.detach()
        u, g = value_and_grad(fn, z)
        h = dense_hessian(fn, z)
    return Polish(z, h, float(g.norm()), decrement < tol)


def lbfgs(
    fn: Callable[[Tensor], Tensor], z: Tensor, max_iter: int = 100, tol: float = 1e-6
) -> Polish:
    """L-BFGS with a strong-Wolfe line search (models too large for a dense Hessian);
    converged when the gradient's largest entry is below ``tol``."""
    x = z.detach().clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [x], lr=1.0, max_iter=max_iter, tolerance_grad=tol, line_search_fn="strong_wolfe"
    )

    def closure():
        opt.zero_grad()
        u = fn(x)
        u.backward()
        return u

    start = x.detach().clone()
    try:
        opt.step(closure)
    except RuntimeError:
        x = start.requires_grad_(True)
    z_new = x.detach()
    u, g = value_and_grad(fn, z_new)
    if not torch.isfinite(u):
        z_new = start
        u, g = value_and_grad(fn, z_new)
    return Polish(z_new, None, float(g.norm()), float(g.abs().max()) < tol)
