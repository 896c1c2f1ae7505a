"""Tests of step-size schedules and warm-up adaptation (pyro_sgmcmc.samplers)."""

from __future__ import annotations

import doctest
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pyro_sgmcmc.samplers import WelfordVariance, adaptation, adaptation_windows, schedules

PROPERTY = settings(max_examples=50, deadline=None)

# --------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------


@given(st.floats(1e-6, 10.0), st.integers(0, 10**6))
def test_constant(step_size, t):
    assert schedules.constant(step_size)(t) == step_size


@pytest.mark.parametrize("step_size", [0.0, -0.1])
def test_constant_rejects_nonpositive(step_size):
    with pytest.raises(ValueError, match="step_size"):
        schedules.constant(step_size)


@PROPERTY
@given(st.floats(1e-4, 1.0), st.floats(0.1, 100.0), st.floats(0.501, 1.0))
def test_polynomial_values(a, b, gamma):
    s = schedules.polynomial(a, b=b, gamma=gamma)
    for t in [0, 1, 7, 100, 12345]:
        assert s(t) == pytest.approx(a * (b + t) ** -gamma, rel=1e-12)
    # Robbins-Monro: strictly decreasing, and s(t) (b + t)^γ is constant.
    values = [s(t) for t in range(50)]
    assert all(x > y for x, y in zip(values, values[1:], strict=False))
    assert s(10**6) * (b + 10**6) ** gamma == pytest.approx(a, rel=1e-9)


def test_polynomial_known_values():
    s = schedules.polynomial(0.1, b=1.0, gamma=0.55)
    assert s(0) == pytest.approx(0.1)
    assert s(99) == pytest.approx(0.1 * 100**-0.55)  # = 0.00794, not 0.008
    assert schedules.polynomial(1.0, b=10.0, gamma=1.0)(90) == pytest.approx(0.01)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(a=0.0), "a and b"),
        (dict(a=-1.0), "a and b"),
        (dict(a=0.1, b=0.0), "a and b"),
        (dict(a=0.1, b=-2.0), "a and b"),
        (dict(a=0.1, gamma=0.5), "gamma"),
        (dict(a=0.1, gamma=0.2), "gamma"),
        (dict(a=0.1, gamma=1.01), "gamma"),
        (dict(a=0.1, gamma=0.0), "gamma"),
    ],
)
def test_polynomial_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        schedules.polynomial(**kwargs)


def test_polynomial_gamma_one_allowed():
    assert schedules.polynomial(0.1, gamma=1.0)(1) == pytest.approx(0.05)


@PROPERTY
@given(st.floats(1e-4, 1.0), st.integers(1, 500), st.data())
def test_cyclical(step_size, num_steps, data):
    num_cycles = data.draw(st.integers(1, num_steps))
    s = schedules.cyclical(step_size, num_steps, num_cycles)
    length = math.ceil(num_steps / num_cycles)
    values = [s(t) for t in range(num_steps)]
    for t, v in enumerate(values):
        r = (t % length) / length
        assert v == pytest.approx(0.5 * step_size * (math.cos(math.pi * r) + 1.0), rel=1e-12)
        assert 0.0 < v <= step_size
    # Each cycle restarts at the full step size and then strictly decreases.
    starts = list(range(0, num_steps, length))
    assert all(values[t] == step_size for t in starts)
    for t in range(num_steps - 1):
        if (t + 1) % length:
            assert values[t + 1] < values[t]
    # Half way through a cycle of even length the step size is halved.
    if length % 2 == 0 and length // 2 < num_steps:
        assert values[length // 2] == pytest.approx(0.5 * step_size)
    # Never more cycles than asked for; exactly as many when they divide the steps.
    assert len(starts) <= num_cycles
    if num_steps % num_cycles == 0:
        assert len(starts) == num_cycles


def test_cyclical_known_values():
    s = schedules.cyclical(0.1, num_steps=100, num_cycles=2)
    assert s(0) == s(50) == 0.1
    assert s(25) == pytest.approx(0.05)
    assert s(49) == pytest.approx(0.05 * (math.cos(math.pi * 49 / 50) + 1))
    # One cycle per step is the constant schedule.
    assert [schedules.cyclical(0.3, 5, 5)(t) for t in range(5)] == [0.3] * 5


@pytest.mark.parametrize(
    "args",
    [(0.0, 10, 2), (-0.1, 10, 2), (0.1, 0, 1), (0.1, 10, 0), (0.1, 10, 11), (0.1, 10, -1)],
)
def test_cyclical_validation(args):
    with pytest.raises(ValueError):
        schedules.cyclical(*args)


def test_as_schedule():
    s = schedules.as_schedule(0.25)
    assert [s(t) for t in (0, 1, 1000)] == [0.25] * 3
    assert schedules.as_schedule(1)(7) == 1.0
    assert isinstance(schedules.as_schedule(1)(7), float)
    custom = schedules.polynomial(0.1)
    assert schedules.as_schedule(custom) is custom
    with pytest.raises(ValueError):
        schedules.as_schedule(0.0)
    with pytest.raises(ValueError):
        schedules.as_schedule(-1)


# --------------------------------------------------------------------------------------
# Welford variance
# --------------------------------------------------------------------------------------

shapes = st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple)
site_shapes = st.dictionaries(
    st.sampled_from(["w", "b", "loc", "z"]), shapes, min_size=1, max_size=3
)


