"""``jit_compile="auto"``: trace the minibatch potential when the trace is exact.

``torch.jit.trace`` records one path through the model; a model whose Python control
flow depends on values (of the data in the batch, or of the parameters) would be
silently wrong with it. So the traced potential and gradient are compared with the
eager ones at two parameter values on two fresh minibatches each, and the trace is
kept only where all agree; otherwise the kernel runs eagerly.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor


def trace_agrees(potential, phi: dict[str, Tensor], generator: torch.Generator) -> bool:
    """Whether ``potential``'s traced minibatch potential matches the eager one."""
    if potential.plate_name is None or potential.subsample_size is None:
        return False  # the trace is only used for minibatches
    n, b = potential.plate_size, potential.subsample_size
    shifted = {
        k: v
        + 0.1
        * torch.randn(v.shape, generator=generator, dtype=v.dtype, device=generator.device).to(v)
        for k, v in phi.items()
    }
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for params in (phi, shifted):
                for _ in range(2):
                    idx = torch.randint(n, (b,), generator=generator, device=generator.device)
                    if potential.indices is not None and potential.indices.device is not None:
                        idx = idx.to(potential.indices.device)
                    potential.jit_compile = True
                    u_j, g_j = potential.potential_and_grad(params, idx)
                    potential.jit_compile = False
                    u_e, g_e = potential.potential_and_grad(params, idx)
                    if not _close(u_j, u_e) or not all(_close(g_j[k], g_e[k]) for k in g_e):
                        return False
    except Exception:  # noqa: BLE001 - a model the tracer cannot handle runs eagerly
        potential.jit_compile = False
        return False
    return True


def _close(a: Tensor, b: Tensor) -> bool:
    return bool(torch.allclose(a, b, rtol=1e-4, atol=1e-6, equal_nan=True))
