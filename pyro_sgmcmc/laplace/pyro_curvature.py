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

import math
import warnings
import weakref
from collections.abc import Iterator, Mapping
from typing import NamedTuple

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.distributions.torch_distribution import ExpandedDistribution
from pyro.distributions.util import scale_and_mask
from pyro.poutine.subsample_messenger import _Subsample
from torch import Tensor

from pyro_sgmcmc.curvature import unflatten
from pyro_sgmcmc.potential import ModelError, PyroPotential

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
#: Cap on the entries of one batched one-hot cotangent (rows x outputs): bounds memory.
_MAX_COTANGENT = 1 << 22
_MAX_ROWS = 512


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


# ---------------------------------------------------------------------- sites and chunks
def _is_plate_site(site: dict) -> bool:
    return site["type"] == "sample" and isinstance(site["fn"], _Subsample)


def _observed(trace, latent_names) -> Iterator[tuple[str, dict]]:
    """The model's observed sites (latents conditioned to ``phi`` are excluded)."""
    for name, site in trace.nodes.items():
        if (
            site["type"] == "sample"
            and site["is_observed"]
            and not _is_plate_site(site)
            and name not in latent_names
        ):
            yield name, site


def _plate_frame(site: dict, plate: str | None):
    if plate is None:
        return None
    for frame in site["cond_indep_stack"]:
        if frame.name == plate:
            return frame
    return None


def model_plate_subsample_size(potential: PyroPotential) -> int | None:
    """The data plate's own ``subsample_size`` when the model fixes one (< its size).

    A plate written ``pyro.plate("data", N, subsample_size=B)`` only accepts index
    batches of exactly ``B``, so curvature chunks then have that size.
    """
    if potential.plate_name is None:
        return None
    one = torch.zeros(1, dtype=torch.long)
    cond = poutine.condition(potential.model, {potential.plate_name: one})
    try:
        with pyro.validation_enabled(False):
            poutine.trace(cond).get_trace(*potential.model_args, **potential.model_kwargs)
        return None
    except Exception as e:  # noqa: BLE001 - other failures are _full_batch_reason's business
        if "subsample_size does not match" not in str(e):
            return None
    # The plate subsamples by itself: one run reads its size (cheap, it is a minibatch).
    with pyro.validation_enabled(False):
        tr = poutine.trace(potential.model).get_trace(
            *potential.model_args, **potential.model_kwargs
        )
    site = tr.nodes[potential.plate_name]
    sub = site["fn"].subsample_size
    return None if sub is None or sub >= site["fn"].size else int(sub)


#: potentials already warned that their plate cannot be cut into chunks
_WARNED: weakref.WeakSet = weakref.WeakSet()


def _full_batch_reason(potential: PyroPotential, fixed: int | None) -> str | None:
    """Why the data plate cannot be cut into chunks (``None`` when it can).

    One model run on a small batch of plate indices (latents drawn from the prior): the
    plate's observed sites must have that batch's size at the plate's dim, and no latent
    may sit inside the plate.
    """
    n = potential.plate_size
    k = fixed or min(2, n)
    if k >= n:
        return None
    idx = torch.arange(k)
    plate = potential.plate_name
    try:
        with pyro.validation_enabled(False), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tr = poutine.trace(poutine.condition(potential.model, {plate: idx})).get_trace(
                *potential.model_args, **potential.model_kwargs
            )
    except Exception as e:  # noqa: BLE001 - any failure means: not chunkable as written
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "Shape mismatch inside plate" in first:
            return (
                f"the model's observed sites do not index their data with the plate's indices "
                f"({first}; write `with pyro.plate('{plate}', N) as idx: ... obs=y[idx]`)"
            )
        return f"the model fails on a chunk of the plate's indices ({first})"
    for name, site in tr.nodes.items():
        if site["type"] != "sample" or _is_plate_site(site):
            continue
        frame = _plate_frame(site, plate)
        if frame is None:
            continue
        if not site["is_observed"]:
            return f"latent site '{name}' lies inside the data plate '{plate}'"
        value = site["value"]
        event = len(site["fn"].event_shape)
        shape = value.shape[: value.dim() - event] if event else value.shape
        if -frame.dim <= len(shape) and shape[frame.dim] != k:
            return (
                f"observed site '{name}' does not index its data with the plate's indices "
                f"(write `with pyro.plate('{plate}', N) as idx: ... obs=y[idx]`)"
            )
    return None


