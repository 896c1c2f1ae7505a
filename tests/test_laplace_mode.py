"""The Laplace guides find their mode: :mod:`pyro_sgmcmc.laplace.mode` and its use.

Each case has its own gold standard, computed here independently of the package: the
exact mode of the full-data log joint by float64 Newton (or SciPy's BFGS) on a
closed-form objective, and the exact full-data Hessian there, whose inverse gives the
reference posterior sds (the posteriors are near-Gaussian at these sample sizes). The
guides run with their defaults; the check is the mode, within 0.1 reference sd.
"""

from __future__ import annotations

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import init_to_value

from pyro_sgmcmc.laplace import (
    AutoDenseLaplace,
    AutoDiagonalLaplace,
    AutoKFACLaplace,
    LaplaceError,
    LaplaceModeWarning,
    find_mode,
)
from pyro_sgmcmc.potential import PyroPotential
from pyro_sgmcmc.tree import flatten

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(autouse=True)
def _clean_param_store():
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


def newton_reference(neg_log_joint, z0: torch.Tensor, iters: int = 100):
    """Float64 Newton with halving on a closed-form objective: the mode and the sds."""
    z = z0.to(F64).clone()
    for _ in range(iters):
        g = torch.autograd.functional.jacobian(neg_log_joint, z)
        h = torch.autograd.functional.hessian(neg_log_joint, z)
        step = torch.linalg.solve(h, g)
        t, f0 = 1.0, neg_log_joint(z)
        while not bool(neg_log_joint(z - t * step) <= f0) and t > 1e-10:
            t *= 0.5
        z = z - t * step
        if float(g @ step) < 1e-20:
            break
    h = torch.autograd.functional.hessian(neg_log_joint, z)
    return z, torch.linalg.inv(h).diagonal().sqrt()


# ====================================================================== randhie Poisson GLM
def randhie():
    sm = pytest.importorskip("statsmodels.api")
    data = sm.datasets.randhie.load_pandas().data
    y = torch.tensor(data["mdvis"].to_numpy(), dtype=torch.float32)
    cov = data.drop(columns="mdvis").to_numpy()
    cov = (cov - cov.mean(0)) / cov.std(0)
    X = torch.tensor(np.column_stack([np.ones(len(cov)), cov]), dtype=torch.float32)
    return X, y


def poisson_glm(X, y, batch=None):
    w = pyro.sample("w", dist.Normal(X.new_zeros(X.shape[1]), 1.0).to_event(1))
    with pyro.plate("data", len(X), subsample_size=batch) as idx:
        pyro.sample("obs", dist.Poisson((X[idx] @ w).exp()), obs=y[idx])


@pytest.mark.parametrize("cls", [AutoDenseLaplace, AutoDiagonalLaplace])
def test_randhie_poisson_docs_recipe_reaches_the_mode(cls):
    # The docs' recipe (ClippedAdam, 1000 steps of batch 256) left the dense guide's
    # means 2.27 posterior sds off (issue 11); the default mode search finishes the job.
    X, y = randhie()
    X64, y64 = X.to(F64), y.to(F64)

    def neg_log_joint(w):
        eta = X64 @ w
        return -(y64 * eta - eta.exp()).sum() + 0.5 * w.square().sum()

    mode, sd = newton_reference(neg_log_joint, torch.zeros(X.shape[1]))
    pyro.set_rng_seed(0)
    guide = cls(poisson_glm)
    optim = pyro.optim.ClippedAdam({"lr": 0.05, "lrd": 0.993, "clip_norm": float("inf")})
    svi = SVI(poisson_glm, guide, optim, Trace_ELBO())
    for _ in range(1000):
        svi.step(X, y, batch=256)
    q = guide.laplace_approximation(X, y)
    report = q.mode_report
    assert report.converged and report.method == "newton" and report.distance < 1e-3
    assert report.start_distance > 0.5  # SVI alone had stopped short
    err = (q.median()["w"].to(F64) - mode).abs() / sd
    assert float(err.max()) < 0.1, err
    if cls is AutoDenseLaplace:  # the GGN of a canonical-link GLM is its Hessian
        lap_sd = flatten(q.posterior.stddev()).to(F64)
        torch.testing.assert_close(lap_sd, sd, rtol=1e-3, atol=0)


# ====================================================================== learned noise scale
def regression_data(n=400, seed=0):
    X = torch.randn(n, 3, generator=gen(seed), dtype=F64)
    y = X @ torch.tensor([1.0, -2.0, 0.5], dtype=F64) + torch.randn(n, generator=gen(seed + 1))
    return X, y.to(F64)


def sigma_model(X, y, batch=None):
    w = pyro.sample("w", dist.Normal(X.new_zeros(3), 10.0).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(X.new_tensor(10.0)))
    with pyro.plate("data", len(X), subsample_size=batch) as idx:
        pyro.sample("obs", dist.Normal(X[idx] @ w, sigma), obs=y[idx])


