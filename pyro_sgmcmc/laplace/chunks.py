r"""Sites and chunks of a Pyro model's data plate: the machinery shared by
:func:`~pyro_sgmcmc.laplace.pyro_curvature.likelihood_curvature`,
:func:`~pyro_sgmcmc.laplace.pyro_curvature.log_joint_and_grad` and
:class:`~pyro_sgmcmc.laplace.kfac.AutoKFACLaplace` (an internal module: its names are
public for those callers, not part of the documented API).

The data plate is cut into chunks of indices (:func:`chunks`); each chunk's observed
sites (:class:`Site`) give per-datum log-density rows (:func:`site_rows`), whose
Jacobian rows (:func:`jacobian_rows`) are summed into an :class:`Accumulator` as a GGN
(:func:`ggn_outputs`, the closed-form Fisher factor of the observation family), a Monte
Carlo Fisher (:func:`mc_site`), an empirical Fisher or a Hessian
(:func:`chunk_curvature`).
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Iterator, Mapping
from typing import NamedTuple

import pyro
import torch
from pyro.distributions.util import scale_and_mask
from torch import Tensor

from pyro_sgmcmc.likelihoods import fisher_factor, observation_family, unwrap_observation
from pyro_sgmcmc.potential import ModelError, PyroPotential
from pyro_sgmcmc.pyro_model import (
    full_batch_reason,
    model_plate_subsample_size,
    observed_sites,
    plate_frame,
)

Params = dict[str, Tensor]
#: Cap on the entries of one batched one-hot cotangent (rows x outputs): bounds memory.
MAX_COTANGENT = 1 << 22
MAX_ROWS = 512

#: potentials already warned that their plate cannot be cut into chunks
_WARNED: weakref.WeakSet = weakref.WeakSet()


def chunks(
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
        reason = full_batch_reason(potential, fixed)
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


def grad_leaves(phi: Mapping[str, Tensor]) -> Params:
    return {k: v.detach().requires_grad_(True) for k, v in phi.items()}


def check_phi(potential: PyroPotential, phi: Mapping[str, Tensor]) -> None:
    if list(phi) != list(potential.latent_names):
        raise ValueError(
            f"phi must have the model's latent sites {potential.latent_names} in that order, "
            f"got {list(phi)}"
        )


def check_local_latents(potential: PyroPotential, trace) -> None:
    """Raise for latents inside the data plate (for methods that need global latents)."""
    if potential.plate_name is None:
        return
    for name in potential.latent_names:
        if plate_frame(trace.nodes[name], potential.plate_name) is not None:
            raise ModelError(
                f"latent site '{name}' lies inside the data plate '{potential.plate_name}': "
                "Laplace curvature over chunks of the data needs global latents only; "
                "marginalise the local latents out or move them outside the plate"
            )


class Site(NamedTuple):
    """An observed site of one chunk: its trace entry, and whether it is per-datum."""

    name: str
    site: dict
    inside: bool  # in the data plate: one row per plate index; else one row in all


def site_rows(site: Site, plate: str | None, lp: Tensor, sample_dims: int = 0) -> Tensor:
    """Per-datum log-densities ``(*sample, b)`` of a site (``b = 1`` outside the plate)."""
    mask = site.site["mask"]
    lp = scale_and_mask(lp, 1.0, mask) if mask is not None else lp
    lead = lp.shape[:sample_dims]
    frame = plate_frame(site.site, plate) if site.inside else None
    if frame is None or -frame.dim > lp.dim() - sample_dims:
        return lp.reshape(*lead, -1).sum(-1, keepdim=True)
    lp = lp.movedim(frame.dim, sample_dims)
    return lp.reshape(*lead, lp.shape[sample_dims], -1).sum(-1)


def weighted_rows(rows: Tensor, weights: Tensor | None, site: Site) -> Tensor:
    """Zero the rows of indices a fixed-size last chunk repeats."""
    if weights is None or not site.inside or rows.shape[-1] != weights.numel():
        return rows
    return rows * weights.to(rows.dtype)


def flat_grads(grads, leaves: Params, rows: int) -> Tensor:
    parts = []
    for g, leaf in zip(grads, leaves.values(), strict=True):
        if g is None:
            parts.append(leaf.new_zeros(rows, leaf.numel()))
        else:
            parts.append(g.reshape(rows, -1))
    return torch.cat(parts, dim=1)


def jacobian_rows(
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
    rows = max(align, min(MAX_ROWS, MAX_COTANGENT // total) // align * align)
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
            jac = flat_grads(grads, leaves, n)
        except RuntimeError:  # an op without a batching rule: one backward per row
            jac = torch.cat(
                [
                    flat_grads(
                        torch.autograd.grad(flat[r], params, retain_graph=True, allow_unused=True),
                        leaves,
                        1,
                    )
                    for r in range(start, stop)
                ]
            )
        yield start, stop, jac.detach()


class Accumulator:
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


def ggn_outputs(site: Site, plate: str | None):
    """``(outputs (b, m, k), factor (b, m, k, r))`` of a closed-form site.

    ``None`` when the family has no closed form here, ``"constant"`` when the site's
    distribution does not depend on the latents.
    """
    fn = site.site["fn"]
    base = unwrap_observation(fn)
    fam = None if base is None else observation_family(base)
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
    frame = plate_frame(site.site, plate) if site.inside else None
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
    factor = fisher_factor(name, values, [rows(f) for f in fixed])
    if mask is not None and not isinstance(mask, bool):
        m = mask.expand(tuple(fn.batch_shape))
        m = m.reshape(m.shape + (1,) * extra)
        factor = factor * rows(m).to(factor.dtype)[..., None, None]
    return values, factor


# ---------------------------------------------------------------------- per-chunk work
def chunk_curvature(
    potential: PyroPotential,
    leaves: Params,
    sites: list[Site],
    weights: Tensor | None,
    kind: str,
    acc: Accumulator,
    num_samples: int,
    generator: torch.Generator | None,
    methods: dict[str, str],
) -> Tensor:
    """Add one chunk's curvature to ``acc``; return its (weighted) log-likelihood."""
    plate = potential.plate_name
    with pyro.validation_enabled(False):
        rows_ll = [
            weighted_rows(site_rows(s, plate, s.site["fn"].log_prob(s.site["value"])), weights, s)
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
                for _, _, jac in jacobian_rows(r, leaves):
                    acc.add_rows(jac)
        if per_datum is not None:
            for _, _, jac in jacobian_rows(per_datum, leaves):
                acc.add_rows(jac)
        return ll_total.detach()

    if kind == "hessian":
        for s in sites:
            methods[s.name] = "hessian"
        if ll_total.requires_grad:
            grad = torch.autograd.grad(
                ll_total, list(leaves.values()), create_graph=True, allow_unused=True
            )
            g = flat_grads([None if x is None else x.reshape(1, -1) for x in grad], leaves, 1)
            for start, stop, jac in jacobian_rows(-g, leaves):
                acc.add_matrix_rows(start, stop, jac)
        return ll_total.detach()

    for s in sites:
        closed = ggn_outputs(s, plate) if kind == "ggn" else None
        if closed == "constant":
            methods.setdefault(s.name, "ggn")
            continue
        if closed is None:
            methods[s.name] = "fisher"
            mc_site(potential, leaves, s, weights, acc, num_samples, generator)
            continue
        methods[s.name] = "ggn"
        values, factor = closed
        b, m, k = values.shape
        factor = factor.reshape(b * m, k, -1)
        w = None
        if weights is not None and s.inside and b == weights.numel():
            w = weights.to(factor.dtype).repeat_interleave(m)
        for start, stop, jac in jacobian_rows(values, leaves, align=k):
            e0, e1 = start // k, stop // k
            v = torch.einsum("ekr,ekp->erp", factor[e0:e1], jac.reshape(e1 - e0, k, -1))
            acc.add_rows(v if w is None else v * w[e0:e1, None, None])
    return ll_total.detach()


def mc_site(
    potential: PyroPotential,
    leaves: Params,
    site: Site,
    weights: Tensor | None,
    acc: Accumulator,
    num_samples: int,
    generator: torch.Generator | None,
) -> None:
    """Monte Carlo Fisher of one site: ``num_samples`` draws of its data from the model.

    The draws are scored in groups of about ``MAX_ROWS`` rows: the per-row gradients
    cost one backward pass each through the group's graph, so small groups keep the
    work linear in ``num_samples``.
    """
    fn = site.site["fn"]
    seed = int(torch.randint(2**62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        ys = fn.sample((num_samples,))
    rows_per_draw = site_rows(site, potential.plate_name, fn.log_prob(ys[:1]).detach(), 1)
    group = max(1, MAX_ROWS // max(1, rows_per_draw.shape[-1]))
    for start in range(0, num_samples, group):
        with pyro.validation_enabled(False):
            lp = fn.log_prob(ys[start : start + group])
        rows = site_rows(site, potential.plate_name, lp, sample_dims=1)  # (S, b)
        rows = weighted_rows(rows, weights, site) / math.sqrt(num_samples)
        for _, _, jac in jacobian_rows(rows, leaves):
            acc.add_rows(jac)


def chunk_sites(potential: PyroPotential, trace, first: bool) -> list[Site]:
    """The observed sites a chunk counts: per-datum ones always, global ones once."""
    out = []
    plate = potential.plate_name
    for name, site in observed_sites(trace, potential.latent_names):
        inside = plate_frame(site, plate) is not None
        if inside or first:
            out.append(Site(name, site, inside))
    return out


def log_prior_terms(potential: PyroPotential, leaves: Params, trace) -> Tensor:
    """:math:`\\log p(\\theta) + \\log|\\partial\\theta/\\partial\\phi|` of the latents."""
    total = next(iter(leaves.values())).new_zeros(())
    with pyro.validation_enabled(False):
        for name in potential.latent_names:
            site = trace.nodes[name]
            lp = site["fn"].log_prob(site["value"])
            total = total + scale_and_mask(lp, site["scale"], site["mask"]).sum()
            t = potential.to_constrained[name]
            total = total + t.log_abs_det_jacobian(leaves[name], site["value"]).sum()
    return total


def first_indices(potential: PyroPotential, device) -> Tensor | None:
    """A small batch of plate indices (the prior terms need one trace of the model)."""
    fixed = model_plate_subsample_size(potential)
    idx, _ = next(iter(chunks(potential, 1, device, fixed)))
    return idx
