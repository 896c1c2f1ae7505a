"""Tests of :mod:`pyro_sgmcmc.potential` (and the kernels' control variates built on it).

Answers are checked against closed forms: conjugate Bayesian linear regression
(``w ~ N(0, I)``, ``y ~ N(Xw, 1)``), a hand-written unconstrained log density for a
model with a positive scale and a simplex, and per-datum autograd loops. Everything
runs in float64 so the exact checks hold to 1e-6 or better.

Statistical checks use fixed seeds (so they are deterministic) and tolerances of
about 4 Monte Carlo standard errors, or a chi-square quantile at level 1e-4; each
tolerance is explained next to it.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pyro.infer.autoguide.initialization import init_to_median, init_to_value
from scipy.stats import chi2

from pyro_sgmcmc import ModelError, PyroPotential
from pyro_sgmcmc.kernels.gradients import ControlVariateGradient, MinibatchGradient, minibatch_beta
from pyro_sgmcmc.potential import IndexStream

F64 = torch.float64


def close(a, b, tol=1e-6):
    """Elementwise |a - b| <= tol * (1 + |b|)."""
    a, b = torch.as_tensor(a, dtype=F64), torch.as_tensor(b, dtype=F64)
    return bool(((a - b).abs() <= tol * (1 + b.abs())).all())


# ======================================================================================
# 1. IndexStream
# ======================================================================================


def draw(stream, n):
    return [stream() for _ in range(n)]


@settings(max_examples=60, deadline=None)
@given(size=st.integers(1, 40), data=st.data(), seed=st.integers(0, 2**31 - 1))
def test_epoch_stream_visits_every_index_once_per_epoch(size, data, seed):
    """Any B (dividing N or not): batches never change size, and the concatenated
    stream is a sequence of permutations, also across the epoch boundaries that fall
    inside a batch."""
    batch = data.draw(st.integers(1, size))
    stream = IndexStream(size, batch, generator=torch.Generator().manual_seed(seed))
    epochs = 3
    batches = draw(stream, math.ceil(epochs * size / batch) + 1)
    assert all(b.shape == (batch,) and b.dtype == torch.long for b in batches)
    flat = torch.cat(batches)
    for e in range(epochs):
        chunk = flat[e * size : (e + 1) * size]
        assert torch.equal(chunk.sort().values, torch.arange(size)), (e, chunk)


def test_epoch_stream_straddles_boundary_and_reshuffles():
    g = torch.Generator().manual_seed(3)
    stream = IndexStream(10, 4, generator=g)
    b = draw(stream, 5)  # 20 indices = two epochs; batch 3 straddles the first boundary
    assert all(len(x) == 4 for x in b)
    first, second = torch.cat(b)[:10], torch.cat(b)[10:]
    assert torch.equal(first.sort().values, torch.arange(10))
    assert torch.equal(second.sort().values, torch.arange(10))
    assert not torch.equal(first, second)  # reshuffled (equal w.p. 1/10!)
    assert all(len(set(x.tolist())) == 4 for x in b[:2])  # no repeats within an epoch


def test_stream_reproducible_with_seeded_generator():
    for replacement in (False, True):
        a = draw(IndexStream(13, 5, torch.Generator().manual_seed(7), replacement=replacement), 9)
        b = draw(IndexStream(13, 5, torch.Generator().manual_seed(7), replacement=replacement), 9)
        c = draw(IndexStream(13, 5, torch.Generator().manual_seed(8), replacement=replacement), 9)
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
        assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))


def test_iid_stream_is_uniform_and_independent():
    """replacement=True: every slot uniform on range(N), slots independent within and
    across batches, duplicates allowed."""
    n, b, m = 10, 7, 3000
    stream = IndexStream(n, b, torch.Generator().manual_seed(0), replacement=True)
    batches = torch.stack(draw(stream, m))  # (m, b)
    assert batches.shape == (m, b) and batches.min() >= 0 and batches.max() < n

    # Pearson chi-square goodness of fit; the threshold is the 1 - 1e-4 quantile of the
    # chi-square law with (cells - 1) dof, so a correct stream fails w.p. 1e-4 per test
    # (and the seed is fixed).
    def chi_square_ok(cells, num_cells):
        counts = torch.bincount(cells, minlength=num_cells).double()
        expected = cells.numel() / num_cells
        stat = float(((counts - expected) ** 2 / expected).sum())
        return stat < chi2.ppf(1 - 1e-4, num_cells - 1), stat

    ok, stat = chi_square_ok(batches.flatten(), n)  # marginal of all slots
    assert ok, stat
    ok, stat = chi_square_ok(batches[:, 0] * n + batches[:, 1], n * n)  # within a batch
    assert ok, stat
    ok, stat = chi_square_ok(batches[:-1, 0] * n + batches[1:, 0], n * n)  # across batches
    assert ok, stat
    # With replacement duplicates occur: a batch of 7 from 10 is duplicate-free w.p. 0.06.
    dup = sum(len(set(row.tolist())) < b for row in batches)
    assert 0.9 * m < dup < m
    # Even a batch the size of the data is drawn with replacement, not as arange.
    full = IndexStream(n, n, torch.Generator().manual_seed(1), replacement=True)
    assert any(len(set(full().tolist())) < n for _ in range(5))


def test_full_batch_stream_returns_arange():
    stream = IndexStream(9, 9, torch.Generator().manual_seed(0))
    for _ in range(3):
        assert torch.equal(stream(), torch.arange(9))


def test_stream_state_dict_round_trip():
    g = torch.Generator().manual_seed(11)
    stream = IndexStream(10, 3, generator=g)
    draw(stream, 2)  # mid-epoch: 6 of 10 used
    state, gstate = stream.state_dict(), g.get_state()
    expected = draw(stream, 8)  # continues across two epoch boundaries

    # Stream state + generator state: the whole continuation is reproduced.
    g2 = torch.Generator().manual_seed(999)
    g2.set_state(gstate)
    restored = IndexStream(10, 3, generator=g2)
    restored.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(draw(restored, 8), expected, strict=True))

    # The stream state alone fixes the rest of the current epoch (the next
    # permutation comes from the generator): the first batch after it, [6:9], matches.
    other = IndexStream(10, 3, generator=torch.Generator().manual_seed(5))
    other.load_state_dict(state)
    assert torch.equal(other(), expected[0])

    assert state["pos"] == 6
    assert torch.equal(state["perm"].sort().values, torch.arange(10))


@pytest.mark.parametrize("batch", [0, -1, 11])
@pytest.mark.parametrize("replacement", [False, True])
def test_stream_bad_batch_size_raises(batch, replacement):
    with pytest.raises(ValueError, match=r"batch_size must lie in \[1, 10\]"):
        IndexStream(10, batch, replacement=replacement)


# ======================================================================================
# 2-3. Conjugate linear regression: exact potential and unbiased minibatch gradients
# ======================================================================================

N, D = 120, 3


@pytest.fixture(scope="module")
def linreg():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(N, D, generator=g, dtype=F64)
    y = X @ torch.tensor([1.0, -0.5, 0.25], dtype=F64) + torch.randn(N, generator=g, dtype=F64)
    cov = torch.linalg.inv(X.T @ X + torch.eye(D, dtype=F64))
    return X, y, cov @ X.T @ y, cov


def linreg_model(X, y):
    w = pyro.sample("w", dist.Normal(torch.zeros(X.shape[1], dtype=X.dtype), 1.0).to_event(1))
    with pyro.plate("data", X.shape[0]) as idx:
        pyro.sample("obs", dist.Normal(X[idx] @ w, 1.0), obs=y[idx])


def linreg_log_joint(w, X, y):
    """Exact log p(w, y) (with its constants)."""
    n, d = X.shape
    r = y - X @ w
    return -0.5 * (w @ w) - 0.5 * (r @ r) - 0.5 * (n + d) * math.log(2 * math.pi)


def linreg_grad_u(w, X, y, idx=None):
    """Closed-form gradient of the (minibatch) per-datum potential."""
    n = X.shape[0]
    Xb, yb = (X, y) if idx is None else (X[idx], y[idx])
    scale = 1.0 if idx is None else n / len(idx)
    return (w - scale * Xb.T @ (yb - Xb @ w)) / n


def per_example_linreg(w, X, y):
    """Gradient of each datum's log-likelihood: x_i (y_i - x_i w), shape (N, D)."""
    return X * (y - X @ w)[:, None]


