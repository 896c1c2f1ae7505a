"""Small helpers shared by the sampler steps: copies, noise draws, argument checks."""

from __future__ import annotations

import torch
from torch import Tensor


class AntitheticPairs:
    """A noise source for chains in antithetic pairs: chains ``2k`` and ``2k + 1`` (the
    leading dimension) receive opposite draws, ``z`` and ``-z``, from ``generator``.

    Each chain's noise is still standard normal, so each chain is a valid sampler; for
    a near-Gaussian target the pair stays mirrored about the mode (antithetic
    variates), so averages over the chains have much smaller Monte Carlo error.
    """

    def __init__(self, generator: torch.Generator | None) -> None:
        self.generator = generator

    def normal_like(self, x: Tensor) -> Tensor:
        if x.dim() == 0 or x.shape[0] % 2:
            raise ValueError(
                f"antithetic pairs need an even leading chain dimension, got {tuple(x.shape)}"
            )
        half = torch.randn(
            (x.shape[0] // 2, *x.shape[1:]), generator=self.generator, dtype=x.dtype,
            device=x.device,
        )  # fmt: skip
        return torch.stack([half, -half], dim=1).reshape(x.shape)


def normal_like(
    x: Tensor, generator: torch.Generator | list[torch.Generator] | AntitheticPairs | None
) -> Tensor:
    """Standard normal noise with the shape, dtype and device of ``x``.

    A list of generators, one per entry of ``x``'s leading (chain) dimension, gives
    each chain its own stream: exactly the draws that chain would get run alone.
    :class:`AntitheticPairs` gives pairs of chains opposite draws; any other object with
    a ``normal_like(x)`` method (e.g. the fused step's recorded noise) is asked for it.
    """
    if hasattr(generator, "normal_like"):
        return generator.normal_like(x)
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
