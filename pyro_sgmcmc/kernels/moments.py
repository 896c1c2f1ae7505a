r"""Running moments of vectorised draws: per-chain means and the pooled within-chain
(co)variance, by Welford's update (one step of all chains at a time).

Pooling the *within*-chain variances (not the spread of all draws together) keeps
chains in different modes from inflating the posterior width estimate.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class ChainMoments:
    """Moments of flat draws ``x`` of shape ``(C, d)``, ``C`` chains.

    Args:
        dense: also keep the pooled within-chain ``(d, d)`` cross products.

    Examples:
        >>> import torch
        >>> m = ChainMoments(dense=True)
        >>> for x in torch.tensor([[[0.0, 0.0]], [[2.0, 2.0]], [[4.0, 1.0]]]):
        ...     m.update(x)
        >>> m.variance()
        tensor([[4., 1.]])
        >>> m.pooled_cov()
        tensor([[4., 1.],
                [1., 1.]])
    """

    def __init__(self, dense: bool = False) -> None:
        self.dense = dense
        self.count = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None  # (C, d) per-chain sums of squares
        self.cross: Tensor | None = None  # (d, d) pooled sums of cross products

    def update(self, x: Tensor) -> None:
        x = x.detach()
        self.count += 1
        if self.mean is None:
            self.mean = x.clone()
            self.m2 = torch.zeros_like(x)
            if self.dense:
                self.cross = x.new_zeros((x.shape[-1], x.shape[-1]))
            return
        delta = x - self.mean
        self.mean = self.mean + delta / self.count
        after = x - self.mean
        self.m2 = self.m2 + delta * after
        if self.dense:
            self.cross = self.cross + delta.T @ after

    def variance(self) -> Tensor:
        """Each chain's sample variance, ``(C, d)``."""
        return self.m2 / max(self.count - 1, 1)

    def pooled_cov(self) -> Tensor:
        """Mean over chains of the within-chain covariance: ``(d, d)``, or the variances
        ``(d,)`` without ``dense``."""
        chains = self.mean.shape[0]
        if self.dense:
            cross = 0.5 * (self.cross + self.cross.T)
            return cross / (chains * max(self.count - 1, 1))
        return self.variance().mean(0)

    def state_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        vars(self).update(state)


def split_rhat(first: ChainMoments, second: ChainMoments) -> Tensor:
    r"""Split :math:`\hat R` per coordinate from the two halves of a window, each chain's
    halves counted as two chains (Gelman et al., 2013): a value far above 1 means the
    chains (or a chain's halves) disagree: still drifting, or stuck in different modes.
    """
    n = min(first.count, second.count)
    means = torch.cat([first.mean, second.mean])
    within = torch.cat([first.variance(), second.variance()]).mean(0)
    between = n * means.var(0)
    var_plus = (n - 1) / n * within + between / n
    tiny = torch.finfo(within.dtype).tiny
    return (var_plus / within.clamp(min=tiny)).sqrt()