def _chunks(
    potential: PyroPotential, batch_size: int, device: torch.device, fixed: int | None
) -> Iterator[tuple[Tensor | None, Tensor | None]]:
    """``(indices, weights)`` covering every plate index once (``weights`` None: all 1).

    When the model's plate fixes its subsample size (``fixed``), every chunk has that
    size and the last one re-uses earlier indices with weight 0. A model whose plate
    cannot be cut (latents inside it, data not indexed by it) is one full-data chunk.
    """
    if potential.plate_name is None:
        yield None, None
        return
    n = potential.plate_size
    size = fixed or min(batch_size, n)
    if size < n:
        reason = _full_batch_reason(potential, fixed)
        if reason is not None:
            if fixed is not None:
                raise ModelError(
                    f"{reason}, so the curvature needs the full data in one chunk, but the "
                    f"plate fixes subsample_size={fixed}: call laplace_approximation with "
                    "arguments that do not subsample"
                )
            if "latent site" not in reason and potential not in _WARNED:
                _WARNED.add(potential)
                warnings.warn(
                    f"{reason}: the curvature is computed on the full data in one chunk",
                    stacklevel=3,
                )
            size = n
    for start in range(0, n, size):
        stop = min(start + size, n)
        if fixed is not None and stop - start < size:
            idx = torch.arange(n - size, n, device=device)
            yield idx, (idx >= start)
        else:
            yield torch.arange(start, stop, device=device), None


def _leaves(phi: Mapping[str, Tensor]) -> Params:
    return {k: v.detach().requires_grad_(True) for k, v in phi.items()}


def _check_phi(potential: PyroPotential, phi: Mapping[str, Tensor]) -> None:
    if list(phi) != list(potential.latent_names):
        raise ValueError(
            f"phi must have the model's latent sites {potential.latent_names} in that order, "
            f"got {list(phi)}"
        )


def _check_local_latents(potential: PyroPotential, trace) -> None:
    """Raise for latents inside the data plate (for methods that need global latents)."""
    if potential.plate_name is None:
        return
    for name in potential.latent_names:
        if _plate_frame(trace.nodes[name], potential.plate_name) is not None:
            raise ModelError(
                f"latent site '{name}' lies inside the data plate '{potential.plate_name}': "
                "Laplace curvature over chunks of the data needs global latents only; "
                "marginalise the local latents out or move them outside the plate"
            )


class _Site(NamedTuple):
    """An observed site of one chunk: its trace entry, and whether it is per-datum."""

    name: str
    site: dict
    inside: bool  # in the data plate: one row per plate index; else one row in all


def _site_rows(site: _Site, plate: str | None, lp: Tensor, sample_dims: int = 0) -> Tensor:
    """Per-datum log-densities ``(*sample, b)`` of a site (``b = 1`` outside the plate)."""
    mask = site.site["mask"]
    lp = scale_and_mask(lp, 1.0, mask) if mask is not None else lp
    lead = lp.shape[:sample_dims]
    frame = _plate_frame(site.site, plate) if site.inside else None
    if frame is None or -frame.dim > lp.dim() - sample_dims:
        return lp.reshape(*lead, -1).sum(-1, keepdim=True)
    lp = lp.movedim(frame.dim, sample_dims)
    return lp.reshape(*lead, lp.shape[sample_dims], -1).sum(-1)


def _weighted(rows: Tensor, weights: Tensor | None, site: _Site) -> Tensor:
    """Zero the rows of indices a fixed-size last chunk repeats."""
    if weights is None or not site.inside or rows.shape[-1] != weights.numel():
        return rows
    return rows * weights.to(rows.dtype)


def _flat_grads(grads, leaves: Params, rows: int) -> Tensor:
    parts = []
    for g, leaf in zip(grads, leaves.values(), strict=True):
        if g is None:
            parts.append(leaf.new_zeros(rows, leaf.numel()))
        else:
            parts.append(g.reshape(rows, -1))
    return torch.cat(parts, dim=1)


