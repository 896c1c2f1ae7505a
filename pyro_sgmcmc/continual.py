r"""Continual (online) Bayesian learning: a Gaussian posterior as the next episode's prior.

After episode :math:`t` the posterior over the unconstrained latents :math:`\phi` is
approximated by a Gaussian :math:`q_t(\phi) = \mathcal N(\mu_t, \Lambda_t^{-1})` (a
Laplace, VI or EKF posterior, any :class:`~pyro_sgmcmc.gaussian.GaussianPosterior`),
and episode :math:`t+1` uses it as its prior:

.. math::

    p(\phi \mid y_{1:t+1}) \propto p(y_{t+1} \mid \phi)\, p(\phi \mid y_{1:t})
        \approx p(y_{t+1} \mid \phi)\, q_t(\phi).

For a linear-Gaussian model the Laplace approximation is exact, so updating on two
halves of the data in turn gives exactly the posterior of one update on all of it
(:math:`\Lambda_{t+1} = \Lambda_t + X_{t+1}^\top X_{t+1} / s^2`).

**Pyro models.** :func:`prior_from_posterior` returns a :class:`GaussianPrior`. Inside
the next model, ``prior()`` does one ``pyro.sample`` per latent site, with the sites'
own names and supports (each unconstrained Gaussian is mapped through the site's
``biject_to`` transform, so the density of :math:`\phi` is exactly :math:`q_t`), and
returns the constrained values::

    prior = prior_from_posterior(laplace_guide)    # a LaplaceGuide or a GaussianPosterior

    def model_next(X, y):
        w = prior()["w"]                            # pyro.sample("w", ...) inside
        with pyro.plate("data", len(X)) as idx:
            pyro.sample("obs", dist.Bernoulli(logits=X[idx] @ w), obs=y[idx])

A dense posterior correlates the sites; ``prior()`` keeps that by sampling them in
order from their Gaussian conditionals,
:math:`\phi_k \mid \phi_{<k} \sim \mathcal N(\mu_k + S_{k,<k} S_{<k}^{-1}(\phi_{<k} -
\mu_{<k}),\ S_{kk} S_{kk}^\top)` with :math:`S` the Cholesky factor of the covariance.
A diagonal posterior factorises over sites, so its per-site distributions are also
available one by one, ``pyro.sample("w", prior["w"])``, with each site's original
batch/event split (so a site of a ``pyro.plate`` can stay inside that plate).
``prior()`` itself samples every site as one event, outside any plate.

**PyTorch models.** The prior of the next task is the quadratic penalty
:meth:`GaussianPosterior.penalty <pyro_sgmcmc.gaussian.GaussianPosterior.penalty>`,
:math:`\tfrac12 (\theta - \mu_t)^\top \Lambda_t (\theta - \mu_t)`, added to the loss
(elastic weight consolidation with the full Laplace precision), or the normalised
log-density ``q.log_prob`` passed as ``ModulePotential(..., prior=q.log_prob)``.

Examples:
    >>> import pyro, pyro.distributions as dist, torch
    >>> from pyro_sgmcmc.gaussian import DiagonalGaussian
    >>> q = DiagonalGaussian({"w": torch.zeros(2)}, {"w": torch.tensor([4.0, 1.0])})
    >>> prior = prior_from_posterior(q)
    >>> prior["w"]
    Independent(Normal(loc: torch.Size([2]), scale: torch.Size([2])), 1)
    >>> def model():
    ...     return prior()["w"]
    >>> pyro.poutine.trace(model).get_trace().nodes["w"]["fn"].event_shape
    torch.Size([2])
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from torch import Tensor
from torch.distributions import biject_to
from torch.distributions.transforms import ReshapeTransform

from pyro_sgmcmc.gaussian import DiagonalGaussian, GaussianPosterior
from pyro_sgmcmc.pyro_model import is_identity_transform
from pyro_sgmcmc.tree import flatten

__all__ = ["GaussianPrior", "prior_from_posterior"]


class GaussianPrior:
    r"""A Gaussian over unconstrained latents, usable as a Pyro model's prior.

    Built by :func:`prior_from_posterior`; see the module docs for the model code.

    Args:
        posterior: the Gaussian over the unconstrained latents (site name -> value
            shaped like the unconstrained site).
        supports: each site's support (``constraints`` object); missing sites are real.
        event_dims: each site's event dimension in the model it came from (used by
            ``prior[name]``); missing sites are all event.

    Attributes:
        posterior: the :class:`~pyro_sgmcmc.gaussian.GaussianPosterior`.
        names: the site names, in sampling order.
        transforms: unconstrained -> constrained, per site (``biject_to(support)``).
    """

    def __init__(
        self,
        posterior: GaussianPosterior,
        supports: Mapping[str, Any] | None = None,
        event_dims: Mapping[str, int] | None = None,
    ) -> None:
        supports = dict(supports or {})
        unknown = set(supports) - set(posterior.mean)
        if unknown:
            raise ValueError(f"supports has sites {sorted(unknown)} the posterior lacks")
        self.posterior = posterior
        self.names = list(posterior.mean)
        self.supports = {k: supports.get(k, constraints.real) for k in self.names}
        self.transforms = {k: biject_to(s) for k, s in self.supports.items()}
        self._ushapes = {k: tuple(v.shape) for k, v in posterior.mean.items()}
        self._cshapes = {
            k: tuple(self.transforms[k].forward_shape(torch.Size(s)))
            for k, s in self._ushapes.items()
        }
        dims = dict(event_dims or {})
        self._event_dims = {k: dims.get(k, len(self._cshapes[k])) for k in self.names}
        self.diagonal = isinstance(posterior, DiagonalGaussian)
        if not self.diagonal:
            self._conditionals()

    # ------------------------------------------------------------------ structure
    def _conditionals(self) -> None:
        """Per-site Gaussian conditionals from the Cholesky factor of the covariance."""
        cov = self.posterior.covariance()
        s = torch.linalg.cholesky(0.5 * (cov + cov.T))
        mu = flatten(self.posterior.mean)
        self._mu, self._gain, self._tril, self._slices = mu, {}, {}, {}
        start = 0
        for k in self.names:
            n = self.posterior.mean[k].numel()
            sl = slice(start, start + n)
            self._slices[k] = sl
            self._tril[k] = s[sl, sl]
            if start:
                # A_k = S_{k,<k} S_{<k}^{-1}: solve A_k S_{<k} = S_{k,<k}
                self._gain[k] = torch.linalg.solve_triangular(
                    s[:start, :start], s[sl, :start], upper=False, left=False
                )
            start += n

    def _transformed(self, base, name: str):
        t = self.transforms[name]
        return base if is_identity_transform(t) else dist.TransformedDistribution(base, t)

    # ------------------------------------------------------------------ per-site use
    @property
    def distributions(self) -> dict[str, dist.TorchDistribution]:
        """Per-site distributions (diagonal posteriors only), each with its site's
        original batch/event split."""
        return {k: self[k] for k in self.names}

    def __getitem__(self, name: str) -> dist.TorchDistribution:
        """The prior of one site, for ``pyro.sample(name, prior[name])`` (diagonal only)."""
        if name not in self.posterior.mean:
            raise KeyError(f"no site {name!r}; the prior has {self.names}")
        if not self.diagonal:
            raise TypeError(
                f"a {type(self.posterior).__name__} correlates the sites, so they have no "
                "independent per-site priors: sample them jointly with `prior()` inside "
                "the model (or use a diagonal posterior)"
            )
        mean = self.posterior.mean[name]
        scale = self.posterior.stddev()[name]
        ushape, cshape = self._ushapes[name], self._cshapes[name]
        uevent = self._event_dims[name] + len(ushape) - len(cshape)
        base = dist.Normal(mean, scale).to_event(uevent) if uevent else dist.Normal(mean, scale)
        return self._transformed(base, name)

    # ------------------------------------------------------------------ joint use
    def __call__(self) -> dict[str, Tensor]:
        """Sample every site (``pyro.sample`` with the site names) inside a model.

        Returns:
            The constrained site values, keyed by site name.
        """
        values: dict[str, Tensor] = {}
        prev: list[Tensor] = []
        for name in self.names:
            ushape = self._ushapes[name]
            mean = self.posterior.mean[name]
            if self.diagonal:
                base = dist.Normal(mean, self.posterior.stddev()[name])
                base = base.to_event(len(ushape)) if ushape else base
            else:
                sl = self._slices[name]
                loc = self._mu[sl]
                if prev:
                    before = torch.cat(prev, -1) - self._mu[: sl.start]
                    loc = loc + before @ self._gain[name].T
                mvn = dist.MultivariateNormal(loc, scale_tril=self._tril[name])
                base = dist.TransformedDistribution(
                    mvn, ReshapeTransform(torch.Size([mean.numel()]), torch.Size(ushape))
                )
            value = pyro.sample(name, self._transformed(base, name))
            values[name] = value
            if not self.diagonal:
                phi = self.transforms[name].inv(value)
                batch = phi.shape[: phi.dim() - len(ushape)]
                prev.append(phi.reshape(*batch, mean.numel()))
        return values

    def log_prob(self, values: Mapping[str, Tensor]) -> Tensor:
        r"""The prior log-density of constrained site values (with the change of
        variables), as the next model's ``pyro.sample`` statements score them."""
        total = 0.0
        with pyro.poutine.trace() as tr, pyro.poutine.condition(data=dict(values)):
            self()
        for name in self.names:
            site = tr.trace.nodes[name]
            total = total + site["fn"].log_prob(site["value"])
        return total

    def __repr__(self) -> str:
        return f"GaussianPrior({type(self.posterior).__name__}, sites={self.names})"


