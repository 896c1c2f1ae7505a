r"""Warm-up adaptation of a constant diagonal preconditioner, as NUTS adapts its mass.

A constant positive-definite preconditioner :math:`D` leaves every SGMCMC sampler's
target invariant (Ma, Chen & Fox, 2015), so it may be learned during warm-up and
frozen before sampling. Following Stan, warm-up is split into a fast initial buffer,
doubling slow windows that each re-estimate the variance of the draws, and a
terminal buffer; after each slow window

.. math::

    D = \frac{N}{T}\Big(\frac{n}{n + 5}\,\widehat{\mathrm{Var}}[\theta]
        + 10^{-3} \frac{5}{n + 5}\, \overline{\mathrm{Var}}\Big),

so :math:`D` is the inverse Hessian of the per-datum potential for a Gaussian
posterior (variance :math:`T / (N \lambda)`), i.e. the step size becomes relative to
a whitened target with unit curvature. :math:`\overline{\mathrm{Var}}` is the mean
of the estimate over all coordinates; the shrinkage matters only for short windows.
"""

from __future__ import annotations

from torch import Tensor


class WelfordVariance:
    """Running mean and variance of a dict of tensors (elementwise), Welford's algorithm."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: dict[str, Tensor] = {}
        self.m2: dict[str, Tensor] = {}

    def update(self, params: dict[str, Tensor], batched: bool = False) -> None:
        """Add one draw, or with ``batched`` one draw per entry of the leading dim."""
        if batched:
            self._update_batch(params)
            return
        self.count += 1
        for name, x in params.items():
            x = x.detach()
            if name not in self.mean:
                self.mean[name] = x.clone()
                self.m2[name] = x.new_zeros(x.shape)
                continue
            delta = x - self.mean[name]
            self.mean[name] = self.mean[name] + delta / self.count
            self.m2[name] = self.m2[name] + delta * (x - self.mean[name])

    def _update_batch(self, params: dict[str, Tensor]) -> None:
        """Chan et al.'s pairwise combination of the running and the batch moments."""
        n = next(iter(params.values())).shape[0]
        total = self.count + n
        for name, x in params.items():
            x = x.detach()
            mean_b = x.mean(0)
            m2_b = (x - mean_b).square().sum(0)
            if name not in self.mean:
                self.mean[name], self.m2[name] = mean_b, m2_b
                continue
            delta = mean_b - self.mean[name]
            self.mean[name] = self.mean[name] + delta * (n / total)
            self.m2[name] = self.m2[name] + m2_b + delta.square() * (self.count * n / total)
        self.count = total

    def variance(self, regularize: bool = True) -> dict[str, Tensor]:
        """Sample variance, shrunk towards its mean as Stan does when ``regularize``."""
        if self.count < 2:
            raise ValueError("need at least two draws to estimate a variance")
        n = self.count
        var = {k: v / (n - 1) for k, v in self.m2.items()}
        if not regularize:
            return var
        total = sum(v.sum() for v in var.values())
        size = sum(v.numel() for v in var.values())
        scalar = total / size
        return {k: (n / (n + 5.0)) * v + 1e-3 * (5.0 / (n + 5.0)) * scalar for k, v in var.items()}


def adaptation_windows(warmup_steps: int) -> list[int]:
    """The steps (0-based) at which a slow adaptation window ends.

    Stan's layout: an initial buffer of 15%, doubling windows starting at 25 steps,
    and a final buffer of 10% in which the preconditioner is already fixed.
    Returns an empty list for fewer than 20 warm-up steps.

    Examples:
        >>> adaptation_windows(1000)
        [199, 299, 499, 899]
    """
    if warmup_steps < 20:
        return []
    start = int(0.15 * warmup_steps)
    end = warmup_steps - int(0.1 * warmup_steps)
    window = max(25, (end - start) // 15)
    ends, pos = [], start
    while pos < end:
        nxt = pos + window
        if nxt + 2 * window > end:  # the last window absorbs the remainder
            nxt = end
        ends.append(nxt - 1)
        pos, window = nxt, 2 * window
    return ends
