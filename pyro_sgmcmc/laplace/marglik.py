r"""Prior precision by the Laplace marginal likelihood (evidence), as laplace-torch tunes it.

With a Normal prior :math:`p(\theta) = \mathcal N(0, \delta^{-1} I)` on the (unconstrained)
parameters, a mode :math:`\theta^*` and the likelihood curvature :math:`C` (GGN, Fisher,
EF or Hessian, summed over the data, no prior), the Laplace approximation of the log
marginal likelihood is

.. math::

    \log p(y \mid \delta) &\approx \log p(y \mid \theta^*) + \log p(\theta^*)
        + \tfrac P2 \log 2\pi - \tfrac12 \log\det \Lambda,
        \qquad \Lambda = C + \delta I, \\
    &= \log p(y \mid \theta^*) + \tfrac12 \sum_j \log\delta_j
        - \tfrac12 \sum_j \delta_j \theta_j^{*2} - \tfrac12 \log\det(C + \mathrm{diag}\,\delta),

and :func:`optimize_prior_precision` maximises it over a scalar :math:`\delta` or one
:math:`\delta_s` per site (every entry :math:`j` of site :math:`s` then has
:math:`\delta_j = \delta_s`), holding :math:`\theta^*` and :math:`C` fixed (post-hoc
tuning: the mode is not refitted). Setting the derivative to zero gives MacKay's
fixed point :math:`\delta = \gamma / \|\theta^*\|^2` with :math:`\gamma = \sum_j
\lambda_j / (\lambda_j + \delta)` the effective number of parameters, so the optimum is
unique for a PSD :math:`C`.

The curvature is duck-typed:

* a dict shaped like ``mean``: a diagonal curvature;
* a ``(P, P)`` tensor: a dense curvature over :func:`~pyro_sgmcmc.curvature.flatten`
  order (one eigendecomposition serves every scalar :math:`\delta`);
* any object with ``with_prior_precision(delta)`` returning an object with
  ``log_det_precision()`` (:math:`\log\det(C + \delta I)`), e.g. a K-FAC posterior; it is
  called with a 0-dim tensor, or with a ``{site: 0-dim tensor}`` dict for
  ``per_site=True``, and its ``mean`` is used when ``mean`` is ``None``.

The search is over :math:`\log\delta`: a grid brackets the maximum, golden-section
search refines it (values only, so no gradient of the structure is needed);
``per_site`` does coordinate ascent over the sites.

Examples:
    >>> import torch
    >>> mean = {"w": torch.tensor([1.0, -1.0, 0.5, 0.5])}
    >>> curv = {"w": torch.full((4,), 100.0)}
    >>> delta = optimize_prior_precision(torch.tensor(-10.0), mean, curv)
    >>> gamma = (100.0 / (100.0 + delta) * 4)
    >>> torch.allclose(delta, gamma / 2.5, rtol=1e-5)  # MacKay's fixed point
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from pyro_sgmcmc.curvature import flatten

__all__ = ["log_marginal_likelihood", "optimize_prior_precision"]

PriorPrecision = float | Tensor | Mapping[str, float | Tensor]
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


def _resolve_mean(mean: Mapping[str, Tensor] | None, curvature: Any) -> dict[str, Tensor]:
    if mean is None:
        mean = getattr(curvature, "mean", None)
        if mean is None:
            raise ValueError("pass mean=: the curvature object has no .mean")
    return {k: torch.as_tensor(v).detach() for k, v in mean.items()}


def _delta_vector(delta: PriorPrecision, mean: Mapping[str, Tensor], like: Tensor) -> Tensor:
    """The per-entry prior precision over :func:`flatten` order."""
    if isinstance(delta, Mapping):
        if set(delta) != set(mean):
            raise ValueError(
                f"a per-site prior precision needs one value per site {list(mean)}, "
                f"got {list(delta)}"
            )
        parts = [
            torch.as_tensor(delta[k], dtype=like.dtype, device=like.device).expand(m.numel())
            for k, m in mean.items()
        ]
        return torch.cat(parts)
    d = torch.as_tensor(delta, dtype=like.dtype, device=like.device)
    if d.dim() != 0:
        raise ValueError(f"prior_precision must be a scalar or a per-site dict, got {d.shape}")
    return d.expand(like.numel())


class _Evidence:
    """The Laplace log evidence as a function of the prior precision, with caches."""

    def __init__(
        self, log_likelihood: Tensor | float, mean: Mapping[str, Tensor], curvature: Any
    ) -> None:
        self.mean = dict(mean)
        theta = flatten(self.mean).detach()
        #: the dtype of the answer; the search itself runs in float64
        self.dtype = theta.dtype if theta.is_floating_point() else torch.float64
        dtype = torch.float64
        self.theta = theta.to(dtype)
        self.ll = torch.as_tensor(log_likelihood, dtype=dtype).detach()
        self.curvature = curvature
        if isinstance(curvature, Mapping):
            if list(curvature) != list(self.mean):
                raise ValueError(
                    f"a diagonal curvature must have the keys {list(self.mean)} in that "
                    f"order, got {list(curvature)}"
                )
            self.kind = "diag"
            self.diag = flatten(curvature).detach().to(dtype)
        elif isinstance(curvature, Tensor):
            p = self.theta.numel()
            if curvature.shape != (p, p):
                raise ValueError(
                    f"a dense curvature must be ({p}, {p}) over flatten(mean), got "
                    f"{tuple(curvature.shape)}"
                )
            self.kind = "dense"
            self.dense = (0.5 * (curvature + curvature.T)).detach().to(dtype)
            self._eig: Tensor | None = None
        elif hasattr(curvature, "with_prior_precision"):
            self.kind = "structured"
        else:
            raise TypeError(
                "curvature must be a dict (diagonal), a (P, P) tensor (dense), or an object "
                f"with with_prior_precision(delta) and log_det_precision(); got "
                f"{type(curvature).__name__}"
            )

    def log_det(self, delta: PriorPrecision) -> Tensor:
        vec = _delta_vector(delta, self.mean, self.theta)
        if self.kind == "diag":
            return (self.diag + vec).log().sum()
        if self.kind == "dense":
            if not isinstance(delta, Mapping):
                if self._eig is None:
                    self._eig = torch.linalg.eigvalsh(self.dense)
                return (self._eig + vec[0]).log().sum()
            chol, info = torch.linalg.cholesky_ex(self.dense + torch.diag(vec))
            if int(info) != 0:
                return self.theta.new_tensor(float("nan"))
            return 2 * chol.diagonal().log().sum()
        arg = (
            {k: torch.as_tensor(v, dtype=self.theta.dtype) for k, v in delta.items()}
            if isinstance(delta, Mapping)
            else torch.as_tensor(delta, dtype=self.theta.dtype)
        )
        return torch.as_tensor(
            self.curvature.with_prior_precision(arg).log_det_precision(), dtype=self.theta.dtype
        )

    def __call__(self, delta: PriorPrecision) -> Tensor:
        vec = _delta_vector(delta, self.mean, self.theta)
        return (
            self.ll
            + 0.5 * vec.log().sum()
            - 0.5 * (vec * self.theta.square()).sum()
            - 0.5 * self.log_det(delta)
        )


def log_marginal_likelihood(
    log_likelihood: Tensor | float,
    mean: Mapping[str, Tensor] | None,
    curvature: Any,
    prior_precision: PriorPrecision,
) -> Tensor:
    r"""The Laplace log marginal likelihood for a :math:`\mathcal N(0, \delta^{-1})` prior.

    Args:
        log_likelihood: :math:`\log p(y \mid \theta^*)`, summed over the data.
        mean: the mode :math:`\theta^*`, a flat parameter dict (``None``: the
            structured curvature's ``mean``).
        curvature: the likelihood curvature :math:`C` without prior: a dict
            (diagonal), a ``(P, P)`` tensor (dense) or an object with
            ``with_prior_precision`` (see the module docs).
        prior_precision: :math:`\delta`, a positive scalar or a ``{site: value}`` dict.

    Returns:
        A scalar tensor (``nan`` where :math:`C + \delta` is not positive definite).

    Examples:
        >>> import torch
        >>> mean, curv = {"w": torch.tensor([0.0])}, {"w": torch.tensor([3.0])}
        >>> log_marginal_likelihood(0.0, mean, curv, 1.0)  # -1/2 log(3 + 1)
        tensor(-0.6931)
    """
    mean = _resolve_mean(mean, curvature)
    evidence = _Evidence(log_likelihood, mean, curvature)
    return evidence(prior_precision).to(evidence.dtype)


def _golden_max(f: Callable[[float], float], lo: float, hi: float, tol: float) -> float:
    """Maximise a unimodal ``f`` on ``[lo, hi]`` by golden-section search."""
    a, b = lo, hi
    c, d = b - _GOLDEN * (b - a), a + _GOLDEN * (b - a)
    fc, fd = f(c), f(d)
    while b - a > tol:
        if fc >= fd:
            b, d, fd = d, c, fc
            c = b - _GOLDEN * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + _GOLDEN * (b - a)
            fd = f(d)
    return 0.5 * (a + b)


def _maximise_log(f: Callable[[float], float], lo: float, hi: float, num: int, tol: float):
    """Grid over ``[lo, hi]`` (in log-precision), then golden search around the best."""
    grid = torch.linspace(lo, hi, num, dtype=torch.float64).tolist()
    values = [f(t) for t in grid]
    best = max(range(num), key=lambda i: values[i])
    if not math.isfinite(values[best]):
        raise ValueError(
            "the Laplace evidence is not finite for any prior precision in the search range: "
            "is the curvature positive semi-definite (use curvature='ggn')?"
        )
    left, right = grid[max(best - 1, 0)], grid[min(best + 1, num - 1)]
    return _golden_max(f, left, right, tol)


def optimize_prior_precision(
    log_likelihood: Tensor | float,
    mean: Mapping[str, Tensor] | None,
    curvature: Any,
    *,
    per_site: bool = False,
    bounds: tuple[float, float] = (1e-8, 1e8),
    num_grid: int = 49,
    tol: float = 1e-7,
    max_sweeps: int = 20,
) -> Tensor | dict[str, Tensor]:
    r"""The prior precision :math:`\delta` that maximises the Laplace evidence.

    Args:
        log_likelihood: :math:`\log p(y \mid \theta^*)` (only shifts the objective).
        mean: the mode :math:`\theta^*`, a flat parameter dict (``None``: the
            structured curvature's ``mean``).
        curvature: the likelihood curvature without prior: a dict (diagonal), a
            ``(P, P)`` tensor (dense) or an object with ``with_prior_precision``.
        per_site: one precision per site (coordinate ascent) instead of one scalar.
        bounds: the search range of :math:`\delta`.
        num_grid: grid points (log-spaced over ``bounds``) that bracket the maximum.
        tol: the golden-section tolerance on :math:`\log\delta`.
        max_sweeps: coordinate-ascent sweeps for ``per_site`` (stops earlier when no
            :math:`\log\delta_s` moves by more than ``10 * tol``).

    Returns:
        A 0-dim tensor, or a ``{site: 0-dim tensor}`` dict for ``per_site``.

    Raises:
        ValueError: the evidence is not finite anywhere in ``bounds`` (a curvature
            that is not positive semi-definite).

    Examples:
        >>> import torch
        >>> mean = {"a": torch.tensor([2.0, 2.0]), "b": torch.tensor([0.1])}
        >>> curv = torch.diag(torch.tensor([50.0, 50.0, 50.0]))
        >>> d = optimize_prior_precision(0.0, mean, curv, per_site=True)
        >>> bool(d["b"] > 10 * d["a"])  # small weights: a strong prior
        True
    """
    lo, hi = bounds
    if not 0 < lo < hi:
        raise ValueError(f"bounds must satisfy 0 < lo < hi, got {bounds}")
    mean = _resolve_mean(mean, curvature)
    evidence = _Evidence(log_likelihood, mean, curvature)
    llo, lhi = math.log(lo), math.log(hi)

    def value(d: PriorPrecision) -> float:
        v = float(evidence(d))
        return v if math.isfinite(v) else -math.inf

    dtype = evidence.dtype
    t = _maximise_log(lambda s: value(math.exp(s)), llo, lhi, num_grid, tol)
    if not per_site:
        return torch.tensor(math.exp(t), dtype=dtype)
    logs = dict.fromkeys(mean, t)
    for _ in range(max_sweeps):
        moved = 0.0
        for k in mean:

            def f(s: float, k: str = k) -> float:
                return value({j: math.exp(s if j == k else logs[j]) for j in mean})

            new = _maximise_log(f, llo, lhi, num_grid, tol)
            moved = max(moved, abs(new - logs[k]))
            logs[k] = new
        if moved < 10 * tol or evidence.kind == "diag":  # sites separate for a diagonal
            break
    return {k: torch.tensor(math.exp(s), dtype=dtype) for k, s in logs.items()}
