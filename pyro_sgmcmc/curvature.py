r"""Curvature of the negative log-likelihood: Hessian, GGN, Fisher, K-FAC, and CG.

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

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, jvp, vjp, vmap

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

Params = dict[str, Tensor]
#: ``(params, x) -> output`` with the batch first.
ModelFn = Callable[[Params, Any], Tensor]
#: ``(params, x, y) -> (B,)`` per-example log-likelihoods.
LogLikFn = Callable[[Params, Any, Any], Tensor]
#: ``(params, x, generator) -> y``, one draw per row of ``x`` from the model.
SampleFn = Callable[[Params, Any, "torch.Generator | None"], Tensor]

# Errors a missing forward-mode (or vmap) rule raises; then we fall back to reverse mode.
_UNSUPPORTED = (RuntimeError, NotImplementedError)
_MODES = ("auto", "forward", "reverse")


# ---------------------------------------------------------------------- dict helpers
def flatten(params: Mapping[str, Tensor], batch_dims: int = 0) -> Tensor:
    """Concatenate the parameters, each flattened row-major, in dict order.

    Args:
        params: a dict of tensors.
        batch_dims: leading dimensions shared by all entries (e.g. 1 for draws
            ``(S, *shape)``), kept in front.

    Examples:
        >>> flatten({"w": torch.tensor([[1.0, 2.0]]), "b": torch.tensor([3.0])})
        tensor([1., 2., 3.])
    """
    if not params:
        raise ValueError("params is empty: pass a dict of at least one tensor")
    parts = list(params.values())
    lead = parts[0].shape[:batch_dims]
    return torch.cat([p.reshape((*lead, -1)) for p in parts], dim=-1)


def unflatten(vec: Tensor, like: Mapping[str, Tensor]) -> Params:
    """Split the last dimension of ``vec`` into a dict shaped like ``like``.

    Leading dimensions of ``vec`` (e.g. draws) are kept in front of every entry.

    Examples:
        >>> unflatten(torch.arange(3.0), {"w": torch.zeros(1, 2), "b": torch.zeros(1)})
        {'w': tensor([[0., 1.]]), 'b': tensor([2.])}
    """
    sizes = [p.numel() for p in like.values()]
    if vec.dim() < 1 or vec.shape[-1] != sum(sizes):
        raise ValueError(
            f"vec's last dimension must have {sum(sizes)} entries (the parameters' total "
            f"size), got shape {tuple(vec.shape)}"
        )
    lead = vec.shape[:-1]
    parts = vec.split(sizes, dim=-1)
    return {
        k: part.reshape((*lead, *p.shape)) for (k, p), part in zip(like.items(), parts, strict=True)
    }


def module_fn(
    module: nn.Module, output_transform: Callable[[Any], Tensor] | None = None
) -> ModelFn:
    """``fn(params, x) = module(x)`` evaluated at ``params`` (``functional_call``).

    Parameters missing from ``params`` (and buffers) come from the module itself, so
    ``params`` may be a subset, e.g. only the last layer's.

    Examples:
        >>> net = torch.nn.Linear(2, 1)
        >>> fn = module_fn(net, lambda out: out.squeeze(-1))
        >>> fn({"weight": torch.ones(1, 2), "bias": torch.zeros(1)}, torch.ones(3, 2))
        tensor([2., 2., 2.])
    """

    def fn(params: Params, x: Any) -> Tensor:
        out = functional_call(module, params, (x,))
        return out if output_transform is None else output_transform(out)

    return fn


def _check_like(v: Mapping[str, Tensor], params: Mapping[str, Tensor], name: str) -> None:
    if list(v.keys()) != list(params.keys()):
        raise ValueError(
            f"{name} must have the keys of params in the same order, {list(params)}; got {list(v)}"
        )
    for k, p in params.items():
        if v[k].shape != p.shape:
            raise ValueError(
                f"{name}['{k}'] has shape {tuple(v[k].shape)}, params['{k}'] {tuple(p.shape)}"
            )


def _detached(params: Mapping[str, Tensor]) -> Params:
    """Curvature is a value, not part of the caller's graph (``nn.Parameter``s included)."""
    return {k: p.detach() for k, p in params.items()}


def _check_mode(mode: str) -> None:
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")


def _tree_map(fn: Callable[[Tensor], Tensor], x: Any) -> Any:
    """Map over the tensors of an input: a tensor, a tuple/list or a dict of tensors."""
    if isinstance(x, Tensor):
        return fn(x)
    if isinstance(x, Mapping):
        return {k: _tree_map(fn, v) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_tree_map(fn, v) for v in x)
    return x


def _leaves(x: Any) -> list[Tensor]:
    leaves: list[Tensor] = []

    def visit(t: Tensor) -> Tensor:
        leaves.append(t)
        return t

    _tree_map(visit, x)
    return leaves


def _batch_size(x: Any) -> int:
    sizes = [t.shape[0] if t.dim() else 0 for t in _leaves(x)]
    if not sizes or any(s != sizes[0] for s in sizes) or sizes[0] == 0:
        raise ValueError(
            f"inputs must be tensors sharing a non-empty batch (first) dimension, got sizes {sizes}"
        )
    return sizes[0]