def test_full_batch_potential_is_scaled_log_joint(linreg):
    X, y, _, _ = linreg
    pot = PyroPotential(linreg_model, (X, y))
    assert pot.plate_name == "data" and pot.num_data == N and pot.latent_names == ["w"]
    w1 = torch.tensor([0.3, -1.2, 2.0], dtype=F64)
    w2 = torch.tensor([-0.7, 0.1, 0.4], dtype=F64)
    u1, g1 = pot.potential_and_grad({"w": w1})
    u2 = pot.potential({"w": w2})
    assert u1.dtype == F64 and g1["w"].dtype == F64
    # U = -(1/N) log p(w, y); the normaliser is included, so values match too.
    assert close(u1, -linreg_log_joint(w1, X, y) / N, 1e-10)
    assert close(u1 - u2, -(linreg_log_joint(w1, X, y) - linreg_log_joint(w2, X, y)) / N, 1e-10)
    assert close(g1["w"], linreg_grad_u(w1, X, y), 1e-10)
    # Explicit all-data indices are the same thing as indices=None.
    u_all, g_all = pot.potential_and_grad({"w": w1}, torch.arange(N))
    assert close(u_all, u1, 1e-12) and close(g_all["w"], g1["w"], 1e-12)
    terms = pot.log_density_terms({"w": w1})
    assert set(terms) == {"w", "obs", "w (log-Jacobian)"}
    assert float(terms["w (log-Jacobian)"]) == 0.0


