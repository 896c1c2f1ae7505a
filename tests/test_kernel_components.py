"""The kernel layer's pieces, one at a time: gradient estimators, the noise estimate,
the whitening, the moments, the mode search, initialisation and the warm-up check."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_sgmcmc import MCMC, NonFiniteError, PyroPotential, SGHMCKernel
from pyro_sgmcmc.kernels.gradients import ControlVariateGradient, MinibatchGradient, minibatch_beta
from pyro_sgmcmc.kernels.init import find_initial_params, initial_chains
from pyro_sgmcmc.kernels.mode import dense_hessian, newton
from pyro_sgmcmc.kernels.moments import ChainMoments, split_rhat
from pyro_sgmcmc.kernels.warmup import check_warmup
from pyro_sgmcmc.kernels.whitening import Whitening

N, DIM = 500, 3


def linreg_model(X, y):
    w = pyro.sample("w", dist.Normal(torch.zeros(X.shape[1], dtype=X.dtype), 1.0).to_event(1))
    with pyro.plate("data", X.shape[0]) as idx:
        pyro.sample("obs", dist.Normal(X[idx] @ w, 1.0), obs=y[idx])


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(N, DIM, generator=g, dtype=torch.float64)
    y = X @ torch.tensor([1.0, -0.5, 0.2], dtype=torch.float64) + torch.randn(
        N, generator=g, dtype=torch.float64
    )
    return X, y


def _potential(data, b=10):
    gen = torch.Generator().manual_seed(1)
    return PyroPotential(linreg_model, data, subsample_size=b, generator=gen)


def test_minibatch_estimator_is_unbiased(data):
    pot = _potential(data)
    est = MinibatchGradient(pot)
    phi = {"w": torch.tensor([0.3, 0.1, -0.4], dtype=torch.float64)}
    _, full = pot.potential_and_grad(phi, None)
    draws = torch.stack([est(phi, pot.next_indices())[1]["w"] for _ in range(4000)])
    se = draws.std(0) / 4000**0.5
    assert ((draws.mean(0) - full["w"]).abs() < 4 * se).all()


def test_control_variates_are_exact_at_the_centre_and_unbiased_elsewhere(data):
    pot = _potential(data)
    est = ControlVariateGradient(MinibatchGradient(pot))
    centre = {"w": torch.tensor([0.9, -0.4, 0.1], dtype=torch.float64)}
    est.set_centre(centre)
    _, full = pot.potential_and_grad(centre, None)
    for _ in range(5):
        torch.testing.assert_close(est(centre, pot.next_indices())[1]["w"], full["w"])
    phi = {"w": torch.tensor([0.5, 0.0, 0.5], dtype=torch.float64)}
    _, full = pot.potential_and_grad(phi, None)
    draws = torch.stack([est(phi, pot.next_indices())[1]["w"] for _ in range(4000)])
    se = draws.std(0) / 4000**0.5
    assert ((draws.mean(0) - full["w"]).abs() < 4 * se).all()
    plain = torch.stack([MinibatchGradient(pot)(phi, pot.next_indices())[1]["w"]
                         for _ in range(2000)])  # fmt: skip
    assert (draws.var(0) < plain.var(0)).all()  # the point of the exercise


def test_beta_formula_matches_the_simulated_noise_variance(data):
    """beta * tau is the variance of the minibatch gradient, for iid batches."""
    pot, b, temperature = _potential(data, b=10), 10, 1.0
    est = MinibatchGradient(pot)
    phi = {"w": torch.tensor([0.2, 0.2, 0.2], dtype=torch.float64)}
    rows = est.per_example(phi, torch.arange(N))
    beta = minibatch_beta({"w": rows["w"].var(0)}, b, N, temperature)["w"]
    draws = torch.stack([est(phi, pot.next_indices())[1]["w"] for _ in range(6000)])
    simulated = draws.var(0) / (temperature / N)
    torch.testing.assert_close(simulated, beta, rtol=0.1, atol=0.0)
    without = minibatch_beta(torch.tensor(1.0), 100, 1000, 1.0, replacement=False)
    assert float(without) == pytest.approx((1 - 0.1) / 100 * 1000)


@pytest.mark.parametrize("dense", [True, False])
def test_whitening_round_trip_and_gradient(dense):
    g = torch.Generator().manual_seed(0)
    like = {"a": torch.zeros(2, dtype=torch.float64), "b": torch.zeros((), dtype=torch.float64)}
    a = torch.randn(3, 3, generator=g, dtype=torch.float64)
    precision = a @ a.T + torch.eye(3, dtype=torch.float64)
    shift = torch.randn(3, generator=g, dtype=torch.float64)
    w = Whitening.from_precision(like, shift, precision if dense else precision.diagonal())
    z = torch.randn(5, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(w.to_z(w.to_params(z)), z)
    # D = L L^T is the inverse precision
    d = w.inverse_mass()
    if dense:
        torch.testing.assert_close(d, torch.linalg.inv(precision))
    else:
        torch.testing.assert_close(d["a"], 1 / precision.diagonal()[:2])

    def u(params):
        return (params["a"] ** 3).sum() + params["b"] ** 2 * params["a"].sum()

    z0 = z[0].clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(u(w.to_params(z0)), z0)
    theta = {k: v.detach().requires_grad_(True) for k, v in w.to_params(z[0]).items()}
    grads = dict(zip(theta, torch.autograd.grad(u(theta), list(theta.values())), strict=True))
    torch.testing.assert_close(w.grad_to_z(grads), expected)


def test_chain_moments_pool_the_within_chain_covariance():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 4, 2, generator=g, dtype=torch.float64)  # steps, chains, d
    x[:, 1] += 10.0  # a chain elsewhere must not widen the estimate
    m = ChainMoments(dense=True)
    for step in x:
        m.update(step)
    expected = torch.stack([torch.cov(x[:, c].T) for c in range(4)]).mean(0)
    torch.testing.assert_close(m.pooled_cov(), expected)
    torch.testing.assert_close(m.mean, x.mean(0))
    halves = (ChainMoments(), ChainMoments())
    for i, step in enumerate(x):
        halves[i // 100].update(step)
    assert float(split_rhat(*halves).max()) > 2  # chain 1 disagrees
    report = check_warmup(halves, step_cut=1.0, nonfinite=0, polish={})
    assert report["problems"] and "did not converge" in report["problems"][0]


def test_newton_reaches_the_mode_of_a_badly_scaled_quadratic():
    scales = torch.tensor([1e-3, 1.0, 1e3], dtype=torch.float64)
    target = torch.tensor([5.0, -2.0, 0.01], dtype=torch.float64)

    def fn(z):
        return (((z - target) / scales) ** 2).sum() + 0.01 * ((z - target) ** 4).sum()

    result = newton(fn, torch.zeros(3, dtype=torch.float64), tol=1e-12)
    assert result.converged
    # within 1e-5 of the mode in each coordinate's own scale (its curvature's units)
    assert float(((result.z - target) / scales).abs().max()) < 1e-5
    torch.testing.assert_close(
        dense_hessian(fn, target), torch.diag(2 / scales**2), rtol=1e-9, atol=1e-9
    )


def test_initial_point_falls_back_where_the_strategy_fails():
    """A Poisson GLM started uniformly overflows exp(); the start must still be finite."""
    g = torch.Generator().manual_seed(0)
    X = torch.cat([torch.ones(300, 1), 50 * torch.randn(300, 2, generator=g)], 1)
    y = torch.poisson(torch.full((300,), 3.0), generator=g)

    def model(X, y):
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
        with pyro.plate("data", 300) as idx:
            pyro.sample("obs", dist.Poisson((X[idx] @ w).exp()), obs=y[idx])

    pot = PyroPotential(model, (X, y), subsample_size=20)
    pyro.set_rng_seed(0)
    phi = find_initial_params(pot, pot.init_strategy)
    u, grads = pot.potential_and_grad(phi, None)
    assert torch.isfinite(u) and torch.isfinite(grads["w"]).all()
    chains = initial_chains(pot, pot.init_strategy, 16, torch.Generator().manual_seed(0))
    u, grads = pot.batched_potential_and_grad(chains, None)
    assert torch.isfinite(u).all() and torch.isfinite(grads["w"]).all()
    assert chains["w"].std(0).min() > 0  # spread, not one point


def test_no_finite_start_names_the_observed_site_and_the_fix():
    """A likelihood term that is -inf wherever the latent is (data that set-up checks
    cannot judge): the error names that site, not the latent, and says what to check."""
    y = torch.tensor([0.5, 1.5, 1.0])

    def model(y):
        s = pyro.sample("s", dist.HalfNormal(1.0))
        with pyro.plate("data", 3) as idx:
            pyro.sample("obs", dist.Normal(0.0, s), obs=y[idx])
        pyro.factor("constraint", torch.where(s > 100.0, 0.0, -float("inf")))

    pot = PyroPotential(model, (y,))
    with pytest.raises(NonFiniteError, match=r"observed site\(s\) \['constraint'\].*support"):
        find_initial_params(pot, pot.init_strategy)


def test_dense_mass_matrix_on_a_correlated_gaussian():
    """Plate-less correlated Gaussian: warm-up whitens by its covariance (dense)."""
    cov = torch.tensor([[1.0, 0.99], [0.99, 1.0]], dtype=torch.float64)
    scale = torch.linalg.cholesky(cov)

    def model():
        pyro.sample("x", dist.MultivariateNormal(torch.zeros(2, dtype=torch.float64),
                                                 scale_tril=scale))  # fmt: skip

    pyro.set_rng_seed(0)
    mcmc = MCMC(SGHMCKernel(model), warmup_steps=400, num_samples=3000, disable_progbar=True)
    mcmc.run()
    d = mcmc.kernel.inverse_mass_matrix
    assert d.shape == (2, 2)
    # dense: it carries the 0.99 correlation; its scale is a window estimate (MC error)
    assert float(d[0, 1] / (d[0, 0] * d[1, 1]).sqrt()) > 0.95
    assert 0.5 < float(d[0, 0]) < 2.0
    x = mcmc.get_samples()["x"]
    torch.testing.assert_close(torch.cov(x.T), cov, rtol=0.15, atol=0.05)
    assert not mcmc.kernel.warmup_report["problems"]


def _bimodal():
    x = pyro.sample("x", dist.Normal(0.0, 10.0))
    wells = torch.stack([-((x - 5.0) ** 2), -((x + 5.0) ** 2)]) / (2 * 0.5**2)
    pyro.factor("wells", torch.logsumexp(wells, 0))


def test_a_failed_warmup_is_reported_where_users_look(capsys):
    """Chains stuck in the two modes of a bimodal target: the warm-up check flags it in
    diagnostics, summary, report, the progress-bar log and a warning; strict raises."""
    from pyro_sgmcmc.diagnostics import report
    from pyro_sgmcmc.kernels import WarmupError

    init = {"x": torch.tensor([-5.0, 5.0, -5.0, 5.0])}
    pyro.set_rng_seed(0)
    kernel = SGHMCKernel(_bimodal)
    mcmc = MCMC(kernel, num_chains=4, warmup_steps=200, num_samples=50, initial_params=init,
                disable_progbar=True)  # fmt: skip
    with pytest.warns(UserWarning, match="warm-up did not converge"):
        mcmc.run()
    assert kernel.warmup_report["problems"]
    assert mcmc.diagnostics()["warmup"]["chain 0"]["problems"]
    mcmc.summary()
    assert "WARM-UP PROBLEM" in capsys.readouterr().out
    assert "WARM-UP PROBLEM" in str(report(mcmc))
    assert "PROBLEM" in kernel.logging()["warm-up"]
    pyro.set_rng_seed(0)
    strict = MCMC(SGHMCKernel(_bimodal, strict=True), num_chains=4, warmup_steps=200,
                  num_samples=50, initial_params=init, disable_progbar=True)  # fmt: skip
    with pytest.raises(WarmupError, match="did not converge"):
        strict.run()
