"""Initial points that work where NUTS's work.

As Pyro's ``initialize_model``, the init strategy is retried until the potential and
its gradient are finite over the whole data; then ``init_to_median`` and
``init_to_feasible`` are tried. Vectorised chains get one start each: redrawn
uniformly where the strategy is ``init_to_uniform``, otherwise spread around the
first good start. Where nothing works the error names the latent sites at fault.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from pyro.infer.autoguide.initialization import init_to_feasible, init_to_median, init_to_uniform
from torch import Tensor

from pyro_sgmcmc.kernels.chain_batch import expand_mask, finite
from pyro_sgmcmc.minibatch import generator_device
from pyro_sgmcmc.potential import NonFiniteError

#: Tries of a random init strategy before the next one.
MAX_TRIES = 100
#: Spread (unconstrained units) of vectorised chains around a deterministic start.
CHAIN_SPREAD = 0.5


def _is_finite(potential, phi: dict[str, Tensor]) -> bool:
    try:
        u, grads = potential.potential_and_grad(phi, None)
    except (ValueError, RuntimeError):  # e.g. a Cholesky of a non-PD matrix
        return False
    return bool(finite(u, grads))


def find_initial_params(potential, init_strategy: Callable) -> dict[str, Tensor]:
    """One start with a finite full-data potential and gradient.

    Tries ``init_strategy`` (up to 100 times), then ``init_to_median``, then
    ``init_to_feasible``; raises :class:`~pyro_sgmcmc.potential.NonFiniteError`
    naming the latent sites whose value, log-density or gradient is not finite.
    """
    strategies = [init_strategy]
    for fallback in (init_to_median, init_to_feasible):
        if fallback is not init_strategy:
            strategies.append(fallback)
    last = None
    for strategy in strategies:
        tries = MAX_TRIES if strategy in (init_strategy, init_to_median) else 1
        for _ in range(tries):
            try:
                phi = potential.draw_initial_params(strategy)
            except (ValueError, RuntimeError):
                continue
            if _is_finite(potential, phi):
                return phi
            last = phi
    raise NonFiniteError(_explain(potential, last))


def _explain(potential, phi: dict[str, Tensor] | None) -> str:
    """Which sites make the start non-finite, and what to do."""
    if phi is None:
        return "the model raised at every initial point tried; check it runs on its data"
    terms = potential.log_density_terms(phi, None)
    latent = set(potential.latent_names)
    bad_latent = [k for k, v in terms.items() if k.split(" ")[0] in latent and not v.isfinite()]
    bad_obs = [k for k, v in terms.items() if k.split(" ")[0] not in latent and not v.isfinite()]
    try:
        _, grads = potential.potential_and_grad(phi, None)
        bad_grad = [k for k, g in grads.items() if not torch.isfinite(g).all()]
    except (ValueError, RuntimeError):
        bad_grad = []
    if (bad_latent or bad_grad) and not bad_obs:
        sites = sorted(set(bad_latent) | {f"{k} (gradient)" for k in bad_grad})
        return (
            f"no initial point with a finite log-density and gradient: non-finite at latent "
            f"sites {sites} for every start tried (the strategy, init_to_median, "
            "init_to_feasible). Pass init_strategy=init_to_value(values={...}) with a "
            "plausible value of those sites, or give them a prior with a finite density there"
        )
    return (
        f"the log-likelihood of observed site(s) {bad_obs} is non-finite at every start "
        "tried: check that the observed data lie in the likelihood's support (no NaN or "
        "out-of-range values) and that its parameters stay valid, or pass "
        "init_strategy=init_to_value(values={...})"
    )


def initial_chains(
    potential, init_strategy: Callable, num_chains: int, generator: torch.Generator | None
) -> dict[str, Tensor]:
    """``num_chains`` starts, stacked on a leading dimension, each with a finite potential.

    ``init_to_uniform`` draws each chain from its box (U(-2, 2) unconstrained) and
    redraws non-finite ones; other strategies spread the chains uniformly by
    :data:`CHAIN_SPREAD` around the first start, halving the spread of a chain until
    it is finite.
    """
    first = find_initial_params(potential, init_strategy)
    c = num_chains

    def draw(shape_like: Tensor, width) -> Tensor:
        noise = torch.rand(
            (c, *shape_like.shape), generator=generator, dtype=shape_like.dtype,
            device=generator_device(generator),
        )  # fmt: skip
        return (2.0 * noise - 1.0).to(shape_like.device) * width

    uniform = init_strategy is init_to_uniform
    width = torch.full((c,), 2.0 if uniform else CHAIN_SPREAD, dtype=torch.float64)
    params = {
        k: _around(v, uniform, draw(v, expand_mask(width, v[None]).to(v))) for k, v in first.items()
    }
    for _ in range(MAX_TRIES):
        u, grads = potential.batched_potential_and_grad(params, None)
        bad = ~finite(u, grads)
        if not bad.any():
            break
        width = torch.where(bad, width * (1.0 if uniform else 0.5), width)
        params = {
            k: torch.where(
                expand_mask(bad, v),
                _around(first[k], uniform, draw(first[k], expand_mask(width, v).to(v))),
                v,
            )
            for k, v in params.items()
        }
    else:
        # Chains that found no finite start of their own begin at the first one.
        params = {
            k: torch.where(expand_mask(bad, v), first[k].expand_as(v), v) for k, v in params.items()
        }
    return params


def _around(value: Tensor, uniform: bool, noise: Tensor) -> Tensor:
    return noise if uniform else value + noise
