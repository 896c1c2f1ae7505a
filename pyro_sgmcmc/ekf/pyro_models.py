r"""The extended Kalman filter for Pyro models: a Gaussian prior read from the model,
and the filter over the data plate."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pyro
import pyro.poutine as poutine
import torch
from torch import Tensor

from pyro_sgmcmc.ekf.core import as_family, ef_terms, hessian_terms, run_ekf
from pyro_sgmcmc.gaussian import DiagonalGaussian, GaussianPosterior
from pyro_sgmcmc.potential import ModelError, PyroPotential

__all__ = ["pyro_ekf", "pyro_gaussian_prior"]

Params = dict[str, Tensor]


# ---------------------------------------------------------------------- Pyro models
def _normal_parts(fn: Any) -> tuple[Tensor, Tensor] | None:
    """(loc, scale) of a (possibly expanded, Independent) Normal, else None."""
    while True:
        if isinstance(fn, torch.distributions.Independent):
            fn = fn.base_dist
        elif isinstance(fn, pyro.distributions.ExpandedDistribution):
            base = _normal_parts(fn.base_dist)
            if base is None:
                return None
            shape = fn.batch_shape
            return base[0].expand(shape), base[1].expand(shape)
        else:
            break
    if isinstance(fn, torch.distributions.Normal):
        return fn.loc, fn.scale
    return None


def _prototype(potential: PyroPotential):
    with pyro.validation_enabled(False), poutine.block():
        return poutine.trace(potential.model).get_trace(
            *potential.model_args, **potential.model_kwargs
        )


def pyro_gaussian_prior(potential: PyroPotential, *, dense: bool = False) -> GaussianPosterior:
    r"""The model's prior as a Gaussian over its (unconstrained) latent sites.

    Every latent site must have a ``Normal`` prior (possibly ``.expand``-ed or
    ``.to_event``-ed) on the real line, whose parameters do not depend on other latents
    (they are read from one trace of the model). For other priors (a ``HalfNormal``
    scale, a hierarchical prior) build the Gaussian yourself, e.g. a Laplace
    approximation of the prior in unconstrained space.

    Examples:
        >>> import pyro.distributions as dist
        >>> from pyro_sgmcmc.potential import PyroPotential
        >>> def model(y):
        ...     w = pyro.sample("w", dist.Normal(0.0, 2.0).expand([2]).to_event(1))
        ...     with pyro.plate("data", len(y)) as idx:
        ...         pyro.sample("obs", dist.Normal(w.sum(), 1.0), obs=y[idx])
        >>> pyro_gaussian_prior(PyroPotential(model, (torch.zeros(3),))).precision
        {'w': tensor([0.2500, 0.2500])}
    """
    trace = _prototype(potential)
    mean, precision = {}, {}
    for name in potential.latent_names:
        site = trace.nodes[name]
        parts = _normal_parts(site["fn"])
        if parts is None:
            raise ModelError(
                f"latent site '{name}' has a {type(site['fn']).__name__} prior, not a Normal "
                "on the real line: pass prior=, a GaussianPosterior over the unconstrained "
                "latent sites"
            )
        loc, scale = parts
        shape = site["value"].shape
        mean[name] = loc.detach().expand(shape).clone()
        precision[name] = scale.detach().expand(shape).pow(-2).clone()
    prior = DiagonalGaussian(mean, precision)
    return as_family(prior, dense)


def pyro_ekf(
    potential: PyroPotential,
    *,
    prior: GaussianPosterior | None = None,
    batch_size: int | None = None,
    dense: bool = False,
    curvature: str = "ef",
    num_iterations: int = 1,
    process_noise: float | Mapping[str, Tensor] = 0.0,
    forgetting: float = 1.0,
    shuffle: bool = True,
    generator: torch.Generator | None = None,
) -> GaussianPosterior:
    r"""One EKF pass over a Pyro model's data plate, ``batch_size`` indices at a time.

    The model is written as for the kernels (``with pyro.plate("data", N) as idx: ...
    obs=y[idx]``); the filter is over the unconstrained latent sites
    (:class:`~pyro_sgmcmc.potential.PyroPotential`'s ``phi``), the data enter through the
    per-datum log-likelihoods of the plate's observed sites, and the prior enters only as
    the initial Gaussian.

    Args:
        potential: the model as a :class:`~pyro_sgmcmc.potential.PyroPotential`.
        prior: the initial belief over the unconstrained latent sites; defaults to
            :func:`pyro_gaussian_prior` (Normal priors only).
        batch_size: indices per update (default ``potential.subsample_size``, else the
            whole plate: one update).
        dense: a full covariance or a diagonal one.
        curvature: ``"ef"`` (empirical Fisher, from per-datum gradients) or
            ``"hessian"`` (the autograd Hessian of the minibatch log-likelihood; exact
            for linear-Gaussian and canonical GLM likelihoods).
        num_iterations: iterated-EKF steps per minibatch.
        process_noise: :math:`q` of :func:`ekf_predict`.
        forgetting: :math:`\gamma` of :func:`ekf_predict`.
        shuffle: visit the data in a random order (else in index order).
        generator: source of the order.

    Raises:
        ModelError: the model has no data plate, or observed sites outside it (which a
            pass over the plate would never see).

    Examples:
        >>> from pyro_sgmcmc.datasets import load_pima, logistic_regression_model
        >>> from pyro_sgmcmc.potential import PyroPotential
        >>> data = load_pima()
        >>> pot = PyroPotential(logistic_regression_model, (data.X, data.y))
        >>> q = pyro_ekf(pot, batch_size=64, dense=True, curvature="hessian",
        ...              generator=torch.Generator().manual_seed(0))
        >>> q, q.stddev()["w"].shape
        (DenseGaussian(num_params=8), torch.Size([8]))
    """
    if not isinstance(potential, PyroPotential):
        raise TypeError(f"potential must be a PyroPotential, got {type(potential).__name__}")
    if potential.plate_name is None:
        raise ModelError(
            "the EKF passes over the model's data plate, and the model has none: write the "
            "likelihood as `with pyro.plate('data', N) as idx: pyro.sample('obs', ..., "
            "obs=y[idx])`"
        )
    if curvature not in ("ef", "hessian"):
        raise ValueError(f"curvature must be 'ef' or 'hessian' for a Pyro model, got {curvature!r}")
    trace = _prototype(potential)
    outside = [
        name
        for name, site in trace.nodes.items()
        if site["type"] == "sample"
        and site["is_observed"]
        and name != potential.plate_name
        and potential.plate_name not in {f.name for f in site["cond_indep_stack"]}
    ]
    if outside:
        raise ModelError(
            f"observed sites {outside} lie outside the data plate '{potential.plate_name}', "
            "so one pass over the plate would ignore them: move them into the plate"
        )
    if prior is None:
        prior = pyro_gaussian_prior(potential, dense=dense)
    else:
        if list(prior.mean) != potential.latent_names:
            raise ValueError(
                f"prior must be over the latent sites {potential.latent_names} (in order), "
                f"got {list(prior.mean)}"
            )
        prior = as_family(prior, dense)
    size = potential.plate_size
    b = batch_size or potential.subsample_size or size
    if not 1 <= b <= size:
        raise ValueError(f"batch_size must lie in [1, {size}], got {b}")
    device = next(iter(prior.mean.values())).device
    order = torch.randperm(size, generator=generator) if shuffle else torch.arange(size)
    batches = [order[i : i + b].to(device) for i in range(0, size, b)]
    if curvature == "ef":
        terms = ef_terms(potential.per_example_grads)
    else:
        terms = hessian_terms(potential.per_example_log_likelihood)
    return run_ekf(
        prior,
        terms,
        batches,
        num_iterations=num_iterations,
        process_noise=process_noise,
        forgetting=forgetting,
    )
