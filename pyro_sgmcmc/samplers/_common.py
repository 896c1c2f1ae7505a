"""Small helpers shared by the sampler steps: copies, noise draws, argument checks."""

from __future__ import annotations

import torch
from torch import Tensor


def normal_like(x: Tensor, generator: torch.Generator | list[torch.Generator] | None) -> Tensor:
    """Standard normal noise with the shape, dtype and device of ``x``.

    A list of generators, one per entry of ``x``'s leading (chain) dimension, gives
    each chain its own stream: exactly the draws that chain would get run alone.
    """
    if isinstance(generator, (list, tuple)):
        return torch.stack(
            [
                torch.randn(x.shape[1:], generator=g, dtype=x.dtype, device=x.device)
                for g in generator
            ]
        )
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


def inv_mass_of(inv_mass: dict[str, Tensor] | None, name: str) -> Tensor | float:
    """The diagonal inverse mass of site ``name`` (1.0 when there is no preconditioner)."""
    if inv_mass is None:
        return 1.0
    return inv_mass[name]


def beta_of(beta: float | dict[str, Tensor], name: str) -> Tensor | float:
    """The gradient-noise estimate of site ``name`` (a float applies to every site)."""
    if isinstance(beta, dict):
        return beta[name]
    return beta


def check_temperature(temperature: float, num_data: float) -> float:
    """Per-datum temperature tau = T / N, with clear errors for bad values."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 gives the optimiser), got {temperature}")
    if num_data <= 0:
        raise ValueError(f"num_data must be positive, got {num_data}")
    return temperature / num_data


def check_step_size(step_size: float) -> None:
    """Step sizes are positive: a negative one would ascend the potential."""
    if not step_size > 0:
        raise ValueError(f"step_size must be positive, got {step_size}")


def copy_params(params: dict[str, Tensor]) -> dict[str, Tensor]:
    """Detached copies, so that a state never aliases the caller's tensors."""
    return {k: v.detach().clone() for k, v in params.items()}


def params_and_momenta(
    params: dict[str, Tensor], momenta: dict[str, Tensor] | None
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Copies of ``params`` and of ``momenta`` (zeros when ``None``), for ``init``."""
    params = copy_params(params)
    if momenta is None:
        return params, {k: torch.zeros_like(v) for k, v in params.items()}
    return params, copy_params(momenta)
