r"""Predictive distributions and their uncertainty: linearised (GLM) and Monte Carlo.

Three ways from a posterior over parameters to predictions at inputs :math:`x`, for a
model function ``fn(params, x)`` whose output :math:`f(x; \theta)` is the likelihood's
natural parameter (logits, mean, log-rate; see :class:`~pyro_sgmcmc.curvature.Likelihood`):

* **Linearised (GLM) predictive** (:func:`linearized_predictive`), from a
  :class:`~pyro_sgmcmc.gaussian.GaussianPosterior` :math:`q = \mathcal N(\mu, \Sigma)`.
  The network is replaced by its first-order Taylor expansion at the mean, so the
  output is Gaussian in function space:

  .. math::

      f(x; \theta) \approx f(x; \mu) + J(x)(\theta - \mu), \qquad
      f(x) \sim \mathcal N\big(f(x; \mu),\; J(x)\, \Sigma\, J(x)^\top\big),

  with :math:`J(x) = \partial f(x; \theta) / \partial \theta` at :math:`\mu`. This is
  the predictive that matches a Laplace/GGN posterior (Immer et al., 2021), and it is
  exact for a model linear in :math:`\theta`. :func:`predictive_distribution` then
  turns that Gaussian over outputs into a distribution over targets.
* **Monte Carlo predictive** (:func:`mc_predictive`): the outputs
  :math:`f(x; \theta_s)` for every draw :math:`\theta_s`: SGMCMC samples, an
  ensemble's members, or draws of a Gaussian posterior.
* **A Pyro model's predictive** (:func:`pyro_predictive_distributions`): the
  distribution of an observation site under every posterior draw.

:func:`decompose_uncertainty` splits the predictive uncertainty of an equally
weighted mixture of :math:`S` members :math:`p(y \mid x, \theta_s)` (draws from any of
the above) into an aleatoric part (noise the members agree on) and an epistemic part
(their disagreement, which more data removes). For classification, in nats:

.. math::

    \underbrace{\mathbb H\Big[\tfrac1S \textstyle\sum_s p_s\Big]}_{\text{total}}
    = \underbrace{\tfrac1S \textstyle\sum_s \mathbb H[p_s]}_{\text{aleatoric}}
    + \underbrace{\mathbb I[y; \theta \mid x]}_{\text{epistemic}},

the epistemic part being the mutual information between the label and the
parameters, :math:`\ge 0` by Jensen's inequality. For Gaussian (and Poisson) outputs,
the law of total variance of the mixture with member means :math:`m_s` and variances
:math:`v_s`:

.. math::

    \underbrace{\mathrm{Var}[y]}_{\text{total}}
    = \underbrace{\tfrac1S \textstyle\sum_s v_s}_{\text{aleatoric}}
    + \underbrace{\tfrac1S \textstyle\sum_s (m_s - \bar m)^2}_{\text{epistemic}}.

Examples:
    A linear model's linearised predictive is exact; its probit approximation is close
    to the Monte Carlo predictive:

    >>> import torch
    >>> from pyro_sgmcmc.gaussian import DiagonalGaussian
    >>> fn = lambda p, x: x @ p["w"]  # logits of a Bernoulli
    >>> q = DiagonalGaussian({"w": torch.tensor([1.0, -1.0])}, {"w": torch.tensor([1.0, 4.0])})
    >>> fg = linearized_predictive(fn, q, torch.tensor([[1.0, 0.0], [1.0, 2.0]]))
    >>> fg.mean, fg.variance  # x^T mu and x^T Sigma x
    (tensor([ 1., -1.]), tensor([1., 2.]))
    >>> predictive_distribution(fg, "bernoulli").probs  # probit approximation
    tensor([0.7000, 0.3212])
    >>> g = torch.Generator().manual_seed(0)
    >>> predictive_distribution(fg, "bernoulli", link_approx="mc", generator=g).probs
    tensor([0.6946, 0.3362])
    >>> u = decompose_uncertainty(fg.sample(10_000, g), "bernoulli", logits=True)
    >>> torch.allclose(u.total, u.aleatoric + u.epistemic), bool((u.epistemic > 0).all())
    (True, True)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
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
    distribution_members,
    mean_parameter,
    observation_parameters,
)
from pyro_sgmcmc.tree import UNSUPPORTED, batch_size, flatten, tree_map, unflatten

__all__ = [
    "FunctionGaussian",
    "MCPredictive",
    "Uncertainty",
    "decompose_uncertainty",
    "linearized_predictive",
    "mc_predictive",
    "predictive_distribution",
    "pyro_predictive_distributions",
]

Params = dict[str, Tensor]
ModelFn = Callable[[Params, Any], Tensor]

_METHODS = ("exact", "sampled")
_LINK_APPROX = ("probit", "mc")


# ---------------------------------------------------------------------- helpers


def _slice(x: Any, start: int, stop: int) -> Any:
    return tree_map(lambda t: t[start:stop], x)


def _check_chunk_size(chunk_size: int) -> None:
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
    _check_chunk_size(chunk_size)
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


# ---------------------------------------------------------------------- Monte Carlo
class MCPredictive(NamedTuple):
    """Per-draw outputs and the predictive mean, from :func:`mc_predictive`.

    Attributes:
        outputs: ``fn(theta_s, x)`` for every draw, shape ``(S, B, *out)``.
        mean: the predictive mean, shape ``(B, *out)``: the average over draws of the
            likelihood's mean parameter (probabilities, mean, rate) when a likelihood
            was given, else of the outputs.
    """

    outputs: Tensor
    mean: Tensor


def _stack_draws(
    draws: Mapping[str, Tensor] | Sequence[Mapping[str, Tensor]] | GaussianPosterior,
    num_samples: int | None,
    generator: torch.Generator | None,
) -> Params:
    if isinstance(draws, GaussianPosterior):
        if num_samples is None:
            raise ValueError("num_samples is required to draw from a GaussianPosterior")
        return draws.sample(num_samples, generator)
    if num_samples is not None:
        raise ValueError(
            "num_samples only applies to a GaussianPosterior; slice the draws to use fewer"
        )
    if isinstance(draws, Mapping):
        stacked = dict(draws)
    elif isinstance(draws, Sequence) and draws and all(isinstance(d, Mapping) for d in draws):
        keys = list(draws[0])
        for i, d in enumerate(draws):
            if list(d) != keys:
                raise ValueError(f"draw {i} has the keys {list(d)}, draw 0 has {keys}")
        stacked = {k: torch.stack([d[k].detach() for d in draws]) for k in keys}
    else:
        raise TypeError(
            "draws must be a dict of tensors with a leading draw dimension (e.g. "
            "mcmc.get_samples()), a non-empty list of parameter dicts (an ensemble, "
            f"saved sampler states), or a GaussianPosterior; got {type(draws).__name__}"
        )
    if not stacked:
        raise ValueError("draws is empty")
    sizes = {k: (v.shape[0] if v.dim() else None) for k, v in stacked.items()}
    if len(set(sizes.values())) != 1 or None in sizes.values():
        raise ValueError(
            f"every entry of draws needs the same leading draw dimension, got {sizes} "
            "(for mcmc.get_samples(group_by_chain=True) merge the chains first)"
        )
    return stacked


def mc_predictive(
    fn: ModelFn,
    draws: Mapping[str, Tensor] | Sequence[Mapping[str, Tensor]] | GaussianPosterior,
    x: Any,
    *,
    likelihood: str | Likelihood | None = None,
    num_samples: int | None = None,
    generator: torch.Generator | None = None,
    chunk_size: int = 64,
) -> MCPredictive:
    r"""The Monte Carlo predictive: ``fn`` evaluated at every posterior draw.

    .. math::

        p(y \mid x) \approx \frac1S \sum_{s=1}^S p(y \mid f(x; \theta_s)).

    Draws are evaluated ``chunk_size`` at a time with ``vmap`` over the draws (one
    call of ``fn`` per draw where an operation has no batching rule, e.g. dropout in
    training mode), without gradients.

    Args:
        fn: ``(params, x) -> output``, batch first (e.g.
            :func:`~pyro_sgmcmc.curvature.module_fn`).
        draws: parameter draws: a dict of ``(S, *shape)`` tensors (``mcmc.get_samples()``
            of a model written as ``fn``'s parameters, stacked sampler states), a list
            of parameter dicts (a deep ensemble, saved SGMCMC states), or a
            :class:`~pyro_sgmcmc.gaussian.GaussianPosterior` to draw ``num_samples``
            from (Laplace, VI).
        x: the inputs, batch first.
        likelihood: if given, :attr:`MCPredictive.mean` averages its mean parameter
            (``sigmoid``/``softmax`` probabilities, the mean, ``exp`` of the log-rate);
            else the raw outputs.
        num_samples: how many draws of a ``GaussianPosterior`` (only then).
        generator: their source.
        chunk_size: draws per vectorised pass.

    Returns:
        :class:`MCPredictive` ``(outputs (S, B, *out), mean (B, *out))``. Feed
        ``outputs`` to :func:`decompose_uncertainty` (``logits=True``).

    Examples:
        >>> fn = lambda p, x: x @ p["w"]
        >>> draws = {"w": torch.tensor([[1.0, 0.0], [3.0, 0.0]])}  # two members
        >>> pred = mc_predictive(fn, draws, torch.tensor([[1.0, 5.0]]))
        >>> pred.outputs, pred.mean
        (tensor([[1.],
                [3.]]), tensor([2.]))
    """
    _check_chunk_size(chunk_size)
    lik = None if likelihood is None else as_likelihood(likelihood, need_scale=False)
    params = _stack_draws(draws, num_samples, generator)
    s = next(iter(params.values())).shape[0]
    outs = []
    with torch.no_grad():
        for start in range(0, s, chunk_size):
            chunk = {k: v[start : start + chunk_size].detach() for k, v in params.items()}
            try:
                outs.append(vmap(fn, in_dims=(0, None))(chunk, x))
            except UNSUPPORTED:
                n = next(iter(chunk.values())).shape[0]
                outs.append(
                    torch.stack([fn({k: v[i] for k, v in chunk.items()}, x) for i in range(n)])
                )
    outputs = torch.cat(outs)
    mean = (outputs if lik is None else mean_parameter(lik, outputs)).mean(0)
    return MCPredictive(outputs, mean)


# ---------------------------------------------------------------------- decomposition
class Uncertainty(NamedTuple):
    """Predictive uncertainty, ``total = aleatoric + epistemic``, per prediction.

    Entropies in nats for ``bernoulli`` and ``categorical``, variances for ``normal``
    and ``poisson``; each of shape ``(B, ...)`` (no draw or class dimension).

    Attributes:
        total: of the mixture predictive: the entropy of the mean probabilities, or the
            total variance.
        aleatoric: the members' own (expected) uncertainty.
        epistemic: the members' disagreement: the mutual information, or the variance
            of the members' means; never negative.
    """

    total: Tensor
    aleatoric: Tensor
    epistemic: Tensor


def _entropy_terms(log_p: Tensor) -> tuple[Tensor, Tensor]:
    r"""Aleatoric and epistemic parts from member log-probabilities ``(S, ..., C)``.

    The epistemic part is computed as :math:`\frac1S \sum_s \mathrm{KL}(p_s \,\|\, \bar p)`
    (equal to the mutual information) with :math:`\log \bar p` taken relative to the
    members' maximum, so that identical members give exactly 0.
    """

    def plogq(p: Tensor, log_q: Tensor) -> Tensor:
        return torch.where(p > 0, p * log_q, torch.zeros_like(p)).sum(-1)  # 0 log 0 = 0

    p = log_p.exp()
    ref = log_p.amax(0)
    ref = torch.where(torch.isfinite(ref), ref, torch.zeros_like(ref))
    log_mean = ref + (log_p - ref).exp().mean(0).log()
    aleatoric = 0.0 - plogq(p, log_p).mean(0)  # 0.0 - 0.0 is +0.0, not -0.0
    epistemic = plogq(p, log_p - log_mean).mean(0).clamp_min(0)
    return aleatoric, epistemic


def decompose_uncertainty(
    members: Tensor | Distribution,
    likelihood: str | Likelihood | None = None,
    *,
    variances: Tensor | float | None = None,
    logits: bool = False,
) -> Uncertainty:
    r"""Split predictive uncertainty into aleatoric and epistemic parts.

    The members are :math:`S` equally weighted predictive distributions (the first
    dimension): SGMCMC samples, ensemble members, draws of a Laplace/VI posterior, or
    draws of a linearised predictive (:meth:`FunctionGaussian.sample`). Classification
    (entropies, nats): total :math:`\mathbb H[\bar p]`, aleatoric
    :math:`\frac1S\sum_s \mathbb H[p_s]`, epistemic the mutual information, their
    difference. Regression (variances): aleatoric :math:`\frac1S\sum_s v_s`, epistemic
    :math:`\frac1S\sum_s (m_s - \bar m)^2` (the mixture's law of total variance, so
    with divisor :math:`S`); for ``poisson`` :math:`v_s = m_s` (the rates). See the
    module docs for the equations.

    Args:
        members: per-member predictions with the members first, ``(S, B, ...)``. With
            a ``likelihood``: probabilities (``categorical``: classes last;
            ``bernoulli``: of :math:`y = 1`), means (``normal``) or rates
            (``poisson``), or with ``logits=True`` the natural parameters (logits,
            log-rates) as :func:`mc_predictive` returns them. Or a
            ``torch.distributions`` ``Bernoulli``, ``Categorical``, ``Normal`` or
            ``Poisson`` with batch shape ``(S, B, ...)``, e.g. from
            :func:`pyro_predictive_distributions` (then no ``likelihood``).
        likelihood: ``"bernoulli"``, ``"categorical"``, ``"normal"`` or ``"poisson"``
            (or a :class:`~pyro_sgmcmc.curvature.Likelihood`).
        variances: the members' noise variances for ``normal``, broadcastable to
            ``members``; defaults to ``scale**2`` of a ``Likelihood("normal", scale)``.
        logits: ``members`` are natural parameters, not probabilities/rates.

    Returns:
        :class:`Uncertainty` ``(total, aleatoric, epistemic)``, each ``(B, ...)``.

    Examples:
        Two confident members that disagree: all the uncertainty is epistemic.

        >>> probs = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # (S=2, B=1, C=2)
        >>> decompose_uncertainty(probs, "categorical")
        Uncertainty(total=tensor([0.6931]), aleatoric=tensor([0.]), epistemic=tensor([0.6931]))
        >>> means, noise = torch.tensor([[0.0], [2.0]]), torch.tensor([[1.0], [1.0]])
        >>> decompose_uncertainty(means, Likelihood("normal"), variances=noise)
        Uncertainty(total=tensor([2.]), aleatoric=tensor([1.]), epistemic=tensor([1.]))
    """
    if isinstance(members, Distribution):
        if likelihood is not None or variances is not None or logits:
            raise ValueError(
                "members is a distribution: its family sets the likelihood; pass no "
                "likelihood, variances or logits"
            )
        values, lik, noise = distribution_members(members)
        return decompose_uncertainty(values, lik, variances=noise)
    if likelihood is None:
        raise ValueError(
            "pass the likelihood ('bernoulli', 'categorical', 'normal', 'poisson') that "
            "members are predictions of, or members as a torch distribution"
        )
    lik = as_likelihood(likelihood, need_scale=False)
    if variances is not None and lik.name != "normal":
        raise ValueError(f"variances apply to normal members only, not {lik.name}")
    if not isinstance(members, Tensor) or members.dim() < 2:
        got = tuple(members.shape) if isinstance(members, Tensor) else type(members).__name__
        raise ValueError(f"members must be a tensor (S, B, ...) with the members first, got {got}")
    if lik.name == "categorical" and members.dim() < 3:
        raise ValueError(
            f"categorical members must be (S, B, ..., C), classes last; got {tuple(members.shape)}"
        )
    if lik.name == "categorical":
        if logits:
            log_p = members.log_softmax(-1)
        else:
            _check_probs(members, simplex=True)
            log_p = members.log()
        aleatoric, epistemic = _entropy_terms(log_p)
    elif lik.name == "bernoulli":
        if logits:
            log_p = torch.stack([F.logsigmoid(members), F.logsigmoid(-members)], -1)
        else:
            _check_probs(members, simplex=False)
            log_p = torch.stack([members.log(), torch.log1p(-members)], -1)
        aleatoric, epistemic = _entropy_terms(log_p)
    else:
        means = members.exp() if (logits and lik.name == "poisson") else members
        if lik.name == "poisson":
            v = means
        elif variances is not None:
            v = torch.as_tensor(variances, dtype=means.dtype, device=means.device)
            try:
                v = v.expand_as(means)
            except RuntimeError as err:
                raise ValueError(
                    f"variances must broadcast to members {tuple(means.shape)}, got "
                    f"{tuple(v.shape)}"
                ) from err
        elif isinstance(likelihood, Likelihood):
            v = torch.full_like(means, lik.scale**2)
        else:
            raise ValueError(
                "normal members need their noise: pass variances= (per member, or one "
                "value) or Likelihood('normal', scale=s)"
            )
        aleatoric = v.mean(0)
        dev = means - means[:1]  # centred on a member: identical members give exactly 0
        epistemic = (dev - dev.mean(0)).square().mean(0)
        return Uncertainty(aleatoric + epistemic, aleatoric, epistemic)
    return Uncertainty(aleatoric + epistemic, aleatoric, epistemic)


def _check_probs(p: Tensor, simplex: bool) -> None:
    if not bool(((p >= 0) & (p <= 1)).all()):
        raise ValueError(
            "members must be probabilities in [0, 1]; pass logits=True for logits (e.g. the "
            "outputs of mc_predictive)"
        )
    if simplex:
        tol = 1e-3 if p.dtype in (torch.float16, torch.bfloat16, torch.float32) else 1e-6
        if not bool(((p.sum(-1) - 1).abs() <= tol).all()):
            raise ValueError(
                "categorical members must sum to 1 over the last (class) dimension; pass "
                "logits=True for logits"
            )


# ---------------------------------------------------------------------- Pyro models


def pyro_predictive_distributions(
    model: Callable[..., Any],
    samples: Mapping[str, Tensor],
    *args: Any,
    site: str = "obs",
    **kwargs: Any,
) -> Distribution:
    r"""A Pyro model's observation distribution under every posterior draw.

    Runs ``model(*args, **kwargs)`` once per draw with its latent sites conditioned on
    that draw (``poutine.condition`` and ``poutine.trace``) and collects the
    distribution of ``site``, so :func:`decompose_uncertainty` splits the posterior
    predictive uncertainty of a Pyro model. The draws of ``site`` itself are not used,
    and Pyro's random state is left as it was.

    Args:
        model: the Pyro model, called on the inputs to predict at (pass ``y=None``, and
            no subsampling: every row of the plate is predicted).
        samples: posterior draws of every latent site, ``{name: (S, *shape)}`` in the
            constrained space: ``mcmc.get_samples()`` of :class:`pyro_sgmcmc.MCMC` or
            ``pyro.infer.MCMC``, or ``pyro.infer.Predictive(guide, ...)`` output.
        *args: the model's arguments.
        site: the observation site.
        **kwargs: the model's keyword arguments.

    Returns:
        A ``torch.distributions`` ``Bernoulli``, ``Categorical``, ``Normal`` or
        ``Poisson`` with batch shape ``(S, *site shape)`` (``to_event`` dimensions
        become batch dimensions).

    Raises:
        ValueError: ``site`` is missing or of another family; ``samples`` has an entry
            that is not a sample site of the model, or misses a latent site (it would be
            drawn from the prior); the model subsamples ``site``'s plate.

    Examples:
        >>> import pyro, pyro.distributions as dist
        >>> def model(x, y=None):
        ...     w = pyro.sample("w", dist.Normal(0.0, 1.0))
        ...     with pyro.plate("data", len(x)):
        ...         pyro.sample("obs", dist.Bernoulli(logits=w * x), obs=y)
        >>> d = pyro_predictive_distributions(model, {"w": torch.tensor([-1.0, 1.0])},
        ...                                   torch.tensor([0.0, 2.0]))
        >>> d.probs
        tensor([[0.5000, 0.1192],
                [0.5000, 0.8808]])
        >>> decompose_uncertainty(d).epistemic
        tensor([0.0000, 0.3278])
    """
    import pyro
    from pyro import poutine

    from pyro_sgmcmc.pyro_model import sample_sites as trace_sample_sites
    from pyro_sgmcmc.pyro_model import subsampled_frames

    draws = _stack_draws(samples, None, None)
    num = next(iter(draws.values())).shape[0]
    draws = {k: v for k, v in draws.items() if k != site}
    rng = pyro.util.get_rng_state()
    family, columns = None, []
    try:
        for i in range(num):
            cond = {k: v[i] for k, v in draws.items()}
            with torch.no_grad():
                trace = poutine.trace(poutine.condition(model, data=cond)).get_trace(
                    *args, **kwargs
                )
            if i == 0:
                sample_sites = trace_sample_sites(trace)
                if site not in sample_sites:
                    raise ValueError(
                        f"the model has no sample site {site!r}; its sample sites are "
                        f"{list(sample_sites)}: pass site="
                    )
                unknown = [k for k in draws if k not in sample_sites]
                if unknown:
                    raise ValueError(
                        f"samples has entries {unknown} that are not sample sites of the model "
                        f"(its sites: {list(sample_sites)})"
                    )
                missing = [
                    name
                    for name, node in sample_sites.items()
                    if name != site and not node["is_observed"] and name not in draws
                ]
                if missing:
                    raise ValueError(
                        f"samples has no draws of the latent sites {missing}: they would be "
                        "drawn from the prior; pass samples of every latent site"
                    )
                for frame in subsampled_frames(trace.nodes[site]):
                    raise ValueError(
                        f"the model subsamples plate {frame.name!r} ({frame.size} of "
                        f"{frame.full_size}) at site {site!r}: call it without "
                        "subsample_size to predict every row"
                    )
            name, params = observation_parameters(trace.nodes[site]["fn"], site)
            if family is None:
                family = name
            columns.append(params)
    finally:
        pyro.util.set_rng_state(rng)
    stacked = [torch.stack([c[j] for c in columns]) for j in range(len(columns[0]))]
    if family == "bernoulli":
        return Bernoulli(probs=stacked[0])
    if family == "categorical":
        return Categorical(probs=stacked[0])
    if family == "normal":
        return Normal(stacked[0], stacked[1])
    return Poisson(stacked[0])