def _split_batch(batch: Any) -> tuple[Any, Any]:
    """``(x, y)`` from a loader's batch; a batch that is not a pair is ``x`` alone."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    return batch, None


def _device_of(params: Mapping[str, Tensor]) -> torch.device:
    return next(iter(params.values())).device


def _add(acc: Any, new: Any) -> Any:
    if acc is None:
        return new
    if isinstance(new, Mapping):
        return {k: acc[k] + new[k] for k in new}
    return acc + new


# ---------------------------------------------------------------------- likelihoods
_LIKELIHOODS = ("bernoulli", "categorical", "normal", "poisson")


@dataclass(frozen=True)
class Likelihood:
    r"""A likelihood in its natural parameter: log-density, sampler and output Hessian.

    Outputs have the batch first. ``bernoulli``, ``normal`` and ``poisson`` act
    elementwise on outputs of any shape ``(B, ...)``, with targets of the same shape;
    ``categorical`` takes logits ``(B, ..., C)`` (classes last) and integer labels
    ``(B, ...)``. Extra dimensions are independent and summed per example.

    Args:
        name: ``"bernoulli"``, ``"categorical"``, ``"normal"`` or ``"poisson"``.
        scale: the noise standard deviation :math:`s` of ``"normal"`` (ignored otherwise).

    Examples:
        >>> lik = Likelihood("normal", scale=0.5)
        >>> lik.hessian_mvp(torch.zeros(2, 1), torch.ones(2, 1))  # H = 1 / s^2
        tensor([[4.],
                [4.]])
        >>> Likelihood("categorical").log_prob(torch.zeros(1, 4), torch.tensor([2]))
        tensor([-1.3863])
    """

    name: str
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.name not in _LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {_LIKELIHOODS}, got {self.name!r}")
        if not self.scale > 0:
            raise ValueError(f"scale must be positive, got {self.scale}")

    def _target(self, out: Tensor, y: Tensor) -> Tensor:
        if self.name == "categorical":
            if y.is_floating_point() or out.shape[:-1] != y.shape:
                raise ValueError(
                    f"categorical needs integer labels of shape {tuple(out.shape[:-1])} "
                    f"for logits {tuple(out.shape)} (classes last), got {y.dtype} "
                    f"{tuple(y.shape)}"
                )
            return y
        if y.shape != out.shape:
            if y.numel() != out.numel() or y.shape[:1] != out.shape[:1]:
                raise ValueError(
                    f"{self.name}: output shape {tuple(out.shape)} does not match the "
                    f"target shape {tuple(y.shape)}"
                )
            y = y.reshape(out.shape)  # a (B, 1) head against (B,) targets
        return y.to(out.dtype)

    def log_prob(self, out: Tensor, y: Tensor) -> Tensor:
        """Per-example log-likelihoods ``(B,)`` of targets ``y`` given outputs ``out``."""
        y = self._target(out, y)
        if self.name == "bernoulli":
            lp = -F.binary_cross_entropy_with_logits(out, y, reduction="none")
        elif self.name == "categorical":
            lp = out.log_softmax(-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
        elif self.name == "normal":
            lp = (
                -0.5 * ((y - out) / self.scale) ** 2
                - math.log(self.scale)
                - 0.5 * math.log(2 * math.pi)
            )
        else:
            lp = y * out - out.exp() - torch.lgamma(y + 1)
        return lp.reshape(lp.shape[0], -1).sum(1)

    def sample(self, out: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """One target per example drawn from the model given outputs ``out``."""
        out = out.detach()
        if self.name == "bernoulli":
            return torch.bernoulli(torch.sigmoid(out), generator=generator)
        if self.name == "categorical":
            p = out.softmax(-1).reshape(-1, out.shape[-1])
            return torch.multinomial(p, 1, generator=generator).reshape(out.shape[:-1])
        if self.name == "normal":
            return out + self.scale * torch.randn(
                out.shape, generator=generator, dtype=out.dtype, device=out.device
            )
        return torch.poisson(out.exp(), generator=generator)

    def _elementwise_hessian(self, out: Tensor) -> Tensor:
        if self.name == "bernoulli":
            return torch.sigmoid(out) * torch.sigmoid(-out)  # p(1 - p), stable in the tails
        if self.name == "normal":
            return torch.full_like(out, 1.0 / self.scale**2)
        return out.exp()

    def hessian_mvp(self, out: Tensor, u: Tensor) -> Tensor:
        r""":math:`H u` per example, with ``u`` shaped ``out.shape + (R,)`` or ``out.shape``.

        For ``categorical``, :math:`Hu = p \odot u - p\,(p^\top u)` per class vector:
        :math:`O(C)` memory, never the :math:`C \times C` matrix.
        """
        out = out.detach()
        squeeze = u.shape == out.shape
        if squeeze:
            u = u.unsqueeze(-1)
        if self.name == "categorical":
            p = out.softmax(-1).unsqueeze(-1)
            hu = p * u - p * (p * u).sum(-2, keepdim=True)
        else:
            hu = self._elementwise_hessian(out).unsqueeze(-1) * u
        return hu.squeeze(-1) if squeeze else hu

    def hessian_factor(self, out: Tensor) -> Tensor:
        r"""Columns :math:`L_r`, shape ``(R,) + out.shape``, with :math:`\sum_r L_r L_r^\top = H`.

        :math:`R` is the number of outputs per example. Elementwise likelihoods have
        :math:`L_r = \sqrt{h_r}\, e_r`; ``categorical`` has :math:`L_c = \sqrt{p_c}\,
        (e_c - p)` per class vector, since :math:`\sum_c p_c (e_c - p)(e_c - p)^\top =
        \mathrm{diag}(p) - pp^\top`.
        """
        out = out.detach()
        b = out.shape[0]
        if self.name == "categorical":
            c = out.shape[-1]
            m = out[0].numel() // c
            p = out.softmax(-1).reshape(b, m, c)
            eye_c = torch.eye(c, dtype=out.dtype, device=out.device)
            block = p.sqrt().unsqueeze(-1) * (eye_c - p.unsqueeze(-2))  # (B, M, C_col, C)
            eye_m = torch.eye(m, dtype=out.dtype, device=out.device)
            cols = torch.einsum("nm,bmcd->ncbmd", eye_m, block)
            return cols.reshape(m * c, *out.shape)
        k = out[0].numel()
        eye = torch.eye(k, dtype=out.dtype, device=out.device).reshape(k, 1, *out.shape[1:])
        return eye * self._elementwise_hessian(out).sqrt().unsqueeze(0)


def _as_likelihood(likelihood: str | Likelihood) -> Likelihood:
    if isinstance(likelihood, Likelihood):
        return likelihood
    if isinstance(likelihood, str):
        return Likelihood(likelihood)
    raise TypeError(
        f"likelihood must be a name {_LIKELIHOODS} or a Likelihood, got {type(likelihood)}"
    )


# ---------------------------------------------------------------------- matrix-free products
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
    _check_like(v, params, "v")
    _check_mode(mode)
    params, v = _detached(params), _detached(v)
    if mode != "reverse":
        try:
            return dict(jvp(grad(f), (params,), (v,))[1])
        except _UNSUPPORTED:
            if mode == "forward":
                raise
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


def _jvp_vjp(
    f: Callable[[Params], Tensor],
    params: Params,
    v: Params,
    middle: Callable[[Tensor, Tensor], Tensor],
    mode: str,
) -> Params:
    """:math:`J^\\top M(f, J v)`, :math:`J` the Jacobian of ``f`` at ``params``, never formed."""
    _check_like(v, params, "v")
    _check_mode(mode)
    params, v = _detached(params), _detached(v)
    if mode != "reverse":
        try:
            out, jv = jvp(f, (params,), (v,))
            _, vjp_fn = vjp(f, params)
            return dict(vjp_fn(middle(out, jv))[0])
        except _UNSUPPORTED:
            if mode == "forward":
                raise
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
    lik = _as_likelihood(likelihood)
    return _jvp_vjp(lambda p: fn(p, x), params, v, lik.hessian_mvp, mode)


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
    b = _batch_size(x)

    def f(p: Params) -> Tensor:
        ll = log_lik(p, x, y)
        if ll.shape != (b,):
            raise ValueError(
                f"log_lik must return one log-likelihood per example, shape ({b},); got "
                f"{tuple(ll.shape)} (a reduced loss has no per-example gradients)"
            )
        return ll

    return _jvp_vjp(f, params, v, lambda out, jv: jv, mode)


# ---------------------------------------------------------------------- per-example pieces
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
    params = _detached(params)
    b = _batch_size(x)

    def one(p: Params, xi: Any, yi: Any) -> Tensor:
        ll = log_lik(p, _tree_map(lambda t: t.unsqueeze(0), xi), _tree_map(lambda t: t[None], yi))
        return ll.sum()  # (1,) or () on a batch of one

    try:
        return dict(vmap(grad(one), in_dims=(None, 0, 0))(params, x, y))
    except _UNSUPPORTED:
        rows = [
            grad(one)(params, _tree_map(lambda t, i=i: t[i], x), _tree_map(lambda t, i=i: t[i], y))
            for i in range(b)
        ]
        return {k: torch.stack([r[k] for r in rows]) for k in params}


def _per_example_jacobians(fn: ModelFn, params: Params, x: Any) -> Params:
    """:math:`J_i` per parameter, shape ``(B, *output_i.shape, P_k)`` (the parameter flattened)."""
    params = _detached(params)

    def one(p: Params, xi: Any) -> Tensor:
        return fn(p, _tree_map(lambda t: t.unsqueeze(0), xi))[0]

    try:
        jac = vmap(jacrev(one), in_dims=(None, 0))(params, x)
    except _UNSUPPORTED:
        rows = [
            jacrev(one)(params, _tree_map(lambda t, i=i: t[i], x)) for i in range(_batch_size(x))
        ]
        jac = {k: torch.stack([r[k] for r in rows]) for k in params}
    return {k: j.flatten(j.dim() - params[k].dim()) for k, j in jac.items()}


def _ggn_from_jacobians(
    fn: ModelFn, params: Params, x: Any, likelihood: str | Likelihood
) -> tuple[Params, Params]:
    """Per-example Jacobians and :math:`H J`, both ``(B, *output_i.shape, P_k)`` per parameter."""
    lik = _as_likelihood(likelihood)
    with torch.no_grad():
        out = fn(_detached(params), x)
    jac = _per_example_jacobians(fn, params, x)
    return jac, {k: lik.hessian_mvp(out, j) for k, j in jac.items()}


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
    jac, hjac = _ggn_from_jacobians(fn, params, x, likelihood)
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
    jac, hjac = _ggn_from_jacobians(fn, params, x, likelihood)
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
def _mc_fisher(
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
    b = _batch_size(x)
    per_chunk = max(1, chunk_size // b)
    params = _detached(params)
    acc: Any = None
    done = 0
    while done < num_samples:
        s = min(per_chunk, num_samples - done)
        # s copies of the batch, one fresh y per row: all draws in one vmapped pass.
        xs = _tree_map(lambda t, s=s: t.repeat(s, *([1] * (t.dim() - 1))), x)
        with torch.no_grad():
            ys = sample_y(params, xs, generator)
        g = per_example_grads(log_lik, params, xs, ys)
        acc = _add(acc, diag_ef(g) if diagonal else dense_ef(g))
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
    return _mc_fisher(log_lik, sample_y, params, x, num_samples, generator, True, chunk_size)


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
    return _mc_fisher(log_lik, sample_y, params, x, num_samples, generator, False, chunk_size)


# ---------------------------------------------------------------------- over a data loader
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
    device = _device_of(params)
    acc: Any = None
    for batch in batches:
        x = _tree_map(lambda t: t.to(device), _split_batch(batch)[0])
        curv = diag_ggn if diagonal else dense_ggn
        acc = _add(acc, curv(fn, params, x, likelihood))
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
        >>> ll = lambda p, x, y: -0.5 * (y - x @ p["w"]) ** 2
        >>> grads_fn = lambda p, b: per_example_grads(ll, p, *b)
        >>> batches = [(torch.ones(2, 1), torch.ones(2)), (torch.ones(1, 1), 3 * torch.ones(1))]
        >>> accumulate_ef(grads_fn, {"w": torch.zeros(1)}, batches)  # 1 + 1 + 9
        {'w': tensor([11.])}
    """
    device = _device_of(params)
    acc: Any = None
    for batch in batches:
        g = grads_fn(params, _tree_map(lambda t: t.to(device), batch))
        acc = _add(acc, diag_ef(g) if diagonal else dense_ef(g))
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
        >>> lik, fn = Likelihood("normal"), lambda p, x: x @ p["w"]
        >>> ll = lambda p, x, y: lik.log_prob(fn(p, x), y)
        >>> draw = lambda p, x, g: lik.sample(fn(p, x), g)
        >>> batches = [torch.ones(2, 1), torch.ones(3, 1)]
        >>> f = accumulate_mc_fisher(ll, draw, {"w": torch.zeros(1)}, batches, 4000,
        ...                          torch.Generator().manual_seed(0))
        >>> abs(f["w"].item() - 5.0) < 0.2  # the GGN: 5 examples, x^2 / s^2 = 1 each
        True
    """
    device = _device_of(params)
    acc: Any = None
    for batch in batches:
        x = _tree_map(lambda t: t.to(device), _split_batch(batch)[0])
        acc = _add(
            acc,
            _mc_fisher(log_lik, sample_y, params, x, num_samples, generator, diagonal, chunk_size),
        )
    if acc is None:
        raise ValueError("batches is empty")
    return acc


# ---------------------------------------------------------------------- K-FAC
class KFACFactors(NamedTuple):
    r"""Kronecker factors of one layer's curvature block, :math:`\approx G \otimes A`.

    Attributes:
        A: :math:`\frac1N \sum_i a_i a_i^\top`, input activations (a 1 appended for the
            bias), :math:`(d_{in} [+1])^2`; a mean over data.
        G: :math:`\sum_i \sum_r g_{ir} g_{ir}^\top`, gradients wrt the layer's output,
            :math:`d_{out}^2`; a sum over data.
        bias: whether the layer has a bias (the last row/column of ``A``).
    """

    A: Tensor
    G: Tensor
    bias: bool


def kron_mvp(A: Tensor, G: Tensor, V: Tensor) -> Tensor:
    r""":math:`(G \otimes A)\, \mathrm{vec}_r(V) = \mathrm{vec}_r(G V A^\top)`, never forming G ⊗ A.

    Args:
        A: ``(n, n)``; G: ``(m, m)``.
        V: ``(m, n)``, e.g. a direction in :math:`\tilde W = [W, b]` (``W`` reshaped to
            ``(d_out, -1)``).

    Returns:
        ``G @ V @ A.T``, shape ``(m, n)``.

    Examples:
        >>> A, G, V = torch.randn(3, 3), torch.randn(2, 2), torch.randn(2, 3)
        >>> torch.allclose(kron_mvp(A, G, V).reshape(-1), torch.kron(G, A) @ V.reshape(-1),
        ...                atol=1e-5)
        True
    """
    if A.shape[0] != V.shape[1] or G.shape[0] != V.shape[0]:
        raise ValueError(
            f"V must have shape (G.shape[0], A.shape[0]) = ({G.shape[0]}, {A.shape[0]}), "
            f"got {tuple(V.shape)}"
        )
    return G @ V @ A.T


def kfac_to_dense(factors: KFACFactors) -> Tensor:
    r"""The dense block ``kron(G, A)`` in the ``weight, bias`` order of :func:`flatten`.

    ``kron(G, A)`` is over :math:`\tilde W = [W, b]` row-major (entry ``(o, j)`` at
    ``o * n + j``); this permutes it to ``[vec_r(W), b]``, the layer's slice of a
    :func:`dense_ggn`. For checks and small layers only: it is
    :math:`(d_{out} d_{in})^2`.

    Examples:
        >>> f = KFACFactors(A=torch.eye(2), G=torch.eye(3), bias=True)
        >>> kfac_to_dense(f).shape
        torch.Size([6, 6])
    """
    A, G, bias = factors
    m, n = G.shape[0], A.shape[0]
    dense = torch.kron(G, A)
    if not bias:
        return dense
    idx = torch.arange(m * n, device=A.device).reshape(m, n)
    order = torch.cat([idx[:, :-1].reshape(-1), idx[:, -1]])  # weight entries, then bias
    return dense[order][:, order]


_KFAC_LAYERS = (nn.Linear, nn.Conv2d)
_VARIANTS = ("ef", "ggn", "mc")


def _conv_patches(layer: nn.Conv2d, inp: Tensor) -> Tensor:
    """The input patches ``(B, T, C_in * kh * kw)`` of a Conv2d, in ``weight.reshape(C_out, -1)``
    order, one row per output position (row-major over the output's ``H, W``)."""
    numeric_padding = not isinstance(layer.padding, str) or layer.padding == "valid"
    if layer.groups != 1 or layer.padding_mode != "zeros" or not numeric_padding:
        raise ValueError(
            "K-FAC supports Conv2d with groups=1 and zero padding given as numbers (or "
            f"'valid'); this layer has groups={layer.groups}, padding={layer.padding!r}, "
            f"padding_mode={layer.padding_mode!r}"
        )
    padding = 0 if isinstance(layer.padding, str) else layer.padding
    patches = F.unfold(
        inp, layer.kernel_size, dilation=layer.dilation, padding=padding, stride=layer.stride
    )  # (B, C_in * kh * kw, T)
    return patches.transpose(1, 2)


def _layer_inputs(layer: nn.Module, inp: Tensor) -> tuple[Tensor, float]:
    """Rows :math:`a` (with the bias 1) and their weight in :math:`A` (KFC's 1/T for conv)."""
    if isinstance(layer, nn.Conv2d):
        patches = _conv_patches(layer, inp)
        a = patches.reshape(-1, patches.shape[2])
        weight = 1.0 / patches.shape[1]
    else:
        a, weight = inp.reshape(-1, inp.shape[-1]), 1.0
    if layer.bias is not None:
        a = torch.cat([a, a.new_ones(a.shape[0], 1)], dim=1)
    return a, weight


def kfac_factors(
    module: nn.Module,
    batches: Iterable[Any],
    likelihood: str | Likelihood,
    variant: str = "ef",
    *,
    num_samples: int = 1,
    generator: torch.Generator | None = None,
    output_transform: Callable[[Any], Tensor] | None = None,
) -> dict[str, KFACFactors]:
    r"""K-FAC factors of every ``nn.Linear`` and ``nn.Conv2d`` in ``module``.

    A layer with weight :math:`\tilde W = [W, b]` has per-example gradient
    :math:`\sum_r g_r a^\top`, so its curvature block is :math:`\sum_i (a_i a_i^\top)
    \otimes (\sum_r g_{ir} g_{ir}^\top)` over row-major :math:`\mathrm{vec}(\tilde W)`,
    which K-FAC approximates by ``kron(G, A)`` with :math:`A = \frac1N \sum_i a_i
    a_i^\top` and :math:`G = \sum_i \sum_r g_{ir} g_{ir}^\top`; exact for one datum.
    The :math:`g_{ir}` are the output cotangents :math:`c_{ir}` backpropagated to the
    layer's output, with, per ``variant``:

    * ``"ef"``: :math:`c_i = \nabla_f \log p(y_i \mid f_i)` at the observed :math:`y_i`
      (empirical Fisher).
    * ``"ggn"``: the columns :math:`L_r` of :meth:`Likelihood.hessian_factor`, so that
      :math:`\sum_r g_r g_r^\top = J_{out}^\top H J_{out}` (exact GGN/Fisher, "KFLR";
      one backward per output dimension of an example).
    * ``"mc"``: :math:`\nabla_f \log p(y_s \mid f_i) / \sqrt{S}` for :math:`S` =
      ``num_samples`` draws :math:`y_s` from the model (Monte Carlo Fisher, "KFAC-MC").

    Inputs of a ``Linear`` with extra dimensions (tokens) and the :math:`T` spatial
    positions of a ``Conv2d`` count as rows of :math:`a` and :math:`g`; for convolutions
    :math:`A` is also divided by :math:`T` (KFC, Grosse & Martens 2016).

    Args:
        module: the network, evaluated with its current parameters (use ``eval()`` for
            dropout and batch norm). Layers must run once per forward.
        batches: ``(x, y)`` pairs (``y`` only used by ``"ef"``) or inputs ``x``;
            ``module(x)`` is called.
        likelihood: a :class:`Likelihood` or its name.
        variant: ``"ef"``, ``"ggn"`` or ``"mc"``.
        num_samples: the number of draws of ``"mc"``.
        generator: their source.
        output_transform: map from the module's output to the likelihood's natural
            parameter (e.g. ``lambda out: out.squeeze(-1)``).

    Returns:
        ``{layer name: KFACFactors}``, names as in ``module.named_modules()``.

    Examples:
        >>> _ = torch.manual_seed(0)
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(),
        ...                           torch.nn.Linear(4, 2))
        >>> x, y = torch.randn(8, 3), torch.randint(2, (8,))
        >>> f = kfac_factors(net, [(x, y)], "categorical", variant="ggn")
        >>> {name: (tuple(k.A.shape), tuple(k.G.shape)) for name, k in f.items()}
        {'0': ((4, 4), (4, 4)), '2': ((5, 5), (2, 2))}
    """
    lik = _as_likelihood(likelihood)
    if variant not in _VARIANTS:
        raise ValueError(f"variant must be one of {_VARIANTS}, got {variant!r}")
    if variant == "mc" and num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples}")
    layers = {
        name: m
        for name, m in module.named_modules()
        if isinstance(m, _KFAC_LAYERS) and m.weight.requires_grad
    }
    if not layers:
        raise ValueError("module has no trainable nn.Linear or nn.Conv2d layer for K-FAC")
    a_sums: dict[str, Tensor] = {}
    g_sums: dict[str, Tensor] = {}
    num_data = 0
    passes = _layer_passes(
        module, layers, batches, lik, variant, num_samples, generator, output_transform, "K-FAC"
    )
    for out, captured, cot in passes:
        names = list(captured)
        grads = _backprop(out, [captured[n][1] for n in names], cot)
        num_data += out.shape[0]
        for name, g_out in zip(names, grads, strict=True):
            layer = layers[name]
            a, w = _layer_inputs(layer, captured[name][0])
            d_out = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
            channel_dim = -1 if isinstance(layer, nn.Linear) else 2  # (R, B, C, H, W)
            g = g_out.movedim(channel_dim, -1).reshape(-1, d_out)
            a_sums[name] = _add(a_sums.get(name), w * (a.T @ a))
            g_sums[name] = _add(g_sums.get(name), g.T @ g)
    return {
        name: KFACFactors(a_sums[name] / num_data, g_sums[name], layers[name].bias is not None)
        for name in a_sums
    }


