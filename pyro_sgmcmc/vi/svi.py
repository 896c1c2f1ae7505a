r"""Tempered stick-the-landing VI for Pyro models: the ELBO for ``SVI``, fitting, and
the fitted guide as a Gaussian posterior."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import (
    AutoContinuous,
    AutoGuide,
    AutoLaplaceApproximation,
    AutoMultivariateNormal,
    AutoNormal,
)
from pyro.infer.util import is_validation_enabled
from pyro.poutine.replay_messenger import ReplayMessenger
from pyro.poutine.util import prune_subsample_sites
from pyro.util import check_if_enumerated, check_model_guide_match, check_site_shape, warn_if_nan
from torch import Tensor

from pyro_sgmcmc.gaussian import DenseGaussian, DiagonalGaussian, GaussianPosterior
from pyro_sgmcmc.potential import PyroPotential
from pyro_sgmcmc.tree import unflatten

__all__ = ["SVIResult", "TemperedSTLELBO", "check_temperature", "fit_svi", "gaussian_from_guide"]

Params = dict[str, Tensor]
#: ``(params, batch) -> scalar`` per-datum minibatch potential, differentiable in params.
Potential = Callable[[Params, Any], Tensor]

_LOG_2PI = math.log(2 * math.pi)


def check_temperature(temperature: float) -> None:
    if not (isinstance(temperature, (int, float)) and temperature >= 0):
        raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")


# ====================================================================== Pyro: the ELBO
class _ReplayDetached(ReplayMessenger):
    """Replay a trace's sample values, detached from the graph."""

    def _pyro_sample(self, msg) -> None:
        super()._pyro_sample(msg)
        name = msg["name"]
        if self.trace is not None and name in self.trace and not msg["is_observed"]:
            value = msg["value"]
            if isinstance(value, Tensor):
                msg["value"] = value.detach()


