r"""Kernelized Stein discrepancy (KSD) of a sample against a target known up to a constant.

The KSD (Liu, Lee & Jordan, 2016; Chwialkowski et al., 2016; Gorham & Mackey, 2017)
measures how far the empirical distribution of draws :math:`x_1, \dots, x_n` is from a
target :math:`p` using only the target's score :math:`s(x) = \nabla_x \log p(x)`, so the
normalising constant is never needed. With a positive-definite base kernel
:math:`k(x, y)`, the Langevin Stein kernel is

.. math::

    k_p(x, y) = s(x)^\top s(y)\, k(x, y) + s(x)^\top \nabla_y k(x, y)
        + s(y)^\top \nabla_x k(x, y) + \operatorname{tr}\big(\nabla_x \nabla_y^\top k(x, y)\big),

which has :math:`\mathbb E_{x \sim p}[k_p(x, y)] = 0` for every :math:`y`. The
discrepancy is the V-statistic over all :math:`n^2` ordered pairs (diagonal included),

.. math::

    \mathrm{KSD}^2 = \frac{1}{n^2} \sum_{i=1}^n \sum_{j=1}^n k_p(x_i, x_j) \;\ge\; 0,

and :func:`ksd` returns :math:`\mathrm{KSD}`, its square root. It is zero in the limit
exactly when the draws come from :math:`p` (for the IMQ kernel, Gorham & Mackey's
Theorem 8 also makes it detect non-convergence, including mass escaping to infinity);
a finite sample of exact draws has :math:`\mathbb E[\mathrm{KSD}^2] = \mathbb E_p[k_p(x,
x)] / n`, a bias of order :math:`1/n`. Compare KSDs of samples of the same size.

**Base kernels.** Both are functions of :math:`u = \lVert x - y \rVert^2` with bandwidth
:math:`h` (the same :math:`h` on every coordinate, so put the coordinates on comparable
scales, e.g. whiten with a preconditioner, or compare runs on the same model only):

* ``"imq"`` (inverse multiquadric, the default, Gorham & Mackey's recommendation):
  :math:`k = (c^2 + u / h^2)^{\beta}` with :math:`c = 1` and :math:`\beta \in (-1, 0)`,
  default :math:`\beta = -1/2`.
* ``"rbf"`` (Gaussian): :math:`k = \exp(-u / (2 h^2))`.

Writing :math:`k = \varphi(u)` and :math:`r = x - y`, the Stein kernel is

.. math::

    k_p(x, y) = \varphi(u)\, s(x)^\top s(y) + 2 \varphi'(u)\, (s(y) - s(x))^\top r
        - 2 d\, \varphi'(u) - 4 u\, \varphi''(u),

with :math:`\varphi' = \beta a^{\beta-1} / h^2`, :math:`\varphi'' = \beta(\beta-1)
a^{\beta-2} / h^4`, :math:`a = c^2 + u/h^2` (IMQ) and :math:`\varphi' = -\varphi /
(2h^2)`, :math:`\varphi'' = \varphi / (4h^4)` (RBF). Every term is a matrix product
of the draws and scores, so blocks of pairs cost :math:`O(b^2 d)` time and
:math:`O(b^2)` memory; :func:`ksd` sums ``chunk_size`` x ``chunk_size`` blocks over the
upper triangle of the (symmetric) pair matrix.

**Bandwidth.** ``bandwidth=1.0`` by default for both kernels; ``bandwidth="median"``
sets :math:`h` to the median of the pairwise distances :math:`\lVert x_i - x_j
\rVert, i < j` (the median heuristic; computed on at most 1000 evenly spaced draws; 1
when all those draws coincide). Note that this :math:`h` multiplies :math:`\lVert x-y
\rVert`, not its square, and that the RBF kernel has the :math:`2h^2` convention.

**Scores** are those of the full-data log posterior, :math:`s = \nabla \log p(\theta
\mid y)`, not divided by :math:`N`. From a
:class:`~pyro_sgmcmc.potential.PyroPotential` (per-datum potential :math:`U = -\frac1N
\log p`) they are :math:`s = -N \nabla U` on all the data, in unconstrained space, so
the draws given with a ``PyroPotential`` must be unconstrained too
(``potential.unconstrain``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from pyro_sgmcmc.potential import PyroPotential

__all__ = ["ksd", "median_bandwidth", "potential_score", "stein_kernel_matrix"]

Samples = Tensor | Mapping[str, Tensor]
Score = Tensor | Mapping[str, Tensor] | Callable[..., Tensor | Mapping[str, Tensor]]

_KERNELS = ("imq", "rbf")


# ------------------------------------------------------------------------------ kernel
def stein_kernel_matrix(
    x: Tensor,
    sx: Tensor,
    y: Tensor,
    sy: Tensor,
    kernel: str = "imq",
    bandwidth: float = 1.0,
    beta: float = -0.5,
) -> Tensor:
    r"""The Langevin Stein kernel :math:`k_p(x_i, y_j)` between two blocks of draws.

    .. math::

        k_p(x, y) = \varphi(u)\, s_x^\top s_y + 2 \varphi'(u)\, (s_y - s_x)^\top (x - y)
            - 2 d\, \varphi'(u) - 4 u\, \varphi''(u), \qquad u = \lVert x - y \rVert^2,

    for the base kernel :math:`k(x, y) = \varphi(u)` (see the module docstring).

    Args:
        x: draws, shape ``(m, d)``.
        sx: their scores :math:`\nabla \log p(x)`, shape ``(m, d)``.
        y: draws, shape ``(p, d)``.
        sy: their scores, shape ``(p, d)``.
        kernel: ``"imq"`` or ``"rbf"``.
        bandwidth: :math:`h > 0`.
        beta: the IMQ exponent :math:`\beta \in (-1, 0)`.

    Returns:
        The ``(m, p)`` matrix :math:`k_p(x_i, y_j)`.

    Examples:
        >>> x = torch.zeros(1, 2, dtype=torch.float64)
        >>> stein_kernel_matrix(x, -x, x, -x, kernel="rbf")  # d / h^2 at the mode
        tensor([[2.]], dtype=torch.float64)
    """
    d = x.shape[-1]
    h2 = float(bandwidth) ** 2
    xx = (x * x).sum(-1)
    yy = (y * y).sum(-1)
    u = (xx[:, None] + yy[None, :] - 2.0 * (x @ y.T)).clamp_min(0.0)
    # (s_y - s_x)^T (x - y) = s_y.x - s_y.y - s_x.x + s_x.y
    cross = (x @ sy.T) - (sy * y).sum(-1)[None, :] - (sx * x).sum(-1)[:, None] + (sx @ y.T)
    ss = sx @ sy.T
    if kernel == "imq":
        a = 1.0 + u / h2
        phi = a.pow(beta)
        d1 = beta * phi / a / h2  # beta a^(beta-1) / h^2
        d2 = beta * (beta - 1.0) * phi / (a * a) / (h2 * h2)
    elif kernel == "rbf":
        phi = torch.exp(-u / (2.0 * h2))
        d1 = -phi / (2.0 * h2)
        d2 = phi / (4.0 * h2 * h2)
    else:
        raise ValueError(f"kernel must be one of {_KERNELS}, got {kernel!r}")
    return phi * ss + 2.0 * d1 * cross - 2.0 * d * d1 - 4.0 * u * d2


def median_bandwidth(x: Tensor, max_points: int = 1000) -> float:
    r"""The median heuristic :math:`h = \operatorname{median}_{i<j} \lVert x_i - x_j \rVert`.

    Computed on at most ``max_points`` evenly spaced rows of ``x`` (deterministic);
    returns 1.0 when there are fewer than two rows or all the distances are zero.

    Args:
        x: draws, shape ``(n, d)``.
        max_points: largest number of rows used.

    Returns:
        The bandwidth :math:`h` as a float.

    Examples:
        >>> median_bandwidth(torch.tensor([[0.0], [1.0], [3.0]]))
        2.0
    """
    n = x.shape[0]
    if n < 2:
        return 1.0
    if n > max_points:
        idx = torch.linspace(0, n - 1, max_points, device=x.device).round().long()
        x = x[idx]
    x = x.to(torch.float64)
    i, j = torch.triu_indices(x.shape[0], x.shape[0], offset=1, device=x.device)
    dist = torch.cdist(x, x)[i, j]
    # torch.median returns the lower of the two middle values; use the usual midpoint.
    h = float(torch.quantile(dist, 0.5)) if dist.numel() <= 2**24 else float(dist.median())
    return h if h > 0 else 1.0


# ------------------------------------------------------------------------------ inputs
def _flatten(samples: Samples, what: str) -> tuple[Tensor, list[str] | None]:
    """``(n, d)`` from a tensor, or from a dict of ``(n, ...)`` site tensors in sorted key
    order; also returns the keys (``None`` for a tensor)."""
    if isinstance(samples, Mapping):
        if not samples:
            raise ValueError(f"{what} is an empty dict")
        keys = sorted(samples)
        values = [torch.as_tensor(samples[k]) for k in keys]
        n = values[0].shape[0] if values[0].dim() else None
        for k, v in zip(keys, values, strict=True):
            if v.dim() == 0 or v.shape[0] != n:
                raise ValueError(
                    f"{what}[{k!r}] has shape {tuple(v.shape)}: every site needs the same "
                    f"leading (draw) dimension, here {n}"
                )
        return torch.cat([v.reshape(n, -1) for v in values], dim=1), keys
    x = torch.as_tensor(samples)
    if x.dim() == 1:
        raise ValueError(
            f"{what} has shape {tuple(x.shape)}: give a 2-D (num_draws, dim) tensor (use "
            "x[:, None] for 1-D draws) or a dict of (num_draws, ...) site tensors"
        )
    if x.dim() != 2:
        raise ValueError(
            f"{what} has shape {tuple(x.shape)}: give a 2-D (num_draws, dim) tensor or a "
            "dict of (num_draws, ...) site tensors"
        )
    return x, None


def _potential_score_loop(potential: PyroPotential, samples: dict[str, Tensor]) -> dict:
    n = next(iter(samples.values())).shape[0]
    rows = []
    for i in range(n):
        _, grads = potential.potential_and_grad({k: v[i] for k, v in samples.items()}, None)
        rows.append(grads)
    return {k: torch.stack([r[k] for r in rows]) for k in samples}


def _potential_score_vmap(
    potential: PyroPotential, samples: dict[str, Tensor], batch_size: int
) -> dict:
    names = list(samples)

    def u(*values):
        return potential.potential(dict(zip(names, values, strict=True)))

    grad = torch.func.vmap(torch.func.grad(u, argnums=tuple(range(len(names)))))
    n = samples[names[0]].shape[0]
    parts = [
        grad(*(samples[k][i : i + batch_size] for k in names)) for i in range(0, n, batch_size)
    ]
    return {k: torch.cat([p[j] for p in parts]) for j, k in enumerate(names)}


def potential_score(
    potential: PyroPotential,
    samples: Mapping[str, Tensor],
    batch_size: int | None = None,
    vectorize: bool = True,
) -> dict[str, Tensor]:
    r"""Full-data scores :math:`s(\phi) = \nabla_\phi \log p(\phi \mid y) = -N \nabla_\phi
    U(\phi)` of unconstrained draws, from a :class:`~pyro_sgmcmc.potential.PyroPotential`.

    Each draw costs one full-data gradient. With ``vectorize=True`` the gradients of
    ``batch_size`` draws at a time go through ``torch.func.vmap`` (much faster than a
    loop: Pyro's per-call overhead is paid once per batch); when the model cannot be
    vectorised (an error, or a first row that disagrees with a plain backward pass) it
    falls back to one backward pass per draw.

    Args:
        potential: the model's potential.
        samples: unconstrained draws, a dict of ``(n, *site_shape)`` tensors keyed by
            ``potential.latent_names``.
        batch_size: draws per vectorised call; memory grows as ``batch_size`` times
            the model's per-datum intermediates. Default: :math:`\lfloor 2^{24} / N
            \rfloor` (at least 1), about 16M per-datum values per call.
        vectorize: try ``torch.func.vmap`` first.

    Returns:
        The scores, a dict of ``(n, *site_shape)`` tensors.

    Examples:
        >>> import pyro, pyro.distributions as dist
        >>> def model(y):
        ...     mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        ...     with pyro.plate("data", len(y)) as idx:
        ...         pyro.sample("obs", dist.Normal(mu, 1.0), obs=y[idx])
        >>> pot = PyroPotential(model, (torch.ones(3),))
        >>> potential_score(pot, {"mu": torch.tensor([0.0, 1.0])})["mu"]  # 3 - 4 mu
        tensor([ 3., -1.])
    """
    names = set(potential.latent_names)
    if set(samples) != names:
        raise ValueError(
            f"samples have sites {sorted(samples)} but the potential's latent sites are "
            f"{sorted(names)}; give one (num_draws, ...) unconstrained tensor per latent site"
        )
    samples = {k: torch.as_tensor(samples[k]).detach() for k in potential.latent_names}
    if batch_size is None:
        batch_size = max(1, 2**24 // max(int(potential.num_data), 1))
    grads = None
    if vectorize:
        try:
            grads = _potential_score_vmap(potential, samples, batch_size)
        except Exception:  # no batching rule, data-dependent control flow, ...
            grads = None
        if grads is not None:
            first = _potential_score_loop(potential, {k: v[:1] for k, v in samples.items()})
            for k, g in first.items():
                scale = 1.0 + float(g.abs().max())
                if not torch.allclose(grads[k][:1], g, rtol=1e-4, atol=1e-5 * scale):
                    grads = None
                    break
    if grads is None:
        grads = _potential_score_loop(potential, samples)
    return {k: -potential.num_data * g.detach() for k, g in grads.items()}


def _scores(samples: Samples, score: Score | PyroPotential, score_batch_size: int | None) -> Tensor:
    if isinstance(score, PyroPotential):
        if not isinstance(samples, Mapping):
            raise ValueError(
                "with a PyroPotential, give the (unconstrained) samples as a dict of "
                f"(num_draws, ...) tensors keyed by its latent sites {score.latent_names}"
            )
        score = potential_score(score, samples, batch_size=score_batch_size)
    elif callable(score) and not isinstance(score, (Tensor, Mapping)):
        score = score(samples)
    if isinstance(score, Mapping) and isinstance(samples, Mapping) and set(score) != set(samples):
        raise ValueError(f"score has keys {sorted(score)} but samples have {sorted(samples)}")
    s, _ = _flatten(score, "score")
    return s


# ------------------------------------------------------------------------------ KSD
def ksd(
    samples: Samples,
    score: Score | PyroPotential,
    kernel: str = "imq",
    bandwidth: float | str = 1.0,
    beta: float = -0.5,
    chunk_size: int = 1024,
    *,
    dtype: torch.dtype = torch.float64,
    score_batch_size: int | None = None,
) -> Tensor:
    r"""Kernelized Stein discrepancy of ``samples`` from the target whose score is ``score``.

    .. math::

        \mathrm{KSD} = \Big(\frac{1}{n^2} \sum_{i,j=1}^n k_p(x_i, x_j)\Big)^{1/2},

    the exact V-statistic over all pairs with the Langevin Stein kernel :math:`k_p` of
    the base kernel ``kernel`` (module docstring: IMQ :math:`(1 + \lVert x-y\rVert^2 /
    h^2)^\beta`, or RBF :math:`\exp(-\lVert x-y\rVert^2 / (2h^2))`).

    Args:
        samples: ``n`` draws, an ``(n, d)`` tensor or a dict of ``(n, ...)`` site
            tensors (flattened and concatenated in sorted key order). With a
            ``PyroPotential`` score: a dict of unconstrained draws per latent site.
        score: the target's full-data score :math:`s(x) = \nabla_x \log p(x)` (e.g.
            ``-x`` for :math:`N(0, I)`), as a tensor or dict shaped like ``samples``; a
            callable ``samples -> scores``; or a
            :class:`~pyro_sgmcmc.potential.PyroPotential`, whose scores are :math:`-N
            \nabla U` over all the data (:func:`potential_score`).
        kernel: ``"imq"`` (default) or ``"rbf"``.
        bandwidth: :math:`h > 0` (default 1.0), or ``"median"`` for the median heuristic
            (:func:`median_bandwidth`).
        beta: IMQ exponent, :math:`-1 < \beta < 0` (default :math:`-1/2`).
        chunk_size: rows per block of pairs; memory is :math:`O(\text{chunk\_size}^2 +
            n d)`.
        dtype: the precision of the kernel sums (float64 by default: the sum has
            cancellations).
        score_batch_size: draws per vectorised gradient call for a ``PyroPotential``
            (:func:`potential_score`).

    Returns:
        The KSD, a 0-d tensor of ``dtype`` on the samples' device.

    Examples:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(500, 2, generator=g)  # exact draws from N(0, I)
        >>> score = lambda x: -x
        >>> bool(ksd(x, score) < ksd(x + 0.5, score) < ksd(3 * x, score))
        True
        >>> mode = torch.zeros(1, 4)  # one draw at the mode: KSD = sqrt(d) / h
        >>> round(float(ksd(mode, score, bandwidth=2.0)), 6)
        1.0
    """
    if kernel not in _KERNELS:
        raise ValueError(f"kernel must be one of {_KERNELS}, got {kernel!r}")
    if kernel == "imq" and not -1.0 < beta < 0.0:
        raise ValueError(f"the IMQ exponent beta must lie in (-1, 0), got {beta}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
    x, _ = _flatten(samples, "samples")
    n, d = x.shape
    if n == 0:
        raise ValueError("samples has no draws")
    s = _scores(samples, score, score_batch_size)
    if s.shape != x.shape:
        raise ValueError(
            f"score flattens to shape {tuple(s.shape)} but samples to {tuple(x.shape)}: "
            "give one score per draw and coordinate"
        )
    x = x.detach().to(dtype)
    s = s.detach().to(device=x.device, dtype=dtype)
    if not torch.isfinite(x).all():
        raise ValueError(f"samples hold {int((~torch.isfinite(x)).sum())} non-finite values")
    if not torch.isfinite(s).all():
        bad = (~torch.isfinite(s)).any(1).nonzero().flatten()
        raise ValueError(
            f"the score is not finite at {bad.numel()} draws (first: draw {int(bad[0])}); "
            "check the model's log density there"
        )
    if isinstance(bandwidth, str):
        if bandwidth != "median":
            raise ValueError(f"bandwidth must be a positive float or 'median', got {bandwidth!r}")
        h = median_bandwidth(x)
    else:
        h = float(bandwidth)
        if not h > 0:
            raise ValueError(f"bandwidth must be positive, got {bandwidth}")
    total = torch.zeros((), dtype=dtype, device=x.device)
    for i in range(0, n, chunk_size):
        xi, si = x[i : i + chunk_size], s[i : i + chunk_size]
        for j in range(i, n, chunk_size):
            block = stein_kernel_matrix(
                xi, si, x[j : j + chunk_size], s[j : j + chunk_size], kernel, h, beta
            ).sum()
            total = total + (block if j == i else 2.0 * block)
    return (total / n**2).clamp_min(0.0).sqrt()