def test_minibatch_potential_scales_likelihood_by_n_over_b(linreg):
    X, y, _, _ = linreg
    pot = PyroPotential(linreg_model, (X, y), subsample_size=8)
    w = torch.tensor([0.3, -1.2, 2.0], dtype=F64)
    idx = torch.tensor([5, 17, 17, 0, 119, 64, 3, 3])  # duplicates: iid batches have them
    u, g = pot.potential_and_grad({"w": w}, idx)
    r = y[idx] - X[idx] @ w
    log_lik = -0.5 * (r @ r) - 0.5 * len(idx) * math.log(2 * math.pi)
    log_prior = -0.5 * (w @ w) - 0.5 * D * math.log(2 * math.pi)
    assert close(u, -(log_prior + N / len(idx) * log_lik) / N, 1e-10)
    assert close(g["w"], linreg_grad_u(w, X, y, idx), 1e-10)


def test_epoch_minibatch_gradients_average_to_full_gradient(linreg):
    """B | N: one stream epoch is a partition of the data, so the average of its
    N / B minibatch gradients is the full gradient exactly."""
    X, y, _, _ = linreg
    b = 8
    pot = PyroPotential(
        linreg_model,
        (X, y),
        subsample_size=b,
        batching="epoch",
        generator=torch.Generator().manual_seed(1),
    )
    assert not pot.indices.replacement
    phi = {"w": torch.tensor([0.3, -1.2, 2.0], dtype=F64)}
    full = pot.potential_and_grad(phi)[1]["w"]
    # Construction traced one batch already; move to the stream's epoch boundary.
    while pot.indices.state_dict()["pos"] != N:
        pot.next_indices()
    batches = [pot.next_indices() for _ in range(N // b)]
    assert torch.equal(torch.cat(batches).sort().values, torch.arange(N))
    mean = torch.stack([pot.potential_and_grad(phi, i)[1]["w"] for i in batches]).mean(0)
    assert close(mean, full, 1e-5)
    assert close(mean, linreg_grad_u(phi["w"], X, y), 1e-5)


def test_iid_minibatch_gradient_is_unbiased(linreg):
    X, y, _, _ = linreg
    b, m = 8, 1500
    pot = PyroPotential(
        linreg_model, (X, y), subsample_size=b, generator=torch.Generator().manual_seed(2)
    )
    assert pot.batching == "iid" and pot.indices.replacement
    w = torch.tensor([0.3, -1.2, 2.0], dtype=F64)
    full = linreg_grad_u(w, X, y)
    grads = torch.stack(
        [pot.potential_and_grad({"w": w}, pot.next_indices())[1]["w"] for _ in range(m)]
    )
    assert all(len(pot.next_indices()) == b for _ in range(5))
    # The estimator is -(1/N) grad log prior - mean over B iid slots of g_i, so its
    # exact variance is Var_pop(g_i) / B; the mean of m draws has standard error
    # sqrt(Var_pop / (B m)). 4 standard errors: a correct estimator fails w.p. ~6e-5
    # per coordinate (the seed is fixed anyway).
    var_pop = per_example_linreg(w, X, y).var(0, unbiased=False)
    se = (var_pop / b / m).sqrt()
    assert ((grads.mean(0) - full).abs() < 4 * se).all(), (grads.mean(0) - full) / se
    # The empirical variance matches Var_pop / B: its relative standard error is about
    # sqrt(2 / m) = 3.7% for near-Gaussian draws; 20% allows heavier tails.
    ratio = grads.var(0) / (var_pop / b)
    assert ((ratio - 1).abs() < 0.2).all(), ratio


# ======================================================================================
# 4. Constrained sites: positive scale and simplex
# ======================================================================================

NC, K = 30, 3
ALPHA = torch.tensor([2.0, 3.0, 4.0], dtype=F64)


@pytest.fixture(scope="module")
def cdata():
    g = torch.Generator().manual_seed(4)
    y = 0.5 + 1.5 * torch.randn(NC, generator=g, dtype=F64)
    c = torch.multinomial(torch.tensor([0.2, 0.3, 0.5]), NC, replacement=True, generator=g)
    return y, c


def constrained_model(y, c):
    sigma = pyro.sample("sigma", dist.HalfNormal(torch.tensor(2.0, dtype=F64)))
    p = pyro.sample("p", dist.Dirichlet(ALPHA))
    mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=F64), 5.0))
    with pyro.plate("data", len(y)) as idx:
        pyro.sample("y", dist.Normal(mu, sigma), obs=y[idx])
        pyro.sample("c", dist.Categorical(p), obs=c[idx])


