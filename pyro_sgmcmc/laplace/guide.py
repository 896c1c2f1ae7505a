r"""The Gaussian guide a Laplace autoguide returns, and any Gaussian posterior as a Pyro
distribution.

:class:`LaplaceGuide` is a regular ``AutoContinuous`` guide: ``median()`` (the MAP),
``quantiles([0.05, 0.5, 0.95])``, ``get_posterior()`` (a ``Normal(...).to_event(1)`` or
a ``MultivariateNormal`` over the flat unconstrained latents) and
``pyro.infer.Predictive(model, guide=..., num_samples=...)`` report constrained values.
:class:`GaussianPosteriorDistribution` wraps any
:class:`~pyro_sgmcmc.gaussian.GaussianPosterior` (a K-FAC one too) as a Pyro
distribution over the flat vector.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.distributions.torch_distribution import TorchDistribution
from pyro.distributions.transforms import biject_to
from pyro.infer.autoguide import AutoContinuous
from torch import Tensor

from pyro_sgmcmc.gaussian import DenseGaussian, DiagonalGaussian, GaussianPosterior
from pyro_sgmcmc.laplace.pyro_curvature import CurvatureResult
from pyro_sgmcmc.tree import flatten

__all__ = ["GaussianPosteriorDistribution", "LaplaceGuide"]


class GaussianPosteriorDistribution(TorchDistribution):
    r"""Any :class:`~pyro_sgmcmc.gaussian.GaussianPosterior` as a Pyro distribution over
    the flat vector (event shape ``(P,)``), e.g. a K-FAC posterior.

    Draws are :math:`\mu + L^{-\top} z` through the posterior's own factorisation, so no
    dense :math:`P \times P` matrix is formed.

    Args:
        posterior: the Gaussian.

    Examples:
        >>> q = DiagonalGaussian({"w": torch.zeros(2)}, {"w": torch.tensor([4.0, 1.0])})
        >>> d = GaussianPosteriorDistribution(q)
        >>> d.sample((5,)).shape, d.variance
        (torch.Size([5, 2]), tensor([0.2500, 1.0000]))
    """

    arg_constraints: dict = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, posterior: GaussianPosterior, validate_args: bool | None = None) -> None:
        self.posterior = posterior
        self._loc = flatten(posterior.mean)
        super().__init__(torch.Size(), self._loc.shape, validate_args=validate_args)

    @property
    def mean(self) -> Tensor:
        return self._loc

    @property
    def variance(self) -> Tensor:
        return flatten(self.posterior.variance())

    def rsample(self, sample_shape: torch.Size | tuple = ()) -> Tensor:
        shape = torch.Size(sample_shape) + self._loc.shape
        z = torch.randn(shape, dtype=self._loc.dtype, device=self._loc.device)
        flat = self.posterior._whitened_to_flat(z.reshape(-1, self._loc.numel()))
        return self._loc + flat.reshape(shape)

    def log_prob(self, value: Tensor) -> Tensor:
        delta = value - self._loc
        p = self._loc.numel()
        return 0.5 * (
            self.posterior.log_det_precision() - self.posterior._mahalanobis(delta)
        ) - 0.5 * p * math.log(2 * math.pi)


class LaplaceGuide(AutoContinuous):
    r"""A fixed Gaussian guide over the flat unconstrained latents (not trained by SVI).

    Returned by :meth:`AutoLaplace.laplace_approximation`; usable wherever an
    ``AutoContinuous`` guide is (``median``, ``quantiles``, ``get_posterior``,
    ``Predictive``). Its loc is a buffer, so it registers no Pyro parameters.

    Args:
        model: the Pyro model.
        posterior: the Gaussian over the unconstrained latents (flat dict in model
            order, each site shaped like its unconstrained value).
        curvature: the likelihood curvature it was built from (a
            :class:`~pyro_sgmcmc.laplace.pyro_curvature.CurvatureResult`).
        prior_precision: the Normal prior precision :math:`\delta` that replaced the
            model's prior, or ``None`` when the model's own prior Hessian was used.
        log_marginal_likelihood: the Laplace estimate of :math:`\log p(y)`.
        temperature: the temperature :math:`T` of :attr:`posterior`.
        mode_report: the :class:`~pyro_sgmcmc.laplace.mode.ModeReport` of the mode
            search that centred it (``None`` if it was not searched).

    Attributes:
        posterior: the :class:`~pyro_sgmcmc.gaussian.GaussianPosterior`.
        curvature: as above.
        prior_precision: as above.
        log_marginal_likelihood: as above.
        temperature: as above.
        mode_report: as above.

    Examples:
        Constrained posterior draws without running the model (:meth:`sample_posterior`):

        >>> import pyro, pyro.distributions as dist, torch
        >>> from pyro_sgmcmc.laplace import AutoDiagonalLaplace
        >>> def model(y):
        ...     rate = pyro.sample("rate", dist.Gamma(2.0, 1.0))
        ...     with pyro.plate("data", len(y)) as idx:
        ...         pyro.sample("obs", dist.Poisson(rate), obs=y[idx])
        >>> y = torch.poisson(torch.full((400,), 3.0), generator=torch.Generator().manual_seed(0))
        >>> pyro.clear_param_store()
        >>> guide = AutoDiagonalLaplace(model)
        >>> _ = guide(y)  # SVI would fit it; the mode search finishes the job
        >>> q = guide.laplace_approximation(y)
        >>> q.mode_report.converged
        True
        >>> draws = q.sample_posterior(1000, generator=torch.Generator().manual_seed(1))
        >>> draws["rate"].shape, bool((draws["rate"] > 0).all())
        (torch.Size([1000]), True)
        >>> abs(float(draws["rate"].mean()) - float(y.mean())) < 0.05
        True
    """

    def __init__(
        self,
        model: Callable,
        posterior: GaussianPosterior,
        *,
        curvature: CurvatureResult | None = None,
        prior_precision: Tensor | dict[str, Tensor] | None = None,
        log_marginal_likelihood: Tensor | None = None,
        temperature: float = 1.0,
        mode_report: Any = None,
    ) -> None:
        super().__init__(model)
        self.posterior = posterior
        self.curvature = curvature
        self.prior_precision = prior_precision
        self.log_marginal_likelihood = log_marginal_likelihood
        self.temperature = temperature
        self.mode_report = mode_report
        self.register_buffer("loc", flatten(posterior.mean).detach())
        self._posterior_dist: TorchDistribution | None = None

    def _copy_prototype(self, other: AutoContinuous) -> None:
        for attr in (
            "prototype_trace",
            "_prototype_frames",
            "_unconstrained_shapes",
            "_cond_indep_stacks",
            "latent_dim",
        ):
            setattr(self, attr, getattr(other, attr))

    def get_posterior(self, *args: Any, **kwargs: Any) -> TorchDistribution:
        """The Gaussian over the flat unconstrained latents, as a Pyro distribution."""
        if self._posterior_dist is None:
            q = self.posterior
            if isinstance(q, DiagonalGaussian):
                d = dist.Normal(self.loc, flatten(q.stddev())).to_event(1)
            elif isinstance(q, DenseGaussian):
                tril = torch.distributions.MultivariateNormal(
                    self.loc, precision_matrix=q.precision_matrix()
                ).scale_tril
                d = dist.MultivariateNormal(self.loc, scale_tril=tril)
            else:
                d = GaussianPosteriorDistribution(q)
            self._posterior_dist = d
        return self._posterior_dist

    def _loc_scale(self, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        return self.loc, flatten(self.posterior.stddev())

    def tempered(self, temperature: float) -> LaplaceGuide:
        r"""The guide for :math:`q^{1/T}`: the precision divided by ``temperature``
        (relative to this guide's own temperature, which it multiplies)."""
        guide = LaplaceGuide(
            self.model,
            self.posterior.tempered(temperature),
            curvature=self.curvature,
            prior_precision=self.prior_precision,
            log_marginal_likelihood=self.log_marginal_likelihood,
            temperature=self.temperature * temperature,
            mode_report=self.mode_report,
        )
        guide._copy_prototype(self)
        return guide

    def sample_posterior(
        self,
        num_samples: int | None = None,
        *,
        constrained: bool = True,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        r"""Draws from the Gaussian, site by site, without running the model.

        ``Predictive`` runs the model (over all the data it is given) once per draw; this
        draws the flat vector once and maps each site through ``biject_to`` of its
        support.

        Args:
            num_samples: number of draws (``None``: one, without the leading dimension).
            constrained: map to each site's support (default) or keep the unconstrained
                values :math:`\phi`.
            generator: source of the draws (default: torch's global generator).

        Returns:
            ``{site: (num_samples, *site_shape)}`` in model order; unconstrained values
            have the unconstrained shape (a simplex site has one entry fewer).
        """
        if num_samples is not None and not (isinstance(num_samples, int) and num_samples >= 1):
            raise ValueError(f"num_samples must be None or a positive integer, got {num_samples!r}")
        s = 1 if num_samples is None else num_samples
        flat = flatten(self.posterior.sample(s, generator=generator), 1)
        out = {}
        for site, value in self._unpack_latent(flat):
            value = value.reshape((s, *self._unconstrained_shapes[site["name"]]))
            if constrained:
                value = biject_to(site["fn"].support)(value)
            out[site["name"]] = value if num_samples is not None else value[0]
        return out

    def site_supports(self) -> dict[str, Any]:
        """Each latent site's support (a ``constraints`` object), in model order."""
        return {
            name: site["fn"].support for name, site in self.prototype_trace.iter_stochastic_nodes()
        }

    def site_event_dims(self) -> dict[str, int]:
        """Each latent site's event dimension in the model, in model order."""
        return {
            name: site["fn"].event_dim
            for name, site in self.prototype_trace.iter_stochastic_nodes()
        }

    def prior(self):
        """This posterior as the next episode's prior: see
        :func:`pyro_sgmcmc.continual.prior_from_posterior`."""
        from pyro_sgmcmc.continual import prior_from_posterior

        return prior_from_posterior(self)
