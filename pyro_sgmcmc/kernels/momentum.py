"""What the momentum kernels (SGHMC, BAOA, SGNHT) share: friction, momenta scale and
the gradient-noise estimate ``beta``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pyro_sgmcmc.kernels.base import SGMCMCKernel
from pyro_sgmcmc.potential import PyroPotential


class MomentumKernel(SGMCMCKernel):
    """A kernel with momenta; see :class:`~pyro_sgmcmc.kernels.sghmc.SGHMCKernel`."""

    def __init__(
        self,
        model: Callable | None = None,
        potential_fn: Callable | None = None,
        *,
        alpha: float = 2.0,
        beta: float | str = "auto",
        sigma: float = 1.0,
        **kwargs,
    ) -> None:
        super().__init__(model, potential_fn, **kwargs)
        if alpha < 0 or sigma <= 0:
            raise ValueError(f"need alpha >= 0 and sigma > 0, got alpha={alpha}, sigma={sigma}")
        if not (beta == "auto" or (isinstance(beta, (int, float)) and beta >= 0)):
            raise ValueError(f"beta must be 'auto' or a float >= 0, got {beta!r}")
        self.alpha, self.beta, self.sigma = float(alpha), beta, float(sigma)

    def setup(self, warmup_steps: int, *args, **kwargs) -> None:
        self._alpha = self.alpha
        self._clipped_warned = False
        super().setup(warmup_steps, *args, **kwargs)
        if self.beta != "auto":
            self._beta = float(self.beta)

    def _estimates_noise(self) -> bool:
        pot = self.potential
        return (
            self.beta == "auto"
            and self.temperature > 0
            and self.batching == "iid"
            and isinstance(pot, PyroPotential)
            and pot.subsample_size is not None
            and pot.subsample_size < pot.plate_size
        )

    def _on_new_beta(self) -> None:
        # Noise can only be absorbed while beta <= 2 alpha: raise the friction to match.
        if isinstance(self._beta, dict):
            worst = max(float(b.max()) for b in self._beta.values())
            self._alpha = max(self.alpha, 0.5 * worst)

    @property
    def friction(self) -> float:
        """The friction in use: ``alpha``, raised to half the largest ``beta`` if needed."""
        return self._alpha

    def _sampler_kwargs(self, step_size: float) -> dict[str, Any]:
        return {"alpha": self._alpha, "beta": self._beta, "sigma": self.sigma}
