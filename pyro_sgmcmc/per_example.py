"""Per-example log-likelihoods and their gradients for a
:class:`~pyro_sgmcmc.potential.PyroPotential`: one datum of the data plate at a time,
as the gradient-noise estimate, the empirical Fisher and the EKF use them.

Gradients are one ``torch.func.vmap``-ed gradient (linear in the batch size); models
without vmap rules fall back to batched backward passes. A plate that fixes its own
minibatch size ``B`` is run on chunks of exactly ``B`` indices
(:func:`~pyro_sgmcmc.log_density.chunks_of`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pyro
import torch
from pyro.distributions.util import scale_and_mask
from torch import Tensor

from pyro_sgmcmc.log_density import chunks_of
from pyro_sgmcmc.pyro_model import ModelError, is_plate_site, site_frames
from pyro_sgmcmc.tracing import trace_at

if TYPE_CHECKING:
    from pyro_sgmcmc.potential import PyroPotential

__all__ = [
    "all_per_example_grads",
    "backward_per_example_grads",
    "batch_log_likelihood",
    "fixed_plate_per_example_grads",
    "per_example_grad_variance",
    "per_example_grads",
    "per_example_log_likelihood",
    "vmapped_per_example_grads",
]


def per_example_log_likelihood(
    potential: PyroPotential, phi: dict[str, Tensor], indices: Tensor
) -> Tensor:
    """Unscaled log-likelihood of each datum in the minibatch, shape ``(B,)``."""
    fixed = potential.model_subsample_size
    if fixed is not None and indices.numel() != fixed:
        parts = [
            batch_log_likelihood(potential, phi, idx)[:rows]
            for idx, rows in chunks_of(indices, fixed)
        ]
        return torch.cat(parts)
    return batch_log_likelihood(potential, phi, indices)


def batch_log_likelihood(potential: PyroPotential, phi, indices) -> Tensor:
    """:func:`per_example_log_likelihood` on one batch the model's plate accepts as it
    is (no chunking)."""
    tr = trace_at(potential, phi, indices)
    total = 0.0
    for site in tr.nodes.values():
        if site["type"] != "sample" or is_plate_site(site) or not site["is_observed"]:
            continue
        frame = site_frames(site).get(potential.plate_name)
        if frame is None:
            continue
        with pyro.validation_enabled(False):
            lp = site["fn"].log_prob(site["value"])
        if site["mask"] is not None:
            lp = scale_and_mask(lp, 1.0, site["mask"])
        lp = lp.movedim(frame.dim, 0).reshape(indices.numel(), -1).sum(-1)
        total = total + lp
    return total


def per_example_grads(
    potential: PyroPotential, phi: dict[str, Tensor], indices: Tensor
) -> dict[str, Tensor]:
    """Gradient of each datum's log-likelihood, shape ``(B, *site_shape)`` per site.

    One vmapped gradient (linear in ``B``); models without vmap rules fall back to a
    batched backward pass over the ``(B, B)`` identity."""
    try:
        return vmapped_per_example_grads(potential, phi, indices)
    except Exception:  # noqa: BLE001 - an op without a vmap rule
        return backward_per_example_grads(potential, phi, indices)


def backward_per_example_grads(
    potential: PyroPotential, phi: dict[str, Tensor], indices: Tensor
) -> dict[str, Tensor]:
    """:func:`per_example_grads` by a batched backward pass over the ``(B, B)``
    identity (one backward per datum for ops without a batching rule)."""
    leaves = {k: v.detach().requires_grad_(True) for k, v in phi.items()}
    ll = potential.per_example_log_likelihood(leaves, indices)
    b = ll.shape[0]
    eye = torch.eye(b, dtype=ll.dtype, device=ll.device)
    try:
        jac = torch.autograd.grad(
            ll, list(leaves.values()), eye, is_grads_batched=True, allow_unused=True
        )
    except RuntimeError:  # an op without a batching rule: one backward per datum
        rows = [
            torch.autograd.grad(ll[i], list(leaves.values()), retain_graph=True, allow_unused=True)
            for i in range(b)
        ]
        jac = [
            None if rows[0][j] is None else torch.stack([r[j] for r in rows])
            for j in range(len(leaves))
        ]
    return {
        name: leaves[name].new_zeros((b, *leaves[name].shape)) if g is None else g.detach()
        for name, g in zip(leaves, jac, strict=True)
    }


def per_example_grad_variance(
    potential: PyroPotential, phi: dict[str, Tensor], indices: Tensor
) -> dict[str, Tensor]:
    """Variance over the minibatch of each datum's log-likelihood gradient."""
    return {k: g.var(0) for k, g in potential.per_example_grads(phi, indices).items()}


def all_per_example_grads(
    potential: PyroPotential, phi: dict[str, Tensor], chunk_size: int = 4096
) -> dict[str, Tensor]:
    """Per-example log-likelihood gradients for the whole data plate, ``(N, ...)``.

    One ``torch.func.vmap``-ed gradient per chunk of ``chunk_size`` data (linear
    work: 0.06 s for a logistic regression on 1e5 rows, 28x faster than batched
    backward passes); models without vmap rules fall back to batched backward
    passes over chunks of 256.
    """
    if potential.plate_name is None:
        raise ModelError("per-example gradients need a data plate")
    device = next(iter(phi.values())).device

    fixed = potential.model_subsample_size  # a plate that takes only batches of B

    def grads(fn, size):
        chunks = potential.index_chunks(max(fixed or size, size), device)
        return [{k: g[:rows] for k, g in fn(potential, phi, idx).items()} for idx, rows in chunks]

    try:
        parts = grads(vmapped_per_example_grads, chunk_size)
    except Exception:  # noqa: BLE001 - an op without a vmap rule
        # A batched backward over the (B, B) identity costs B backward passes of the
        # chunk: quadratic in B, hence small chunks.
        parts = grads(backward_per_example_grads, min(chunk_size, 256))
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def vmapped_per_example_grads(
    potential: PyroPotential, phi: dict[str, Tensor], indices: Tensor
) -> dict[str, Tensor]:
    """:func:`per_example_grads` as one ``torch.func.vmap``-ed gradient (raises for ops
    without a vmap rule)."""
    params = {k: v.detach() for k, v in phi.items()}
    if potential.model_subsample_size is not None:
        return fixed_plate_per_example_grads(potential, params, indices)

    def log_lik(params, idx):
        return potential.per_example_log_likelihood(params, idx).sum()

    grads = torch.func.vmap(torch.func.grad(log_lik), in_dims=(None, 0))(params, indices[:, None])
    return {k: g.detach() for k, g in grads.items()}


def fixed_plate_per_example_grads(
    potential: PyroPotential, params: dict[str, Tensor], indices: Tensor
) -> dict[str, Tensor]:
    """Per-example gradients for a plate that takes only batches of its own size
    ``B``: the Jacobian of each chunk's ``B`` log-likelihoods, vmapped over chunks."""
    chunks = chunks_of(indices, potential.model_subsample_size)
    stacked = torch.stack([idx for idx, _ in chunks])

    def log_lik(params, idx):
        return batch_log_likelihood(potential, params, idx)

    jac = torch.func.vmap(torch.func.jacrev(log_lik), in_dims=(None, 0))(params, stacked)
    return {
        k: torch.cat([g[i, :rows] for i, (_, rows) in enumerate(chunks)]).detach()
        for k, g in jac.items()
    }
