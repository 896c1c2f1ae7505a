"""The terms of a :class:`~pyro_sgmcmc.potential.PyroPotential`'s log-density: each
site's scaled log-density and each latent's log-Jacobian (:func:`log_density_terms`),
and the chunking of the data plate for a plate that fixes its own minibatch size
``pyro.plate("data", N, subsample_size=B)`` (:func:`chunks_of`, :func:`index_chunks`,
:func:`chunked_terms`).

Site log-densities are summed here rather than by ``Trace.log_prob_sum``, which checks
every site for NaNs (slow, and it breaks ``torch.func.vmap``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pyro
import torch
from pyro.distributions.util import scale_and_mask
from torch import Tensor

from pyro_sgmcmc.pyro_model import is_plate_site, site_frames
from pyro_sgmcmc.tracing import trace_at

if TYPE_CHECKING:
    from pyro_sgmcmc.potential import PyroPotential

__all__ = ["chunk_terms", "chunked_terms", "chunks_of", "index_chunks", "log_density_terms",
           "site_terms"]  # fmt: skip


def index_chunks(plate_size: int, size: int, fixed: int | None, device) -> list[tuple[Tensor, int]]:
    """The indices ``range(plate_size)`` in chunks of ``size``, as ``(indices, rows)``:
    with a plate that fixes its own minibatch size (``fixed`` not ``None``) every chunk
    has exactly ``size`` indices (the last wraps round to the start) and only its first
    ``rows`` are new."""
    n = plate_size
    chunks = []
    for start in range(0, n, size):
        rows = min(size, n - start)
        if fixed is not None:
            idx = torch.arange(start, start + size, device=device) % n
        else:
            idx = torch.arange(start, start + rows, device=device)
        chunks.append((idx, rows))
    return chunks


def chunks_of(indices: Tensor, size: int) -> list[tuple[Tensor, int]]:
    """``indices`` in chunks of exactly ``size`` (the model's own plate size ``B``; the
    last wraps round to the start), as ``(chunk, rows)``: only the first ``rows`` of a
    chunk are new."""
    b, m = size, indices.numel()
    return [
        (indices[torch.arange(start, start + b, device=indices.device) % m],
         min(b, m - start))
        for start in range(0, m, b)
    ]  # fmt: skip


def site_terms(potential: PyroPotential, phi, indices) -> Iterator[tuple[str, Tensor]]:
    """(name, scaled log-density) of every site, then each latent's log-Jacobian."""
    tr = trace_at(potential, phi, indices)
    # Out-of-support values must give -inf/NaN here (a divergence), not raise.
    with pyro.validation_enabled(False):
        for name, site in tr.nodes.items():
            if site["type"] == "sample" and not is_plate_site(site):
                lp = site["fn"].log_prob(site["value"])
                yield name, scale_and_mask(lp, site["scale"], site["mask"]).sum()
        for name in potential.latent_names:
            jac = potential.to_constrained[name].log_abs_det_jacobian(
                phi[name], tr.nodes[name]["value"]
            )
            yield f"{name} (log-Jacobian)", jac.sum()


def log_density_terms(potential: PyroPotential, phi, indices) -> dict[str, Tensor]:
    """Scaled log-density of each site and each latent's log-Jacobian, as scalars, on
    the minibatch ``indices`` (all data if ``None``)."""
    fixed = potential.model_subsample_size
    if fixed is not None and (indices is None or indices.numel() != fixed):
        return chunked_terms(potential, phi, indices)
    if indices is None and potential.plate_name is not None:
        indices = torch.arange(potential.plate_size, device=next(iter(phi.values())).device)
    return dict(site_terms(potential, phi, indices))


def chunked_terms(potential: PyroPotential, phi, indices) -> dict[str, Tensor]:
    """The terms on ``indices`` (all data if ``None``) for a plate that only takes
    batches of its own size ``B``: the model runs on chunks of ``B`` indices (one
    vmapped run; a loop for models without vmap rules); the data plate's sites are
    summed over each chunk's new rows, scaled ``N / len(indices)`` as an unrestricted
    plate would, every other term counted once."""
    if indices is None:
        indices = torch.arange(potential.plate_size, device=next(iter(phi.values())).device)
    m = indices.numel()
    chunks = chunks_of(indices, potential.model_subsample_size)
    try:
        per_chunk = torch.func.vmap(lambda idx: chunk_terms(potential, phi, idx, m))(
            torch.stack([idx for idx, _ in chunks])
        )
        parts = [{k: v[i] for k, v in per_chunk.items()} for i in range(len(chunks))]
    except Exception:  # noqa: BLE001 - an op without a vmap rule: one run per chunk
        parts = [chunk_terms(potential, phi, idx, m) for idx, _ in chunks]
    terms: dict[str, Tensor] = {}
    for name, value in parts[0].items():
        if value.dim() == 0:  # outside the data plate: the same in every chunk
            terms[name] = value
        else:
            rows = [r for _, r in chunks]
            terms[name] = sum(p[name][:r].sum() for p, r in zip(parts, rows, strict=True))
    return terms


def chunk_terms(potential: PyroPotential, phi, idx, m) -> dict[str, Tensor]:
    """One chunk's terms: scalars outside the data plate, the ``B`` rows' terms (at
    the scale ``N / m``) for the plate's sites."""
    b = potential.model_subsample_size
    tr = trace_at(potential, phi, idx)
    terms = {}
    with pyro.validation_enabled(False):
        for name, site in tr.nodes.items():
            if site["type"] != "sample" or is_plate_site(site):
                continue
            lp = site["fn"].log_prob(site["value"])
            frame = site_frames(site).get(potential.plate_name)
            if frame is None:
                terms[name] = scale_and_mask(lp, site["scale"], site["mask"]).sum()
                continue
            # The plate scales its sites by N / B: rescale to N / m, one term per row.
            lp = scale_and_mask(lp, site["scale"] * b / m, site["mask"])
            if -frame.dim <= lp.dim() and lp.shape[frame.dim] == b:
                terms[name] = lp.movedim(frame.dim, 0).reshape(b, -1).sum(-1)
            else:
                terms[name] = lp.sum().expand(b) / b
    for name in potential.latent_names:
        jac = potential.to_constrained[name].log_abs_det_jacobian(
            phi[name], tr.nodes[name]["value"]
        )
        terms[f"{name} (log-Jacobian)"] = jac.sum()
    return terms