def prior_from_posterior(
    posterior: Any,
    *,
    supports: Mapping[str, Any] | None = None,
    event_dims: Mapping[str, int] | None = None,
) -> GaussianPrior:
    r"""A Gaussian posterior over unconstrained latents as the next Pyro model's prior.

    Args:
        posterior: a :class:`~pyro_sgmcmc.laplace.LaplaceGuide` (its supports and event
            dims come along) or any :class:`~pyro_sgmcmc.gaussian.GaussianPosterior`
            over unconstrained site values.
        supports: each site's support, for a bare posterior (default: real).
        event_dims: each site's event dimension in its model, for a bare posterior
            (default: all dimensions are event dimensions).

    Returns:
        A :class:`GaussianPrior`: call it inside the next model (``prior()`` samples
        every site), or, for diagonal posteriors, use ``prior["site"]`` per site.

    Examples:
        >>> import pyro, torch
        >>> from pyro.distributions import constraints
        >>> from pyro_sgmcmc.gaussian import DenseGaussian
        >>> q = DenseGaussian({"a": torch.zeros(1), "s": torch.tensor(0.0)},
        ...                   torch.tensor([[2.0, 1.0], [1.0, 2.0]]))
        >>> prior = prior_from_posterior(q, supports={"s": constraints.positive})
        >>> draws = pyro.poutine.trace(prior).get_trace().nodes
        >>> bool(draws["s"]["value"] > 0), draws["a"]["value"].shape
        (True, torch.Size([1]))
    """
    if isinstance(posterior, GaussianPosterior):
        return GaussianPrior(posterior, supports, event_dims)
    inner = getattr(posterior, "posterior", None)
    if isinstance(inner, GaussianPosterior):
        sup = dict(posterior.site_supports()) if hasattr(posterior, "site_supports") else {}
        ev = dict(posterior.site_event_dims()) if hasattr(posterior, "site_event_dims") else {}
        sup.update(supports or {})
        ev.update(event_dims or {})
        return GaussianPrior(inner, sup, ev)
    raise TypeError(
        "posterior must be a GaussianPosterior or a guide with a .posterior "
        f"(LaplaceGuide); got {type(posterior).__name__}"
    )