class TemperedSTLELBO(Trace_ELBO):
    r"""The tempered ELBO with the sticking-the-landing gradient, for ``pyro.infer.SVI``.

    The loss is the negative tempered ELBO (summed over the data, as Pyro's ELBOs are)

    .. math::

        -\mathcal L_T = -\mathbb E_q\big[\log p(y, \theta)\big] + T\,\mathbb E_q
            \big[\log q(\theta)\big],

    whose minimiser targets :math:`p(\theta \mid y)^{1/T}`; observed sites in subsampled
    plates carry Pyro's ``N / B`` scale, so minibatch estimates stay unbiased. The
    gradient drops the score term :math:`T\nabla_\lambda \log q_\lambda(\theta)`
    (with every guide value held fixed): the guide is run a second time replaying its
    own draws *detached*, the log-density of that run is the score term alone, and the
    surrogate loss subtracts it:

    .. math::

        \log q_{\mathrm{STL}} = \log q_\lambda(\theta_\lambda)
            - \log q_\lambda(\bar\theta) + \mathrm{sg}\big[\log q_\lambda(\bar\theta)\big],
        \qquad \bar\theta = \mathrm{sg}(\theta_\lambda).

    Its value is the ELBO's and its gradient is the pathwise one, whatever the guide's
    parameters are (``pyro.param``, ``PyroParam``, ``nn.Parameter``, an amortising
    network) and whatever the dependence between guide sites (an upstream draw is held
    fixed in the score term, so only the direct dependence on the parameters goes). The
    cost is one extra run of the guide per particle.

    Args:
        temperature: :math:`T \ge 0`; 1 is the Bayesian posterior.
        num_particles: draws per gradient estimate.
        max_plate_nesting: as in ``pyro.infer.Trace_ELBO``.
        vectorize_particles: as in ``pyro.infer.Trace_ELBO``.
        **kwargs: other ``pyro.infer.ELBO`` options (``retain_graph``,
            ``strict_enumeration_warning``, ...).

    Raises:
        ValueError: a guide site cannot be reparameterised (a discrete latent, or a
            distribution without ``rsample``): use ``Trace_ELBO`` or
            ``TraceGraph_ELBO`` there, or marginalise the latent out of the model.

    Examples:
        >>> import pyro, pyro.distributions as dist
        >>> from pyro.infer import SVI
        >>> from pyro.infer.autoguide import AutoNormal
        >>> def model(y):
        ...     mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        ...     with pyro.plate("data", len(y), subsample_size=20) as idx:
        ...         pyro.sample("obs", dist.Normal(mu, 1.0), obs=y[idx])
        >>> pyro.clear_param_store()
        >>> _ = pyro.set_rng_seed(0)
        >>> y = 3.0 + torch.randn(100)
        >>> guide = AutoNormal(model)
        >>> svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}),
        ...           loss=TemperedSTLELBO(temperature=1.0))
        >>> for _ in range(500):
        ...     _ = svi.step(y)
        >>> q = gaussian_from_guide(guide)
        >>> abs(q.mean["mu"] - y.mean()).item() < 0.1, abs(q.stddev()["mu"] - 0.1).item() < 0.03
        (True, True)
    """

    def __init__(
        self,
        temperature: float = 1.0,
        num_particles: int = 1,
        max_plate_nesting: float = float("inf"),
        vectorize_particles: bool = False,
        **kwargs: Any,
    ) -> None:
        check_temperature(temperature)
        if not (isinstance(num_particles, int) and num_particles >= 1):
            raise ValueError(f"num_particles must be a positive integer, got {num_particles!r}")
        super().__init__(
            num_particles=num_particles,
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=vectorize_particles,
            **kwargs,
        )
        self.temperature = float(temperature)
        self._with_score = True

    def _get_trace(self, model, guide, args, kwargs):
        if isinstance(poutine.unwrap(guide), poutine.messenger.Messenger):
            raise NotImplementedError(
                "TemperedSTLELBO needs a callable guide (an AutoGuide or a function), not "
                "a GuideMessenger such as AutoRegressiveMessenger"
            )
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
            *args, **kwargs
        )
        if is_validation_enabled():
            check_model_guide_match(model_trace, guide_trace, self.max_plate_nesting)
            check_if_enumerated(guide_trace)
        score_trace = None
        if self._with_score:
            # The guide again at its own (detached) draws, plate indices included: its
            # log-density depends on the parameters only, i.e. it is the score term.
            score_trace = poutine.trace(_ReplayDetached(trace=guide_trace)(guide)).get_trace(
                *args, **kwargs
            )
            score_trace = prune_subsample_sites(score_trace)
            score_trace.compute_log_prob()
        guide_trace = prune_subsample_sites(guide_trace)
        model_trace = prune_subsample_sites(model_trace)
        model_trace.compute_log_prob()
        guide_trace.compute_log_prob()
        for name, site in guide_trace.nodes.items():
            if site["type"] != "sample" or site["is_observed"]:
                continue
            fn = site["fn"]
            if not getattr(fn, "has_rsample", False):
                raise ValueError(
                    f"guide site '{name}' ({type(fn).__name__}) cannot be reparameterised, "
                    "so the sticking-the-landing gradient does not apply: use Trace_ELBO "
                    "or TraceGraph_ELBO for this guide, or marginalise the latent out"
                )
            if score_trace is not None:
                site["score_log_prob_sum"] = score_trace.nodes[name]["log_prob_sum"]
        if is_validation_enabled():
            for trace in (model_trace, guide_trace):
                for site in trace.nodes.values():
                    if site["type"] == "sample":
                        check_site_shape(site, self.max_plate_nesting)
        return model_trace, guide_trace

    def _differentiable_loss_particle(self, model_trace, guide_trace):
        log_p = _site_sum(model_trace, "log_prob_sum")
        log_q = _site_sum(guide_trace, "log_prob_sum")
        score = _site_sum(guide_trace, "score_log_prob_sum")
        log_q_stl = log_q - score + _detach(score)
        surrogate = -(log_p - self.temperature * log_q_stl)
        loss = -(_detach(log_p) - self.temperature * _detach(log_q))
        return float(loss), surrogate

    def loss(self, model, guide, *args, **kwargs) -> float:
        """An estimate of the negative tempered ELBO (no gradient, no extra guide run)."""
        self._with_score = False
        try:
            with torch.no_grad():
                total = 0.0
                for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
                    log_p = _site_sum(model_trace, "log_prob_sum")
                    log_q = _site_sum(guide_trace, "log_prob_sum")
                    total += float(-(log_p - self.temperature * log_q)) / self.num_particles
        finally:
            self._with_score = True
        warn_if_nan(total, "loss")
        return total


def _site_sum(trace, key: str) -> Tensor | float:
    total: Tensor | float = 0.0
    for site in trace.nodes.values():
        if site["type"] == "sample" and key in site:
            total = total + site[key]
    return total


def _detach(x: Tensor | float) -> Tensor | float:
    return x.detach() if isinstance(x, Tensor) else x