def stick_breaking(z):
    """torch's simplex bijection, by hand: R^{K-1} -> K-simplex."""
    k1 = z.shape[-1]
    offset = torch.arange(k1, 0, -1, dtype=z.dtype)  # K-1, ..., 1
    v = torch.sigmoid(z - offset.log())
    rest = torch.cumprod(1 - v, -1)
    return torch.cat([v, torch.ones(1, dtype=z.dtype)]) * torch.cat(
        [torch.ones(1, dtype=z.dtype), rest]
    )


def hand_constrained_log_density(s, z, mu, y, c, idx=None):
    """log p(theta, y) + log|d theta / d phi| in phi = (log sigma, z, mu), by hand;
    the simplex log-Jacobian comes from an autograd Jacobian of the first K-1
    coordinates, independently of torch's ``log_abs_det_jacobian``."""
    sigma, p = s.exp(), stick_breaking(z)
    lp = math.log(2.0) - 0.5 * math.log(2 * math.pi * 4.0) - sigma**2 / 8.0  # HalfNormal(2)
    lp = lp + torch.lgamma(ALPHA.sum()) - torch.lgamma(ALPHA).sum() + ((ALPHA - 1) * p.log()).sum()
    lp = lp - 0.5 * math.log(2 * math.pi * 25.0) - mu**2 / 50.0
    ll = per_datum_loglik(s, z, mu, y, c)
    lp = lp + (ll.sum() if idx is None else len(y) / len(idx) * ll[idx].sum())
    jac = torch.autograd.functional.jacobian(lambda t: stick_breaking(t)[:-1], z, create_graph=True)
    return lp + s + torch.linalg.slogdet(jac)[1]


def per_datum_loglik(s, z, mu, y, c):
    sigma, p = s.exp(), stick_breaking(z)
    return -0.5 * math.log(2 * math.pi) - s - 0.5 * ((y - mu) / sigma) ** 2 + p.log()[c]


PHI_C = {
    "sigma": torch.tensor(0.4, dtype=F64),
    "p": torch.tensor([0.3, -0.8], dtype=F64),
    "mu": torch.tensor(0.7, dtype=F64),
}


def test_constrained_transforms_and_round_trip(cdata):
    y, c = cdata
    pot = PyroPotential(constrained_model, (y, c), subsample_size=5)
    assert pot.latent_names == ["sigma", "p", "mu"]
    assert set(pot.transforms) == {"sigma", "p", "mu"}
    phi = pot.initial_params()
    # A simplex of size K has K - 1 unconstrained coordinates.
    assert phi["sigma"].shape == () and phi["p"].shape == (K - 1,) and phi["mu"].shape == ()
    theta = pot.constrain(PHI_C)
    assert close(theta["sigma"], PHI_C["sigma"].exp(), 1e-12)
    assert close(theta["p"], stick_breaking(PHI_C["p"]), 1e-12)
    assert theta["p"].shape == (K,) and close(theta["p"].sum(), 1.0, 1e-12)
    back = pot.unconstrain(theta)
    assert all(close(back[k], PHI_C[k], 1e-10) for k in PHI_C)
    theta2 = {
        "sigma": torch.tensor(2.5, dtype=F64),
        "p": torch.tensor([0.1, 0.6, 0.3], dtype=F64),
        "mu": torch.tensor(-1.0, dtype=F64),
    }
    again = pot.constrain(pot.unconstrain(theta2))
    assert all(close(again[k], theta2[k], 1e-10) for k in theta2)
    # ``transforms`` map constrained -> unconstrained, as Pyro's initialize_model.
    assert close(pot.transforms["sigma"](torch.tensor(2.5, dtype=F64)), math.log(2.5), 1e-12)


def test_constrained_potential_includes_log_jacobian(cdata):
    y, c = cdata
    pot = PyroPotential(constrained_model, (y, c))
    u, grads = pot.potential_and_grad(PHI_C)
    leaves = {k: v.clone().requires_grad_(True) for k, v in PHI_C.items()}
    hand = hand_constrained_log_density(leaves["sigma"], leaves["p"], leaves["mu"], y, c)
    expected = torch.autograd.grad(-hand / NC, list(leaves.values()))
    assert close(u, -hand.detach() / NC, 1e-8)
    for k, g in zip(leaves, expected, strict=True):
        assert close(grads[k], g, 1e-8), k
    # Leaving out the Jacobian would be visible: s + log|J| is not small here.
    terms = pot.log_density_terms(PHI_C)
    jac = float(terms["sigma (log-Jacobian)"] + terms["p (log-Jacobian)"])
    assert abs(jac) > 0.1
    # Central finite differences of the potential agree with its gradient (O(h^2)).
    h = 1e-5
    for k in PHI_C:
        for j in range(PHI_C[k].numel()):
            e = torch.zeros_like(PHI_C[k]).flatten()
            e[j] = h
            e = e.reshape(PHI_C[k].shape)
            up = pot.potential({**PHI_C, k: PHI_C[k] + e})
            dn = pot.potential({**PHI_C, k: PHI_C[k] - e})
            assert close((up - dn) / (2 * h), grads[k].flatten()[j], 1e-6), (k, j)
    # Minibatch: the likelihood (only) is scaled by N / B.
    idx = torch.tensor([0, 4, 4, 29, 11])
    u_b, g_b = pot.potential_and_grad(PHI_C, idx)
    leaves = {k: v.clone().requires_grad_(True) for k, v in PHI_C.items()}
    hand = hand_constrained_log_density(leaves["sigma"], leaves["p"], leaves["mu"], y, c, idx)
    expected = torch.autograd.grad(-hand / NC, list(leaves.values()))
    assert close(u_b, -hand.detach() / NC, 1e-8)
    assert all(close(g_b[k], g, 1e-8) for k, g in zip(leaves, expected, strict=True))


