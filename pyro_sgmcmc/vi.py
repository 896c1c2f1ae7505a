r"""Gaussian variational inference with a temperature and the sticking-the-landing gradient.

A Gaussian :math:`q_\lambda(\theta) = \mathcal N(\mu, LL^\top)` over the flat parameters
(diagonal :math:`L = \mathrm{diag}(\sigma)` or a dense Cholesky factor) is fitted to the
tempered posterior :math:`p_T(\theta) \propto p(\theta \mid y)^{1/T}` by maximising the
tempered ELBO

.. math::

    \mathcal L_T(\lambda) = \mathbb E_{q_\lambda}\big[\log p(y \mid \theta)
        + \log p(\theta)\big] + T\, \mathbb H[q_\lambda]
    = -T\, \mathrm{KL}\big(q_\lambda \,\|\, p_T\big) + \text{const}.

:math:`T = 1` is ordinary VI, :math:`T < 1` a cold posterior, and :math:`T = 0` drops the
entropy (the mean goes to the MAP and the scale shrinks without end). For a Gaussian
target the optimum is exact: a dense :math:`q` equals :math:`p_T`, whose covariance is
:math:`T` times the posterior's; a diagonal :math:`q` is the mean-field solution, the
exact mean with variances :math:`T / \mathrm{diag}(\Lambda)`, :math:`\Lambda` the
posterior precision.

**Sticking the landing** (Roeder, Wu and Duvenaud, 2017). With the reparameterisation
:math:`\theta = \mu + L\epsilon`, :math:`\epsilon \sim \mathcal N(0, I)`, the gradient of
one draw is

.. math::

    \hat g_{\mathrm{STL}} = \nabla_\lambda \Big[\log p(y, \theta_\lambda(\epsilon))
        - T \log q_{\bar\lambda}(\theta_\lambda(\epsilon))\Big]_{\bar\lambda = \lambda},

where :math:`\bar\lambda` is held fixed (a stop-gradient): the score term
:math:`T \nabla_\lambda \log q_\lambda(\theta)|_\theta` is dropped, which is unbiased
because a score has mean zero. When :math:`q = p_T` the bracket is constant in
:math:`\theta`, so *every* draw's gradient is exactly zero: the estimator's variance
vanishes at the optimum, and a constant step size converges there instead of jittering
around it. The usual estimator (analytic entropy, or the total derivative of
:math:`\log q`) keeps a noisy gradient there (0.05 to 0.4 per datum on the test's linear
regression, where every STL gradient is below :math:`10^{-15}`).

Two ways in:

* **Pyro**: :class:`TemperedSTLELBO` is a ``pyro.infer.ELBO`` for ``SVI`` with any
  reparameterised guide (``AutoNormal``, ``AutoDiagonalNormal``,
  ``AutoMultivariateNormal``, ...), subsampled plates included (Pyro's ``N / B`` scale);
  :func:`fit_svi` runs it on a model written with the idiomatic data plate, feeding
  minibatches of the plate's indices as the kernels do, and :func:`gaussian_from_guide`
  reads a fitted autoguide as a :class:`~pyro_sgmcmc.gaussian.GaussianPosterior` over the
  unconstrained latent sites. Here the ELBO is Pyro's: summed over the data, not per datum.
* **PyTorch**: pure functions (:func:`vi_init`, :func:`vi_loss`, :func:`vi_posterior`)
  over any potential ``potential(params, batch)`` in the per-datum units of
  :class:`~pyro_sgmcmc.nn.ModulePotential` and :class:`~pyro_sgmcmc.potential.PyroPotential`,
  and :class:`GaussianVI`, which holds the optimiser and steps over a ``DataLoader``. The
  loss is :math:`-\mathcal L_T / N`, estimated on a minibatch:

  .. math::

      \ell(\lambda) = \frac1S \sum_{s=1}^S \Big[\tilde U(\theta_s)
          + \frac TN \log q_{\bar\lambda}(\theta_s)\Big], \qquad
      \theta_s = \mu + L\epsilon_s,

  with :math:`\tilde U` the minibatch potential (a mean loss plus
  :math:`-\log p(\theta)/N`), so learning rates are those of the MAP problem.

Both return :class:`~pyro_sgmcmc.gaussian.DiagonalGaussian` or
:class:`~pyro_sgmcmc.gaussian.DenseGaussian`, which the predictive and continual-learning
code take as they take a Laplace approximation.

Examples:
    Dense VI of a Bayesian linear regression matches the exact posterior:

    >>> import torch
    >>> _ = torch.manual_seed(0)
    >>> X = torch.randn(200, 2, dtype=torch.float64)
    >>> y = X @ torch.tensor([1.0, -1.0], dtype=torch.float64) + torch.randn(200).double()
    >>> def potential(p, batch):  # y ~ N(Xw, 1), w ~ N(0, I), per datum
    ...     x, t = batch
    ...     return 0.5 * ((t - x @ p["w"]) ** 2).mean() + 0.5 * (p["w"] ** 2).sum() / 200
    >>> vi = GaussianVI(potential, {"w": torch.zeros(2, dtype=torch.float64)}, num_data=200,
    ...                 dense=True, lr=0.05, generator=torch.Generator().manual_seed(1))
    >>> losses = vi.fit([(X, y)], num_epochs=1500)
    >>> q = vi.posterior()
    >>> exact = X.T @ X + torch.eye(2, dtype=torch.float64)
    >>> torch.allclose(q.precision_matrix(), exact, rtol=1e-3)
    True
    >>> torch.allclose(q.mean["w"], torch.linalg.solve(exact, X.T @ y), atol=1e-4)
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
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

from pyro_sgmcmc.curvature import flatten, unflatten
from pyro_sgmcmc.gaussian import DenseGaussian, DiagonalGaussian, GaussianPosterior
from pyro_sgmcmc.potential import PyroPotential

__all__ = [
    "GaussianVI",
    "SVIResult",
    "TemperedSTLELBO",
    "VIState",
    "fit_svi",
    "gaussian_from_guide",
    "vi_entropy",
    "vi_init",
    "vi_log_prob",
    "vi_loss",
    "vi_posterior",
    "vi_sample",
]

Params = dict[str, Tensor]
#: ``(params, batch) -> scalar`` per-datum minibatch potential, differentiable in params.
Potential = Callable[[Params, Any], Tensor]

_LOG_2PI = math.log(2 * math.pi)


def _check_temperature(temperature: float) -> None:
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
        _check_temperature(temperature)
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
    _check_temperature(temperature)
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


# ====================================================================== PyTorch: pure functions
class VIState(NamedTuple):
    r"""A Gaussian variational family :math:`\mathcal N(\mu, LL^\top)` over flat parameters.

    Attributes:
        mean: :math:`\mu`, a flat parameter dict.
        raw_scale: the unconstrained scale. Diagonal family: a dict like ``mean`` of
            :math:`\rho = \log\sigma`. Dense family: a ``(P, P)`` matrix :math:`R` over
            :func:`~pyro_sgmcmc.curvature.flatten` order with
            :math:`L = \mathrm{diag}(e^{\mathrm{diag} R})\,(I + \mathrm{tril}(R, -1))`:
            its diagonal holds the log row scales and its strict lower triangle a
            unit lower-triangular factor (the upper triangle is unused). As in Pyro's
            ``AutoMultivariateNormal``, every entry is then scale-free, which suits
            Adam's per-coordinate steps.
    """

    mean: Params
    raw_scale: Params | Tensor

    @property
    def dense(self) -> bool:
        """Whether the family has a full covariance."""
        return isinstance(self.raw_scale, Tensor)


def vi_init(
    params: Mapping[str, Tensor] | GaussianPosterior,
    *,
    dense: bool = False,
    init_scale: float = 1e-2,
) -> VIState:
    r"""The initial :class:`VIState`: mean ``params``, standard deviation ``init_scale``.

    Args:
        params: the initial mean (e.g. ``pot.params()``, or a MAP estimate); or a
            :class:`~pyro_sgmcmc.gaussian.GaussianPosterior` (e.g. a Laplace
            approximation) to start from its mean and covariance (its Cholesky factor
            for ``dense``, its marginal standard deviations otherwise).
        dense: a full covariance (:math:`P(P+1)/2` scale parameters) or a diagonal one.
        init_scale: the initial :math:`\sigma` of every coordinate (ignored when
            starting from a posterior).

    Examples:
        >>> s = vi_init({"w": torch.zeros(2)}, dense=True, init_scale=0.5)
        >>> s.raw_scale.diagonal().exp()
        tensor([0.5000, 0.5000])
    """
    if isinstance(params, GaussianPosterior):
        mean = {k: v.clone() for k, v in params.mean.items()}
        if dense:
            chol = torch.linalg.cholesky(params.covariance())
            d = chol.diagonal()
            raw = torch.tril(chol / d.unsqueeze(-1), -1) + torch.diag_embed(d.log())
            return VIState(mean, raw)
        return VIState(mean, {k: v.log() for k, v in params.stddev().items()})
    if not isinstance(params, Mapping) or not params:
        raise TypeError("params must be a non-empty dict of tensors or a GaussianPosterior")
    if not init_scale > 0:
        raise ValueError(f"init_scale must be positive, got {init_scale}")
    for k, v in params.items():
        if not (isinstance(v, Tensor) and v.is_floating_point()):
            raise TypeError(f"params[{k!r}] must be a floating-point tensor")
    mean = {k: v.detach().clone() for k, v in params.items()}
    if dense:
        flat = flatten(mean)
        eye = torch.eye(flat.numel(), dtype=flat.dtype, device=flat.device)
        return VIState(mean, eye * math.log(init_scale))
    return VIState(mean, {k: torch.full_like(v, math.log(init_scale)) for k, v in mean.items()})


def _scale_tril(raw: Tensor) -> Tensor:
    unit = torch.tril(raw, -1) + torch.eye(raw.shape[0], dtype=raw.dtype, device=raw.device)
    return raw.diagonal().exp().unsqueeze(-1) * unit


def _check_state(state: VIState) -> None:
    if not isinstance(state, VIState):
        raise TypeError(f"state must be a VIState (from vi_init), got {type(state).__name__}")
    p = sum(v.numel() for v in state.mean.values())
    if state.dense:
        if state.raw_scale.shape != (p, p):
            raise ValueError(
                f"a dense VIState needs a ({p}, {p}) raw_scale, got {tuple(state.raw_scale.shape)}"
            )
    elif list(state.raw_scale) != list(state.mean):
        raise ValueError("raw_scale must have the keys of mean, in the same order")


def vi_sample(
    state: VIState, num_samples: int | None = None, generator: torch.Generator | None = None
) -> Params:
    r"""Reparameterised draws :math:`\mu + L\epsilon`, differentiable in the state.

    Returns:
        A dict of ``(num_samples, *shape)`` tensors (no leading dimension when
        ``num_samples`` is ``None``).

    Examples:
        >>> s = vi_init({"w": torch.zeros(3)}, init_scale=2.0)
        >>> vi_sample(s, 100_000, torch.Generator().manual_seed(0))["w"].std(0).round()
        tensor([2., 2., 2.])
    """
    _check_state(state)
    mu = flatten(state.mean)
    s = 1 if num_samples is None else num_samples
    eps = torch.randn(s, mu.numel(), generator=generator, dtype=mu.dtype, device=mu.device)
    if state.dense:
        flat = mu + eps @ _scale_tril(state.raw_scale).T
    else:
        flat = mu + eps * flatten(state.raw_scale).exp()
    draws = unflatten(flat, state.mean)
    return {k: v[0] for k, v in draws.items()} if num_samples is None else draws


def vi_log_prob(
    state: VIState, params: Mapping[str, Tensor], *, stop_gradient: bool = False
) -> Tensor:
    r""":math:`\log q_\lambda(\theta)` at ``params`` (entries may share leading batch dims).

    Args:
        state: the variational parameters :math:`\lambda`.
        params: :math:`\theta`.
        stop_gradient: evaluate with :math:`\lambda` detached, so that the gradient
            flows through ``params`` only (the sticking-the-landing term).

    Examples:
        >>> s = vi_init({"w": torch.zeros(1)}, init_scale=1.0)
        >>> vi_log_prob(s, {"w": torch.zeros(1)})  # -log(2 pi) / 2
        tensor(-0.9189)
    """
    _check_state(state)
    first = next(iter(state.mean))
    batch_dims = params[first].dim() - state.mean[first].dim()
    mu = flatten(state.mean)
    raw = state.raw_scale
    if stop_gradient:
        mu = mu.detach()
        raw = raw.detach() if state.dense else {k: v.detach() for k, v in raw.items()}
    delta = flatten(params, batch_dims) - mu
    p = mu.numel()
    if state.dense:
        chol = _scale_tril(raw)
        lead = delta.shape[:-1]
        z = torch.linalg.solve_triangular(chol, delta.reshape(-1, p).T, upper=False).T
        maha = z.square().sum(-1).reshape(lead)
        log_det = raw.diagonal().sum()
    else:
        log_sigma = flatten(raw)
        maha = (delta * torch.exp(-log_sigma)).square().sum(-1)
        log_det = log_sigma.sum()
    return -0.5 * maha - log_det - 0.5 * p * _LOG_2PI


def vi_entropy(state: VIState) -> Tensor:
    r"""The entropy :math:`\mathbb H[q] = \sum_i \log L_{ii} + \tfrac P2 (1 + \log 2\pi)`.

    Examples:
        >>> vi_entropy(vi_init({"w": torch.zeros(1)}, init_scale=1.0))
        tensor(1.4189)
    """
    _check_state(state)
    if state.dense:
        log_det = state.raw_scale.diagonal().sum()
        p = state.raw_scale.shape[0]
    else:
        log_det = sum(v.sum() for v in state.raw_scale.values())
        p = sum(v.numel() for v in state.raw_scale.values())
    return log_det + 0.5 * p * (1.0 + _LOG_2PI)


def vi_loss(
    state: VIState,
    potential: Potential,
    batch: Any,
    *,
    num_data: int,
    temperature: float = 1.0,
    num_samples: int = 1,
    generator: torch.Generator | None = None,
    stl: bool = True,
) -> Tensor:
    r"""The minibatch estimate of the per-datum negative tempered ELBO, :math:`-\mathcal L_T/N`.

    .. math::

        \ell = \frac1S \sum_s \Big[\tilde U(\theta_s) + \frac TN \log
            q_{\bar\lambda}(\theta_s)\Big] \quad (\texttt{stl=True}), \qquad
        \ell = \frac1S \sum_s \tilde U(\theta_s) - \frac TN \mathbb H[q_\lambda]
            \quad (\texttt{stl=False}),

    with :math:`\theta_s = \mu + L\epsilon_s`. Both have the same expectation and the
    same expected gradient; the sticking-the-landing one's gradient vanishes draw by draw
    at the optimum of a Gaussian target (see the module docs), the analytic-entropy
    one's does not.

    Args:
        state: the variational parameters (leaves with ``requires_grad`` to train them).
        potential: ``(params, batch) -> scalar``, the per-datum minibatch potential
            :math:`\tilde U` (``ModulePotential.potential``,
            ``PyroPotential.potential``, or your own).
        batch: what ``potential`` takes (an ``(x, y)`` pair, plate indices, ...).
        num_data: :math:`N`, the size of the data set.
        temperature: :math:`T \ge 0`.
        num_samples: draws :math:`S` per estimate.
        generator: source of :math:`\epsilon`.
        stl: the sticking-the-landing estimator (default) or the analytic entropy.

    Examples:
        >>> pot = lambda p, batch: 0.5 * (p["w"] ** 2).sum()  # N(0, 1) with N = 1
        >>> s = vi_init({"w": torch.zeros(2)}, init_scale=1.0)  # q = the target
        >>> mu, rho = s.mean["w"].requires_grad_(), s.raw_scale["w"].requires_grad_()
        >>> loss = vi_loss(VIState({"w": mu}, {"w": rho}), pot, None, num_data=1)
        >>> [t.abs().max().item() for t in torch.autograd.grad(loss, [mu, rho])]
        [0.0, 0.0]
    """
    _check_state(state)
    _check_temperature(temperature)
    if not num_data > 0:
        raise ValueError(f"num_data must be positive, got {num_data}")
    if not (isinstance(num_samples, int) and num_samples >= 1):
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    draws = vi_sample(state, num_samples, generator)
    loss = _mean_potential(potential, draws, batch, num_samples)
    tau = temperature / num_data
    if tau == 0:
        return loss
    if stl:
        return loss + tau * vi_log_prob(state, draws, stop_gradient=True).mean()
    return loss - tau * vi_entropy(state)


def _mean_potential(potential: Potential, draws: Params, batch: Any, num_samples: int) -> Tensor:
    """The mean of ``potential`` over the draws: one vmapped call, else a loop."""
    if num_samples > 1:
        try:
            values = torch.func.vmap(lambda theta: potential(theta, batch), randomness="different")(
                draws
            )
        except (RuntimeError, NotImplementedError, ValueError):
            values = None  # an operation without a batching rule (or a .item()): loop
        if values is not None and values.shape == (num_samples,):
            return values.mean()
    total = 0.0
    for s in range(num_samples):
        u = potential({k: v[s] for k, v in draws.items()}, batch)
        if not isinstance(u, Tensor) or u.dim() != 0:
            raise ValueError(
                "potential(params, batch) must return a scalar tensor (the mean loss of the "
                "batch plus -log p(params) / N)"
            )
        total = total + u
    return total / num_samples


def vi_posterior(state: VIState) -> GaussianPosterior:
    r"""The fitted :math:`q` as a :class:`~pyro_sgmcmc.gaussian.GaussianPosterior`.

    Diagonal: precision :math:`\sigma^{-2}`. Dense: precision :math:`(LL^\top)^{-1}`.

    Examples:
        >>> vi_posterior(vi_init({"w": torch.zeros(2)}, init_scale=0.5)).precision
        {'w': tensor([4., 4.])}
    """
    _check_state(state)
    mean = {k: v.detach() for k, v in state.mean.items()}
    if state.dense:
        return DenseGaussian(mean, torch.cholesky_inverse(_scale_tril(state.raw_scale.detach())))
    return DiagonalGaussian(
        mean, {k: torch.exp(-2 * v.detach()) for k, v in state.raw_scale.items()}
    )


class GaussianVI:
    r"""Gaussian VI over a minibatch potential, stepping a ``torch.optim`` optimiser.

    Holds the variational parameters as leaf tensors and an optimiser over them (Adam by
    default), and minimises :func:`vi_loss` one batch at a time.

    Args:
        potential: ``(params, batch) -> scalar`` per-datum potential, or an object with
            a ``potential`` method and a ``num_data`` attribute
            (:class:`~pyro_sgmcmc.nn.ModulePotential`,
            :class:`~pyro_sgmcmc.potential.PyroPotential`).
        params: the initial mean (or a posterior to start from, see :func:`vi_init`);
            defaults to ``potential.params()`` for a ``ModulePotential``.
        num_data: :math:`N` (read from ``potential.num_data`` when there is one).
        dense: a full covariance or a diagonal one.
        temperature: :math:`T \ge 0` of the target :math:`p(\theta \mid y)^{1/T}`.
        lr: Adam's learning rate.
        init_scale: the initial standard deviation.
        num_samples: draws per gradient estimate.
        stl: the sticking-the-landing gradient (default) or the analytic entropy.
        generator: source of the draws.
        optimizer: ``params_list -> torch.optim.Optimizer`` to use instead of Adam.

    Attributes:
        optimizer: the ``torch.optim`` optimiser (attach an LR scheduler to it).

    Examples:
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> from pyro_sgmcmc.nn import ModulePotential, bernoulli_log_likelihood
        >>> _ = torch.manual_seed(0)
        >>> X = torch.randn(256, 3)
        >>> y = torch.bernoulli(torch.sigmoid(X @ torch.tensor([2.0, -1.0, 0.0])))
        >>> pot = ModulePotential(torch.nn.Linear(3, 1), bernoulli_log_likelihood, prior=1.0,
        ...                       num_data=256, output_transform=lambda o: o.squeeze(-1))
        >>> vi = GaussianVI(pot, lr=0.02)
        >>> losses = vi.fit(DataLoader(TensorDataset(X, y), batch_size=64, shuffle=True),
        ...                 num_epochs=100)
        >>> q = vi.posterior()
        >>> q, q.mean["weight"].shape
        (DiagonalGaussian(num_params=4), torch.Size([1, 3]))
    """

    def __init__(
        self,
        potential: Potential | Any,
        params: Mapping[str, Tensor] | GaussianPosterior | None = None,
        *,
        num_data: int | None = None,
        dense: bool = False,
        temperature: float = 1.0,
        lr: float = 1e-2,
        init_scale: float = 1e-2,
        num_samples: int = 1,
        stl: bool = True,
        generator: torch.Generator | None = None,
        optimizer: Callable[[list[Tensor]], torch.optim.Optimizer] | None = None,
    ) -> None:
        _check_temperature(temperature)
        if hasattr(potential, "potential") and callable(potential.potential):
            owner = potential
            self.potential = potential.potential
            num_data = num_data if num_data is not None else getattr(owner, "num_data", None)
            if params is None and hasattr(owner, "params"):
                params = owner.params()
            elif params is None and hasattr(owner, "initial_params"):
                params = owner.initial_params()
        elif callable(potential):
            self.potential = potential
        else:
            raise TypeError("potential must be a callable (params, batch) -> scalar")
        if params is None:
            raise ValueError("params (the initial mean) is required for a plain potential")
        if num_data is None:
            raise ValueError("num_data (the size of the data set N) is required")
        state = vi_init(params, dense=dense, init_scale=init_scale)
        mean = {k: v.detach().clone().requires_grad_(True) for k, v in state.mean.items()}
        if state.dense:
            raw: Params | Tensor = state.raw_scale.detach().clone().requires_grad_(True)
            leaves = [*mean.values(), raw]
        else:
            raw = {k: v.detach().clone().requires_grad_(True) for k, v in state.raw_scale.items()}
            leaves = [*mean.values(), *raw.values()]
        self._state = VIState(mean, raw)
        self.num_data = int(num_data)
        self.temperature = float(temperature)
        self.num_samples = num_samples
        self.stl = stl
        self.generator = generator
        self.optimizer = (
            optimizer(leaves) if optimizer is not None else torch.optim.Adam(leaves, lr=lr)
        )

    @property
    def state(self) -> VIState:
        """The current variational parameters (detached)."""
        raw = self._state.raw_scale
        return VIState(
            {k: v.detach() for k, v in self._state.mean.items()},
            raw.detach() if isinstance(raw, Tensor) else {k: v.detach() for k, v in raw.items()},
        )

    def loss(self, batch: Any) -> Tensor:
        """:func:`vi_loss` at the current parameters on ``batch`` (differentiable)."""
        return vi_loss(
            self._state,
            self.potential,
            batch,
            num_data=self.num_data,
            temperature=self.temperature,
            num_samples=self.num_samples,
            generator=self.generator,
            stl=self.stl,
        )

    def step(self, batch: Any) -> Tensor:
        """One optimiser step on ``batch``; returns the (detached) loss."""
        self.optimizer.zero_grad()
        loss = self.loss(batch)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def fit(self, batches: Iterable[Any], num_epochs: int = 1) -> Tensor:
        """Step over ``batches`` (a ``DataLoader``, a list of batches) ``num_epochs`` times.

        Returns:
            The mean loss of each epoch, a ``(num_epochs,)`` tensor.
        """
        history = []
        for _ in range(num_epochs):
            total, count = 0.0, 0
            for batch in batches:
                total = total + self.step(batch)
                count += 1
            if count == 0:
                raise ValueError("batches is empty")
            history.append(total / count)
        return torch.stack(history) if history else torch.zeros(0)

    def posterior(self) -> GaussianPosterior:
        """The current :math:`q` as a Gaussian posterior (see :func:`vi_posterior`)."""
        return vi_posterior(self._state)
