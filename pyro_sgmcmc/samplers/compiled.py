r"""A sampler step and its potential's gradient as one compiled function, for the
PyTorch path (:class:`~pyro_sgmcmc.nn.ModulePotential`, or any object with a pure
``potential(params, batch)``), for one network or a vectorised ensemble.

:func:`compiled_step` returns ``step(state, batch, generator) -> (state, u)`` computing

.. math::

    (g, \tilde U) = \nabla_\theta \tilde U_B(\theta), \qquad
    s_{t+1} = \texttt{sampler.step}(s_t, g, \epsilon, \ldots),

with ``torch.func.grad_and_value`` (and ``torch.func.vmap`` over the ``K`` members of an
ensemble, whose parameters carry a leading dimension ``K`` and share the batch), under
``torch.compile``. The injected noise is drawn outside the compiled function from
``generator`` in the order the eager step draws it, so the draws are the eager step's;
the first call records which noise the sampler asks for (one eager step, discarded).
No host synchronisation: unlike ``ModulePotential.potential_and_grad`` nothing checks
finiteness (check ``u`` every so many steps).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from pyro_sgmcmc.samplers._common import normal_like


class _Feed:
    """Noise handed to the sampler from a list (or recorded, with ``tensors=None``)."""

    def __init__(self, tensors: list[Tensor] | None) -> None:
        self.tensors, self.shapes, self.i = tensors, [], 0

    def normal_like(self, x: Tensor) -> Tensor:
        if self.tensors is None:
            self.shapes.append(torch.empty_like(x))
            return torch.zeros_like(x)
        self.i += 1
        return self.tensors[self.i - 1]


def compiled_step(
    potential,
    sampler,
    step_size: float,
    *,
    ensemble: bool = False,
    compile: bool = True,
    **sampler_kwargs: Any,
) -> Callable:
    """One sampler step with its gradient, compiled (see the module docstring).

    Args:
        potential: an object with a pure ``potential(params, batch)`` (a
            :class:`~pyro_sgmcmc.nn.ModulePotential`).
        sampler: a sampler module of :mod:`pyro_sgmcmc.samplers` (``sghmc``, ``sgld``,
            ``baoa``, ``sgnht``).
        step_size: :math:`\\epsilon`.
        ensemble: parameters carry a leading member dimension ``K`` (one vmapped
            gradient for all members, each on the same batch).
        compile: ``torch.compile`` the step (``False``: the same function eagerly).
        **sampler_kwargs: the sampler's other arguments (``temperature``, ``num_data``,
            ``alpha``, ...), fixed for the compiled function.

    Returns:
        ``step(state, batch, generator=None) -> (state, u)``.

    Examples:
        >>> import torch
        >>> from pyro_sgmcmc.nn import ModulePotential, normal_log_likelihood
        >>> from pyro_sgmcmc.samplers import sghmc
        >>> pot = ModulePotential(torch.nn.Linear(3, 1), normal_log_likelihood(1.0), prior=1.0,
        ...                       num_data=64, output_transform=lambda o: o.squeeze(-1))
        >>> step = compiled_step(pot, sghmc, 0.1, num_data=64, compile=False)
        >>> state, g = sghmc.init(pot.params()), torch.Generator().manual_seed(0)
        >>> state, u = step(state, (torch.randn(8, 3), torch.randn(8)), g)
        >>> u.shape
        torch.Size([])
    """
    grad_fn = torch.func.grad_and_value(potential.potential)
    if ensemble:
        grad_fn = torch.func.vmap(grad_fn, in_dims=(0, None))

    def raw(state, batch, noise: list[Tensor]):
        grads, u = grad_fn(state.params, batch)
        new = sampler.step(state, grads, step_size, generator=_Feed(noise), **sampler_kwargs)
        return new, u

    fn = torch.compile(raw, dynamic=False) if compile else raw
    templates: list[Tensor] | None = None

    def step(state, batch, generator: torch.Generator | None = None):
        nonlocal templates
        if templates is None:
            params = state.params
            zeros = {k: torch.zeros_like(v) for k, v in params.items()}
            feed = _Feed(None)
            sampler.step(state, zeros, step_size, generator=feed, **sampler_kwargs)
            templates = feed.shapes
        noise = [normal_like(t, generator) for t in templates]
        return fn(state, batch, noise)

    return step