# ======================================================================================
# 5. Per-example gradients
# ======================================================================================


def per_datum_grad_loop(y, c, phi, rows):
    out = {k: [] for k in phi}
    for i in rows.tolist():
        leaves = {k: v.clone().requires_grad_(True) for k, v in phi.items()}
        ll = per_datum_loglik(leaves["sigma"], leaves["p"], leaves["mu"], y[i], c[i])
        for k, g in zip(leaves, torch.autograd.grad(ll, list(leaves.values())), strict=True):
            out[k].append(g)
    return {k: torch.stack(v) for k, v in out.items()}


def test_per_example_grads_match_per_datum_autograd(cdata):
    y, c = cdata
    pot = PyroPotential(constrained_model, (y, c), subsample_size=6)
    idx = torch.tensor([3, 0, 3, 17, 29, 8])
    got = pot.per_example_grads(PHI_C, idx)
    want = per_datum_grad_loop(y, c, PHI_C, idx)
    assert got["p"].shape == (6, K - 1) and got["sigma"].shape == (6,)
    assert all(close(got[k], want[k], 1e-10) for k in want)
    # Per-datum log-likelihoods sum to the (unscaled) likelihood of the batch.
    ll = pot.per_example_log_likelihood(PHI_C, idx)
    hand = per_datum_loglik(PHI_C["sigma"], PHI_C["p"], PHI_C["mu"], y[idx], c[idx])
    assert close(ll, hand, 1e-10)
    var = pot.per_example_grad_variance(PHI_C, idx)
    assert all(close(var[k], want[k].var(0), 1e-10) for k in want)


@pytest.mark.parametrize("chunk_size", [7, 10, 256])  # 30 = 4 x 7 + 2; 3 x 10; one chunk
def test_all_per_example_grads_cover_all_rows_in_order(cdata, chunk_size):
    y, c = cdata
    pot = PyroPotential(constrained_model, (y, c), subsample_size=6)
    got = pot.all_per_example_grads(PHI_C, chunk_size=chunk_size)
    want = per_datum_grad_loop(y, c, PHI_C, torch.arange(NC))
    assert got["p"].shape == (NC, K - 1) and got["mu"].shape == (NC,)
    assert all(close(got[k], want[k], 1e-10) for k in want)
    # The vmapped path (not its batched-backward fallback) handles this model.
    vmapped = pot._vmapped_per_example_grads(PHI_C, torch.arange(NC))
    assert all(close(vmapped[k], want[k], 1e-10) for k in want)


# ======================================================================================
# 6. Control variates through the kernel
# ======================================================================================


def cv_estimator(X, y, b):
    """The kernels' control-variate estimator over the model's minibatch potential."""
    pyro.set_rng_seed(0)
    pot = PyroPotential(linreg_model, (X, y), subsample_size=b, generator=torch.Generator())
    est = ControlVariateGradient(MinibatchGradient(pot))
    assert est.table is None  # no centre yet: the plain estimator
    return est


def one_step_grads(est, phi, m):
    """m draws of the estimator's gradient at a fixed phi, each on a fresh minibatch."""
    pot = est.potential
    return torch.stack([est({"w": phi}, pot.next_indices())[1]["w"] for _ in range(m)])


