r"""Curvature of a Pyro model's log-likelihood over its unconstrained latent sites.

For a Pyro model with latent sites :math:`\theta = T(\phi)` (``biject_to`` of each site's
support, :math:`\phi` unconstrained, a flat parameter dict) and observed sites inside the
data plate, :func:`likelihood_curvature` accumulates one of four curvatures of the
*summed* negative log-likelihood over **all** the plate's indices, in chunks of
``batch_size`` (never one random minibatch, and never an :math:`N \times P` matrix):

.. math::

    \text{GGN:}\quad & G = \sum_i J_i^\top F_i J_i, \qquad
        J_i = \frac{\partial \eta_i}{\partial \phi}, \\
    \text{Fisher (Monte Carlo):}\quad & \hat F = \sum_i \frac1S \sum_{s=1}^S
        \tilde g_{is} \tilde g_{is}^\top, \qquad
        \tilde g_{is} = \nabla_\phi \log p(\tilde y_{is} \mid \phi),\
        \tilde y_{is} \sim p(y_i \mid \phi), \\
    \text{empirical Fisher (EF):}\quad & \tilde F = \sum_i g_i g_i^\top, \qquad
        g_i = \nabla_\phi \log p(y_i \mid \phi), \\
    \text{Hessian:}\quad & H = -\nabla^2_\phi \sum_i \log p(y_i \mid \phi).

Here :math:`\eta_i` are the parameters of datum :math:`i`'s observation distribution as
the model builds it (``Bernoulli`` logits, ``Normal`` loc and scale, ``Poisson`` rate,
...) and :math:`F_i` is that distribution's Fisher information in those parameters, in
closed form. The Fisher information transforms covariantly (:math:`J^\top F J` is the
same in any parameterisation), so probs or logits, rate or log-rate give the same
matrix; for an exponential family in its natural parameter :math:`F_i` is the Hessian
of :math:`-\log p`, so :math:`G` is the generalised Gauss-Newton matrix and equals the
Fisher :math:`\mathbb E_{y \sim p}[g g^\top]` exactly. Closed forms of :math:`F`:

* ``Bernoulli``: :math:`p(1-p)` in the logits;
* ``Binomial`` (fixed :math:`n`): :math:`n\,p(1-p)` in the logits;
* ``Categorical``, ``OneHotCategorical``: :math:`\mathrm{diag}(p) - pp^\top` in the
  logits;
* ``Normal``, ``LogNormal``: :math:`\mathrm{diag}(1/\sigma^2, 2/\sigma^2)` in
  :math:`(\mu, \sigma)`;
* ``Poisson``: :math:`1/\lambda` in the rate; ``Exponential``: :math:`1/\lambda^2`
  in the rate;
* ``Gamma``: :math:`\psi'(\alpha)`, :math:`-1/\beta`, :math:`\alpha/\beta^2` (the
  entries of the symmetric 2x2 block) in :math:`(\alpha, \beta)`;
* ``Beta``: :math:`\psi'(a) - \psi'(a+b)`, :math:`-\psi'(a+b)`, :math:`\psi'(b) -
  \psi'(a+b)` in :math:`(a, b)`.

Any other observation distribution (``StudentT``, ``MultivariateNormal``, a
``MaskedDistribution``, your own) gets the Monte Carlo conditional Fisher instead:
:math:`\tilde y` is drawn from the model's own observation site, given the latents
and the observed values of every other site. The GGN, the Fisher and the EF are
positive semi-definite; the Hessian need not be.

Each curvature is a **sum** over the data with no prior (as in
:mod:`pyro_sgmcmc.curvature`): a Laplace precision adds the prior's
(:func:`log_prior_hessian`). ``"diag"`` curvatures are dicts shaped like :math:`\phi`;
``"dense"`` ones are :math:`(P, P)` over :func:`~pyro_sgmcmc.curvature.flatten` order.

Observed sites outside the data plate are counted once, as one more "datum". A model
without a data plate is a single datum: the GGN and the Hessian are then still exact
(and the Monte Carlo Fisher unbiased; the Jacobian rows are processed in blocks, the
forward pass is full batch), but the EF is not defined and raises. A model with latent
sites inside the data plate (local latents), or whose observed sites do not index their
data with the plate's indices, cannot be cut into chunks either: it is processed as one
full-data chunk (with a warning in the second case). The site's scale (the plate's
:math:`N/B`, a ``poutine.scale``) is ignored: every datum counts once.

Examples:
    The GGN of a logistic regression equals the closed form :math:`X^\top W X`:

    >>> import pyro, pyro.distributions as dist, torch
    >>> from pyro_sgmcmc.potential import PyroPotential
    >>> X = torch.randn(50, 3, generator=torch.Generator().manual_seed(0))
    >>> y = torch.bernoulli(torch.full((50,), 0.5), generator=torch.Generator().manual_seed(1))
    >>> def model(X, y):
    ...     w = pyro.sample("w", dist.Normal(torch.zeros(3), 1.0).to_event(1))
    ...     with pyro.plate("data", len(X)) as idx:
    ...         pyro.sample("obs", dist.Bernoulli(logits=X[idx] @ w), obs=y[idx])
    >>> pot = PyroPotential(model, (X, y))
    >>> phi = {"w": torch.tensor([0.5, -1.0, 0.2])}
    >>> res = likelihood_curvature(pot, phi, curvature="ggn", structure="dense", batch_size=16)
    >>> p = torch.sigmoid(X @ phi["w"])
    >>> torch.allclose(res.curvature, X.T @ ((p * (1 - p))[:, None] * X), atol=1e-5)
    True
    >>> res.methods
    {'obs': 'ggn'}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import pyro
import torch
from torch import Tensor

from pyro_sgmcmc.curvature import unflatten
from pyro_sgmcmc.laplace.chunks import (
    Accumulator,
    check_phi,
    chunk_curvature,
    chunk_sites,
    chunks,
    first_indices,
    flat_grads,
    grad_leaves,
    jacobian_rows,
    log_prior_terms,
    site_rows,
    weighted_rows,
)
from pyro_sgmcmc.potential import ModelError, PyroPotential
from pyro_sgmcmc.pyro_model import model_plate_subsample_size

__all__ = [
    "CURVATURES",
    "CurvatureResult",
    "STRUCTURES",
    "likelihood_curvature",
    "log_joint_and_grad",
    "log_prior_hessian",
]

#: The curvatures :func:`likelihood_curvature` computes.
CURVATURES = ("ggn", "fisher", "ef", "hessian")
#: The structures it returns them in.
STRUCTURES = ("diag", "dense")

Params = dict[str, Tensor]


class CurvatureResult(NamedTuple):
    """What :func:`likelihood_curvature` returns.

    Attributes:
        curvature: the summed likelihood curvature, a dict like ``phi`` (``"diag"``) or
            a ``(P, P)`` matrix (``"dense"``).
        log_likelihood: the full-data log-likelihood :math:`\\log p(y \\mid \\phi)` at
            ``phi``, a scalar.
        methods: the method used for each observed site (``"ggn"``, ``"fisher"``,
            ``"ef"`` or ``"hessian"``); ``"fisher"`` marks the Monte Carlo Fisher.
    """

    curvature: Params | Tensor
    log_likelihood: Tensor
    methods: dict[str, str]


def _validate(curvature: str, structure: str, batch_size: int, num_samples: int) -> None:
    if curvature not in CURVATURES:
        raise ValueError(f"curvature must be one of {CURVATURES}, got {curvature!r}")
    if structure not in STRUCTURES:
        raise ValueError(f"structure must be one of {STRUCTURES}, got {structure!r}")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not (isinstance(num_samples, int) and num_samples >= 1):
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")


def likelihood_curvature(
    potential: PyroPotential,
    phi: Mapping[str, Tensor],
    *,
    curvature: str = "ggn",
    structure: str = "diag",
    batch_size: int = 256,
    num_samples: int = 1,
    generator: torch.Generator | None = None,
) -> CurvatureResult:
    r"""The likelihood curvature over the whole data plate, accumulated in chunks.

    Args:
        potential: the model as a :class:`~pyro_sgmcmc.potential.PyroPotential` (its data
            plate, latent sites and transforms).
        phi: unconstrained latent values, keyed like ``potential.latent_names``.
        curvature: ``"ggn"`` (closed-form Fisher of the observation distribution,
            Monte Carlo Fisher for families without one), ``"fisher"`` (Monte Carlo
            Fisher for every site), ``"ef"`` (empirical Fisher) or ``"hessian"``.
        structure: ``"diag"`` or ``"dense"``.
        batch_size: plate indices per chunk (a model whose plate fixes
            ``subsample_size`` gets chunks of that size instead).
        num_samples: draws of :math:`\tilde y` per datum for the Monte Carlo Fisher.
        generator: source of the Monte Carlo draws.

    Returns:
        A :class:`CurvatureResult`: the summed curvature, the full-data
        log-likelihood, and the method used per observed site.

    Raises:
        ModelError: the EF of a model without a data plate, or latents inside the plate.

    Examples:
        >>> import pyro, pyro.distributions as dist, torch
        >>> from pyro_sgmcmc.potential import PyroPotential
        >>> def model(y):
        ...     mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        ...     with pyro.plate("data", len(y)) as idx:
        ...         pyro.sample("obs", dist.Normal(mu, 2.0), obs=y[idx])
        >>> pot = PyroPotential(model, (torch.zeros(40),))
        >>> likelihood_curvature(pot, {"mu": torch.tensor(0.0)}, batch_size=16).curvature
        {'mu': tensor(10.)}
    """
    _validate(curvature, structure, batch_size, num_samples)
    check_phi(potential, phi)
    if curvature == "ef" and potential.plate_name is None:
        raise ModelError(
            "the empirical Fisher needs per-datum gradients, but the model has no data "
            "plate: write the likelihood as `with pyro.plate('data', N) as idx: "
            "pyro.sample('obs', ..., obs=y[idx])`, or use curvature='ggn'"
        )
    leaves = grad_leaves(phi)
    first = next(iter(leaves.values()))
    num_params = sum(v.numel() for v in leaves.values())
    acc = Accumulator(structure, num_params, first.detach())
    methods: dict[str, str] = {}
    log_lik = first.new_zeros(())
    fixed = model_plate_subsample_size(potential)
    for c, (idx, weights) in enumerate(chunks(potential, batch_size, first.device, fixed)):
        trace = potential.trace(leaves, idx)
        sites = chunk_sites(potential, trace, first=c == 0)
        log_lik = log_lik + chunk_curvature(
            potential, leaves, sites, weights, curvature, acc, num_samples, generator, methods
        )
    value = acc.value
    if structure == "diag":
        value = unflatten(value, phi)
    else:
        value = 0.5 * (value + value.T)
    return CurvatureResult(value, log_lik.detach(), methods)


def log_prior_hessian(
    potential: PyroPotential, phi: Mapping[str, Tensor], structure: str = "diag"
) -> Params | Tensor:
    r"""The precision of the prior in unconstrained space: :math:`-\nabla^2_\phi[\log
    p(\theta) + \log|\partial\theta/\partial\phi|]` at ``phi``, exactly (autograd).

    The log-Jacobian of each site's ``biject_to`` transform is included, since the
    Laplace approximation is a Gaussian over :math:`\phi`. ``"diag"`` takes the
    diagonal of the exact Hessian (one batched backward per parameter).

    Examples:
        >>> import pyro, pyro.distributions as dist, torch
        >>> from pyro_sgmcmc.potential import PyroPotential
        >>> def model():
        ...     pyro.sample("w", dist.Normal(torch.zeros(2), torch.tensor([1.0, 0.5])).to_event(1))
        >>> pot = PyroPotential(model)
        >>> log_prior_hessian(pot, {"w": torch.zeros(2)})
        {'w': tensor([1., 4.])}
    """
    if structure not in STRUCTURES:
        raise ValueError(f"structure must be one of {STRUCTURES}, got {structure!r}")
    check_phi(potential, phi)
    leaves = grad_leaves(phi)
    first = next(iter(leaves.values()))
    trace = potential.trace(leaves, first_indices(potential, first.device))
    lp = log_prior_terms(potential, leaves, trace)
    num_params = sum(v.numel() for v in leaves.values())
    out = first.new_zeros((num_params, num_params) if structure == "dense" else (num_params,))
    grad = torch.autograd.grad(lp, list(leaves.values()), create_graph=True, allow_unused=True)
    g = flat_grads([None if gi is None else gi.reshape(1, -1) for gi in grad], leaves, 1)[0]
    if g.requires_grad:
        for start, stop, jac in jacobian_rows(-g, leaves):
            if structure == "dense":
                out[start:stop] = jac
            else:
                r = torch.arange(stop - start)
                out[start:stop] = jac[r, start + r]
    if structure == "diag":
        return unflatten(out, phi)
    return 0.5 * (out + out.T)


def log_joint_and_grad(
    potential: PyroPotential, phi: Mapping[str, Tensor], batch_size: int = 256
) -> tuple[Tensor, Params]:
    r"""The full-data :math:`\log p(y, \theta) + \log|\partial\theta/\partial\phi|` and its
    gradient in :math:`\phi`, accumulated over the data plate in chunks.

    Examples:
        >>> import pyro, pyro.distributions as dist, torch
        >>> from pyro_sgmcmc.potential import PyroPotential
        >>> def model(y):
        ...     mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        ...     with pyro.plate("data", len(y)) as idx:
        ...         pyro.sample("obs", dist.Normal(mu, 1.0), obs=y[idx])
        >>> pot = PyroPotential(model, (torch.ones(10),))
        >>> _, g = log_joint_and_grad(pot, {"mu": torch.tensor(0.0)}, batch_size=3)
        >>> g
        {'mu': tensor(10.)}
    """
    check_phi(potential, phi)
    leaves = grad_leaves(phi)
    first = next(iter(leaves.values()))
    total = first.new_zeros(())
    grads = [torch.zeros_like(v) for v in leaves.values()]
    fixed = model_plate_subsample_size(potential)
    for c, (idx, weights) in enumerate(chunks(potential, batch_size, first.device, fixed)):
        trace = potential.trace(leaves, idx)
        value = log_prior_terms(potential, leaves, trace) if c == 0 else first.new_zeros(())
        with pyro.validation_enabled(False):
            for s in chunk_sites(potential, trace, first=c == 0):
                lp = s.site["fn"].log_prob(s.site["value"])
                value = (
                    value + weighted_rows(site_rows(s, potential.plate_name, lp), weights, s).sum()
                )
        total = total + value.detach()
        if value.requires_grad:
            g = torch.autograd.grad(value, list(leaves.values()), allow_unused=True)
            grads = [a if b is None else a + b for a, b in zip(grads, g, strict=True)]
    return total, dict(zip(leaves, grads, strict=True))