def sigma_reference(X, y):
    def neg_log_joint(z):  # z = (w, log sigma), log-Jacobian included
        w, s = z[:3], z[3]
        r = y - X @ w
        nll = len(y) * s + 0.5 * (r.square().sum()) * torch.exp(-2 * s)
        log_prior = -0.5 * (w / 10).square().sum() - 0.5 * (s.exp() / 10) ** 2 + s
        return nll - log_prior

    w0 = torch.linalg.lstsq(X, y[:, None]).solution[:, 0]  # start near the mode
    s0 = (y - X @ w0).square().mean().sqrt().log()
    return newton_reference(neg_log_joint, torch.cat([w0, s0[None]]))


def started_at_sigma_50(**kwargs):
    init = {"w": torch.zeros(3, dtype=F64), "sigma": torch.tensor(50.0, dtype=F64)}
    return AutoDenseLaplace(sigma_model, init_loc_fn=init_to_value(values=init), **kwargs)


def test_learned_sigma_started_at_50_reaches_the_mode():
    # Issue 17: Gauss-Newton moves log sigma by at most 1/2 per step while sigma is far
    # above the residuals; 5 such steps ended at sigma 4.18 with sds 4x too wide.
    X, y = regression_data()
    mode, sd = sigma_reference(X, y)
    guide = started_at_sigma_50()
    guide(X, y)
    q = guide.laplace_approximation(X, y)
    assert q.mode_report.converged and q.mode_report.start_distance > 50
    err = (flatten(q.posterior.mean) - mode).abs() / sd
    assert float(err.max()) < 0.1, err
    assert abs(float(q.median()["sigma"]) / float(mode[3].exp()) - 1) < 1e-3
    torch.testing.assert_close(flatten(q.posterior.stddev()), sd, rtol=0.02, atol=0)


def test_a_missed_tolerance_warns_or_raises():
    X, y = regression_data()
    guide = started_at_sigma_50(newton_steps=1)
    guide(X, y)
    with pytest.warns(LaplaceModeWarning, match="1 iteration"):
        guide.laplace_approximation(X, y)
    report = guide.mode_report
    assert not report.converged and report.iterations == 1
    assert report.distance > report.tol and report.grad_norm > 0
    pyro.clear_param_store()  # each guide starts afresh at sigma = 50
    strict = started_at_sigma_50(newton_steps=1, strict=True)
    strict(X, y)
    with pytest.raises(LaplaceError, match="posterior sds from the mode"):
        strict.laplace_approximation(X, y)
    # newton_steps=0 keeps the starting point, and says it is not the mode
    pyro.clear_param_store()
    skip = started_at_sigma_50(newton_steps=0)
    skip(X, y)
    with pytest.warns(LaplaceModeWarning, match="newton_steps=0"):
        q = skip.laplace_approximation(X, y)
    assert q.mode_report.iterations == 0
    torch.testing.assert_close(q.median()["sigma"], torch.tensor(50.0, dtype=F64))
    # a cap that suffices: no warning, and the same mode as the default
    pyro.clear_param_store()
    capped = started_at_sigma_50(newton_steps=20)
    capped(X, y)
    q = capped.laplace_approximation(X, y)
    assert q.mode_report.converged and q.mode_report.iterations <= 20


# ====================================================================== collinear covariates
def collinear_data(n=5000, d=24, seed=0):
    base = torch.randn(n, 1, generator=gen(seed), dtype=F64)
    X = base + 0.05 * torch.randn(n, d, generator=gen(seed + 1), dtype=F64)
    w = torch.linspace(-1.0, 1.0, d, dtype=F64) + 0.1
    y = torch.bernoulli(torch.sigmoid(X @ w), generator=gen(seed + 2))
    return X, y


def logistic_model(X, y, batch=None):
    w = pyro.sample("w", dist.Normal(X.new_zeros(X.shape[1]), 1.0).to_event(1))
    with pyro.plate("data", len(X), subsample_size=batch) as idx:
        pyro.sample("obs", dist.Bernoulli(logits=X[idx] @ w), obs=y[idx])


def logistic_reference(X, y):
    def neg_log_joint(w):
        f = X @ w
        return -(y * f - torch.nn.functional.softplus(f)).sum() + 0.5 * w.square().sum()

    return newton_reference(neg_log_joint, torch.zeros(X.shape[1]))


def test_diagonal_guide_finds_the_mode_of_correlated_coefficients():
    # Diagonal Newton steps crawl along the collinear direction (issue 17: 24 reference
    # sds off); the mode search uses the full gradient and Hessian whatever the guide.
    X, y = collinear_data()
    mode, sd = logistic_reference(X, y)
    zero = init_to_value(values={"w": torch.zeros(X.shape[1], dtype=F64)})
    guide = AutoDiagonalLaplace(logistic_model, init_loc_fn=zero)
    guide(X, y)  # the initial point: w = 0
    q = guide.laplace_approximation(X, y)
    assert q.mode_report.converged and q.mode_report.start_distance > 1
    err = (q.median()["w"] - mode).abs() / sd
    assert float(err.max()) < 0.1, err


