r"""Monte Carlo predictives from posterior draws, and a Pyro model's observation
distribution under each draw."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.distributions import (
    Bernoulli,
    Categorical,
    Distribution,
    Normal,
    Poisson,
)
from torch.func import vmap

from pyro_sgmcmc.gaussian import GaussianPosterior
from pyro_sgmcmc.likelihoods import (
    Likelihood,
    as_likelihood,
    mean_parameter,
    observation_parameters,
)
from pyro_sgmcmc.predictive.function_space import ModelFn, Params, check_chunk_size
from pyro_sgmcmc.tree import UNSUPPORTED

__all__ = ["MCPredictive", "mc_predictive", "pyro_predictive_distributions", "stack_draws"]


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


def stack_draws(
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
    check_chunk_size(chunk_size)
    lik = None if likelihood is None else as_likelihood(likelihood, need_scale=False)
    params = stack_draws(draws, num_samples, generator)
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
        >>> from pyro_sgmcmc.predictive import decompose_uncertainty
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

    draws = stack_draws(samples, None, None)
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