def test_control_variate_gradient_is_unbiased_and_low_variance(linreg):
    X, y, mean, cov = linreg
    b, m = 8, 1500
    kernel = cv_estimator(X, y, b)
    kernel.set_centre({"w": mean})
    table, gbar = kernel.table, kernel.mean
    assert close(table["w"], per_example_linreg(mean, X, y), 1e-10)
    assert close(gbar["w"], per_example_linreg(mean, X, y).mean(0), 1e-10)

    sd = cov.diag().sqrt()
    for offset, min_ratio in ((0.1, 50.0), (3.0, None)):
        phi = mean + offset * sd * torch.tensor([1.0, -1.0, 1.0], dtype=F64)
        full = linreg_grad_u(phi, X, y)
        cv = one_step_grads(kernel, phi, m)
        # Exact variance of the CV estimator: its random part is -mean_B (g_i - G_i)
        # over B iid slots, so Var = Var_pop(g_i - G_i) / B and the mean of m draws
        # has standard error sqrt(Var / m). 4 standard errors, as for the plain
        # gradient (false-failure rate ~6e-5 per coordinate; the seed is fixed).
        diff = per_example_linreg(phi, X, y) - table["w"]
        var_pop = diff.var(0, unbiased=False)
        se = (var_pop / b / m).sqrt()
        assert ((cv.mean(0) - full).abs() < 4 * se).all(), (offset, (cv.mean(0) - full) / se)
        # Its empirical variance matches Var_pop / B (relative SE ~ sqrt(2/m) = 3.7%).
        assert (((cv.var(0) / (var_pop / b)) - 1).abs() < 0.2).all()
        if min_ratio is not None:
            # Near the centre the CV removes almost all the noise. Here the ratio is
            # ~|G|^2 / (|x|^4 |phi - centre|^2) ~ 2e3-4e3; 50x is a loose floor.
            plain_var = per_example_linreg(phi, X, y).var(0, unbiased=False) / b
            assert (plain_var / cv.var(0) > min_ratio).all(), plain_var / cv.var(0)
            plain = torch.stack(
                [
                    kernel.potential.potential_and_grad(
                        {"w": phi}, kernel.potential.next_indices()
                    )[1]["w"]
                    for _ in range(300)
                ]
            )
            assert (plain.var(0) / cv.var(0) > min_ratio).all()


def test_control_variate_has_no_noise_at_the_centre(linreg):
    X, y, mean, _ = linreg
    kernel = cv_estimator(X, y, 8)
    centre = mean + torch.tensor([0.05, 0.0, -0.02], dtype=F64)
    kernel.set_centre({"w": centre})
    full = linreg_grad_u(centre, X, y)
    # At phi == centre the estimator is the full gradient for every batch (rounding only).
    cv = one_step_grads(kernel, centre, 50)
    assert (cv - full).abs().max() < 1e-12
    # The noise estimate (used for beta) is zero there as well.
    rows = kernel.per_example({"w": centre}, kernel.potential.next_indices())
    assert rows["w"].var(0).abs().max() < 1e-20


def test_gradient_noise_and_beta_estimate_the_estimator_variance(linreg):
    """The batch variance of the estimator's per-example terms is an unbiased estimate
    of their Var_pop, and ``minibatch_beta`` turns it into Var[grad U~] / tau with
    Var[grad U~] = Var / B for iid batches."""
    X, y, mean, cov = linreg
    b, m = 8, 600
    kernel = cv_estimator(X, y, b)
    phi = mean + 2.0 * cov.diag().sqrt()
    for centre in (None, mean):
        if centre is not None:
            kernel.set_centre({"w": centre})
        g = per_example_linreg(phi, X, y) - (0 if centre is None else kernel.table["w"])
        var_pop = g.var(0, unbiased=False)
        est = torch.stack(
            [
                kernel.per_example({"w": phi}, kernel.potential.next_indices())["w"].var(0)
                for _ in range(m)
            ]
        )
        # The batch variance (ddof 1) of B iid draws is unbiased for Var_pop. Its
        # standard error over m batches is measured from the draws; 4 of them.
        se = est.std(0) / math.sqrt(m)
        assert ((est.mean(0) - var_pop).abs() < 4 * se).all(), (est.mean(0) - var_pop) / se
    # beta = var / B / tau with tau = T / N (T = 1).
    v = torch.tensor([1.0, 2.0, 3.0], dtype=F64)
    assert close(minibatch_beta({"w": v}, b, N, 1.0)["w"], v / b / (1.0 / N), 1e-12)


# ======================================================================================
# 7. Init strategies
# ======================================================================================


def median_model(y):
    mu = pyro.sample("mu", dist.Normal(torch.tensor(3.0, dtype=F64), 1e-8))
    s = pyro.sample("s", dist.LogNormal(torch.tensor(math.log(2.0), dtype=F64), 1e-8))
    p = pyro.sample("p", dist.Dirichlet(ALPHA))
    with pyro.plate("data", len(y)) as idx:
        pyro.sample("obs", dist.Normal(mu, s), obs=y[idx])
        pyro.sample("c", dist.Categorical(p), obs=(idx % K))


def test_init_to_median():
    y = torch.randn(20, dtype=F64)
    pot = PyroPotential(median_model, (y,), subsample_size=5, init_strategy=init_to_median)
    phi = pot.initial_params()
    # The medians are the locations to ~1e-8 (prior scales 1e-8); a multivariate site
    # (Dirichlet) has no median and falls back to init_to_feasible: the simplex's centre
    # image, unconstrained zeros.
    assert close(phi["mu"], 3.0, 1e-6)
    assert close(phi["s"], math.log(2.0), 1e-6)
    assert phi["p"].shape == (K - 1,) and close(phi["p"], torch.zeros(K - 1), 1e-12)