def _output_cotangents(
    lik: Likelihood,
    out: Tensor,
    y: Any,
    variant: str,
    num_samples: int,
    generator: torch.Generator | None,
) -> Tensor:
    """Cotangents ``(R, *out.shape)`` on the network output whose backprops give the g's."""
    if variant == "ggn":
        return lik.hessian_factor(out)
    if variant == "ef":
        f = out.detach().requires_grad_(True)
        (col,) = torch.autograd.grad(lik.log_prob(f, y.to(out.device)).sum(), f)
        return col.unsqueeze(0)
    # num_samples copies of the batch, one draw each: every score in one pass.
    f = out.detach().repeat(num_samples, *([1] * (out.dim() - 1))).requires_grad_(True)
    (cols,) = torch.autograd.grad(lik.log_prob(f, lik.sample(f, generator)).sum(), f)
    return cols.reshape(num_samples, *out.shape) / math.sqrt(num_samples)


def _backprop(out: Tensor, targets: Sequence[Tensor], cot: Tensor) -> list[Tensor]:
    """``(R, *target.shape)`` vector-Jacobian products, batched over the R cotangents."""
    try:
        grads = torch.autograd.grad(
            out, targets, cot, retain_graph=True, is_grads_batched=True, allow_unused=True
        )
    except _UNSUPPORTED:  # an op without a batching rule: one backward per cotangent
        rows = [
            torch.autograd.grad(out, targets, c, retain_graph=True, allow_unused=True) for c in cot
        ]
        grads = tuple(
            None if rows[0][j] is None else torch.stack([r[j] for r in rows])
            for j in range(len(targets))
        )
    # A layer the output does not depend on has no curvature.
    return [
        t.new_zeros(cot.shape[:1] + t.shape) if g is None else g
        for t, g in zip(targets, grads, strict=True)
    ]


