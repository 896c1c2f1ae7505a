"""A user's ``potential_fn`` behind the interface the kernels use for a Pyro model."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


class FunctionPotential:
    """A user's ``potential_fn(params) -> -log p`` behind the PyroPotential interface."""

    plate_name = None
    subsample_size = None

    def __init__(self, potential_fn: Callable, num_data: int) -> None:
        self.potential_fn = potential_fn
        self.num_data = num_data
        self.transforms: dict = {}

    def next_indices(self, *args) -> None:
        return None

    def potential(self, phi, indices=None) -> Tensor:
        return self.potential_fn(phi) / self.num_data

    def potential_and_grad(self, phi, indices=None):
        leaves = {k: v.detach().requires_grad_(True) for k, v in phi.items()}
        u = self.potential(leaves)
        grads = torch.autograd.grad(u, list(leaves.values()), allow_unused=True)
        grads = [
            torch.zeros_like(v) if g is None else g
            for v, g in zip(leaves.values(), grads, strict=True)
        ]
        return u.detach(), dict(zip(leaves, grads, strict=True))

    def nonfinite_sites(self, phi, indices=None) -> list[str]:
        u, grads = self.potential_and_grad(phi)
        bad = [] if torch.isfinite(u) else ["potential_fn"]
        return bad + [f"{k} (gradient)" for k, g in grads.items() if not torch.isfinite(g).all()]
