r"""Minibatch gradient estimators of the per-datum potential, and the noise they add.

An estimator is called as ``u, grads = estimator(params, indices)`` and has
``per_example(params, indices)``: the per-datum terms whose batch mean is the random
part of the estimate. :class:`ControlVariateGradient` wraps an estimator and keeps its
signature (as BlackJAX's control variates do).

With :math:`g_i = \nabla \log p(y_i \mid \theta)` and a minibatch :math:`B` of size
:math:`b`, the plain estimate is

.. math::

    \nabla \tilde U_B(\theta) = -\frac1N \nabla \log p(\theta) - \frac1b \sum_{i\in B} g_i,

unbiased for iid batches, with variance :math:`S^2/b` (:math:`S^2` the per-example
variance of :math:`g_i`); without replacement :math:`(1 - b/N)\,S^2/b`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

#: Largest per-example gradient table (data x parameters) that control variates keep.
MAX_CV_TABLE = 2e7


def minibatch_beta(
    per_example_var: dict[str, Tensor] | Tensor,
    batch_size: int,
    num_data: int,
    temperature: float,
    *,
    replacement: bool = True,
) -> dict[str, Tensor] | Tensor:
    r"""The gradient-noise estimate :math:`\beta = \mathrm{Var}[\nabla\tilde U] / \tau`,
    :math:`\tau = T/N`, that SGHMC, BAOA and SGNHT subtract from their injected noise.

    :math:`\mathrm{Var}[\nabla\tilde U] = S^2/b` for iid batches (``replacement``) and
    :math:`(1 - b/N)\,S^2/b` for batches without replacement; ``per_example_var`` is
    :math:`S^2` in the sampler's coordinates (multiply by a diagonal :math:`D` for a
    preconditioned sampler, as ``beta = D Var / tau``).

    Examples:
        >>> import torch
        >>> minibatch_beta(torch.tensor([4.0]), batch_size=10, num_data=100, temperature=1.0)
        tensor([40.])
    """
    if not temperature > 0:
        raise ValueError(f"beta needs temperature > 0 (no noise at T = 0), got {temperature}")
    factor = 1.0 if replacement else 1.0 - batch_size / num_data
    scale = factor / batch_size * num_data / temperature
    if isinstance(per_example_var, Tensor):
        return per_example_var * scale
    return {k: v * scale for k, v in per_example_var.items()}


class MinibatchGradient:
    """The plain minibatch estimate of a :class:`~pyro_sgmcmc.potential.PyroPotential`
    (or any object with the same methods).

    Args:
        potential: the potential.
        batched: parameters carry a leading chain dimension (one vmapped gradient).
    """

    def __init__(self, potential, batched: bool = False) -> None:
        self.potential = potential
        self.batched = batched

    def __call__(self, params: dict[str, Tensor], indices) -> tuple[Tensor, dict[str, Tensor]]:
        if self.batched:
            return self.potential.batched_potential_and_grad(params, indices)
        return self.potential.potential_and_grad(params, indices)

    def per_example(self, params: dict[str, Tensor], indices: Tensor) -> dict[str, Tensor]:
        """:math:`-g_i`, one chain's per-datum terms of the gradient, ``(b, ...)``."""
        return {k: -g for k, g in self.potential.per_example_grads(params, indices).items()}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class ControlVariateGradient:
    r"""Control variates around a centre :math:`\hat\theta` (Baker et al., 2019):

    .. math::

        \nabla\tilde U_B(\theta) - \nabla\tilde U_B(\hat\theta) + \nabla U(\hat\theta)
        = \nabla\tilde U_B(\theta) + \frac1b\sum_{i\in B} G_i - \bar G,

    with :math:`G_i = g_i(\hat\theta)` tabulated over all data (one pass) and
    :math:`\bar G` their mean; the prior terms cancel. Still unbiased, and exact at the
    centre: its noise vanishes as :math:`\theta \to \hat\theta`. Without a centre it is
    the wrapped estimator.

    Args:
        base: the estimator it corrects.
    """

    def __init__(self, base: MinibatchGradient) -> None:
        self.base = base
        self.potential = base.potential
        self.centre: dict[str, Tensor] | None = None
        self.table: dict[str, Tensor] | None = None
        self.mean: dict[str, Tensor] | None = None

    def set_centre(self, centre: dict[str, Tensor]) -> None:
        """Tabulate every datum's log-likelihood gradient at ``centre`` (one data pass)."""
        self.centre = {k: v.detach().clone() for k, v in centre.items()}
        self.table = self.potential.all_per_example_grads(self.centre)
        self.mean = {k: g.mean(0) for k, g in self.table.items()}

    def __call__(self, params: dict[str, Tensor], indices) -> tuple[Tensor, dict[str, Tensor]]:
        u, grads = self.base(params, indices)
        if self.table is None or indices is None:
            return u, grads
        out = {}
        for k, g in grads.items():
            rows = torch.index_select(self.table[k], 0, indices.reshape(-1))
            rows = rows.reshape(*indices.shape, *self.table[k].shape[1:]).mean(indices.dim() - 1)
            out[k] = g + rows - self.mean[k]
        return u, out

    def per_example(self, params: dict[str, Tensor], indices: Tensor) -> dict[str, Tensor]:
        """:math:`G_i - g_i`: the per-datum terms left after the correction."""
        terms = self.base.per_example(params, indices)
        if self.table is None:
            return terms
        return {k: t + self.table[k][indices] for k, t in terms.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"centre": self.centre}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("centre") is not None:
            self.set_centre(state["centre"])  # the table is a deterministic function of it


def wants_control_variates(potential, setting: bool | str, num_params: int) -> bool:
    """Whether to use control variates: ``setting`` True/False/"auto" (on when the model
    is subsampled and the per-example table, data x parameters, has at most
    :data:`MAX_CV_TABLE` entries)."""
    subsampled = (
        getattr(potential, "plate_name", None) is not None
        and potential.subsample_size is not None
        and potential.subsample_size < potential.plate_size
    )
    if not subsampled or setting is False:
        if setting is True:
            raise ValueError("control_variates=True needs a Pyro model with subsample_size")
        return False
    size = potential.plate_size * num_params
    if size > MAX_CV_TABLE:
        if setting is True:
            raise ValueError(
                f"control variates would store {size:.3g} per-example gradient entries "
                f"(data x parameters, limit {MAX_CV_TABLE:.0e}); pass control_variates=False"
            )
        return False
    return True
