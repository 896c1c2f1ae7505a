r"""Laplace autoguides for Pyro models: a MAP guide for SVI, then a Gaussian guide.

The workflow is Pyro's :class:`~pyro.infer.autoguide.AutoLaplaceApproximation`, made to
scale with the data:

1. **MAP.** :class:`AutoDiagonalLaplace` and :class:`AutoDenseLaplace` are ordinary
   ``AutoContinuous`` guides (a point mass on the unconstrained latents, as
   ``AutoLaplaceApproximation``), fitted by ``SVI(model, guide, optim, Trace_ELBO())``
   on a model that subsamples its data plate like any Pyro model. The mode is that of
   the density of the unconstrained latents :math:`\phi` (log-Jacobian included).
2. **Mode.** ``guide.laplace_approximation(*args, **kwargs)`` first refines the SVI
   point to the mode of the full-data log joint (damped Newton with the exact Hessian,
   or L-BFGS for over 200 parameters, accumulated over the data in chunks;
   :func:`~pyro_sgmcmc.laplace.mode.find_mode`), records how that went in
   ``guide.mode_report`` and warns when it stops short (``newton_steps``,
   ``mode_tol``, ``strict``).
3. **Curvature.** It then accumulates the
   likelihood curvature :math:`C` (GGN, Monte Carlo Fisher, empirical Fisher or
   Hessian; :mod:`pyro_sgmcmc.laplace.pyro_curvature`) over **all** the plate's
   indices in chunks of ``batch_size`` and adds the prior's precision.
4. **Gaussian guide.** It returns a :class:`LaplaceGuide` with

   .. math::

       q(\phi) = \mathcal N\big(\phi^*,\ \Lambda^{-1}\big), \qquad
       \Lambda = \frac{C + \Lambda_0}{T},

   where :math:`\Lambda_0` is the exact Hessian of :math:`-[\log p(\theta) +
   \log|\partial\theta/\partial\phi|]` at :math:`\phi^*` (the model's own prior;
   ``prior_precision=None``) or :math:`\delta I` for a :math:`\mathcal N(0,
   \delta^{-1})` prior on :math:`\phi` that *replaces* it (``prior_precision=δ``, or
   ``"marglik"`` to choose :math:`\delta` by the Laplace evidence,
   :func:`~pyro_sgmcmc.laplace.marglik.optimize_prior_precision`). :math:`T` is the
   temperature of the samplers: the target is :math:`p(\phi \mid y)^{1/T}`, so
   :math:`T < 1` is a cold posterior and the variances scale with :math:`T`.

The :class:`LaplaceGuide` is a regular ``AutoContinuous`` guide: ``median()`` (the MAP),
``quantiles([0.05, 0.5, 0.95])``, ``get_posterior()`` (a ``Normal(...).to_event(1)`` or
a ``MultivariateNormal`` over the flat unconstrained latents) and
``pyro.infer.Predictive(model, guide=..., num_samples=...)`` report constrained values.
Its :attr:`~LaplaceGuide.posterior` (a :class:`~pyro_sgmcmc.gaussian.GaussianPosterior`)
becomes the next episode's prior with :meth:`LaplaceGuide.prior`
(:mod:`pyro_sgmcmc.continual`).

Examples:
    Logistic regression with minibatch SVI, then a diagonal GGN Laplace over all data:

    >>> import pyro, pyro.distributions as dist, torch
    >>> from pyro.infer import SVI, Trace_ELBO
    >>> X = torch.randn(200, 2, generator=torch.Generator().manual_seed(0))
    >>> y = torch.bernoulli(torch.sigmoid(X @ torch.tensor([1.0, -1.0])),
    ...                     generator=torch.Generator().manual_seed(1))
    >>> def model(X, y, batch=None):
    ...     w = pyro.sample("w", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    ...     with pyro.plate("data", len(X), subsample_size=batch) as idx:
    ...         pyro.sample("obs", dist.Bernoulli(logits=X[idx] @ w), obs=y[idx])
    >>> pyro.clear_param_store()
    >>> guide = AutoDiagonalLaplace(model)
    >>> svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    >>> for _ in range(300):
    ...     _ = svi.step(X, y, batch=50)
    >>> laplace = guide.laplace_approximation(X, y)
    >>> laplace.mode_report.converged  # SVI's end point, refined on all 200 rows
    True
    >>> laplace.quantiles([0.05, 0.5, 0.95])["w"].shape
    torch.Size([3, 2])
    >>> bool((laplace.posterior.stddev()["w"] < 0.3).all())
    True
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from pyro.infer.autoguide import AutoLaplaceApproximation
from pyro.infer.autoguide.initialization import init_to_median
from torch import Tensor

from pyro_sgmcmc.gaussian import DenseGaussian, DiagonalGaussian, GaussianPosterior
from pyro_sgmcmc.laplace.chunks import first_indices, grad_leaves, log_prior_terms
from pyro_sgmcmc.laplace.guide import GaussianPosteriorDistribution, LaplaceGuide
from pyro_sgmcmc.laplace.marglik import log_marginal_likelihood, optimize_prior_precision
from pyro_sgmcmc.laplace.mode import ModeReport, find_mode
from pyro_sgmcmc.laplace.pyro_curvature import CURVATURES, likelihood_curvature, log_prior_hessian
from pyro_sgmcmc.potential import ModelError, PyroPotential
from pyro_sgmcmc.pyro_model import subsampling_plate
from pyro_sgmcmc.tree import flatten, unflatten

__all__ = [
    "LAPLACE_FIX",
    "AutoDenseLaplace",
    "AutoDiagonalLaplace",
    "AutoLaplace",
    "GaussianPosteriorDistribution",
    "LaplaceError",
    "LaplaceGuide",
    "LaplaceModeWarning",
]

_MARGLIK = ("marglik", "marglik_per_site")


class LaplaceError(ValueError):
    """The Laplace approximation cannot be formed; the message says what to change."""


class LaplaceModeWarning(UserWarning):
    """The full-data mode search stopped short of its tolerance: the Laplace Gaussian is
    centred off the mode (see the guide's ``mode_report``)."""


class AutoLaplace(AutoLaplaceApproximation):
    r"""Base of the Laplace autoguides: a MAP guide whose :meth:`laplace_approximation`
    returns a :class:`LaplaceGuide`. Use :class:`AutoDiagonalLaplace` or
    :class:`AutoDenseLaplace`; subclasses set :attr:`structure` (and may override
    :meth:`_make_posterior`).

    Args:
        model: a Pyro model whose likelihood sits in a data plate, ``with
            pyro.plate("data", N, subsample_size=...) as idx: ... obs=y[idx]``
            (index every per-datum tensor with the plate's indices).
        curvature: ``"ggn"`` (default: exact GGN for Bernoulli, Binomial,
            Categorical, Normal, LogNormal, Poisson, Exponential, Gamma and Beta
            observations, Monte Carlo Fisher for any other), ``"fisher"`` (Monte Carlo
            Fisher everywhere), ``"ef"`` (empirical Fisher) or ``"hessian"``.
        temperature: :math:`T > 0`; the guide targets :math:`p(\phi \mid y)^{1/T}`.
        prior_precision: ``None`` (the model's own prior, exact Hessian at the MAP), a
            positive float or ``{site: float}`` :math:`\delta` for a
            :math:`\mathcal N(0, \delta^{-1})` prior on the unconstrained latents
            (replaces the model's prior and log-Jacobian in the precision, not in the
            MAP), ``"marglik"`` (a scalar :math:`\delta` maximising the Laplace
            evidence) or ``"marglik_per_site"``.
        batch_size: plate indices per curvature chunk (memory
            :math:`O(\text{batch\_size} \cdot K \cdot P)`). A model whose plate fixes
            ``subsample_size`` in the arguments given gets chunks of that size.
        plate: the data plate's name (found automatically when unambiguous).
        num_samples: draws of :math:`\tilde y` per datum for the Monte Carlo Fisher.
        newton_steps: the cap on the full-data mode search that
            :meth:`laplace_approximation` runs from the SVI point before taking the
            curvature (:func:`~pyro_sgmcmc.laplace.mode.find_mode`: damped Newton with
            the exact Hessian and a line search up to 200 unconstrained parameters,
            L-BFGS beyond, whatever the guide's covariance structure). ``None``
            (default): iterate until the mode is reached (100 Newton or 500 L-BFGS
            iterations at most); an integer ``k``: at most ``k`` iterations, fewer when
            the tolerance is met; ``0``: keep the SVI point and only measure how far it
            is from the mode. Updates this guide's ``loc``.
        mode_tol: the tolerance of the mode search: the estimated distance to the
            mode in posterior standard deviations, :math:`\sqrt{g^\top H^{-1} g}`.
        strict: raise :class:`LaplaceError` rather than warn
            (:class:`LaplaceModeWarning`) when the mode search misses ``mode_tol``.
        seed: seed of the Monte Carlo draws.
        init_loc_fn: Pyro init strategy of the MAP's starting point.

    Attributes:
        structure: ``"diag"`` or ``"dense"``.
        mode_report: after :meth:`laplace_approximation`, the
            :class:`~pyro_sgmcmc.laplace.mode.ModeReport` of its mode search (final
            gradient norm, distance to the mode, iterations, convergence); ``None``
            before.
    """

    structure = "dense"

    def __init__(
        self,
        model: Callable,
        *,
        curvature: str = "ggn",
        temperature: float = 1.0,
        prior_precision: float | Mapping[str, float] | str | None = None,
        batch_size: int = 256,
        plate: str | None = None,
        num_samples: int = 1,
        newton_steps: int | None = None,
        mode_tol: float = 1e-3,
        strict: bool = False,
        seed: int = 0,
        init_loc_fn: Callable = init_to_median,
    ) -> None:
        if curvature not in CURVATURES:
            raise ValueError(f"curvature must be one of {CURVATURES}, got {curvature!r}")
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ValueError(
                f"temperature must be > 0, got {temperature!r} (T = 0 is the MAP itself: "
                "use guide.median())"
            )
        _check_prior_precision(prior_precision)
        for name, value in (("batch_size", batch_size), ("num_samples", num_samples)):
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if newton_steps is not None and not (isinstance(newton_steps, int) and newton_steps >= 0):
            raise ValueError(
                f"newton_steps must be None (iterate to the mode) or a non-negative integer "
                f"cap, got {newton_steps!r}"
            )
        if not (isinstance(mode_tol, (int, float)) and mode_tol > 0):
            raise ValueError(f"mode_tol must be > 0 (posterior sds), got {mode_tol!r}")
        super().__init__(model, init_loc_fn=init_loc_fn)
        self._raw_model = (model,)  # a tuple: never registered as a submodule
        self.curvature = curvature
        self.temperature = float(temperature)
        self.prior_precision = prior_precision
        self.batch_size = batch_size
        self.plate = plate
        self.num_samples = num_samples
        self.newton_steps = newton_steps
        self.mode_tol = float(mode_tol)
        self.strict = bool(strict)
        self.mode_report: ModeReport | None = None
        self.seed = seed

    def _loc_scale(self, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        return self.loc, torch.zeros_like(self.loc)

    # ------------------------------------------------------------------ set-up
    def _fitted(self, args: tuple, kwargs: dict) -> tuple[PyroPotential, dict[str, Tensor]]:
        """The potential on ``args`` and the fitted MAP; a clear error before fitting."""
        if self.prototype_trace is None:
            raise RuntimeError(
                f"{type(self).__name__} has no MAP yet: fit it first with "
                "SVI(model, guide, optim, Trace_ELBO()).step(*args) (or call guide(*args) "
                "once to start from its initial point)"
            )
        return self._potential(args, kwargs), self._phi()

    def _potential(self, args: tuple, kwargs: dict) -> PyroPotential:
        model = self._raw_model[0]
        sub = subsampling_plate(model, args, kwargs, self.plate)
        if sub is not None:
            pot = PyroPotential(model, args, kwargs, plate=sub[0], subsample_size=sub[1])
        else:
            pot = PyroPotential(model, args, kwargs, plate=self.plate)
        names = [name for name, _ in self.prototype_trace.iter_stochastic_nodes()]
        if names != pot.latent_names:
            raise ModelError(
                f"the model's latent sites {pot.latent_names} differ from those the guide was "
                f"fitted on {names}: call laplace_approximation with the model's arguments"
            )
        return pot

    def _phi(self) -> dict[str, Tensor]:
        return {
            site["name"]: value.detach().clone()
            for site, value in self._unpack_latent(self.loc.detach())
        }

    # ------------------------------------------------------------------ building blocks
    def _prior_term(self, pot: PyroPotential, phi: dict[str, Tensor], delta) -> Any:
        """:math:`\\Lambda_0`: the model prior's Hessian, or :math:`\\delta` on the diagonal."""
        if delta is None:
            return log_prior_hessian(pot, phi, self.structure)
        like = flatten(phi)
        if isinstance(delta, Mapping):
            if set(delta) != set(phi):
                raise ValueError(
                    f"a per-site prior_precision needs one value per latent site {list(phi)}, "
                    f"got {list(delta)}"
                )
            vec = torch.cat(
                [
                    torch.as_tensor(delta[k], dtype=like.dtype, device=like.device).expand(
                        v.numel()
                    )
                    for k, v in phi.items()
                ]
            )
        else:
            vec = torch.as_tensor(delta, dtype=like.dtype, device=like.device).expand(like.numel())
        if self.structure == "diag":
            return unflatten(vec.clone(), phi)
        return torch.diag(vec)

    def _make_posterior(
        self, phi: dict[str, Tensor], curvature: Any, prior: Any, temperature: float
    ) -> GaussianPosterior:
        r"""The Gaussian with mean ``phi`` and precision :math:`(C + \Lambda_0) / T`."""
        if self.structure == "diag":
            prec = {k: (curvature[k] + prior[k]) / temperature for k in phi}
            bad = {k: int((v <= 0).sum()) for k, v in prec.items() if not bool((v > 0).all())}
            if bad:
                raise LaplaceError(
                    f"the Laplace precision is not positive at the MAP (non-positive entries "
                    f"per site: {bad}). {LAPLACE_FIX}"
                )
            return DiagonalGaussian(phi, prec)
        try:
            return DenseGaussian(phi, (curvature + prior) / temperature)
        except ValueError as e:
            raise LaplaceError(
                f"the Laplace precision is not positive definite at the MAP. {LAPLACE_FIX}"
            ) from e

    def _refine_mode(self, pot: PyroPotential, phi: dict[str, Tensor]) -> dict[str, Tensor]:
        """The full-data mode from ``phi`` (see ``newton_steps``): sets ``loc`` and
        :attr:`mode_report`; warns, or raises with ``strict``, when it is not reached."""
        phi, report = find_mode(
            pot, phi, max_iter=self.newton_steps, tol=self.mode_tol, batch_size=self.batch_size
        )
        self.mode_report = report
        with torch.no_grad():
            self.loc.copy_(flatten(phi).to(self.loc.dtype))
        if not report.converged:
            hint = (
                "newton_steps=0 skipped the search: use newton_steps=None"
                if self.newton_steps == 0
                else "raise newton_steps (None: up to 100 Newton / 500 L-BFGS iterations), "
                "train SVI longer, or loosen mode_tol"
            )
            msg = f"{report.message()}: the Laplace Gaussian is centred off the mode; {hint}"
            if self.strict:
                raise LaplaceError(msg)
            warnings.warn(msg, LaplaceModeWarning, stacklevel=3)
        return phi

    # ------------------------------------------------------------------ the approximation
    def laplace_approximation(self, *args: Any, **kwargs: Any) -> LaplaceGuide:
        r"""The Gaussian guide around the fitted MAP, from the curvature over all data.

        Args:
            *args: the model's positional arguments (those SVI used, or the full data).
            **kwargs: the model's keyword arguments.

        Returns:
            A :class:`LaplaceGuide`; its ``curvature``, ``prior_precision`` and
            ``log_marginal_likelihood`` record how it was built.

        Raises:
            RuntimeError: called before the guide was fitted (or run once).
            ModelError: the model has other latent sites than when fitted; the EF of a
                model without a data plate.
            LaplaceError: the precision is not positive definite at the MAP.
        """
        pot, phi = self._fitted(args, kwargs)
        phi = self._refine_mode(pot, phi)
        gen = torch.Generator().manual_seed(self.seed)
        res = likelihood_curvature(
            pot,
            phi,
            curvature=self.curvature,
            structure=self.structure,
            batch_size=self.batch_size,
            num_samples=self.num_samples,
            generator=gen,
        )
        delta = self.prior_precision
        if isinstance(delta, str):
            delta = optimize_prior_precision(
                res.log_likelihood, phi, res.curvature, per_site=delta == "marglik_per_site"
            )
        prior = self._prior_term(pot, phi, delta)
        posterior = self._make_posterior(phi, res.curvature, prior, self.temperature)
        return self._laplace_guide(pot, phi, res, prior, delta, posterior)

    def _laplace_guide(self, pot, phi, res, prior, delta, posterior) -> LaplaceGuide:
        """The fixed Gaussian guide of ``posterior``, with its evidence."""
        evidence = self._log_evidence(pot, phi, res, prior, delta, posterior)
        guide = LaplaceGuide(
            self._raw_model[0],
            posterior,
            curvature=res,
            prior_precision=_as_tensor_delta(delta, phi),
            log_marginal_likelihood=evidence,
            temperature=self.temperature,
            mode_report=self.mode_report,
        )
        guide._copy_prototype(self)
        return guide

    def _log_evidence(self, pot, phi, res, prior, delta, posterior) -> Tensor | None:
        """The Laplace :math:`\\log p(y)` (untempered), from the curvature and the prior."""
        if delta is not None:
            return log_marginal_likelihood(res.log_likelihood, phi, res.curvature, delta)
        untempered = posterior.log_det_precision() + posterior.num_params * math.log(
            self.temperature
        )
        leaves = grad_leaves(phi)
        trace = pot.trace(leaves, first_indices(pot, flatten(phi).device))
        log_prior = log_prior_terms(pot, leaves, trace).detach()
        p = posterior.num_params
        return res.log_likelihood + log_prior + 0.5 * p * math.log(2 * math.pi) - 0.5 * untempered


#: What to try when the Laplace precision is not positive definite (for error messages).
LAPLACE_FIX = (
    "Check that the mode search converged (guide.mode_report; newton_steps=None "
    "iterates to the mode), use curvature='ggn' (positive semi-definite) rather than "
    "'hessian', or set prior_precision=... (a Normal(0, 1/delta) prior on the "
    "unconstrained latents, e.g. 1.0, or 'marglik')."
)


def _check_prior_precision(value: Any) -> None:
    if value is None or value in _MARGLIK:
        return
    if isinstance(value, str):
        raise ValueError(f"prior_precision must be None, a float, a dict or one of {_MARGLIK}")
    values = value.values() if isinstance(value, Mapping) else [value]
    for v in values:
        if not bool(torch.all(torch.as_tensor(v) > 0)):
            raise ValueError(f"prior_precision must be positive, got {value!r}")


def _as_tensor_delta(delta: Any, phi: Mapping[str, Tensor]):
    if delta is None:
        return None
    like = flatten(phi)
    if isinstance(delta, Mapping):
        return {k: torch.as_tensor(v, dtype=like.dtype) for k, v in delta.items()}
    return torch.as_tensor(delta, dtype=like.dtype)


class AutoDiagonalLaplace(AutoLaplace):
    r"""Laplace with a diagonal precision :math:`\mathrm{diag}(C + \Lambda_0) / T`.

    Memory :math:`O(P)`: for models with many latents. The diagonal of the exact prior
    Hessian costs one batched backward pass per parameter (prior only, no data); set
    ``prior_precision`` for very large models. Arguments as :class:`AutoLaplace`.

    Examples:
        >>> import pyro, pyro.distributions as dist, torch
        >>> def model(y):
        ...     mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        ...     with pyro.plate("data", len(y)) as idx:
        ...         pyro.sample("obs", dist.Normal(mu, 1.0), obs=y[idx])
        >>> y = torch.randn(100) + 3.0
        >>> pyro.clear_param_store()
        >>> guide = AutoDiagonalLaplace(model)
        >>> _ = guide(y)  # set up at the initial point (SVI would fit it)
        >>> q = guide.laplace_approximation(y)
        >>> torch.allclose(q.median()["mu"], y.sum() / (100 + 0.01), atol=1e-4)
        True
        >>> q.posterior.variance()["mu"]  # 1 / (N / 1 + 1 / 100)
        tensor(0.0100)
    """

    structure = "diag"


class AutoDenseLaplace(AutoLaplace):
    r"""Laplace with a dense precision :math:`(C + \Lambda_0) / T`: correlations between
    all latents, memory :math:`O(P^2)`. Arguments as :class:`AutoLaplace`.

    Examples:
        >>> import pyro, pyro.distributions as dist, torch
        >>> X = torch.randn(100, 2, generator=torch.Generator().manual_seed(0))
        >>> y = X @ torch.tensor([1.0, 2.0]) + 0.5 * torch.randn(100)
        >>> def model(X, y):
        ...     w = pyro.sample("w", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        ...     with pyro.plate("data", len(X)) as idx:
        ...         pyro.sample("obs", dist.Normal(X[idx] @ w, 0.5), obs=y[idx])
        >>> pyro.clear_param_store()
        >>> guide = AutoDenseLaplace(model, newton_steps=1)  # linear-Gaussian: 1 step
        >>> _ = guide(X, y)
        >>> q = guide.laplace_approximation(X, y)
        >>> exact = X.T @ X / 0.25 + torch.eye(2)
        >>> torch.allclose(q.posterior.precision_matrix(), exact, rtol=1e-4)
        True
    """

    structure = "dense"