# ====================================================================== L-BFGS, K-FAC
def test_lbfgs_above_the_dense_limit_reaches_the_mode():
    n, d = 1500, 240  # P = 240 > MAX_DENSE: L-BFGS on the full-data objective
    X = torch.randn(n, d, generator=gen(5), dtype=F64) / math.sqrt(d)
    X[:, 1] = X[:, 0] + 0.1 * X[:, 1]  # one correlated pair, and badly scaled columns
    X[:, 2] *= 20.0
    w = torch.randn(d, generator=gen(6), dtype=F64)
    y = torch.bernoulli(torch.sigmoid(X @ w), generator=gen(7))
    mode, sd = logistic_reference(X, y)
    pot = PyroPotential(logistic_model, (X, y))
    phi, report = find_mode(pot, {"w": torch.zeros(d, dtype=F64)})
    assert report.method == "lbfgs" and report.converged, report
    err = (phi["w"] - mode).abs() / sd
    assert float(err.max()) < 0.1, err


def test_kfac_guide_refines_its_mode():
    from pyro.nn import PyroModule, PyroSample

    class Net(PyroModule):
        def __init__(self):
            super().__init__()
            self.fc1 = PyroModule[torch.nn.Linear](2, 6)
            self.fc1.weight = PyroSample(dist.Normal(0.0, 1.0).expand([6, 2]).to_event(2))
            self.fc1.bias = PyroSample(dist.Normal(0.0, 1.0).expand([6]).to_event(1))
            self.fc2 = PyroModule[torch.nn.Linear](6, 1)
            self.fc2.weight = PyroSample(dist.Normal(0.0, 1.0).expand([1, 6]).to_event(2))
            self.fc2.bias = PyroSample(dist.Normal(0.0, 1.0).expand([1]).to_event(1))

        def forward(self, x, y=None, batch=None):
            data = pyro.plate("data", len(x), subsample_size=batch)
            with data as idx:
                pass
            logits = self.fc2(torch.tanh(self.fc1(x[idx]))).squeeze(-1)
            with data:
                pyro.sample("obs", dist.Bernoulli(logits=logits), obs=y[idx])

    pyro.set_rng_seed(0)
    x = torch.randn(400, 2)
    y = (x[:, 0] * x[:, 1] > 0).float()
    net = Net()
    guide = AutoKFACLaplace(net, batch_size=128)
    svi = SVI(net, guide, pyro.optim.Adam({"lr": 0.02}), Trace_ELBO())
    for _ in range(200):
        svi.step(x, y, batch=64)
    q = guide.laplace_approximation(x, y)
    report = q.mode_report
    assert report.converged and report.start_distance > report.distance
    pot = PyroPotential(net, (x, y))
    phi = {k: v for k, v in q.posterior.mean.items()}
    _, again = find_mode(pot, phi, max_iter=0)  # the guide's centre is the mode
    assert again.distance < 1e-3


# ====================================================================== constrained draws
def test_sample_posterior_draws_constrained_values_without_the_model():
    def model(y):
        probs = pyro.sample("probs", dist.Dirichlet(torch.ones(3, dtype=F64)))
        scale = pyro.sample("scale", dist.LogNormal(torch.tensor(0.0, dtype=F64), 1.0))
        with pyro.plate("data", len(y)) as idx:
            pyro.sample("obs", dist.Categorical(probs), obs=y[idx])
            pyro.sample("extra", dist.Normal(0.0, scale), obs=y[idx].to(F64) - 1.0)

    y = torch.multinomial(torch.tensor([0.2, 0.3, 0.5]), 300, True, generator=gen(0))
    guide = AutoDenseLaplace(model)
    guide(y)
    q = guide.laplace_approximation(y)
    draws = q.sample_posterior(4000, generator=gen(1))
    assert draws["probs"].shape == (4000, 3) and draws["scale"].shape == (4000,)
    torch.testing.assert_close(draws["probs"].sum(-1), torch.ones(4000, dtype=F64))
    assert bool((draws["probs"] > 0).all()) and bool((draws["scale"] > 0).all())
    raw = q.sample_posterior(4000, constrained=False, generator=gen(1))
    assert raw["probs"].shape == (4000, 2)  # the unconstrained (stick-breaking) shape
    torch.testing.assert_close(raw["scale"].exp(), draws["scale"])
    flat = torch.cat([raw["probs"], raw["scale"][:, None]], -1)
    cov = torch.cov(flat.T)
    exact = q.posterior.covariance()
    assert float((cov - exact).abs().max()) < 0.1 * float(exact.diagonal().max())
    assert float(((flat.mean(0) - q.loc) / exact.diagonal().sqrt()).abs().max()) < 0.1
    one = q.sample_posterior()
    assert one["probs"].shape == (3,) and one["scale"].shape == ()
    with pytest.raises(ValueError, match="num_samples"):
        q.sample_posterior(0)
