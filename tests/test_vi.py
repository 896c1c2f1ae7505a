"""Tempered Gaussian VI with the sticking-the-landing gradient, against exact posteriors.

The target is conjugate Bayesian linear regression, ``y ~ N(Xw, s^2)``, ``w ~ N(0, a^2 I)``
(float64), whose posterior is ``N(m, A^{-1})`` with ``A = X^T X / s^2 + I / a^2``. At
temperature ``T`` the target ``p^{1/T}`` is ``N(m, T A^{-1})``: dense VI must find it
exactly, diagonal VI the mean-field solution ``N(m, T / diag(A))``.
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import (
    AutoDelta,
    AutoDiagonalNormal,
    AutoLaplaceApproximation,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
)
from torch.utils.data import DataLoader, TensorDataset

from pyro_sgmcmc.curvature import flatten
from pyro_sgmcmc.gaussian import DenseGaussian, DiagonalGaussian
from pyro_sgmcmc.nn import ModulePotential, normal_log_likelihood
from pyro_sgmcmc.potential import ModelError, PyroPotential
from pyro_sgmcmc.vi import (
    GaussianVI,
    TemperedSTLELBO,
    VIState,
    fit_svi,
    gaussian_from_guide,
    vi_entropy,
    vi_init,
    vi_log_prob,
    vi_loss,
    vi_posterior,
)

F64 = torch.float64
N, D, S, A_PRIOR = 50, 3, 1.0, 1.0


def _regression(n=N, mix=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.tensor([[1.0, 0.5, 0.0], [0.0, 1.0, 0.3], [0.0, 0.0, 1.0]]) if mix is None else mix
    X = (torch.randn(n, D, generator=g) @ mix).to(F64)
    y = X @ torch.tensor([0.5, -0.5, 0.25], dtype=F64) + S * torch.randn(n, generator=g).to(F64)
    A = X.T @ X / S**2 + torch.eye(D, dtype=F64) / A_PRIOR**2
    m = torch.linalg.solve(A, X.T @ y / S**2)
    return X, y, A, m


def _potential(p, batch):
    x, t = batch
    return 0.5 * ((t - x @ p["w"]) ** 2).mean() / S**2 + 0.5 * (p["w"] ** 2).sum() / A_PRIOR**2 / N


def _model(X, y, subsample_size=None):
    w = pyro.sample("w", dist.Normal(X.new_zeros(D), A_PRIOR).to_event(1))
    with pyro.plate("data", X.shape[0], subsample_size=subsample_size) as idx:
        pyro.sample("obs", dist.Normal(X[idx] @ w, S), obs=y[idx])


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


# ---------------------------------------------------------------------- PyTorch path
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_dense_vi_is_the_exact_tempered_posterior(temperature):
    X, y, A, m = _regression()
    vi = GaussianVI(
        _potential,
        {"w": torch.zeros(D, dtype=F64)},
        num_data=N,
        dense=True,
        temperature=temperature,
        lr=0.01,
        init_scale=0.1,
        generator=torch.Generator().manual_seed(1),
    )
    vi.fit([(X, y)], num_epochs=1000)  # constant step: STL's noise vanishes at the optimum
    q = vi.posterior()
    assert isinstance(q, DenseGaussian)
    cov = temperature * torch.linalg.inv(A)
    assert _rel(q.mean["w"], m) < 1e-6
    assert _rel(q.covariance(), cov) < 1e-6


def test_diagonal_vi_is_the_mean_field_solution():
    X, y, A, m = _regression()
    vi = GaussianVI(
        _potential,
        {"w": torch.zeros(D, dtype=F64)},
        num_data=N,
        lr=0.05,
        init_scale=0.1,
        num_samples=64,
        generator=torch.Generator().manual_seed(1),
    )
    sched = torch.optim.lr_scheduler.ExponentialLR(vi.optimizer, 1e-3 ** (1 / 1000))
    for _ in range(1000):
        vi.step((X, y))
        sched.step()
    q = vi.posterior()
    assert isinstance(q, DiagonalGaussian)
    sd = torch.linalg.inv(A).diagonal().sqrt()
    assert ((q.mean["w"] - m) / sd).abs().max() < 0.05
    torch.testing.assert_close(q.precision["w"], A.diagonal(), rtol=0.03, atol=0)


def test_minibatch_vi_of_a_module_matches_the_posterior():
    X, y, A, m = _regression(n=200, seed=3)
    net = torch.nn.Linear(D, 1, bias=False).to(F64)
    pot = ModulePotential(
        net,
        normal_log_likelihood(S),
        prior=A_PRIOR,
        num_data=200,
        output_transform=lambda out: out.squeeze(-1),
    )
    torch.manual_seed(0)
    loader = DataLoader(TensorDataset(X, y), batch_size=50, shuffle=True)
    vi = GaussianVI(
        pot, dense=True, lr=0.02, num_samples=8, generator=torch.Generator().manual_seed(0)
    )
    sched = torch.optim.lr_scheduler.ExponentialLR(vi.optimizer, 0.05 ** (1 / 200))
    for _ in range(200):
        vi.fit(loader)
        sched.step()
    q = vi.posterior()
    cov = torch.linalg.inv(A)
    sd = cov.diagonal().sqrt()
    assert list(q.mean) == ["weight"]
    assert ((q.mean["weight"][0] - m) / sd).abs().max() < 0.1
    torch.testing.assert_close(q.stddev()["weight"][0], sd, rtol=0.08, atol=0)
    assert _rel(q.covariance(), cov) < 0.15


def _state_at(posterior, dense):
    state = vi_init(posterior, dense=dense)
    mean = {k: v.clone().requires_grad_(True) for k, v in state.mean.items()}
    if dense:
        raw = state.raw_scale.clone().requires_grad_(True)
        return VIState(mean, raw), [*mean.values(), raw]
    raw = {k: v.clone().requires_grad_(True) for k, v in state.raw_scale.items()}
    return VIState(mean, raw), [*mean.values(), *raw.values()]


@pytest.mark.parametrize("temperature", [1.0, 0.3])
def test_stl_gradient_is_zero_at_the_optimum_and_the_standard_one_is_not(temperature):
    X, y, A, m = _regression()
    exact = DenseGaussian({"w": m}, A / temperature)
    state, leaves = _state_at(exact, dense=True)
    stl, analytic = [], []
    for seed in range(10):
        for flag, out in ((True, stl), (False, analytic)):
            g = torch.Generator().manual_seed(seed)
            loss = vi_loss(
                state,
                _potential,
                (X, y),
                num_data=N,
                temperature=temperature,
                generator=g,
                stl=flag,
            )
            grads = torch.autograd.grad(loss, leaves)
            out.append(max(t.abs().max().item() for t in grads))
    assert max(stl) < 1e-12
    assert min(analytic) > 1e-3


def test_stl_is_unbiased():
    """Away from the optimum, both estimators average to the same gradient."""
    X, y, A, m = _regression()
    start = DenseGaussian({"w": m + 0.3}, 0.5 * A)
    state, leaves = _state_at(start, dense=True)
    means = []
    for flag in (True, False):
        g = torch.Generator().manual_seed(0)
        loss = vi_loss(
            state, _potential, (X, y), num_data=N, num_samples=40_000, generator=g, stl=flag
        )
        means.append(flatten(dict(enumerate(torch.autograd.grad(loss, leaves)))))
    # the gradients differ by the score term's Monte Carlo average, O(1/sqrt(S)) of O(1/N)
    assert (means[0] - means[1]).abs().max() < 2e-3
    assert means[0].abs().max() > 1e-2


def test_zero_temperature_drops_the_entropy():
    X, y, _, m = _regression()
    state = vi_init({"w": m}, init_scale=1e-3)
    g = torch.Generator().manual_seed(0)
    loss = vi_loss(state, _potential, (X, y), num_data=N, temperature=0.0, generator=g)
    draws = torch.randn(1, D, generator=torch.Generator().manual_seed(0), dtype=F64)
    torch.testing.assert_close(loss, _potential({"w": m + 1e-3 * draws[0]}, (X, y)))


@pytest.mark.parametrize("dense", [True, False])
def test_log_prob_entropy_and_round_trip(dense):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 4, generator=g, dtype=F64)
    prec = a @ a.T + 4 * torch.eye(4, dtype=F64)
    mean = {
        "w": torch.randn(3, generator=g, dtype=F64),
        "b": torch.randn(1, generator=g, dtype=F64),
    }
    q = (
        DenseGaussian(mean, prec)
        if dense
        else DiagonalGaussian(mean, {"w": prec.diagonal()[:3], "b": prec.diagonal()[3:]})
    )
    state = vi_init(q, dense=dense)
    back = vi_posterior(state)
    torch.testing.assert_close(back.precision_matrix(), q.precision_matrix())
    ref = q.to_distribution()
    x = ref.sample((5,))
    draws = {"w": x[:, :3], "b": x[:, 3:]}
    torch.testing.assert_close(vi_log_prob(state, draws), ref.log_prob(x))
    torch.testing.assert_close(vi_entropy(state), ref.entropy())


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="temperature"):
        vi_loss(vi_init({"w": torch.zeros(1)}), _potential, None, num_data=1, temperature=-1.0)
    with pytest.raises(ValueError, match="num_data"):
        GaussianVI(_potential, {"w": torch.zeros(1)})
    with pytest.raises(ValueError, match="scalar"):
        vi_loss(vi_init({"w": torch.zeros(2)}), lambda p, b: p["w"], None, num_data=1)
    with pytest.raises(TypeError, match="VIState"):
        vi_posterior({"w": torch.zeros(1)})
    with pytest.raises(ValueError, match="init_scale"):
        vi_init({"w": torch.zeros(1)}, init_scale=0.0)


# ---------------------------------------------------------------------- Pyro: the ELBO
def _set_mvn(guide, mean, cov):
    chol = torch.linalg.cholesky(cov)
    d = chol.diagonal()
    with torch.no_grad():
        guide.loc.copy_(mean)
    guide.scale = d.clone()
    guide.scale_tril = chol / d.unsqueeze(-1)


def _max_grad(elbo, model, guide, *args):
    loss = elbo.differentiable_loss(model, guide, *args)
    params = [p for p in guide.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return max(g.abs().max().item() for g in grads if g is not None)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_pyro_stl_gradient_is_zero_at_the_optimum(temperature):
    X, y, A, m = _regression()
    pyro.clear_param_store()
    guide = AutoMultivariateNormal(_model)
    guide(X, y)
    _set_mvn(guide, m, temperature * torch.linalg.inv(A))
    stl = [_max_grad(TemperedSTLELBO(temperature), _model, guide, X, y) for _ in range(5)]
    assert max(stl) < 1e-10
    if temperature == 1.0:
        usual = [_max_grad(Trace_ELBO(), _model, guide, X, y) for _ in range(5)]
        assert min(usual) > 1e-2


def test_pyro_stl_keeps_the_path_through_jacobians_and_upstream_draws():
    """q = p exactly, with a constrained site (a log-Jacobian in the guide) and a guide
    site whose distribution depends on an upstream draw: every STL gradient is zero."""

    def model():
        s = pyro.sample("s", dist.LogNormal(0.0, 1.0))
        z = pyro.sample("z", dist.Normal(0.5 * s.log(), 1.0))
        pyro.sample("u", dist.Normal(z, 2.0))

    def guide():
        loc = pyro.param("loc", torch.tensor(0.0, dtype=F64))
        scale = pyro.param("scale", torch.tensor(1.0, dtype=F64))
        coef = pyro.param("coef", torch.tensor(0.5, dtype=F64))
        s = pyro.sample("s", dist.LogNormal(loc, scale))
        z = pyro.sample("z", dist.Normal(coef * s.log(), 1.0))
        pyro.sample("u", dist.Normal(z, 2.0))

    pyro.clear_param_store()
    elbo = TemperedSTLELBO()
    for _ in range(5):
        loss = elbo.differentiable_loss(model, guide)
        grads = torch.autograd.grad(
            loss, [pyro.param(k).unconstrained() for k in ("loc", "scale", "coef")]
        )
        assert max(g.abs().item() for g in grads) < 1e-12
        assert abs(loss.item()) < 1e-12  # log p - log q = 0 for every draw
    pyro.clear_param_store()
    auto = AutoNormal(lambda: pyro.sample("s", dist.LogNormal(0.0, 1.0)), init_scale=1.0)
    auto()
    with torch.no_grad():
        auto.locs.s = torch.tensor(0.0)
    for _ in range(5):
        assert _max_grad(elbo, lambda: pyro.sample("s", dist.LogNormal(0.0, 1.0)), auto) < 1e-6


def test_pyro_loss_is_the_tempered_elbo():
    X, y, A, m = _regression()
    pyro.clear_param_store()
    guide = AutoNormal(_model)
    guide(X, y)
    for temperature in (1.0, 0.25):
        pyro.set_rng_seed(0)
        loss = TemperedSTLELBO(temperature).loss(_model, guide, X, y)
        pyro.set_rng_seed(0)
        guide_tr = pyro.poutine.trace(guide).get_trace(X, y)
        model_tr = pyro.poutine.trace(pyro.poutine.replay(_model, guide_tr)).get_trace(X, y)
        expected = -(model_tr.log_prob_sum() - temperature * guide_tr.log_prob_sum())
        assert loss == pytest.approx(expected.item(), rel=1e-10)
        pyro.set_rng_seed(0)
        diff = TemperedSTLELBO(temperature).differentiable_loss(_model, guide, X, y)
        assert diff.item() == pytest.approx(expected.item(), rel=1e-10)


def test_pyro_full_batch_dense_svi_is_the_exact_cold_posterior():
    X, y, A, m = _regression()
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    fit = fit_svi(_model, (X, y), guide="dense", temperature=0.5, num_steps=600, lr=0.05)
    q = fit.posterior
    assert isinstance(q, DenseGaussian) and list(q.mean) == ["w"]
    assert _rel(q.mean["w"], m) < 1e-3
    assert _rel(q.covariance(), 0.5 * torch.linalg.inv(A)) < 1e-3
    assert fit.losses.shape == (600,)


def test_pyro_subsampled_svi_matches_the_posterior():
    """Minibatches of the plate's indices (fit_svi) and Pyro's own subsampling plate."""
    X, y, A, m = _regression()
    cov = torch.linalg.inv(A)
    sd = cov.diagonal().sqrt()
    steps = 600
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    fit = fit_svi(
        _model,
        (X, y),
        guide="dense",
        num_steps=steps,
        optim=pyro.optim.ExponentialLR(
            {
                "optimizer": torch.optim.Adam,
                "optim_args": {"lr": 0.05},
                "gamma": 0.01 ** (1 / steps),
            }
        ),
        subsample_size=25,
        generator=torch.Generator().manual_seed(0),
    )
    assert ((fit.posterior.mean["w"] - m) / sd).abs().max() < 0.1
    torch.testing.assert_close(fit.posterior.stddev()["w"], sd, rtol=0.1, atol=0)

    pyro.clear_param_store()
    pyro.set_rng_seed(1)
    guide = AutoNormal(_model)
    optim = pyro.optim.ClippedAdam({"lr": 0.05, "lrd": 0.01 ** (1 / steps), "clip_norm": math.inf})
    svi = SVI(_model, guide, optim, TemperedSTLELBO())
    for _ in range(steps):
        svi.step(X, y, subsample_size=25)
    q = gaussian_from_guide(guide)  # mean field: the exact mean, precision diag(A)
    assert ((q.mean["w"] - m) / sd).abs().max() < 0.25
    torch.testing.assert_close(q.precision["w"], A.diagonal(), rtol=0.12, atol=0)


def test_pyro_stl_with_vectorised_particles():
    y = torch.linspace(-1.0, 2.0, 20, dtype=F64)

    def model(y):
        mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=F64), 10.0))
        with pyro.plate("data", len(y)):
            pyro.sample("obs", dist.Normal(mu, 1.0), obs=y)

    prec = 20 + 0.01
    pyro.clear_param_store()
    guide = AutoNormal(model, init_scale=prec**-0.5)
    guide(y)
    guide.locs.mu = y.sum() / prec
    stl = TemperedSTLELBO(num_particles=8, vectorize_particles=True)
    assert _max_grad(stl, model, guide, y) < 1e-10
    usual = Trace_ELBO(num_particles=8, vectorize_particles=True)
    assert _max_grad(usual, model, guide, y) > 1e-3
    assert math.isfinite(stl.loss(model, guide, y))


def test_fit_svi_needs_the_plate_indices():
    X, y, _, _ = _regression()

    def bad(X, y):
        w = pyro.sample("w", dist.Normal(X.new_zeros(D), 1.0).to_event(1))
        with pyro.plate("data", X.shape[0]):
            pyro.sample("obs", dist.Normal(X @ w, 1.0), obs=y)

    with pytest.raises(ModelError, match="idx"):
        fit_svi(bad, (X, y), num_steps=1, subsample_size=10)


def test_non_reparameterisable_guide_site_raises():
    def model():
        pyro.sample("k", dist.Bernoulli(0.3))

    def guide():
        pyro.sample("k", dist.Bernoulli(pyro.param("p", torch.tensor(0.5))))

    pyro.clear_param_store()
    with pytest.raises(ValueError, match="reparameterised"):
        TemperedSTLELBO().differentiable_loss(model, guide)


# ---------------------------------------------------------------------- Pyro: guides
def _two_site_model():
    pyro.sample("s", dist.LogNormal(0.0, 1.0))
    pyro.sample("w", dist.Normal(torch.zeros(2, 2, dtype=F64), 1.0).to_event(2))


@pytest.mark.parametrize(
    "cls", [AutoNormal, AutoDiagonalNormal, AutoMultivariateNormal, AutoLowRankMultivariateNormal]
)
def test_gaussian_from_guide_matches_the_guide(cls):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = cls(_two_site_model, init_scale=0.3)
    guide()
    q = gaussian_from_guide(guide)
    assert list(q.mean) == ["s", "w"]
    assert q.mean["s"].shape == () and q.mean["w"].shape == (2, 2)
    assert isinstance(
        q, DiagonalGaussian if cls in (AutoNormal, AutoDiagonalNormal) else DenseGaussian
    )
    # the guide's draws, in unconstrained space, have q's moments
    pot = PyroPotential(_two_site_model)
    with torch.no_grad():
        draws = [pot.unconstrain(guide()) for _ in range(1000)]
    flat = torch.stack([flatten(d) for d in draws])
    assert (flat.mean(0) - flatten(q.mean)).abs().max() < 0.05
    torch.testing.assert_close(torch.cov(flat.T), q.covariance(), atol=0.02, rtol=0.1)


def test_gaussian_from_guide_errors():
    pyro.clear_param_store()
    with pytest.raises(ValueError, match="not been run"):
        gaussian_from_guide(AutoNormal(_two_site_model))
    delta = AutoDelta(_two_site_model)
    delta()
    with pytest.raises(TypeError, match="not a Gaussian"):
        gaussian_from_guide(delta)
    laplace = AutoLaplaceApproximation(_two_site_model)
    laplace()
    with pytest.raises(TypeError, match="laplace_approximation"):
        gaussian_from_guide(laplace)


def test_gaussian_vi_runs_on_a_pyro_potential():
    X, y, A, m = _regression()
    pot = PyroPotential(
        _model, (X, y), subsample_size=25, generator=torch.Generator().manual_seed(0)
    )
    vi = GaussianVI(pot, {"w": torch.zeros(D, dtype=F64)}, lr=0.05, init_scale=0.1)
    vi.fit([pot.next_indices() for _ in range(200)])
    q = vi.posterior()
    assert list(q.mean) == ["w"]
    assert ((q.mean["w"] - m) / torch.linalg.inv(A).diagonal().sqrt()).abs().max() < 1.0
    assert math.isfinite(q.log_det_precision().item())
