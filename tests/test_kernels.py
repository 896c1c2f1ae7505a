"""The kernels through ``pyro.infer.MCMC`` on models with a known posterior."""

from __future__ import annotations

import math
import warnings

import arviz as az
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import MCMC
from pyro.ops.stats import effective_sample_size

from pyro_sgmcmc import (
    BAOAKernel,
    ModelError,
    NonFiniteError,
    SGHMCKernel,
    SGLDKernel,
    SGNHTKernel,
)

N, DIM = 600, 3


@pytest.fixture(scope="module")
def linreg():
    """Conjugate Bayesian linear regression: w ~ N(0, I), y ~ N(Xw, 1)."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(N, DIM, generator=g)
    y = X @ torch.tensor([1.0, -0.5, 0.25]) + torch.randn(N, generator=g)
    precision = X.T @ X + torch.eye(DIM)
    cov = torch.linalg.inv(precision)
    return X, y, cov @ X.T @ y, cov


def linreg_model(X, y):
    w = pyro.sample("w", dist.Normal(torch.zeros(X.shape[1]), 1.0).to_event(1))
    with pyro.plate("data", X.shape[0]) as idx:
        pyro.sample("obs", dist.Normal(X[idx] @ w, 1.0), obs=y[idx])


def run(kernel, *args, num_samples=3000, warmup_steps=1000, seed=0):
    pyro.set_rng_seed(seed)
    mcmc = MCMC(kernel, num_samples=num_samples, warmup_steps=warmup_steps, disable_progbar=True)
    mcmc.run(*args)
    return mcmc


# Tolerances: where a test does not measure the effective sample size itself, its
# chains have ESS ~400-700 per coordinate (Monte Carlo error of a mean <= 0.05
# posterior sd, of an sd <= 4%); the bounds are ~4 such errors plus the samplers'
# O(step) bias.
# Every kernel with its documented defaults.
KERNELS = {
    "sgld": lambda **kw: SGLDKernel(linreg_model, **kw),
    "sghmc": lambda **kw: SGHMCKernel(linreg_model, **kw),
    "sgnht": lambda **kw: SGNHTKernel(linreg_model, **kw),
    "baoa": lambda **kw: BAOAKernel(linreg_model, **kw),
}


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_conjugate_linear_regression_subsampled(linreg, name):
    X, y, mean, cov = linreg
    mcmc = run(KERNELS[name](subsample_size=30), X, y, num_samples=4000)
    w = mcmc.get_samples()["w"]
    sd = cov.diag().sqrt()
    ess = effective_sample_size(w.unsqueeze(0), chain_dim=0, sample_dim=1)
    assert ess.min() > 40, ess  # the chain mixes (SGLD: ESS ~50 in 4000 steps)
    # 4 Monte Carlo standard errors (1/sqrt(ESS) sd for a mean, 1/sqrt(2 ESS) for an
    # sd) plus 0.1 for the sampler's own bias.
    err = ((w.mean(0) - mean) / sd).abs()
    assert (err < 0.1 + 4 / ess.sqrt()).all(), (err, ess)
    ratio = w.std(0) / sd
    assert ((ratio - 1).abs() < 0.1 + 4 / (2 * ess).sqrt()).all(), (ratio, ess)


@pytest.mark.parametrize("subsample_size", [None, 30])
def test_sghmc_cold_posterior_halves_variance(linreg, subsample_size):
    X, y, mean, cov = linreg
    sd = cov.diag().sqrt()
    var, tol = {}, {}
    for temperature in (1.0, 0.5):
        kernel = SGHMCKernel(
            linreg_model,
            subsample_size=subsample_size,
            step_size=0.05,
            alpha=2.0,
            temperature=temperature,
        )
        w = run(kernel, X, y, num_samples=4000).get_samples()["w"]
        ess = effective_sample_size(w.unsqueeze(0), chain_dim=0, sample_dim=1)
        # T scales the covariance, so the mean error is measured in sqrt(T) sds.
        err = ((w.mean(0) - mean) / (sd * temperature**0.5)).abs()
        assert (err < 0.1 + 4 / ess.sqrt()).all(), (err, ess)
        var[temperature] = w.var(0) / cov.diag()
        tol[temperature] = (2 / ess).sqrt()  # relative Monte Carlo error of a variance
    assert ((var[1.0] - 1).abs() < 0.1 + 4 * tol[1.0]).all(), var[1.0]
    ratio = var[0.5] / var[1.0]
    bound = 0.5 * (0.1 + 4 * (tol[0.5] ** 2 + tol[1.0] ** 2).sqrt())
    assert ((ratio - 0.5).abs() < bound).all(), ratio


def test_constrained_positive_scale_matches_exact_posterior():
    """y ~ N(0, v), v ~ InverseGamma(a, b): the posterior is InverseGamma(a + n/2, b + S/2)."""
    g = torch.Generator().manual_seed(1)
    y = 2.0 * torch.randn(400, generator=g)
    a, b = 3.0, 2.0

    def model(y):
        v = pyro.sample("v", dist.InverseGamma(a, b))
        with pyro.plate("data", len(y)) as idx:
            pyro.sample("obs", dist.Normal(0.0, v.sqrt()), obs=y[idx])

    shape, rate = a + len(y) / 2, b + (y**2).sum() / 2
    exact_mean = rate / (shape - 1)
    exact_sd = exact_mean / math.sqrt(shape - 2)
    mcmc = run(SGHMCKernel(model, subsample_size=40, step_size=0.02), y, num_samples=4000)
    v = mcmc.get_samples()["v"]
    assert (v > 0).all()
    assert abs(v.mean() - exact_mean) < 0.3 * exact_sd
    assert 0.8 < v.std() / exact_sd < 1.25


def test_summary_arviz_and_diagnostics(linreg, capsys):
    X, y, _, _ = linreg
    mcmc = run(
        SGHMCKernel(linreg_model, subsample_size=30, thinning=2),
        X,
        y,
        num_samples=200,
        warmup_steps=200,
    )
    mcmc.summary()
    assert "n_eff" in capsys.readouterr().out
    diag = mcmc.diagnostics()
    assert diag["divergences"] == {"chain 0": []}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        idata = az.from_pyro(mcmc)
    assert idata.posterior["w"].shape == (1, 200, DIM)
    assert not idata.sample_stats["diverging"].values.any()
    # Thinning: 200 warm-up steps + 200 draws x 2 steps.
    assert mcmc.kernel._t == 200 + 2 * 200
    log = mcmc.kernel.logging()
    assert set(log) == {"step size", "U", "nonfinite", "warm-up"}
    assert log["warm-up"] == "ok"
    assert all(isinstance(v, str) for v in log.values())


def test_reproducible_with_pyro_seed(linreg):
    X, y, _, _ = linreg
    draws = [
        run(
            SGHMCKernel(linreg_model, subsample_size=30),
            X,
            y,
            num_samples=50,
            warmup_steps=50,
            seed=s,
        ).get_samples()["w"]
        for s in (3, 3, 4)
    ]
    assert torch.equal(draws[0], draws[1])
    assert not torch.equal(draws[0], draws[2])


def test_potential_fn_mode_gaussian():
    prec = torch.tensor([[2.0, 0.6], [0.6, 1.0]])

    def potential_fn(params):
        x = params["x"]
        return 0.5 * x @ prec @ x

    kernel = SGHMCKernel(potential_fn=potential_fn, step_size=0.1, alpha=2.0)
    pyro.set_rng_seed(0)
    mcmc = MCMC(
        kernel,
        num_samples=6000,
        warmup_steps=500,
        disable_progbar=True,
        initial_params={"x": torch.zeros(2)},
    )
    mcmc.run()
    x = mcmc.get_samples()["x"]
    cov = torch.linalg.inv(prec)
    assert (x.mean(0) / cov.diag().sqrt()).abs().max() < 0.2
    torch.testing.assert_close(torch.cov(x.T), cov, atol=0.12, rtol=0.12)


def test_temperature_zero_is_the_optimiser(linreg):
    """At T = 0, SGLD is SGD: full batch it converges to the MAP."""
    X, y, mean, _ = linreg
    kernel = SGLDKernel(linreg_model, step_size=0.5, temperature=0.0)
    w = run(kernel, X, y, num_samples=10, warmup_steps=300).get_samples()["w"]
    # The MAP of the conjugate model is its posterior mean.
    torch.testing.assert_close(w[-1], mean, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- errors, not wrong answers
def setup_kernel(kernel, *args):
    kernel.setup(10, *args)
    return kernel


def test_error_discrete_latent():
    def model(y):
        z = pyro.sample("z", dist.Bernoulli(0.5))
        with pyro.plate("data", len(y)) as idx:
            pyro.sample("obs", dist.Normal(z, 1.0), obs=y[idx])

    with pytest.raises(ModelError, match="'z' is discrete"):
        setup_kernel(SGHMCKernel(model, subsample_size=5), torch.randn(20))


def test_error_local_latent_in_subsampled_plate():
    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(y)) as idx:
            z = pyro.sample("z", dist.Normal(mu, 1.0))
            pyro.sample("obs", dist.Normal(z, 1.0), obs=y[idx])

    with pytest.raises(ModelError, match="local .*latents are not supported"):
        setup_kernel(SGHMCKernel(model, subsample_size=5), torch.randn(20))
    # Full batch, a local latent is just another latent.
    setup_kernel(SGHMCKernel(model), torch.randn(20))


def test_error_observed_data_not_indexed_by_plate():
    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(y)):
            pyro.sample("obs", dist.Normal(mu, 1.0), obs=y)

    with pytest.raises(ModelError, match=r"obs=y\[idx\]"):
        setup_kernel(SGHMCKernel(model, subsample_size=5), torch.randn(20))


def test_error_covariates_not_indexed_by_plate():
    def model(X, y):
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(y)) as idx:
            pyro.sample("obs", dist.Normal(X * w, 1.0), obs=y[idx])

    with pytest.raises(ModelError, match="indexed with the plate's indices"):
        setup_kernel(SGHMCKernel(model, subsample_size=5), torch.randn(20), torch.randn(20))


def test_error_subsample_larger_than_plate():
    with pytest.raises(ModelError, match=r"subsample_size=50 must lie in \[1, 20\]"):
        setup_kernel(
            SGHMCKernel(linreg_model, subsample_size=50), torch.randn(20, 2), torch.randn(20)
        )


def test_error_no_data_plate_with_subsample_size():
    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        pyro.sample("obs", dist.Normal(mu, 1.0).expand([len(y)]).to_event(1), obs=y)

    with pytest.raises(ModelError, match="no data plate"):
        setup_kernel(SGHMCKernel(model, subsample_size=5), torch.randn(20))


def test_error_nonfinite_potential_names_site():
    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(y)) as idx:
            pyro.sample("obs", dist.Normal(mu, 1.0), obs=y[idx])

    y = torch.randn(20)
    y[3] = float("nan")  # missing data coded as NaN: caught by the set-up data check
    with pytest.raises(ModelError, match="'obs'.*data row 3"):
        setup_kernel(SGHMCKernel(model), y)


def test_error_invalid_distribution_parameters_at_setup():
    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(y)) as idx:
            pyro.sample("obs", dist.Normal(mu, -1.0), obs=y[idx])

    with pytest.raises(ModelError, match="scale"):
        setup_kernel(SGHMCKernel(model, subsample_size=5), torch.randn(20))


def test_error_divergence_mid_run_names_step_and_site(linreg):
    X, y, _, _ = linreg
    kernel = SGLDKernel(
        linreg_model, subsample_size=30, step_size=50.0, max_divergences=3, adapt_mass_matrix=False
    )
    with pytest.raises(NonFiniteError, match=r"at step \d+ \(warm-up\).*'obs'"):
        run(kernel, X, y, num_samples=10, warmup_steps=200)


def test_divergences_are_counted_within_budget(linreg):
    X, y, _, _ = linreg
    kernel = SGLDKernel(
        linreg_model,
        subsample_size=30,
        step_size=3.0,
        max_divergences=10**6,
        adapt_mass_matrix=False,
    )
    mcmc = run(kernel, X, y, num_samples=50, warmup_steps=10)
    divergences = mcmc.diagnostics()["divergences"]["chain 0"]
    assert len(divergences) > 0 and all(0 <= i < 50 for i in divergences)
    assert torch.isfinite(mcmc.get_samples()["w"]).all()


def test_error_argument_validation():
    with pytest.raises(ValueError, match="exactly one"):
        SGHMCKernel()
    with pytest.raises(ValueError, match="temperature"):
        SGHMCKernel(linreg_model, temperature=-1.0)
    with pytest.raises(ValueError, match="beta"):
        SGHMCKernel(linreg_model, beta="often")
    with pytest.raises(ValueError, match="initial_params"):
        setup_kernel(SGHMCKernel(potential_fn=lambda p: p["x"].sum()))


def test_unknown_noise_scale_normal_inverse_gamma_exact():
    """y ~ N(Xw, s2), w | s2 ~ N(0, s2 I), s2 ~ InverseGamma(a, b): conjugate, so
    E[w] = m_n, E[s2] = b_n / (a_n - 1), Var[w] = b_n / (a_n - 1) V_n exactly; the
    positive scale couples with w, and the default kernels start from init_to_uniform,
    where s2 can be far off (the warm-up must not diverge)."""
    g = torch.Generator().manual_seed(5)
    n, a, b = 1500, 2.0, 1.0
    X = torch.randn(n, 2, generator=g, dtype=torch.float64)
    y = X @ torch.tensor([1.0, -2.0], dtype=torch.float64) + 0.7 * torch.randn(
        n, generator=g, dtype=torch.float64
    )

    def model(X, y):
        s2 = pyro.sample("s2", dist.InverseGamma(torch.tensor(a, dtype=X.dtype), b))
        w = pyro.sample("w", dist.Normal(X.new_zeros(2), s2.sqrt()).to_event(1))
        with pyro.plate("data", X.shape[0]) as idx:
            pyro.sample("obs", dist.Normal(X[idx] @ w, s2.sqrt()), obs=y[idx])

    v_n = torch.linalg.inv(X.T @ X + torch.eye(2, dtype=X.dtype))
    m_n = v_n @ X.T @ y
    a_n = a + n / 2
    b_n = b + 0.5 * (y @ y - m_n @ torch.linalg.inv(v_n) @ m_n)
    s2_mean = b_n / (a_n - 1)
    w_sd = (s2_mean * v_n.diag()).sqrt()
    s2_sd = s2_mean / (a_n - 2) ** 0.5
    for kernel in (SGHMCKernel(model, subsample_size=32), BAOAKernel(model, subsample_size=32)):
        s = run(kernel, X, y, num_samples=3000, warmup_steps=700).get_samples()
        assert ((s["w"].mean(0) - m_n) / w_sd).abs().max() < 0.3
        assert abs(s["s2"].mean() - s2_mean) < 0.3 * s2_sd
        ratio = s["w"].std(0) / w_sd
        assert ratio.min() > 0.8 and ratio.max() < 1.25, ratio
        assert 0.75 < s["s2"].std() / s2_sd < 1.3


def test_stiff_model_without_a_data_plate_is_preconditioned_by_its_curvature():
    """No plate, so no empirical Fisher: the initial buffer preconditions with the
    Hessian's diagonal (Hutchinson). Scales 0.01 and 10 at the default step size used to
    diverge at warm-up step 26 (step_size * h = 1e3 on the stiff coordinate)."""

    def stiff():
        pyro.sample("x", dist.Normal(torch.zeros(2), torch.tensor([0.01, 10.0])).to_event(1))

    for kernel, bias in ((BAOAKernel(stiff), 0.1), (SGHMCKernel(stiff), 0.25)):
        pyro.set_rng_seed(0)
        mcmc = MCMC(kernel, num_samples=3000, warmup_steps=1000, disable_progbar=True)
        mcmc.run()
        x = mcmc.get_samples()["x"]
        ess = effective_sample_size(x.unsqueeze(0), chain_dim=0, sample_dim=1)
        ratio = x.std(0) / torch.tensor([0.01, 10.0])
        # SGHMC's O(step) bias is larger than BAOA's (exact for Gaussians).
        assert ((ratio - 1).abs() < bias + 4 / (2 * ess).sqrt()).all(), (ratio, ess)