# ---------------------------------------------------------------------- fast module diagonal
#: Elements of one chunk of per-example weight gradients (or token-pair products) in
#: :func:`module_diag_ggn`'s layers with token or spatial dimensions.
_DIAG_CHUNK_ELEMENTS = 1 << 24


def _weight_rows(layer: nn.Module, inp: Tensor) -> Tensor:
    """The layer's inputs as ``(B, T, n)``: per example, ``T`` rows that multiply the weight."""
    if isinstance(layer, nn.Conv2d):
        return _conv_patches(layer, inp)
    if inp.dim() < 2:
        raise ValueError(
            f"a Linear layer got an input of shape {tuple(inp.shape)}: inputs need a batch "
            "(first) dimension"
        )
    return inp.reshape(inp.shape[0], -1, inp.shape[-1])


def _layer_diag(layer: nn.Module, inp: Tensor, g_out: Tensor) -> tuple[Tensor, Tensor]:
    r""":math:`\sum_{i,r} (\partial_W)^2` and :math:`(\partial_b)^2` of one layer.

    ``g_out`` ``(R, *output.shape)`` are the R backpropagated columns at the layer's
    output. Per example and column the weight gradient is :math:`\sum_t g_{rit}
    a_{it}^\top`; its elementwise square is summed without storing all of them.
    """
    a = _weight_rows(layer, inp)  # (B, T, n)
    b, t, n = a.shape
    r = g_out.shape[0]
    if isinstance(layer, nn.Conv2d):
        g = g_out.flatten(3).transpose(2, 3)  # (R, B, C_out, H, W) -> (R, B, T, C_out)
    else:
        g = g_out.reshape(r, b, -1, g_out.shape[-1])
    m = g.shape[-1]
    if g.shape[2] != t:
        raise ValueError(f"the layer's output has {g.shape[2]} positions, its input {t}")
    if t == 1:  # one row per example: sum_i (sum_r g_ir^2) (a_i^2)^T, never a (B, m, n)
        s = torch.linalg.vector_norm(g[:, :, 0], dim=0).square()  # (B, m), no (R, B, m) temp
        return s.T @ a[:, 0].square(), s.sum(0)
    d_bias = g.sum(2).square().sum((0, 1))
    d_weight = a.new_zeros(m, n)
    if t <= r:
        # (sum_t g_t a_t)^2 = sum_{t,s} (g_t g_s)(a_t a_s): T^2 (m + n) per example.
        step = max(1, _DIAG_CHUNK_ELEMENTS // (t * t * (m + n)))
        for lo in range(0, b, step):
            gg = torch.einsum("rbtm,rbsm->btsm", g[:, lo : lo + step], g[:, lo : lo + step])
            aa = torch.einsum("btn,bsn->btsn", a[lo : lo + step], a[lo : lo + step])
            d_weight += gg.reshape(-1, m).T @ aa.reshape(-1, n)
    else:
        # Per-example gradients in chunks: R m n per example.
        step = max(1, _DIAG_CHUNK_ELEMENTS // (r * m * n))
        for lo in range(0, b, step):
            per_example = torch.einsum("rbtm,btn->rbmn", g[:, lo : lo + step], a[lo : lo + step])
            d_weight += per_example.square().sum((0, 1))
    return d_weight, d_bias


def _diag_layers(module: nn.Module, keep: Callable[[str], bool]) -> dict[str, nn.Module]:
    """The layers holding the kept trainable parameters; an error for unsupported ones."""
    layers = {}
    for name, m in module.named_modules():
        prefix = f"{name}." if name else ""
        own = [
            k for k, p in m.named_parameters(recurse=False) if p.requires_grad and keep(prefix + k)
        ]
        if not own:
            continue
        if not isinstance(m, _KFAC_LAYERS) or set(own) - {"weight", "bias"}:
            raise ValueError(
                f"module_diag_ggn supports the parameters of nn.Linear and nn.Conv2d only; "
                f"layer '{name}' ({type(m).__name__}) has trainable parameters {own}. Freeze "
                "it (requires_grad_(False)) or use accumulate_ggn(module_fn(module), ...), "
                "which handles any layer through per-example Jacobians"
            )
        layers[name] = m
    if not layers:
        raise ValueError("module has no trainable parameter (among those asked for)")
    return layers


def module_diag_ggn(
    module: nn.Module,
    batches: Iterable[Any],
    likelihood: str | Likelihood,
    variant: str = "ggn",
    *,
    num_samples: int = 1,
    generator: torch.Generator | None = None,
    output_transform: Callable[[Any], Tensor] | None = None,
    max_columns: int | None = None,
    parameters: Collection[str] | None = None,
) -> Params:
    r"""Diagonal GGN (or empirical / Monte Carlo Fisher) of a network, layer by layer.

    The same diagonal as :func:`accumulate_ggn` (``variant="ggn"``), :func:`diag_ef`
    of per-example gradients (``"ef"``) or :func:`accumulate_mc_fisher` (``"mc"``), at
    memory :math:`O(P)` plus one batch's activations: no per-example Jacobian or
    gradient is stored, so it scales to millions of parameters and examples. The
    columns :math:`c_r` of the output curvature (as in :func:`kfac_factors`: the
    :meth:`Likelihood.hessian_factor` columns :math:`L_r`, :math:`H_i = \sum_r L_{ir}
    L_{ir}^\top`, for ``"ggn"``; the observed score for ``"ef"``; one score per draw
    :math:`y_s \sim p(y \mid f_i)`, over :math:`\sqrt S`, for ``"mc"``) are
    backpropagated together to every layer's output, :math:`g_{ir} = J_{z_i}^\top
    c_{ir}`, and a layer :math:`z = W a + b` adds

    .. math::

        \mathrm{diag}_W = \sum_i \sum_r \Big(\sum_t g_{irt}\, a_{it}^\top\Big)^{\odot 2},
        \qquad
        \mathrm{diag}_b = \sum_i \sum_r \Big(\sum_t g_{irt}\Big)^{\odot 2},

    the squared per-example, per-column gradient, since :math:`\mathrm{diag}(J_i^\top
    H_i J_i) = \sum_r (J_i^\top L_{ir})^{\odot 2}`. With one row per example
    (:math:`T = 1`, a plain MLP) this is :math:`(\sum_r g_{ir}^{\odot 2})^\top
    (a_i^{\odot 2})`, one matrix product per layer (BackPACK's ``DiagGGNExact``).
    Inputs of a ``Linear`` with extra (token) dimensions and the :math:`T` output
    positions of a ``Conv2d`` are summed *inside* the square, exactly: through the
    token-pair products :math:`\sum_{t,s} (g_t \cdot g_s)(a_t a_s)` when :math:`T
    \le R`, else through per-example gradients in chunks of examples.

    Args:
        module: the network, evaluated with its current parameters (``eval()`` mode
            for dropout and batch norm). Every module holding trainable parameters
            must be an ``nn.Linear`` or an ``nn.Conv2d`` (``groups=1``, zero padding);
            freeze the others or use :func:`accumulate_ggn`. Each layer runs once per
            forward, and each example's output depends on its own input only.
        batches: ``(x, y)`` pairs (``y`` only used by ``"ef"``) or inputs ``x``, e.g.
            a ``DataLoader``; ``module(x)`` is called, tensors are moved to the
            parameters' device.
        likelihood: a :class:`Likelihood` or its name.
        variant: ``"ggn"`` (exact, :math:`R` = outputs per example columns),
            ``"ef"`` (one column) or ``"mc"`` (``num_samples`` columns).
        num_samples: :math:`S`, the draws per example of ``"mc"``.
        generator: their source (draws match :func:`accumulate_mc_fisher`'s given
            the same generator and batches).
        output_transform: map from the module's output to the likelihood's natural
            parameter (e.g. ``lambda out: out.squeeze(-1)``).
        max_columns: backpropagate at most this many columns at once (memory
            ``max_columns`` times one batch's backward); all at once by default.
        parameters: names of the trainable parameters to compute (default: all);
            layers holding none of them may be of any type.

    Returns:
        A dict like the module's trainable ``named_parameters()`` (those in
        ``parameters``), summed over every example seen (no prior, no mean).

    Examples:
        >>> _ = torch.manual_seed(0)
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(),
        ...                           torch.nn.Linear(4, 2))
        >>> x, y = torch.randn(8, 3), torch.randint(2, (8,))
        >>> fast = module_diag_ggn(net, [(x[:5], y[:5]), (x[5:], y[5:])], "categorical")
        >>> ref = diag_ggn(module_fn(net), dict(net.named_parameters()), x, "categorical")
        >>> all(torch.allclose(fast[k], ref[k], atol=1e-6) for k in ref)
        True
    """
    lik = _as_likelihood(likelihood)
    if variant not in _VARIANTS:
        raise ValueError(f"variant must be one of {_VARIANTS}, got {variant!r}")
    if variant == "mc" and num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples}")
    if max_columns is not None and max_columns < 1:
        raise ValueError(f"max_columns must be a positive integer, got {max_columns}")
    if parameters is not None:
        parameters = set(parameters)
        named = {k for k, p in module.named_parameters() if p.requires_grad}
        if parameters - named:
            raise ValueError(
                f"parameters {sorted(parameters - named)} are not trainable parameters of module"
            )

    def keep(key: str) -> bool:
        return parameters is None or key in parameters

    layers = _diag_layers(module, keep)
    trainable = {k: p for k, p in module.named_parameters() if p.requires_grad and keep(k)}
    sums = {
        k: torch.zeros_like(p, memory_format=torch.contiguous_format) for k, p in trainable.items()
    }
    passes = _layer_passes(
        module, layers, batches, lik, variant, num_samples, generator, output_transform,
        "module_diag_ggn",
    )  # fmt: skip
    for out, captured, cot in passes:
        names = list(captured)
        outputs = [captured[n][1] for n in names]
        step = cot.shape[0] if max_columns is None else max_columns
        for lo in range(0, cot.shape[0], step):
            grads = _backprop(out, outputs, cot[lo : lo + step])
            for name, g_out in zip(names, grads, strict=True):
                layer = layers[name]
                d_weight, d_bias = _layer_diag(layer, captured[name][0], g_out.detach())
                prefix = f"{name}." if name else ""
                if prefix + "weight" in sums:
                    sums[prefix + "weight"] += d_weight.reshape(layer.weight.shape)
                if prefix + "bias" in sums:
                    sums[prefix + "bias"] += d_bias
    return sums


def _layer_passes(
    module: nn.Module,
    layers: Mapping[str, nn.Module],
    batches: Iterable[Any],
    lik: Likelihood,
    variant: str,
    num_samples: int,
    generator: torch.Generator | None,
    output_transform: Callable[[Any], Tensor] | None,
    what: str,
) -> Iterator[tuple[Tensor, dict[str, tuple[Tensor, Tensor]], Tensor]]:
    """One forward pass per batch with hooks on ``layers``: yields the output, each
    layer's ``(input, output)`` in call order, and the output cotangents of ``variant``
    (:func:`_output_cotangents`), with the graph kept for :func:`_backprop`."""
    device = next(iter(module.parameters())).device
    captured: dict[str, tuple[Tensor, Tensor]] = {}

    def hook(name: str) -> Callable:
        def record(layer: nn.Module, args: tuple, output: Tensor) -> Tensor:
            if name in captured:
                raise ValueError(
                    f"layer '{name}' ran twice in one forward pass (shared weights): "
                    f"{what} assumes each layer runs once"
                )
            captured[name] = (args[0].detach(), output)
            # Downstream gets a copy: an in-place op (ReLU(inplace=True)) must not
            # overwrite the tensor whose cotangent we ask for.
            return output.clone()

        return record

    seen = 0
    handles = [m.register_forward_hook(hook(name)) for name, m in layers.items()]
    try:
        for batch in batches:
            x, y = _split_batch(_tree_map(lambda t: t.to(device), batch))
            if variant == "ef" and y is None:
                raise ValueError("variant='ef' needs (x, y) batches with the observed targets")
            captured.clear()
            with torch.enable_grad():
                out = module(x)
                if output_transform is not None:
                    out = output_transform(out)
                cot = _output_cotangents(lik, out, y, variant, num_samples, generator)
            yield out, dict(captured), cot
            seen += out.shape[0]
    finally:
        for h in handles:
            h.remove()
        captured.clear()
    if seen == 0:
        raise ValueError("batches is empty")


# ---------------------------------------------------------------------- conjugate gradients
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
            _check_like(x0, b, "x0")
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