def test_init_to_value(linreg, cdata):
    X, y, _, _ = linreg
    w0 = torch.tensor([0.1, 0.2, 0.3], dtype=F64)
    pot = PyroPotential(linreg_model, (X, y), init_strategy=init_to_value(values={"w": w0}))
    assert torch.equal(pot.initial_params()["w"], w0)

    yc, c = cdata
    p0 = torch.tensor([0.2, 0.3, 0.5], dtype=F64)
    strategy = init_to_value(values={"sigma": torch.tensor(0.5, dtype=F64), "p": p0})
    pot = PyroPotential(constrained_model, (yc, c), subsample_size=5, init_strategy=strategy)
    phi = pot.initial_params()
    assert close(phi["sigma"], math.log(0.5), 1e-12)
    assert phi["p"].shape == (K - 1,) and close(stick_breaking(phi["p"]), p0, 1e-12)
    assert -2.0 <= float(phi["mu"]) <= 2.0  # fallback init_to_uniform: U(-2, 2) unconstrained


def test_initial_params_retries_until_finite(linreg):
    X, y, _, _ = linreg
    queue: list[float] = []
    calls = []

    def strategy(site):
        calls.append(site["name"])
        v = queue.pop(0) if queue else 0.5
        return torch.full((D,), v, dtype=F64)

    pot = PyroPotential(linreg_model, (X, y), subsample_size=10, init_strategy=strategy)
    calls.clear()
    # +-inf: the prior's log-density is -inf, so U is not finite (NaN values: see below).
    queue.extend([float("inf"), float("-inf")])
    phi = pot.initial_params()
    assert len(calls) == 3  # two non-finite tries, then a finite one
    assert torch.equal(phi["w"], torch.full((D,), 0.5, dtype=F64))


def test_out_of_support_latent_gives_nonfinite_potential_not_an_error():
    def model(y):
        sigma = pyro.sample("sigma", dist.LogNormal(0.0, 1.0))
        with pyro.plate("data", len(y)) as idx:
            pyro.sample("obs", dist.Normal(0.0, sigma), obs=y[idx])

    pot = PyroPotential(model, (torch.randn(20),), subsample_size=5)
    phi = {"sigma": torch.tensor(-120.0)}  # exp(-120) underflows to 0 in float32
    u, _ = pot.potential_and_grad(phi, torch.arange(5))
    assert not torch.isfinite(u)
    assert "obs" in pot.nonfinite_sites(phi, torch.arange(5))
    assert "sigma (value)" in pot.nonfinite_sites({"sigma": torch.tensor(float("nan"))}, None)


def test_initial_params_nan_data_raises_naming_the_site():
    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(y)) as idx:
            pyro.sample("obs", dist.Normal(mu, 1.0), obs=y[idx])

    y = torch.full((20,), float("nan"))
    for subsample_size in (5, None):
        # Caught at set-up now, over the whole data, before any initial point is tried.
        with pytest.raises(ModelError, match=r"'obs'.*not finite") as err:
            PyroPotential(model, (y,), subsample_size=subsample_size)
        assert "'mu'" not in str(err.value)  # only the offending site is named


# ======================================================================================
# 8. Plate detection
# ======================================================================================


def test_plate_found_automatically_or_by_name(linreg):
    X, y, _, _ = linreg
    auto = PyroPotential(linreg_model, (X, y), subsample_size=8)
    named = PyroPotential(linreg_model, (X, y), subsample_size=8, plate="data")
    for pot in (auto, named):
        assert pot.plate_name == "data" and pot.plate_size == N and pot.plate_dim == -1
        assert pot.num_data == N
    w = {"w": torch.tensor([0.3, -1.2, 2.0], dtype=F64)}
    idx = torch.arange(8)
    assert close(auto.potential(w, idx), named.potential(w, idx), 1e-14)


def test_unknown_plate_name_lists_the_plates(linreg):
    X, y, _, _ = linreg
    with pytest.raises(ModelError, match=r"'batch' is not in the model.*\['data'\]"):
        PyroPotential(linreg_model, (X, y), plate="batch", subsample_size=8)


def two_plate_model(ya, yb):
    mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=F64), 1.0))
    with pyro.plate("a", len(ya)) as i:
        pyro.sample("obs_a", dist.Normal(mu, 1.0), obs=ya[i])
    with pyro.plate("b", len(yb)) as j:
        pyro.sample("obs_b", dist.Normal(mu, 2.0), obs=yb[j])