# ====================================================================== Pyro: guides
def gaussian_from_guide(guide: AutoGuide, *args: Any, **kwargs: Any) -> GaussianPosterior:
    r"""A fitted Gaussian autoguide as a Gaussian over the model's unconstrained latent sites.

    Keys are the model's latent site names in model order and values live in
    unconstrained space (``biject_to(site.support).inv``), as
    :class:`~pyro_sgmcmc.potential.PyroPotential` parameterises the model, so the result
    can be a prior, a proposal or a starting point there.

    Args:
        guide: a fitted ``AutoNormal`` or ``AutoDiagonalNormal`` (giving a
            :class:`~pyro_sgmcmc.gaussian.DiagonalGaussian`), or an
            ``AutoMultivariateNormal`` or ``AutoLowRankMultivariateNormal`` (giving a
            :class:`~pyro_sgmcmc.gaussian.DenseGaussian`); for an
            ``AutoLaplaceApproximation`` pass ``guide.laplace_approximation(*args)``.
        *args: the model's arguments, for guides whose posterior depends on them.
        **kwargs: the model's keyword arguments.

    Raises:
        TypeError: the guide is not Gaussian (``AutoDelta``, flows, ...).
        ValueError: the guide has not been run yet (its parameters do not exist).

    Examples:
        >>> import pyro, pyro.distributions as dist
        >>> from pyro.infer.autoguide import AutoMultivariateNormal
        >>> def model():
        ...     pyro.sample("s", dist.LogNormal(0.0, 1.0))
        ...     pyro.sample("w", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        >>> pyro.clear_param_store()
        >>> guide = AutoMultivariateNormal(model, init_scale=0.5)
        >>> _ = guide()  # creates the parameters (normally SVI does)
        >>> q = gaussian_from_guide(guide)
        >>> q, list(q.mean), q.stddev()["w"]
        (DenseGaussian(num_params=3), ['s', 'w'], tensor([0.5000, 0.5000]))
    """
    if not isinstance(guide, AutoGuide):
        raise TypeError(f"guide must be a Pyro AutoGuide, got {type(guide).__name__}")
    if getattr(guide, "prototype_trace", None) is None:
        raise ValueError(
            "the guide has not been run yet, so its parameters do not exist: fit it with "
            "SVI first (or call guide(*model_args) once)"
        )
    names = [name for name, _ in guide.prototype_trace.iter_stochastic_nodes()]
    with torch.no_grad():
        if isinstance(guide, AutoNormal):
            mean, precision = {}, {}
            for name in names:
                loc, scale = guide._get_loc_and_scale(name)
                mean[name] = loc.detach().clone()
                precision[name] = scale.detach().pow(-2)
            return DiagonalGaussian(mean, precision)
        if isinstance(guide, AutoContinuous):
            try:
                post = guide.get_posterior(*args, **kwargs)
            except NotImplementedError:
                post = None
            like = {
                name: torch.empty(guide._unconstrained_shapes[name], device=guide.loc.device)
                for name in names
            }
            if isinstance(post, torch.distributions.Independent) and isinstance(
                post.base_dist, torch.distributions.Normal
            ):
                return DiagonalGaussian(
                    unflatten(post.mean.detach(), like),
                    unflatten(post.base_dist.scale.detach().pow(-2), like),
                )
            if isinstance(
                post,
                (
                    torch.distributions.MultivariateNormal,
                    torch.distributions.LowRankMultivariateNormal,
                ),
            ):
                return DenseGaussian(
                    unflatten(post.mean.detach(), like), post.precision_matrix.detach()
                )
    hint = (
        ": pass guide.laplace_approximation(*model_args), an AutoMultivariateNormal"
        if isinstance(guide, AutoLaplaceApproximation)
        else ""
    )
    raise TypeError(
        f"{type(guide).__name__} is not a Gaussian guide: use AutoNormal, AutoDiagonalNormal, "
        f"AutoMultivariateNormal or AutoLowRankMultivariateNormal{hint}"
    )


class SVIResult(NamedTuple):
    """What :func:`fit_svi` returns.

    Attributes:
        guide: the fitted autoguide (its parameters are in Pyro's param store).
        posterior: :func:`gaussian_from_guide` of it, over unconstrained latent sites.
        losses: the loss of every step, a ``(num_steps,)`` tensor.
    """

    guide: AutoGuide
    posterior: GaussianPosterior
    losses: Tensor