def _jacobian_rows(
    outputs: Tensor, leaves: Params, align: int = 1
) -> Iterator[tuple[int, int, Tensor]]:
    """Rows of :math:`\\partial\\,\\mathrm{outputs} / \\partial \\phi`, in blocks.

    Yields ``(start, stop, J)`` with ``J`` of shape ``(stop - start, P)``; blocks hold a
    multiple of ``align`` rows and bound the one-hot cotangents' memory.
    """
    flat = outputs.reshape(-1)
    total = flat.numel()
    if total == 0 or not flat.requires_grad:
        return
    rows = max(align, min(_MAX_ROWS, _MAX_COTANGENT // total) // align * align)
    params = list(leaves.values())
    for start in range(0, total, rows):
        stop = min(start + rows, total)
        n = stop - start
        cot = flat.new_zeros(n, total)
        cot[torch.arange(n), torch.arange(start, stop)] = 1.0
        try:
            grads = torch.autograd.grad(
                flat, params, cot, retain_graph=True, allow_unused=True, is_grads_batched=True
            )
            jac = _flat_grads(grads, leaves, n)
        except RuntimeError:  # an op without a batching rule: one backward per row
            jac = torch.cat(
                [
                    _flat_grads(
                        torch.autograd.grad(flat[r], params, retain_graph=True, allow_unused=True),
                        leaves,
                        1,
                    )
                    for r in range(start, stop)
                ]
            )
        yield start, stop, jac.detach()


class _Accumulator:
    """Sums :math:`V^\\top V` (dense) or the column sums of :math:`V^2` (diag)."""

    def __init__(self, structure: str, num_params: int, like: Tensor) -> None:
        self.structure = structure
        shape = (num_params, num_params) if structure == "dense" else (num_params,)
        self.value = like.new_zeros(shape)

    def add_rows(self, v: Tensor) -> None:
        """Add the outer products of the rows of ``v`` (``(..., P)``)."""
        v = v.reshape(-1, v.shape[-1])
        if self.structure == "dense":
            self.value += v.T @ v
        else:
            self.value += v.square().sum(0)

    def add_matrix_rows(self, start: int, stop: int, rows: Tensor) -> None:
        """Add rows ``start:stop`` of a symmetric matrix (its diagonal entries if diag)."""
        if self.structure == "dense":
            self.value[start:stop] += rows
        else:
            r = torch.arange(stop - start)
            self.value[start:stop] += rows[r, start + r]


# ---------------------------------------------------------------------- closed-form Fisher
def _unwrap(fn):
    """The base distribution under ``Independent``/``Expanded`` wrappers (None if masked)."""
    while True:
        if isinstance(fn, dist.MaskedDistribution):
            return None
        if isinstance(fn, (torch.distributions.Independent, ExpandedDistribution)):
            fn = fn.base_dist
            continue
        return fn


def _chol2(f11: Tensor, f12: Tensor, f22: Tensor) -> Tensor:
    """Lower Cholesky factors ``(..., 2, 2)`` of 2x2 Fisher blocks."""
    l11 = f11.clamp_min(0).sqrt()
    l21 = f12 / l11.clamp_min(torch.finfo(l11.dtype).tiny)
    l22 = (f22 - l21.square()).clamp_min(0).sqrt()
    zero = torch.zeros_like(l11)
    return torch.stack([torch.stack([l11, zero], -1), torch.stack([l21, l22], -1)], -2)


def _family(base) -> tuple[str, list[Tensor], list[Tensor]] | None:
    """``(name, parameters, fixed)``: the differentiated parameters and fixed extras."""
    D = torch.distributions
    if isinstance(base, D.Bernoulli):
        return "bernoulli", [base.logits], []
    if isinstance(base, D.Binomial):
        return "binomial", [base.logits], [base.total_count]
    if isinstance(base, (D.Categorical, D.OneHotCategorical)):
        return "categorical", [base.logits], []
    if isinstance(base, (D.Normal, D.LogNormal)):
        return "normal", [base.loc, base.scale], []
    if isinstance(base, D.Poisson):
        return "poisson", [base.rate], []
    if isinstance(base, D.Exponential):
        return "exponential", [base.rate], []
    if isinstance(base, D.Gamma):
        return "gamma", [base.concentration, base.rate], []
    if isinstance(base, D.Beta):
        return "beta", [base.concentration1, base.concentration0], []
    return None


def _fisher_factor(name: str, v: Tensor, fixed: list[Tensor]) -> Tensor:
    r"""``L`` with :math:`LL^\top = F` per element: values ``(..., k) -> (..., k, r)``."""
    v = v.detach()
    tiny = torch.finfo(v.dtype).tiny
    if name == "bernoulli":
        return (torch.sigmoid(v) * torch.sigmoid(-v)).sqrt().unsqueeze(-1)
    if name == "binomial":
        n = fixed[0].detach().to(v.dtype)
        return (n * torch.sigmoid(v[..., 0]) * torch.sigmoid(-v[..., 0])).sqrt()[..., None, None]
    if name == "categorical":
        p = v.softmax(-1)
        eye = torch.eye(p.shape[-1], dtype=v.dtype, device=v.device)
        # column c is sqrt(p_c) (e_c - p): sum_c L_c L_c^T = diag(p) - p p^T
        return (eye - p.unsqueeze(-1)) * p.sqrt().unsqueeze(-2)
    if name == "normal":
        inv = 1.0 / v[..., 1].clamp_min(tiny)
        return torch.diag_embed(torch.stack([inv, math.sqrt(2.0) * inv], -1))
    if name == "poisson":
        return v[..., 0].clamp_min(tiny).rsqrt()[..., None, None]
    if name == "exponential":
        return (1.0 / v[..., 0].clamp_min(tiny))[..., None, None]
    if name == "gamma":
        a, b = v[..., 0], v[..., 1]
        return _chol2(torch.polygamma(1, a), -1.0 / b, a / b.square())
    if name == "beta":
        a, b = v[..., 0], v[..., 1]
        ab = torch.polygamma(1, a + b)
        return _chol2(torch.polygamma(1, a) - ab, -ab, torch.polygamma(1, b) - ab)
    raise AssertionError(name)


def _ggn_outputs(site: _Site, plate: str | None):
    """``(outputs (b, m, k), factor (b, m, k, r))`` of a closed-form site.

    ``None`` when the family has no closed form here, ``"constant"`` when the site's
    distribution does not depend on the latents.
    """
    fn = site.site["fn"]
    base = _unwrap(fn)
    fam = None if base is None else _family(base)
    if fam is None:
        return None
    name, params, fixed = fam
    mask = site.site["mask"]
    if not any(p.requires_grad for p in params) or mask is False:
        return "constant"
    categorical = name == "categorical"
    extra = len(fn.event_shape) - len(base.event_shape)
    target = tuple(fn.batch_shape) + tuple(fn.event_shape[:extra])
    nd = len(target)
    frame = _plate_frame(site.site, plate) if site.inside else None
    dim = None
    if frame is not None and -(frame.dim - extra) <= nd:
        dim = nd + frame.dim - extra

    def rows(t: Tensor, tail: tuple = ()) -> Tensor:
        """Expand to the elements, plate dim first: ``(b, m, *tail)``."""
        t = torch.as_tensor(t).expand(target + tail)
        t = t.movedim(dim, 0) if dim is not None else t.unsqueeze(0)
        return t.reshape(t.shape[0], -1, *tail)

    if categorical:
        values = rows(params[0], tuple(params[0].shape[-1:]))
    else:
        values = torch.stack([rows(p) for p in params], -1)
    factor = _fisher_factor(name, values, [rows(f) for f in fixed])
    if mask is not None and not isinstance(mask, bool):
        m = mask.expand(tuple(fn.batch_shape))
        m = m.reshape(m.shape + (1,) * extra)
        factor = factor * rows(m).to(factor.dtype)[..., None, None]
    return values, factor


# ---------------------------------------------------------------------- per-chunk work
def _chunk_curvature(
    potential: PyroPotential,
    leaves: Params,
    sites: list[_Site],
    weights: Tensor | None,
    kind: str,
    acc: _Accumulator,
    num_samples: int,
    generator: torch.Generator | None,
    methods: dict[str, str],
) -> Tensor:
    """Add one chunk's curvature to ``acc``; return its (weighted) log-likelihood."""
    plate = potential.plate_name
    with pyro.validation_enabled(False):
        rows_ll = [
            _weighted(_site_rows(s, plate, s.site["fn"].log_prob(s.site["value"])), weights, s)
            for s in sites
        ]
    ll_total = sum((r.sum() for r in rows_ll), next(iter(leaves.values())).new_zeros(()))

    if kind == "ef":
        per_datum = None
        for s, r in zip(sites, rows_ll, strict=True):
            methods[s.name] = "ef"
            if s.inside:
                per_datum = r if per_datum is None else per_datum + r
            else:  # a site outside the data plate: one more "datum"
                for _, _, jac in _jacobian_rows(r, leaves):
                    acc.add_rows(jac)
        if per_datum is not None:
            for _, _, jac in _jacobian_rows(per_datum, leaves):
                acc.add_rows(jac)
        return ll_total.detach()

    if kind == "hessian":
        for s in sites:
            methods[s.name] = "hessian"
        if ll_total.requires_grad:
            grad = torch.autograd.grad(
                ll_total, list(leaves.values()), create_graph=True, allow_unused=True
            )
            g = _flat_grads([None if x is None else x.reshape(1, -1) for x in grad], leaves, 1)
            for start, stop, jac in _jacobian_rows(-g, leaves):
                acc.add_matrix_rows(start, stop, jac)
        return ll_total.detach()

    for s in sites:
        closed = _ggn_outputs(s, plate) if kind == "ggn" else None
        if closed == "constant":
            methods.setdefault(s.name, "ggn")
            continue
        if closed is None:
            methods[s.name] = "fisher"
            _mc_site(potential, leaves, s, weights, acc, num_samples, generator)
            continue
        methods[s.name] = "ggn"
        values, factor = closed
        b, m, k = values.shape
        factor = factor.reshape(b * m, k, -1)
        w = None
        if weights is not None and s.inside and b == weights.numel():
            w = weights.to(factor.dtype).repeat_interleave(m)
        for start, stop, jac in _jacobian_rows(values, leaves, align=k):
            e0, e1 = start // k, stop // k
            v = torch.einsum("ekr,ekp->erp", factor[e0:e1], jac.reshape(e1 - e0, k, -1))
            acc.add_rows(v if w is None else v * w[e0:e1, None, None])
    return ll_total.detach()


def _mc_site(
    potential: PyroPotential,
    leaves: Params,
    site: _Site,
    weights: Tensor | None,
    acc: _Accumulator,
    num_samples: int,
    generator: torch.Generator | None,
) -> None:
    """Monte Carlo Fisher of one site: ``num_samples`` draws of its data from the model.

    The draws are scored in groups of about ``_MAX_ROWS`` rows: the per-row gradients
    cost one backward pass each through the group's graph, so small groups keep the
    work linear in ``num_samples``.
    """
    fn = site.site["fn"]
    seed = int(torch.randint(2**62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        ys = fn.sample((num_samples,))
    rows_per_draw = _site_rows(site, potential.plate_name, fn.log_prob(ys[:1]).detach(), 1)
    group = max(1, _MAX_ROWS // max(1, rows_per_draw.shape[-1]))
    for start in range(0, num_samples, group):
        with pyro.validation_enabled(False):
            lp = fn.log_prob(ys[start : start + group])
        rows = _site_rows(site, potential.plate_name, lp, sample_dims=1)  # (S, b)
        rows = _weighted(rows, weights, site) / math.sqrt(num_samples)
        for _, _, jac in _jacobian_rows(rows, leaves):
            acc.add_rows(jac)


def _chunk_sites(potential: PyroPotential, trace, first: bool) -> list[_Site]:
    """The observed sites a chunk counts: per-datum ones always, global ones once."""
    out = []
    plate = potential.plate_name
    for name, site in _observed(trace, potential.latent_names):
        inside = _plate_frame(site, plate) is not None
        if inside or first:
            out.append(_Site(name, site, inside))
    return out


# ---------------------------------------------------------------------- public functions
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
    _check_phi(potential, phi)
    if curvature == "ef" and potential.plate_name is None:
        raise ModelError(
            "the empirical Fisher needs per-datum gradients, but the model has no data "
            "plate: write the likelihood as `with pyro.plate('data', N) as idx: "
            "pyro.sample('obs', ..., obs=y[idx])`, or use curvature='ggn'"
        )
    leaves = _leaves(phi)
    first = next(iter(leaves.values()))
    num_params = sum(v.numel() for v in leaves.values())
    acc = _Accumulator(structure, num_params, first.detach())
    methods: dict[str, str] = {}
    log_lik = first.new_zeros(())
    fixed = model_plate_subsample_size(potential)
    for c, (idx, weights) in enumerate(_chunks(potential, batch_size, first.device, fixed)):
        trace = potential._trace(leaves, idx)
        sites = _chunk_sites(potential, trace, first=c == 0)
        log_lik = log_lik + _chunk_curvature(
            potential, leaves, sites, weights, curvature, acc, num_samples, generator, methods
        )
    value = acc.value
    if structure == "diag":
        value = unflatten(value, phi)
    else:
        value = 0.5 * (value + value.T)
    return CurvatureResult(value, log_lik.detach(), methods)


def _log_prior_terms(potential: PyroPotential, leaves: Params, trace) -> Tensor:
    """:math:`\\log p(\\theta) + \\log|\\partial\\theta/\\partial\\phi|` of the latents."""
    total = next(iter(leaves.values())).new_zeros(())
    with pyro.validation_enabled(False):
        for name in potential.latent_names:
            site = trace.nodes[name]
            lp = site["fn"].log_prob(site["value"])
            total = total + scale_and_mask(lp, site["scale"], site["mask"]).sum()
            t = potential._to_constrained[name]
            total = total + t.log_abs_det_jacobian(leaves[name], site["value"]).sum()
    return total


def _first_indices(potential: PyroPotential, device) -> Tensor | None:
    """A small batch of plate indices (the prior terms need one trace of the model)."""
    fixed = model_plate_subsample_size(potential)
    idx, _ = next(iter(_chunks(potential, 1, device, fixed)))
    return idx


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
    _check_phi(potential, phi)
    leaves = _leaves(phi)
    first = next(iter(leaves.values()))
    trace = potential._trace(leaves, _first_indices(potential, first.device))
    lp = _log_prior_terms(potential, leaves, trace)
    num_params = sum(v.numel() for v in leaves.values())
    out = first.new_zeros((num_params, num_params) if structure == "dense" else (num_params,))
    grad = torch.autograd.grad(lp, list(leaves.values()), create_graph=True, allow_unused=True)
    g = _flat_grads([None if gi is None else gi.reshape(1, -1) for gi in grad], leaves, 1)[0]
    if g.requires_grad:
        for start, stop, jac in _jacobian_rows(-g, leaves):
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
    _check_phi(potential, phi)
    leaves = _leaves(phi)
    first = next(iter(leaves.values()))
    total = first.new_zeros(())
    grads = [torch.zeros_like(v) for v in leaves.values()]
    fixed = model_plate_subsample_size(potential)
    for c, (idx, weights) in enumerate(_chunks(potential, batch_size, first.device, fixed)):
        trace = potential._trace(leaves, idx)
        value = _log_prior_terms(potential, leaves, trace) if c == 0 else first.new_zeros(())
        with pyro.validation_enabled(False):
            for s in _chunk_sites(potential, trace, first=c == 0):
                lp = s.site["fn"].log_prob(s.site["value"])
                value = value + _weighted(_site_rows(s, potential.plate_name, lp), weights, s).sum()
        total = total + value.detach()
        if value.requires_grad:
            g = torch.autograd.grad(value, list(leaves.values()), allow_unused=True)
            grads = [a if b is None else a + b for a, b in zip(grads, g, strict=True)]
    return total, dict(zip(leaves, grads, strict=True))