def test_two_sibling_data_plates_need_a_name():
    ya, yb = torch.randn(40, dtype=F64), torch.randn(10, dtype=F64)
    with pytest.raises(ModelError, match="plate='...'"):
        PyroPotential(two_plate_model, (ya, yb), subsample_size=8)
    pot = PyroPotential(two_plate_model, (ya, yb), subsample_size=8, plate="a")
    assert pot.plate_name == "a" and pot.num_data == 40
    # Plate "a" is subsampled (scale 40 / 8); plate "b" stays full (scale 1).
    mu = torch.tensor(0.3, dtype=F64)
    idx = torch.tensor([1, 5, 5, 39, 0, 2, 7, 20])
    _, g = pot.potential_and_grad({"mu": mu}, idx)
    want = (mu - 40 / 8 * (ya[idx] - mu).sum() - ((yb - mu) / 4).sum()) / 40
    assert close(g["mu"], want, 1e-10)


def nested_model(Y):
    n, f = Y.shape
    mu = pyro.sample("mu", dist.Normal(torch.zeros(f, dtype=F64), 1.0).to_event(1))
    with pyro.plate("data", n, dim=-2) as idx:
        with pyro.plate("feat", f, dim=-1):
            pyro.sample("obs", dist.Normal(mu, 1.0), obs=Y[idx])


@pytest.mark.parametrize("plate", [None, "data"])
def test_nested_plates_subsample_the_outer_data_plate(plate):
    n, f, b = 40, 4, 8
    Y = torch.randn(n, f, dtype=F64, generator=torch.Generator().manual_seed(6)) + 1.0
    pot = PyroPotential(
        nested_model,
        (Y,),
        subsample_size=b,
        plate=plate,
        batching="epoch",
        generator=torch.Generator().manual_seed(0),
    )
    assert pot.plate_name == "data" and pot.plate_dim == -2 and pot.num_data == n
    mu = torch.linspace(-0.5, 0.5, f, dtype=F64)

    def grad_u(rows):
        return (mu - n / len(rows) * (Y[rows] - mu).sum(0)) / n

    u_full, g_full = pot.potential_and_grad({"mu": mu})
    assert close(g_full["mu"], grad_u(torch.arange(n)), 1e-10)
    log_joint = dist.Normal(0.0, 1.0).log_prob(mu).sum() + dist.Normal(mu, 1.0).log_prob(Y).sum()
    assert close(u_full, -log_joint / n, 1e-10)
    idx = pot.next_indices()
    assert idx.shape == (b,)
    assert close(pot.potential_and_grad({"mu": mu}, idx)[1]["mu"], grad_u(idx), 1e-10)
    # One aligned epoch averages to the full gradient exactly (B | N).
    while pot.indices.state_dict()["pos"] != n:
        pot.next_indices()
    mean = torch.stack(
        [pot.potential_and_grad({"mu": mu}, pot.next_indices())[1]["mu"] for _ in range(n // b)]
    ).mean(0)
    assert close(mean, g_full["mu"], 1e-10)
    # Per-example gradients sum over the inner feature plate: row i gives Y_i - mu.
    rows = torch.tensor([3, 3, 0, 39])
    assert close(pot.per_example_grads({"mu": mu}, rows)["mu"], Y[rows] - mu, 1e-10)
    assert close(pot.all_per_example_grads({"mu": mu}, chunk_size=7)["mu"], Y - mu, 1e-10)


def global_model(y):
    mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=F64), 1.0))
    pyro.sample("obs", dist.Normal(mu, 1.0).expand([len(y)]).to_event(1), obs=y)


def test_global_observation_without_plate_is_full_batch():
    y = torch.tensor([0.5, 1.5, 2.0, -0.3, 1.1], dtype=F64)
    mu = torch.tensor(0.4, dtype=F64)
    log_joint = dist.Normal(0.0, 1.0).log_prob(mu) + dist.Normal(mu, 1.0).log_prob(y).sum()
    grad_log_joint = -mu + (y - mu).sum()
    for num_data, n in ((None, 1), (5, 5), (12, 12)):
        pot = PyroPotential(global_model, (y,), num_data=num_data)
        assert pot.plate_name is None and pot.indices is None and pot.num_data == n
        assert pot.next_indices() is None
        u, g = pot.potential_and_grad({"mu": mu}, pot.next_indices())
        assert close(u, -log_joint / n, 1e-12)
        assert close(g["mu"], -grad_log_joint / n, 1e-12)
        assert torch.isfinite(pot.initial_params()["mu"])
    with pytest.raises(ModelError, match="no data plate"):
        PyroPotential(global_model, (y,), subsample_size=2)
    with pytest.raises(ModelError, match="data plate"):
        PyroPotential(global_model, (y,)).all_per_example_grads({"mu": mu})


@pytest.mark.parametrize("bad", [0, N + 1])
def test_potential_bad_subsample_size(linreg, bad):
    X, y, _, _ = linreg
    with pytest.raises(ModelError, match=rf"subsample_size={bad} must lie in \[1, {N}\]"):
        PyroPotential(linreg_model, (X, y), subsample_size=bad)
    with pytest.raises(ValueError, match="batching"):
        PyroPotential(linreg_model, (X, y), batching="shuffle")