def fit_svi(
    model: Callable,
    model_args: tuple = (),
    model_kwargs: dict | None = None,
    *,
    guide: str | AutoGuide = "diagonal",
    temperature: float = 1.0,
    num_steps: int = 1000,
    lr: float = 1e-2,
    optim: pyro.optim.PyroOptim | None = None,
    subsample_size: int | None = None,
    plate: str | None = None,
    num_particles: int = 1,
    init_scale: float = 0.1,
    generator: torch.Generator | None = None,
) -> SVIResult:
    r"""Tempered Gaussian VI of a Pyro model with :class:`TemperedSTLELBO` and ``SVI``.

    The model is written as for the kernels, ``with pyro.plate("data", N) as idx: ...
    obs=y[idx]``; with ``subsample_size`` each step conditions the plate on the next
    ``B`` indices of an epoch-wise shuffle (every datum once per epoch), so the
    likelihood is scaled by ``N / B``. A model that ignores the plate's indices gets a
    :class:`~pyro_sgmcmc.potential.ModelError`, as from the kernels.

    Args:
        model: a Pyro model with continuous latents.
        model_args: its positional arguments.
        model_kwargs: its keyword arguments.
        guide: ``"diagonal"`` (``AutoNormal``), ``"dense"`` (``AutoMultivariateNormal``)
            or an autoguide instance of the model.
        temperature: :math:`T \ge 0` of the target :math:`p(\theta \mid y)^{1/T}`.
        num_steps: SVI steps.
        lr: Adam's learning rate (ignored when ``optim`` is given).
        optim: a Pyro optimiser; defaults to ``pyro.optim.Adam({"lr": lr})``. A
            ``pyro.optim`` LR scheduler (e.g. ``pyro.optim.ExponentialLR({"optimizer":
            torch.optim.Adam, "optim_args": {"lr": 0.02}, "gamma": 0.999})``) is stepped
            once per step. Minibatch VI wants a decaying rate, and no gradient clipping:
            clipping a noisy gradient biases it (``ClippedAdam``'s default
            ``clip_norm=10`` moves the Pima posterior mean by 0.3 sd; pass
            ``"clip_norm": float("inf")``).
        subsample_size: minibatch size ``B`` of the data plate (``None``: full batch).
        plate: the data plate's name, when it cannot be found automatically.
        num_particles: draws per gradient estimate.
        init_scale: the guide's initial standard deviation (string ``guide`` only).
        generator: source of the minibatch indices.

    Returns:
        :class:`SVIResult` ``(guide, posterior, losses)``.

    The guide's parameters live in Pyro's global param store, as in any ``SVI`` run:
    call ``pyro.clear_param_store()`` between unrelated fits, or a new autoguide of
    the same class starts from the old values.

    Examples:
        >>> import pyro
        >>> from pyro_sgmcmc.datasets import load_pima, logistic_regression_model
        >>> data = load_pima()
        >>> pyro.clear_param_store()
        >>> _ = pyro.set_rng_seed(0)
        >>> fit = fit_svi(logistic_regression_model, (data.X, data.y), guide="dense",
        ...               num_steps=300, lr=0.05, subsample_size=128,
        ...               generator=torch.Generator().manual_seed(0))
        >>> fit.posterior, fit.posterior.mean["w"].shape
        (DenseGaussian(num_params=8), torch.Size([8]))
    """
    check_temperature(temperature)
    if not (isinstance(num_steps, int) and num_steps >= 1):
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    model_kwargs = dict(model_kwargs or {})
    if isinstance(guide, str):
        if guide == "diagonal":
            guide = AutoNormal(model, init_scale=float(init_scale))
        elif guide == "dense":
            guide = AutoMultivariateNormal(model, init_scale=float(init_scale))
        else:
            raise ValueError(f"guide must be 'diagonal', 'dense' or an AutoGuide, got {guide!r}")
    elif not isinstance(guide, AutoGuide):
        raise TypeError(f"guide must be 'diagonal', 'dense' or an AutoGuide, got {guide!r}")

    pinned: dict[str, Tensor] = {}
    run_model, run_guide, stream = model, guide, None
    if subsample_size is not None:
        # Finds the data plate and checks that the model indexes its data with it.
        pot = PyroPotential(
            model,
            model_args,
            model_kwargs,
            subsample_size=subsample_size,
            plate=plate,
            batching="epoch",
            generator=generator,
        )
        stream = (pot.plate_name, pot.next_indices)
        run_model = poutine.condition(model, data=pinned)
        run_guide = poutine.condition(guide, data=pinned)
    svi = SVI(
        run_model,
        run_guide,
        optim if optim is not None else pyro.optim.Adam({"lr": lr}),
        loss=TemperedSTLELBO(temperature=temperature, num_particles=num_particles),
    )
    scheduler = isinstance(svi.optim, pyro.optim.PyroLRScheduler)
    losses = []
    for _ in range(num_steps):
        if stream is not None:
            pinned[stream[0]] = stream[1]()
        losses.append(svi.step(*model_args, **model_kwargs))
        if scheduler:
            svi.optim.step()
    return SVIResult(
        guide, gaussian_from_guide(guide, *model_args, **model_kwargs), torch.tensor(losses)
    )