@PROPERTY
@given(
    site_shapes,
    st.integers(2, 40),
    st.sampled_from([torch.float32, torch.float64]),
    st.floats(-1e3, 1e3),
    st.integers(0, 2**31),
)
def test_welford_matches_torch(shapes_, n, dtype, offset, seed):
    gen = torch.Generator().manual_seed(seed)
    draws = {
        k: offset + torch.randn((n, *s), generator=gen, dtype=torch.float64)
        for k, s in shapes_.items()
    }
    acc = WelfordVariance()
    for i in range(n):
        acc.update({k: v[i].to(dtype).requires_grad_() for k, v in draws.items()})
    assert acc.count == n
    # Reference in float64 from the same (rounded) inputs; float32 Welford loses about
    # |offset| / sd * eps_32 relative accuracy in the variance (offset up to 1e3).
    ref = {k: v.to(dtype).double() for k, v in draws.items()}
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=2e-3, atol=2e-3)
    var = acc.variance(regularize=False)
    for k, x in ref.items():
        assert acc.mean[k].dtype == var[k].dtype == dtype and var[k].shape == x.shape[1:]
        assert not var[k].requires_grad
        torch.testing.assert_close(acc.mean[k].double(), x.mean(0), **tol)
        torch.testing.assert_close(var[k].double(), x.var(0, unbiased=True), **tol)
    # Stan's regularisation, shrinking towards 1e-3 times the mean variance of all sites.
    pooled = torch.cat([x.var(0, unbiased=True).reshape(-1) for x in ref.values()]).mean()
    reg = acc.variance()
    for k, x in ref.items():
        expected = n / (n + 5) * x.var(0, unbiased=True) + 1e-3 * 5 / (n + 5) * pooled
        torch.testing.assert_close(reg[k].double(), expected, **tol)


def test_welford_large_offset_is_stable():
    """Welford avoids the catastrophic cancellation of E[x²] - E[x]² (float64)."""
    gen = torch.Generator().manual_seed(0)
    x = 1e8 + torch.randn(1000, 3, generator=gen, dtype=torch.float64)
    acc = WelfordVariance()
    for row in x:
        acc.update({"x": row})
    torch.testing.assert_close(acc.variance(regularize=False)["x"], x.var(0), rtol=1e-6, atol=0)


def test_welford_does_not_modify_inputs():
    acc = WelfordVariance()
    first = {"x": torch.tensor([1.0, 2.0])}
    acc.update(first)
    acc.update({"x": torch.tensor([3.0, 6.0])})
    assert torch.equal(first["x"], torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(acc.variance(regularize=False)["x"], torch.tensor([2.0, 8.0]))


def test_welford_needs_two_draws():
    acc = WelfordVariance()
    with pytest.raises(ValueError, match="two draws"):
        acc.variance()
    acc.update({"x": torch.zeros(2)})
    with pytest.raises(ValueError, match="two draws"):
        acc.variance()


# --------------------------------------------------------------------------------------
# Adaptation windows
# --------------------------------------------------------------------------------------


def test_adaptation_windows_known():
    assert adaptation_windows(1000) == [199, 299, 499, 899]


@pytest.mark.parametrize("warmup", [0, 1, 10, 19])
def test_adaptation_windows_short_warmup(warmup):
    assert adaptation_windows(warmup) == []


@settings(max_examples=300, deadline=None)
@given(st.integers(20, 100_000))
def test_adaptation_windows_properties(warmup):
    ends = adaptation_windows(warmup)
    start = int(0.15 * warmup)  # initial fast buffer: 15 %
    end = warmup - warmup // 10  # terminal buffer: the last 10 % of warm-up
    assert ends, "at least one window from 20 warm-up steps on"
    assert ends == sorted(set(ends))
    assert all(start <= e < warmup for e in ends)
    assert ends[-1] == end - 1
    # Window lengths: each slow window doubles the previous one; the last absorbs the
    # remainder, so it is at least as long as the doubling would make it.
    lengths = [b - a for a, b in zip([start - 1, *ends[:-1]], ends, strict=True)]
    first = max(25, (end - start) // 15)
    if len(lengths) > 1:
        assert lengths[0] == first
    for prev, nxt in zip(lengths[:-2], lengths[1:-1], strict=True):
        assert nxt == 2 * prev
    if len(lengths) > 1:
        assert lengths[-1] >= 2 * lengths[-2]


def test_adaptation_windows_count():
    # Once (end - start) / 15 exceeds the 25-step minimum, the windows are w, 2w, 4w and
    # the remainder (~8w) of the 15w slow phase: always four, whatever the warm-up.
    for warmup in (500, 1000, 10_000, 100_000):
        assert len(adaptation_windows(warmup)) == 4
    # Short warm-ups start at 25 steps: 200 -> [30, 55) and [55, 180).
    assert adaptation_windows(200) == [54, 179]


# --------------------------------------------------------------------------------------
# Documentation examples
# --------------------------------------------------------------------------------------


def test_adaptation_docstring_examples():
    assert doctest.testmod(adaptation, verbose=False).failed == 0


def test_schedules_docstring_examples():
    assert doctest.testmod(schedules, verbose=False).failed == 0
