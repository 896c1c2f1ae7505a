r"""Function-space predictives of a Gaussian posterior: the linearised (GLM) Gaussian over
a model's outputs and the predictive distribution it induces."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.distributions import (
    Bernoulli,
    Categorical,
    Distribution,
    MixtureSameFamily,
    Normal,
    Poisson,
)
from torch.func import jvp, vmap

from pyro_sgmcmc.curvature.per_example import per_example_jacobians
from pyro_sgmcmc.gaussian import DenseGaussian, DiagonalGaussian, GaussianPosterior
from pyro_sgmcmc.likelihoods import (
    Likelihood,
    as_likelihood,
    mean_parameter,
)
from pyro_sgmcmc.tree import UNSUPPORTED, batch_size, flatten, tree_map, unflatten

__all__ = [
    "FunctionGaussian",
    "check_chunk_size",
    "linearized_predictive",
    "predictive_distribution",
]

Params = dict[str, Tensor]
ModelFn = Callable[[Params, Any], Tensor]

_METHODS = ("exact", "sampled")
_LINK_APPROX = ("probit", "mc")


# ---------------------------------------------------------------------- helpers


def _slice(x: Any, start: int, stop: int) -> Any:
    return tree_map(lambda t: t[start:stop], x)


def check_chunk_size(chunk_size: int) -> None:
    if not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")


# ---------------------------------------------------------------------- function space
class FunctionGaussian(NamedTuple):
    r"""A Gaussian over a model's outputs, per example: :math:`f(x_b) \sim \mathcal N(m_b, C_b)`.

    What :func:`linearized_predictive` returns. Examples are independent of each other
    (only the covariance *within* an example's outputs is kept).

    Attributes:
        mean: :math:`m`, shape ``(B, *out)``, the outputs at the posterior mean.
        variance: the marginal variances, shape ``(B, *out)``.
        covariance: :math:`C`, shape ``(B, K, K)`` over each example's outputs
            flattened row-major (:math:`K` = ``prod(out)``, 1 for scalar outputs), or
            ``None`` when only the variances were computed.
    """

    mean: Tensor
    variance: Tensor
    covariance: Tensor | None = None

    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> Tensor:
        """Draws of the outputs, shape ``(num_samples, B, *out)``.

        Correlated within an example when :attr:`covariance` is known (through its
        symmetric square root, so a singular covariance is fine), independent
        otherwise.

        Examples:
            >>> fg = FunctionGaussian(torch.zeros(2, 3), torch.ones(2, 3))
            >>> fg.sample(5, torch.Generator().manual_seed(0)).shape
            torch.Size([5, 2, 3])
        """
        if not (isinstance(num_samples, int) and num_samples >= 1):
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
        m = self.mean
        b = m.shape[0]
        flat = m.reshape(b, -1)
        z = torch.randn(
            (num_samples, *flat.shape), generator=generator, dtype=m.dtype, device=m.device
        )
        if self.covariance is None:
            eps = z * self.variance.reshape(b, -1).clamp_min(0).sqrt()
        else:
            evals, evecs = torch.linalg.eigh(self.covariance)
            root = evecs * evals.clamp_min(0).sqrt().unsqueeze(-2)  # (B, K, K), root root^T = C
            eps = torch.einsum("bkl,sbl->sbk", root, z)
        return (flat + eps).reshape(num_samples, *m.shape)


def _jvps(f: Callable[[Params], Tensor], mean: Params, tangents: Params) -> Tensor:
    """``J v`` for each of the leading-dimension tangents: ``(S, *out)``."""
    try:
        return vmap(lambda v: jvp(f, (mean,), (v,))[1])(tangents)
    except UNSUPPORTED:  # no forward-mode or batching rule: one double-backward per draw
        keys = list(mean)
        s = next(iter(tangents.values())).shape[0]
        rows = []
        for i in range(s):
            _, jv = torch.autograd.functional.jvp(
                lambda *ps: f(dict(zip(keys, ps, strict=True))),
                tuple(mean[k] for k in keys),
                tuple(tangents[k][i] for k in keys),
            )
            rows.append(jv)
        return torch.stack(rows)


def linearized_predictive(
    fn: ModelFn,
    posterior: GaussianPosterior,
    x: Any,
    *,
    full_covariance: bool = True,
    method: str = "exact",
    num_samples: int = 200,
    generator: torch.Generator | None = None,
    chunk_size: int = 32,
) -> FunctionGaussian:
    r"""The linearised (GLM) predictive over outputs: :math:`\mathcal N(f(x;\mu), J \Sigma J^\top)`.

    Each example's Jacobian :math:`J_b = \partial f(x_b;\theta)/\partial\theta` at the
    posterior mean :math:`\mu` maps the posterior covariance :math:`\Sigma` to the
    output covariance :math:`J_b \Sigma J_b^\top` (exact for a model linear in
    :math:`\theta`). With ``method``:

    * ``"exact"``: per-example Jacobians (``vmap(jacrev)``), ``chunk_size`` examples at
      a time (memory :math:`O(\text{chunk} \cdot K \cdot P)` for :math:`K` outputs per
      example and :math:`P` parameters). A
      :class:`~pyro_sgmcmc.gaussian.DiagonalGaussian` needs no covariance matrix
      (:math:`J \,\mathrm{diag}(\sigma^2) J^\top`); a
      :class:`~pyro_sgmcmc.gaussian.DenseGaussian` uses its cached Cholesky factor
      :math:`\Lambda = LL^\top` (:math:`J\Sigma J^\top = W^\top W`, :math:`W =
      L^{-1} J^\top`); any other posterior (e.g. K-FAC) its dense
      :meth:`~pyro_sgmcmc.gaussian.GaussianPosterior.covariance`, formed once.
    * ``"sampled"``: :math:`S` = ``num_samples`` draws :math:`\theta_s \sim q` pushed
      through the linearisation with one Jacobian-vector product each (``jvp``, no
      Jacobian formed), :math:`\hat C_b = \frac1S \sum_s (J_b\delta_s)(J_b\delta_s)^\top`
      with :math:`\delta_s = \theta_s - \mu`; ``chunk_size`` draws per vectorised
      pass. Unbiased, with relative error about :math:`\sqrt{2/S}`; memory that of
      ``chunk_size`` forward passes. The path for K-FAC and large models.

    Args:
        fn: ``(params, x) -> output``, batch first (e.g.
            :func:`~pyro_sgmcmc.curvature.module_fn`); called with
            ``posterior.mean``, which may be a subset of a module's parameters (e.g. the
            last layer's). Each example's output must depend on its own input only.
        posterior: a :class:`~pyro_sgmcmc.gaussian.GaussianPosterior` over those
            parameters (``posterior.tempered(T)`` for a tempered one).
        x: the inputs (a tensor, or a tuple/dict of tensors), batch first.
        full_covariance: also return the ``(B, K, K)`` covariances (else only the
            variances, which is all the probit approximation needs).
        method: ``"exact"`` or ``"sampled"``.
        num_samples: draws of ``"sampled"``.
        generator: their source.
        chunk_size: examples (``"exact"``) or draws (``"sampled"``) per vectorised
            pass.

    Returns:
        A :class:`FunctionGaussian`: ``mean`` and ``variance`` shaped like ``fn``'s
        output, ``covariance`` ``(B, K, K)`` or ``None``.

    Examples:
        >>> from pyro_sgmcmc.gaussian import DenseGaussian
        >>> fn = lambda p, x: x @ p["w"]
        >>> q = DenseGaussian({"w": torch.zeros(2)}, torch.tensor([[2.0, 1.0], [1.0, 2.0]]))
        >>> fg = linearized_predictive(fn, q, torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
        >>> fg.variance  # x^T Sigma x, Sigma = [[2, -1], [-1, 2]] / 3
        tensor([0.6667, 0.6667])
        >>> fg.covariance.shape
        torch.Size([2, 1, 1])
    """
    if not isinstance(posterior, GaussianPosterior):
        raise TypeError(
            f"posterior must be a GaussianPosterior (DiagonalGaussian, DenseGaussian, ...), "
            f"got {type(posterior).__name__}; for parameter draws use mc_predictive"
        )
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    check_chunk_size(chunk_size)
    mean_params = posterior.mean
    b = batch_size(x)
    with torch.no_grad():
        out = fn(mean_params, x)
    if not isinstance(out, Tensor) or out.dim() < 1 or out.shape[0] != b:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"fn must return a tensor with the batch ({b}) first, got {got}")
    out = out.detach()
    k = out[0].numel()
    if method == "exact":
        # torch.func transforms see through no_grad; it keeps the result off the graph of
        # module parameters outside the posterior (a last-layer posterior).
        with torch.no_grad():
            cov_or_var = _exact_function_covariance(
                fn, posterior, x, b, k, full_covariance, chunk_size
            )
    else:
        if not (isinstance(num_samples, int) and num_samples >= 1):
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
        cov_or_var = _sampled_function_covariance(
            fn, posterior, x, b, k, full_covariance, num_samples, generator, chunk_size
        )
    if full_covariance:
        cov = cov_or_var
        var = cov.diagonal(dim1=-2, dim2=-1).reshape(out.shape)
    else:
        cov, var = None, cov_or_var.reshape(out.shape)
    return FunctionGaussian(out, var, cov)


def _exact_function_covariance(
    fn: ModelFn,
    posterior: GaussianPosterior,
    x: Any,
    b: int,
    k: int,
    full: bool,
    chunk_size: int,
) -> Tensor:
    """``(B, K, K)`` covariances (or ``(B, K)`` variances) from per-example Jacobians."""
    mean_params = posterior.mean
    if isinstance(posterior, DiagonalGaussian):
        var, chol, cov = flatten(posterior.variance()), None, None
    elif isinstance(posterior, DenseGaussian):
        var, chol, cov = None, posterior.scale_tril_precision, None
    else:
        var, chol, cov = None, None, posterior.covariance()
    parts = []
    for start in range(0, b, chunk_size):
        xc = _slice(x, start, start + chunk_size)
        jac = per_example_jacobians(fn, mean_params, xc)
        n = batch_size(xc)
        j = torch.cat([t.reshape(n, k, -1) for t in jac.values()], dim=-1)  # (n, K, P)
        if var is not None:
            jv = j * var
        elif chol is not None:  # W = L^{-1} J^T per example; J Sigma J^T = W^T W
            w = torch.linalg.solve_triangular(chol, j.reshape(n * k, -1).T, upper=False)
            j = w.T.reshape(n, k, -1)
            jv = j
        else:
            jv = j @ cov
        if full:
            parts.append(jv @ j.transpose(-1, -2))
        else:
            parts.append((jv * j).sum(-1))
    return torch.cat(parts)


def _sampled_function_covariance(
    fn: ModelFn,
    posterior: GaussianPosterior,
    x: Any,
    b: int,
    k: int,
    full: bool,
    num_samples: int,
    generator: torch.Generator | None,
    chunk_size: int,
) -> Tensor:
    """Monte Carlo :math:`J \\Sigma J^\\top` from ``jvp``'s of centred posterior draws."""
    mean_params = posterior.mean
    mu = flatten(mean_params)
    acc: Tensor | None = None
    done = 0
    while done < num_samples:
        s = min(chunk_size, num_samples - done)
        draws = posterior.sample(s, generator)
        deltas = unflatten(flatten(draws, batch_dims=1) - mu, mean_params)
        with torch.no_grad():
            e = _jvps(lambda p: fn(p, x), mean_params, deltas).reshape(s, b, k)
        term = torch.einsum("sbk,sbl->bkl", e, e) if full else e.square().sum(0)
        acc = term if acc is None else acc + term
        done += s
    return acc / num_samples


def predictive_distribution(
    fg: FunctionGaussian,
    likelihood: str | Likelihood,
    *,
    link_approx: str = "probit",
    num_samples: int = 1000,
    generator: torch.Generator | None = None,
) -> Distribution:
    r"""The predictive distribution of targets from a Gaussian over outputs.

    :math:`p(y \mid x) = \int p(y \mid f)\, \mathcal N(f; m, C)\, df`, per likelihood:

    * ``bernoulli`` (logits), ``link_approx="probit"``: MacKay's probit
      approximation :math:`p = \sigma(\kappa m)`, :math:`\kappa = (1 + \pi v / 8)^{-1/2}`
      (:math:`\sigma(t) \approx \Phi(t\sqrt{\pi/8})`, then the Gaussian integral of
      :math:`\Phi` in closed form); ``"mc"``: :math:`\frac1S \sum_s \sigma(f_s)`,
      :math:`f_s \sim \mathcal N(m, v)`.
    * ``categorical`` (logits, classes last), ``"probit"``: the multiclass (mean-field)
      probit approximation :math:`p = \mathrm{softmax}(\kappa \odot m)` with
      :math:`\kappa_c = (1 + \pi C_{cc} / 8)^{-1/2}` (only the variances are used);
      ``"mc"``: :math:`\frac1S \sum_s \mathrm{softmax}(f_s)` with correlated draws
      when ``fg.covariance`` is known.
    * ``normal`` (mean): exact, :math:`\mathcal N(m, v + s^2)` per output (the
      aleatoric noise variance :math:`s^2` of ``Likelihood("normal", scale=s)``
      added; the two terms are the epistemic and aleatoric variances); ``link_approx``
      is not used.
    * ``poisson`` (log-rate): a mixture of :math:`S` Poissons with rates
      :math:`e^{f_s}` (``link_approx`` is not used).

    Args:
        fg: a :class:`FunctionGaussian` (from :func:`linearized_predictive`).
        likelihood: a :class:`~pyro_sgmcmc.curvature.Likelihood` or its name; a normal
            likelihood must be a ``Likelihood`` object with its noise ``scale``.
        link_approx: ``"probit"`` or ``"mc"`` (classification only).
        num_samples: draws of ``"mc"`` and ``poisson``.
        generator: their source.

    Returns:
        A ``torch.distributions`` object with batch shape ``(B, *out)`` (``(B, ...)``
        without the classes for ``categorical``): ``Bernoulli``, ``Categorical``,
        ``Normal`` or ``MixtureSameFamily`` of ``Poisson``.

    Examples:
        >>> fg = FunctionGaussian(torch.tensor([[2.0, 0.0]]), torch.tensor([[8.0, 0.0]]))
        >>> predictive_distribution(fg, "categorical").probs  # the first logit shrunk
        tensor([[0.7277, 0.2723]])
        >>> predictive_distribution(fg, Likelihood("normal", scale=1.0)).variance
        tensor([[9., 1.]])
    """
    lik = as_likelihood(likelihood, need_scale=True)
    if link_approx not in _LINK_APPROX:
        raise ValueError(f"link_approx must be one of {_LINK_APPROX}, got {link_approx!r}")
    m, v = fg.mean, fg.variance
    if lik.name == "normal":
        return Normal(m, (v + lik.scale**2).sqrt())
    if lik.name == "categorical" and m.dim() < 2:
        raise ValueError(
            "categorical needs logits with the classes last, shape (B, ..., C); got "
            f"{tuple(m.shape)}"
        )
    if lik.name == "poisson":
        rates = fg.sample(num_samples, generator).exp().movedim(0, -1)  # (B, *out, S)
        mix = Categorical(logits=torch.zeros_like(rates))
        return MixtureSameFamily(mix, Poisson(rates))
    if link_approx == "probit":
        kappa = (1 + math.pi / 8 * v.clamp_min(0)).rsqrt()
        if lik.name == "bernoulli":
            return Bernoulli(probs=torch.sigmoid(kappa * m))
        return Categorical(probs=torch.softmax(kappa * m, -1))
    draws = fg.sample(num_samples, generator)
    return (Bernoulli if lik.name == "bernoulli" else Categorical)(
        probs=mean_parameter(lik, draws).mean(0)
    )
