"""Tests of :mod:`pyro_sgmcmc.continual`: a Gaussian posterior as the next episode's prior.

The central check is exact: for conjugate Bayesian linear regression (float64) a Laplace
on half A, then a Laplace on half B with the first posterior as prior, equals one
Laplace on all the data (precision and mean to 1e-10). The other checks compare the
prior's densities and draws with the Gaussian it came from (draws: 5 Monte Carlo
standard errors).
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions import constraints

from pyro_sgmcmc.continual import GaussianPrior, prior_from_posterior
from pyro_sgmcmc.curvature import flatten
from pyro_sgmcmc.gaussian import DenseGaussian, DiagonalGaussian
from pyro_sgmcmc.laplace import AutoDenseLaplace, AutoDiagonalLaplace

F64 = torch.float64
NOISE, PRIOR = 0.5, 2.0


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(autouse=True)
def _clean_param_store():
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


def data(n=80, seed=0):
    X = torch.randn(n, 3, generator=gen(seed), dtype=F64)
    y = X @ torch.tensor([1.0, -2.0, 0.5], dtype=F64) + NOISE * torch.randn(
        n, generator=gen(seed + 1), dtype=F64
    )
    return X, y


def first_model(X, y):
    w = pyro.sample("w", dist.Normal(X.new_zeros(3), PRIOR).to_event(1))
    s = pyro.sample("b", dist.Normal(X.new_zeros(()), PRIOR))
    with pyro.plate("data", len(X)) as idx:
        pyro.sample("obs", dist.Normal(X[idx] @ w + s, NOISE), obs=y[idx])


def next_model(prior):
    def model(X, y):
        theta = prior()
        with pyro.plate("data", len(X)) as idx:
            pyro.sample("obs", dist.Normal(X[idx] @ theta["w"] + theta["b"], NOISE), obs=y[idx])

    return model


def laplace(cls, model, X, y):
    guide = cls(model, newton_steps=2)
    guide(X, y)
    return guide.laplace_approximation(X, y)


def test_two_halves_equal_one_update_on_all_data_dense():
    X, y = data()
    q_all = laplace(AutoDenseLaplace, first_model, X, y)
    pyro.clear_param_store()
    q_a = laplace(AutoDenseLaplace, first_model, X[:40], y[:40])
    prior = prior_from_posterior(q_a)
    pyro.clear_param_store()
    q_b = laplace(AutoDenseLaplace, next_model(prior), X[40:], y[40:])
    assert list(q_b.posterior.mean) == ["w", "b"]  # the sites keep their names
    torch.testing.assert_close(
        q_b.posterior.precision_matrix(), q_all.posterior.precision_matrix(), rtol=1e-10, atol=1e-10
    )
    torch.testing.assert_close(
        flatten(q_b.posterior.mean), flatten(q_all.posterior.mean), rtol=1e-10, atol=1e-10
    )
    # and the exact conjugate posterior, for good measure
    Xb = torch.cat([X, torch.ones(80, 1, dtype=F64)], 1)
    prec = Xb.T @ Xb / NOISE**2 + torch.eye(4, dtype=F64) / PRIOR**2
    torch.testing.assert_close(q_all.posterior.precision_matrix(), prec, rtol=1e-10, atol=1e-10)


def test_two_halves_equal_one_update_for_a_diagonal_posterior_with_orthogonal_design():
    # With orthogonal columns the posterior precision is diagonal, so the diagonal Laplace is
    # exact and continual updates compose exactly too; per-site priors via prior["w"].
    q, _ = torch.linalg.qr(torch.randn(80, 3, generator=gen(4), dtype=F64))
    X = torch.cat([q * 4, q.flip(0) * 4], 0)  # each half has orthogonal columns: 16 I
    y = X @ torch.tensor([1.0, -2.0, 0.5], dtype=F64) + torch.randn(160, generator=gen(5))

    def model_a(X, y):
        w = pyro.sample("w", dist.Normal(X.new_zeros(3), PRIOR).to_event(1))
        with pyro.plate("data", len(X)) as idx:
            pyro.sample("obs", dist.Normal(X[idx] @ w, NOISE), obs=y[idx])

    q_all = laplace(AutoDiagonalLaplace, model_a, X, y)
    pyro.clear_param_store()
    q_a = laplace(AutoDiagonalLaplace, model_a, X[:80], y[:80])
    prior = prior_from_posterior(q_a)

    def model_b(X, y):
        w = pyro.sample("w", prior["w"])
        with pyro.plate("data", len(X)) as idx:
            pyro.sample("obs", dist.Normal(X[idx] @ w, NOISE), obs=y[idx])

    pyro.clear_param_store()
    q_b = laplace(AutoDiagonalLaplace, model_b, X[80:], y[80:])
    torch.testing.assert_close(q_b.posterior.precision["w"], q_all.posterior.precision["w"])
    torch.testing.assert_close(q_b.posterior.mean["w"], q_all.posterior.mean["w"])


def test_constrained_sites_keep_their_support_and_density():
    # A dense posterior over an unconstrained (loc, log scale, simplex) triple.
    mean = {
        "loc": torch.tensor([0.5, -0.5], dtype=F64),
        "scale": torch.tensor(0.3, dtype=F64),
        "p": torch.tensor([0.2, -0.1], dtype=F64),  # stick-breaking coordinates of a 3-simplex
    }
    a = torch.randn(5, 5, generator=gen(2), dtype=F64)
    q = DenseGaussian(mean, a @ a.T + 2 * torch.eye(5, dtype=F64))
    supports = {"scale": constraints.positive, "p": constraints.simplex}
    prior = prior_from_posterior(q, supports=supports)
    tr = pyro.poutine.trace(prior).get_trace()
    assert bool(tr.nodes["scale"]["value"] > 0)
    assert tr.nodes["p"]["value"].shape == (3,)
    torch.testing.assert_close(tr.nodes["p"]["value"].sum(), torch.tensor(1.0, dtype=F64))
    # the density of the constrained values times the Jacobian is q's density of phi
    values = {k: tr.nodes[k]["value"] for k in mean}
    phi = {k: prior.transforms[k].inv(v) for k, v in values.items()}
    log_jac = sum(
        prior.transforms[k].log_abs_det_jacobian(phi[k], values[k]).sum() for k in ("scale", "p")
    )
    torch.testing.assert_close(prior.log_prob(values) + log_jac, q.log_prob(phi))
    with pytest.raises(TypeError, match="jointly"):
        prior["loc"]


def test_dense_prior_draws_have_the_posterior_mean_and_covariance():
    mean = {"a": torch.tensor([1.0, 2.0], dtype=F64), "s": torch.tensor(-0.5, dtype=F64)}
    prec = torch.tensor([[3.0, 1.0, 0.5], [1.0, 2.0, -0.3], [0.5, -0.3, 1.5]], dtype=F64)
    q = DenseGaussian(mean, prec)
    prior = prior_from_posterior(q, supports={"s": constraints.positive})

    def many():
        with pyro.plate("draws", 40000, dim=-1):
            return prior()

    with pyro.poutine.seed(rng_seed=0):
        draws = many()
    phi = torch.stack([draws["a"][:, 0], draws["a"][:, 1], draws["s"].log()], -1)
    cov = q.covariance()
    se = (cov.diagonal() / 40000).sqrt()
    assert ((phi.mean(0) - flatten(mean)).abs() < 5 * se).all()
    # sd of a sample covariance entry ~ sqrt((S_ii S_jj + S_ij^2) / n)
    sd_cov = ((cov.diagonal()[:, None] * cov.diagonal()[None] + cov**2) / 40000).sqrt()
    assert ((torch.cov(phi.T) - cov).abs() < 5 * sd_cov).all()


def test_diagonal_prior_per_site_distributions_keep_the_batch_event_split():
    # A site of a "groups" plate stays in that plate in the next model.
    def model(y):
        with pyro.plate("groups", 4):
            u = pyro.sample("u", dist.LogNormal(torch.zeros(4, dtype=F64), 1.0))
        with pyro.plate("data", len(y)) as idx:
            pyro.sample("obs", dist.Normal(u.log().sum(), 1.0), obs=y[idx])

    y = torch.randn(10, generator=gen(0), dtype=F64)
    guide = AutoDiagonalLaplace(model)
    guide(y)
    q = guide.laplace_approximation(y)
    prior = prior_from_posterior(q)
    d = prior["u"]
    assert d.batch_shape == (4,) and d.event_shape == ()
    assert set(prior.distributions) == {"u"}

    def next_model():
        with pyro.plate("groups", 4):
            return pyro.sample("u", prior["u"])

    tr = pyro.poutine.trace(next_model).get_trace()
    assert bool((tr.nodes["u"]["value"] > 0).all())
    # prior(): every site as one event, outside any plate
    tr = pyro.poutine.trace(prior).get_trace()
    assert tr.nodes["u"]["fn"].event_shape == (4,)
    torch.testing.assert_close(
        tr.nodes["u"]["fn"].log_prob(tr.nodes["u"]["value"]),
        prior["u"].log_prob(tr.nodes["u"]["value"]).sum(),
    )


def test_pytorch_path_penalty_gives_the_all_data_posterior_mean():
    # Minimising -log p(y_B | w) + q_A.penalty(w) over w is the posterior mean on A + B.
    X, y = data()
    Xa, ya, Xb, yb = X[:40], y[:40], X[40:], y[40:]
    eye = torch.eye(3, dtype=F64) / PRIOR**2
    prec_a = Xa.T @ Xa / NOISE**2 + eye
    q_a = DenseGaussian({"w": torch.linalg.solve(prec_a, Xa.T @ ya / NOISE**2)}, prec_a)
    w = torch.zeros(3, dtype=F64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=200, tolerance_grad=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = 0.5 * ((yb - Xb @ w) / NOISE).square().sum() + q_a.penalty({"w": w})
        loss.backward()
        return loss

    opt.step(closure)
    prec = X.T @ X / NOISE**2 + eye
    torch.testing.assert_close(w.detach(), torch.linalg.solve(prec, X.T @ y / NOISE**2))


def test_bad_input():
    q = DiagonalGaussian({"w": torch.zeros(2)}, {"w": torch.ones(2)})
    with pytest.raises(ValueError, match="lacks"):
        prior_from_posterior(q, supports={"v": constraints.positive})
    with pytest.raises(TypeError, match="GaussianPosterior"):
        prior_from_posterior(object())
    prior = prior_from_posterior(q)
    assert isinstance(prior, GaussianPrior) and prior.names == ["w"]
    with pytest.raises(KeyError):
        prior["v"]
    assert math.isfinite(float(prior.log_prob({"w": torch.zeros(2)})))
