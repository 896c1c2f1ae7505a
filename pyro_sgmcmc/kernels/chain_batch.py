"""Per-chain masks for vectorised chains (a leading chain dimension on every tensor)."""

from __future__ import annotations

import torch
from torch import Tensor


def expand_mask(mask: Tensor, like: Tensor) -> Tensor:
    """A per-chain mask ``(C,)`` shaped to broadcast against ``like`` ``(C, ...)``."""
    return mask.reshape(mask.shape + (1,) * (like.dim() - mask.dim()))


def finite(u: Tensor, grads: dict[str, Tensor] | Tensor) -> Tensor:
    """Whether the potential and every gradient are finite, per chain (``u``'s shape).

    One reduction instead of one check per site: a NaN or inf anywhere makes the sum
    non-finite.
    """
    parts = grads.values() if isinstance(grads, dict) else [grads]
    return torch.isfinite(u + sum(g.reshape(*u.shape, -1).sum(-1) for g in parts))


def select_chains(mask: Tensor, where_true, where_false):
    """The sampler state (a NamedTuple of tensors and dicts of tensors) taking the
    chains in ``mask`` from ``where_true`` and the others from ``where_false``."""
    fields = {}
    for field, a, b in zip(where_true._fields, where_true, where_false, strict=True):
        if isinstance(a, dict):
            fields[field] = {k: torch.where(expand_mask(mask, b[k]), a[k], b[k]) for k in a}
        else:
            fields[field] = torch.where(expand_mask(mask, b), a, b)
    return type(where_true)(**fields)


def reset_momenta(state):
    """The state with its momenta (if any) at rest."""
    if hasattr(state, "momenta"):
        return state._replace(momenta={k: torch.zeros_like(v) for k, v in state.momenta.items()})
    return state
