r"""Step-size schedules: callables ``t -> step size`` for ``t = 0, 1, 2, ...``.

* :func:`constant`: :math:`\epsilon_t = \epsilon`.
* :func:`polynomial`: Robbins-Monro decay :math:`\epsilon_t = a (b + t)^{-\gamma}`,
  :math:`\gamma \in (0.5, 1]`, for which :math:`\sum \epsilon_t = \infty` and
  :math:`\sum \epsilon_t^2 < \infty` (Welling & Teh, 2011).
* :func:`cyclical`: cosine cycles (Zhang et al., 2020, cSG-MCMC),
  :math:`\epsilon_t = \tfrac{\epsilon_0}{2}\big(\cos(\pi\, (t \bmod L)/L) + 1\big)`,
  :math:`L = \lceil K / M \rceil` for :math:`K` steps in :math:`M` cycles.
"""

from __future__ import annotations

import math
from collections.abc import Callable

Schedule = Callable[[int], float]


def constant(step_size: float) -> Schedule:
    """Always ``step_size``.

    Examples:
        >>> constant(0.1)(1000)
        0.1
    """
    if step_size <= 0:
        raise ValueError(f"step_size must be positive, got {step_size}")
    return lambda t: step_size


def polynomial(a: float, b: float = 1.0, gamma: float = 0.55) -> Schedule:
    """Robbins-Monro decay ``a * (b + t) ** -gamma``.

    Examples:
        >>> s = polynomial(0.1, b=1.0, gamma=0.55)
        >>> s(0), round(s(99), 4)
        (0.1, 0.0079)
    """
    if a <= 0 or b <= 0:
        raise ValueError(f"a and b must be positive, got a={a}, b={b}")
    if not 0.5 < gamma <= 1.0:
        raise ValueError(f"gamma must lie in (0.5, 1] for Robbins-Monro, got {gamma}")
    return lambda t: a * (b + t) ** -gamma


def cyclical(step_size: float, num_steps: int, num_cycles: int) -> Schedule:
    """Cosine cycles from ``step_size`` down to ~0, ``num_cycles`` of them in ``num_steps``.

    Examples:
        >>> s = cyclical(0.1, num_steps=100, num_cycles=2)
        >>> s(0), s(50), round(s(25), 3)
        (0.1, 0.1, 0.05)
    """
    if step_size <= 0 or num_steps < 1 or not 1 <= num_cycles <= num_steps:
        raise ValueError("need step_size > 0 and 1 <= num_cycles <= num_steps")
    length = math.ceil(num_steps / num_cycles)
    return lambda t: 0.5 * step_size * (math.cos(math.pi * (t % length) / length) + 1.0)


def as_schedule(step_size: float | Schedule) -> Schedule:
    """A float becomes :func:`constant`; a callable is returned as is."""
    return step_size if callable(step_size) else constant(float(step_size))
