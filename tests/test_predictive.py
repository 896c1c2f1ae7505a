"""Linearised and Monte Carlo predictives, link approximations, uncertainty decomposition."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pyro_sgmcmc.curvature import Likelihood, flatten, module_fn, unflatten
from pyro_sgmcmc.datasets import logistic_regression_model
from pyro_sgmcmc.gaussian import DenseGaussian, DiagonalGaussian, GaussianPosterior
from pyro_sgmcmc.predictive import (
    FunctionGaussian,
    decompose_uncertainty,
    linearized_predictive,
    mc_predictive,
    predictive_distribution,
    pyro_predictive_distributions,
)

D, C = 3, 2  # inputs, outputs of the linear model


class _Generic(GaussianPosterior):
    """A posterior that is neither diagonal nor dense: the covariance() fallback path."""

    def __init__(self, inner: DenseGaussian) -> None:
        self.inner, self.mean = inner, inner.mean

    def variance(self):
        return self.inner.variance()

    def covariance(self):
        return self.inner.covariance()

    def precision_matrix(self):
        return self.inner.precision_matrix()

    def _whitened_to_flat(self, z):
        return self.inner._whitened_to_flat(z)

    def _mahalanobis(self, delta):
        return self.inner._mahalanobis(delta)

    def log_det_precision(self):
        return self.inner.log_det_precision()

    def tempered(self, temperature):
        return _Generic(self.inner.tempered(temperature))


def _posterior(kind: str, mean: dict, seed: int = 0) -> GaussianPosterior:
    g = torch.Generator().manual_seed(seed)
    p = sum(v.numel() for v in mean.values())
    if kind == "diagonal":
        prec = {k: 0.5 + torch.rand(v.shape, generator=g, dtype=v.dtype) for k, v in mean.items()}
        return DiagonalGaussian(mean, prec)
    a = torch.randn(p, p, generator=g, dtype=torch.float64)
    dense = DenseGaussian(mean, a @ a.T / p + 0.5 * torch.eye(p, dtype=torch.float64))
    return dense if kind == "dense" else _Generic(dense)


def _linear_fn(params, x):
    return x @ params["w"] + params["b"]


def _linear_case(kind: str):
    g = torch.Generator().manual_seed(1)
    mean = {
        "w": torch.randn(D, C, generator=g, dtype=torch.float64),
        "b": torch.randn(C, generator=g, dtype=torch.float64),
    }
    x = torch.randn(5, D, generator=g, dtype=torch.float64)
    return _posterior(kind, mean), x


def _design(x: torch.Tensor) -> torch.Tensor:
    """Phi(x) with f(x) = Phi(x) theta over flatten order [vec_r(w), b]: (B, C, D*C + C)."""
    eye = torch.eye(C, dtype=x.dtype)
    return torch.stack([torch.cat([torch.kron(xi.unsqueeze(0), eye), eye], dim=1) for xi in x])


KINDS = ["diagonal", "dense", "generic"]


@pytest.mark.parametrize("kind", KINDS)
def test_linear_model_is_exact(kind):
    q, x = _linear_case(kind)
    phi = _design(x)
    sigma = q.covariance()
    fg = linearized_predictive(_linear_fn, q, x, chunk_size=2)
    torch.testing.assert_close(fg.mean, _linear_fn(q.mean, x))
    torch.testing.assert_close(fg.covariance, phi @ sigma @ phi.transpose(1, 2))
    torch.testing.assert_close(fg.variance, fg.covariance.diagonal(dim1=1, dim2=2))
    only_var = linearized_predictive(_linear_fn, q, x, full_covariance=False)
    assert only_var.covariance is None
    torch.testing.assert_close(only_var.variance, fg.variance)


@pytest.mark.parametrize("kind", ["diagonal", "dense"])
def test_mc_predictive_of_a_gaussian_matches_the_linearised_one_for_a_linear_model(kind):
    q, x = _linear_case(kind)
    fg = linearized_predictive(_linear_fn, q, x)
    s = 40_000
    pred = mc_predictive(
        _linear_fn, q, x, num_samples=s, generator=torch.Generator().manual_seed(2), chunk_size=4096
    )
    assert pred.outputs.shape == (s, 5, C)
    # Monte Carlo standard errors: sqrt(C_kk / S) for the mean, sqrt((C_kk C_ll + C_kl^2) / S)
    # for the covariance.
    cov = fg.covariance
    se_mean = (fg.variance / s).sqrt()
    assert ((pred.mean - fg.mean).abs() <= 5 * se_mean).all()
    centred = pred.outputs - pred.outputs.mean(0)
    emp = torch.einsum("sbk,sbl->bkl", centred, centred) / (s - 1)
    v = cov.diagonal(dim1=1, dim2=2)
    se_cov = ((v.unsqueeze(-1) * v.unsqueeze(-2) + cov.square()) / s).sqrt()
    assert ((emp - cov).abs() <= 5 * se_cov).all()


def _mlp_case(kind: str):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    net = net.double()
    mean = {k: v.detach().clone() for k, v in net.named_parameters()}
    x = torch.randn(7, 2, dtype=torch.float64)
    return module_fn(net), _posterior(kind, mean, seed=3), x


def _dense_jacobian(fn, params, x) -> torch.Tensor:
    """(B, K, P) by differentiating the whole batch's outputs wrt the flat parameters."""
    mu = flatten(params)
    jac = torch.autograd.functional.jacobian(lambda t: fn(unflatten(t, params), x), mu)
    return jac.reshape(x.shape[0], -1, mu.numel())


@pytest.mark.parametrize("kind", KINDS)
def test_nonlinear_model_covariance_is_j_sigma_jt(kind):
    fn, q, x = _mlp_case(kind)
    j = _dense_jacobian(fn, q.mean, x)
    expected = j @ q.covariance() @ j.transpose(1, 2)
    fg = linearized_predictive(fn, q, x, chunk_size=3)
    assert fg.mean.shape == (7, 3) and fg.covariance.shape == (7, 3, 3)
    torch.testing.assert_close(fg.covariance, expected)
    torch.testing.assert_close(fg.mean, fn(q.mean, x).detach())


@pytest.mark.parametrize("method", ["exact", "sampled"])
def test_last_layer_posterior_of_a_module(method):
    """A posterior over a subset of a module's parameters; the result is off the graph."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    fn, x = module_fn(net), torch.randn(5, 2)
    last = {k: v for k, v in net.named_parameters() if k.startswith("2.")}
    q = DiagonalGaussian(last, {k: torch.full_like(v, 4.0) for k, v in last.items()})
    fg = linearized_predictive(fn, q, x, method=method, generator=torch.Generator())
    assert not fg.mean.requires_grad and not fg.covariance.requires_grad
    # logits are linear in the last layer: Cov = (|h|^2 + 1) / 4 * I for features h
    h = net[1](net[0](x)).detach()
    expected = ((h.square().sum(-1) + 1) / 4)[:, None, None] * torch.eye(3)
    if method == "exact":
        torch.testing.assert_close(fg.covariance, expected)
    else:
        assert ((fg.covariance - expected).abs() < 0.5 * expected.amax()).all()


@pytest.mark.parametrize("kind", ["diagonal", "generic"])
def test_sampled_method_is_within_monte_carlo_error_of_exact(kind):
    fn, q, x = _mlp_case(kind)
    exact = linearized_predictive(fn, q, x)
    s = 4000
    sampled = linearized_predictive(
        fn, q, x, method="sampled", num_samples=s, generator=torch.Generator().manual_seed(0),
        chunk_size=1000,
    )  # fmt: skip
    torch.testing.assert_close(sampled.mean, exact.mean)
    cov = exact.covariance
    v = cov.diagonal(dim1=1, dim2=2)
    se = ((v.unsqueeze(-1) * v.unsqueeze(-2) + cov.square()) / s).sqrt()
    assert ((sampled.covariance - cov).abs() <= 5 * se).all()
    only_var = linearized_predictive(
        fn, q, x, method="sampled", num_samples=s, generator=torch.Generator().manual_seed(0),
        full_covariance=False, chunk_size=1000,
    )  # fmt: skip
    torch.testing.assert_close(only_var.variance, sampled.variance)


def test_sampled_method_falls_back_to_reverse_mode_without_vmap():
    q, x = _linear_case("dense")

    def no_vmap(p, x):  # data-dependent control flow: vmap refuses
        return _linear_fn(p, x) if bool(p["b"].sum() > -100) else -_linear_fn(p, x)

    kw = {"method": "sampled", "num_samples": 50}
    a = linearized_predictive(no_vmap, q, x, generator=torch.Generator().manual_seed(0), **kw)
    b = linearized_predictive(_linear_fn, q, x, generator=torch.Generator().manual_seed(0), **kw)
    torch.testing.assert_close(a.covariance, b.covariance)


def test_scalar_outputs_and_input_tuples():
    q = DiagonalGaussian({"w": torch.zeros(2)}, {"w": torch.tensor([1.0, 4.0])})
    fn = lambda p, xs: xs[0] @ p["w"] + xs[1]  # noqa: E731
    x = (torch.tensor([[1.0, 2.0], [0.0, 1.0]]), torch.ones(2))
    fg = linearized_predictive(fn, q, x)
    assert fg.mean.shape == (2,) and fg.covariance.shape == (2, 1, 1)
    torch.testing.assert_close(fg.variance, torch.tensor([2.0, 0.25]))


def test_function_gaussian_draws_have_its_covariance_even_when_singular():
    cov = torch.tensor([[[1.0, 1.0], [1.0, 1.0]], [[2.0, 0.5], [0.5, 1.0]]], dtype=torch.float64)
    fg = FunctionGaussian(torch.zeros(2, 2, dtype=torch.float64), cov.diagonal(dim1=1, dim2=2), cov)
    draws = fg.sample(50_000, torch.Generator().manual_seed(0))
    emp = torch.einsum("sbk,sbl->bkl", draws, draws) / draws.shape[0]
    torch.testing.assert_close(emp, cov, atol=0.05, rtol=0)
    torch.testing.assert_close(draws[:, 0, 0], draws[:, 0, 1])  # rank one: f_1 = f_2


def test_probit_is_close_to_monte_carlo_for_bernoulli():
    m = torch.linspace(-6, 6, 25, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    for v in (0.1, 1.0, 4.0, 16.0, 100.0):
        fg = FunctionGaussian(m, torch.full_like(m, v))
        probit = predictive_distribution(fg, "bernoulli").probs
        mc = predictive_distribution(
            fg, "bernoulli", link_approx="mc", num_samples=200_000, generator=g
        ).probs
        assert (probit - mc).abs().max() < 0.02, v
    # more variance pulls the probabilities towards 1/2
    p = [predictive_distribution(FunctionGaussian(m, torch.full_like(m, v)), "bernoulli").probs
         for v in (0.0, 1.0, 10.0)]  # fmt: skip
    assert ((p[0] - 0.5).abs() >= (p[1] - 0.5).abs()).all()
    assert ((p[1] - 0.5).abs() >= (p[2] - 0.5).abs()).all()


def test_categorical_probit_and_mc():
    g = torch.Generator().manual_seed(0)
    m = 3 * torch.randn(50, 4, generator=g, dtype=torch.float64)
    zero = predictive_distribution(FunctionGaussian(m, torch.zeros_like(m)), "categorical")
    torch.testing.assert_close(zero.probs, m.softmax(-1))
    for v in (0.1, 1.0, 4.0):  # the mean-field probit is cruder than the binary one
        fg = FunctionGaussian(m, torch.full_like(m, v))
        probit = predictive_distribution(fg, "categorical").probs
        mc = predictive_distribution(
            fg, "categorical", link_approx="mc", num_samples=50_000, generator=g
        ).probs
        assert (probit - mc).abs().max() < 0.08, v
        torch.testing.assert_close(mc.sum(-1), torch.ones(50, dtype=torch.float64))


def test_regression_and_poisson_predictives():
    m, v = torch.tensor([[1.0, -1.0]]), torch.tensor([[0.5, 2.0]])
    fg = FunctionGaussian(m, v)
    d = predictive_distribution(fg, Likelihood("normal", scale=0.5))
    torch.testing.assert_close(d.mean, m)
    torch.testing.assert_close(d.variance, v + 0.25)  # epistemic + aleatoric
    with pytest.raises(ValueError, match="scale=s"):
        predictive_distribution(fg, "normal")
    pois = predictive_distribution(
        fg, "poisson", num_samples=200_000, generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(pois.mean, (m + v / 2).exp(), rtol=0.02, atol=0)  # lognormal mean
    assert pois.log_prob(torch.tensor([[2.0, 0.0]])).shape == (1, 2)


def test_linearised_bad_input():
    q, x = _linear_case("diagonal")
    with pytest.raises(ValueError, match="method"):
        linearized_predictive(_linear_fn, q, x, method="kfac")
    with pytest.raises(TypeError, match="GaussianPosterior"):
        linearized_predictive(_linear_fn, {"w": torch.zeros(3)}, x)
    with pytest.raises(ValueError, match="batch"):
        linearized_predictive(lambda p, x: (x @ p["w"]).sum(), q, x)
    with pytest.raises(ValueError, match="chunk_size"):
        linearized_predictive(_linear_fn, q, x, chunk_size=0)
    with pytest.raises(ValueError, match="link_approx"):
        predictive_distribution(FunctionGaussian(x, x), "bernoulli", link_approx="bridge")


# ---------------------------------------------------------------------- Monte Carlo
def test_mc_predictive_from_draws_lists_and_likelihoods():
    g = torch.Generator().manual_seed(0)
    draws = {"w": torch.randn(6, D, C, generator=g), "b": torch.randn(6, C, generator=g)}
    x = torch.randn(4, D, generator=g)
    pred = mc_predictive(_linear_fn, draws, x, likelihood="categorical", chunk_size=4)
    expected = torch.stack([_linear_fn({"w": draws["w"][s], "b": draws["b"][s]}, x)
                            for s in range(6)])  # fmt: skip
    torch.testing.assert_close(pred.outputs, expected)
    torch.testing.assert_close(pred.mean, expected.softmax(-1).mean(0))
    as_list = [{"w": draws["w"][s], "b": draws["b"][s]} for s in range(6)]
    torch.testing.assert_close(mc_predictive(_linear_fn, as_list, x).outputs, expected)

    def no_vmap(p, x):  # data-dependent control flow: vmap refuses, the loop takes over
        return _linear_fn(p, x) if bool(p["b"].sum() > -100) else -_linear_fn(p, x)

    torch.testing.assert_close(mc_predictive(no_vmap, draws, x).outputs, expected)


def test_mc_predictive_bad_input():
    x = torch.randn(4, D)
    q, _ = _linear_case("diagonal")
    with pytest.raises(ValueError, match="num_samples is required"):
        mc_predictive(_linear_fn, q, x)
    with pytest.raises(ValueError, match="same leading draw dimension"):
        mc_predictive(_linear_fn, {"w": torch.zeros(3, D, C), "b": torch.zeros(2, C)}, x)
    with pytest.raises(ValueError, match="only applies"):
        mc_predictive(_linear_fn, {"w": torch.zeros(3, D, C)}, x, num_samples=2)
    with pytest.raises(TypeError, match="draws must be"):
        mc_predictive(_linear_fn, torch.zeros(3), x)


# ---------------------------------------------------------------------- decomposition
def test_categorical_decomposition():
    g = torch.Generator().manual_seed(0)
    logits = 2 * torch.randn(8, 5, 3, generator=g, dtype=torch.float64)  # (S, B, C)
    u = decompose_uncertainty(logits.softmax(-1), "categorical")
    torch.testing.assert_close(u.total, u.aleatoric + u.epistemic)
    assert (u.epistemic > 0).all() and (u.total <= math.log(3) + 1e-12).all()
    p_bar = logits.softmax(-1).mean(0)
    torch.testing.assert_close(u.total, -(p_bar * p_bar.log()).sum(-1))
    from_logits = decompose_uncertainty(logits, "categorical", logits=True)
    for a, b in zip(u, from_logits, strict=True):
        torch.testing.assert_close(a, b)
    same = decompose_uncertainty(logits[:1].expand(8, 5, 3).softmax(-1), "categorical")
    assert (same.epistemic == 0).all()
    torch.testing.assert_close(same.total, same.aleatoric)
    # exact zeros are fine (0 log 0 = 0): two confident members that disagree
    u = decompose_uncertainty(torch.tensor([[[1.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]]]), "categorical")
    torch.testing.assert_close(u.epistemic, torch.tensor([math.log(2)]))
    assert u.aleatoric.item() == 0.0


def test_bernoulli_decomposition_matches_two_class_categorical():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(10, 4, generator=g, dtype=torch.float64)
    u = decompose_uncertainty(logits, "bernoulli", logits=True)
    two = torch.stack([torch.zeros_like(logits), logits], -1)  # softmax([0, t]) = [1-p, p]
    ref = decompose_uncertainty(two, "categorical", logits=True)
    for a, b in zip(u, ref, strict=True):
        torch.testing.assert_close(a, b)
    same = decompose_uncertainty(torch.sigmoid(logits[:1]).expand(10, 4), "bernoulli")
    assert (same.epistemic == 0).all() and (same.total > 0).all()


def test_gaussian_decomposition_is_the_mixtures_law_of_total_variance():
    g = torch.Generator().manual_seed(2)
    means = torch.randn(6, 5, 2, generator=g, dtype=torch.float64)
    variances = torch.rand(6, 5, 2, generator=g, dtype=torch.float64)
    u = decompose_uncertainty(means, "normal", variances=variances)
    mixture_var = (variances + means.square()).mean(0) - means.mean(0).square()
    torch.testing.assert_close(u.total, mixture_var)
    torch.testing.assert_close(u.total, u.aleatoric + u.epistemic)
    torch.testing.assert_close(u.aleatoric, variances.mean(0))
    same = decompose_uncertainty(means[:1].expand(6, 5, 2), Likelihood("normal", scale=0.5))
    assert (same.epistemic == 0).all()
    torch.testing.assert_close(same.aleatoric, torch.full((5, 2), 0.25, dtype=torch.float64))
    as_dist = decompose_uncertainty(torch.distributions.Normal(means, variances.sqrt()))
    for a, b in zip(u, as_dist, strict=True):
        torch.testing.assert_close(a, b)
    rates = decompose_uncertainty(means, "poisson", logits=True)
    torch.testing.assert_close(rates.aleatoric, means.exp().mean(0))


def test_decomposition_bad_input():
    p = torch.full((2, 3, 4), 0.25)
    with pytest.raises(ValueError, match="logits=True"):
        decompose_uncertainty(2 * p, "categorical")
    with pytest.raises(ValueError, match="likelihood"):
        decompose_uncertainty(p)
    with pytest.raises(ValueError, match="noise"):
        decompose_uncertainty(p, "normal")
    with pytest.raises(ValueError, match="broadcast"):
        decompose_uncertainty(p, "normal", variances=torch.ones(5))
    with pytest.raises(ValueError, match="classes last"):
        decompose_uncertainty(p[..., 0], "categorical")
    with pytest.raises(ValueError, match="supports"):
        decompose_uncertainty(torch.distributions.Gamma(p, p))


@settings(max_examples=30, deadline=None)
@given(
    s=st.integers(1, 5),
    b=st.integers(1, 4),
    c=st.integers(2, 5),
    scale=st.floats(0.0, 10.0),
    seed=st.integers(0, 2**16),
)
def test_decomposition_properties(s, b, c, scale, seed):
    logits = scale * torch.randn(s, b, c, generator=torch.Generator().manual_seed(seed))
    u = decompose_uncertainty(logits, "categorical", logits=True)
    assert all(t.shape == (b,) for t in u)
    assert (u.epistemic >= 0).all() and (u.aleatoric >= -1e-6).all()
    assert (u.total <= math.log(c) + 1e-5).all()
    torch.testing.assert_close(u.total, u.aleatoric + u.epistemic)
    if s == 1:
        assert (u.epistemic <= 1e-6).all()


# ---------------------------------------------------------------------- Pyro models
def _pima_like(n=20):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, generator=g)


def test_pyro_logistic_regression_with_draws():
    X = _pima_like()
    w = torch.randn(16, 3, generator=torch.Generator().manual_seed(1))
    before = torch.get_rng_state()
    d = pyro_predictive_distributions(logistic_regression_model, {"w": w}, X)
    assert torch.equal(torch.get_rng_state(), before)  # Pyro's random state is untouched
    assert isinstance(d, torch.distributions.Bernoulli) and d.batch_shape == (16, 20)
    torch.testing.assert_close(d.probs, torch.sigmoid(w @ X.T))
    u = decompose_uncertainty(d)
    ref = decompose_uncertainty(w @ X.T, "bernoulli", logits=True)
    for a, b in zip(u, ref, strict=True):
        torch.testing.assert_close(a, b)


def test_pyro_logistic_regression_with_sgmcmc_samples():
    from pyro_sgmcmc import MCMC, SGLDKernel

    X = _pima_like(64)
    y = torch.bernoulli(torch.sigmoid(X @ torch.tensor([2.0, -1.0, 0.0])), generator=None)
    pyro.set_rng_seed(0)
    mcmc = MCMC(
        SGLDKernel(logistic_regression_model, subsample_size=16, step_size=1e-2),
        num_samples=40,
        warmup_steps=40,
        disable_progbar=True,
    )
    mcmc.run(X, y)
    samples = mcmc.get_samples()
    d = pyro_predictive_distributions(logistic_regression_model, samples, X)
    assert d.probs.shape == (40, 64)
    torch.testing.assert_close(d.probs, torch.sigmoid(samples["w"] @ X.T))
    u = decompose_uncertainty(d)
    torch.testing.assert_close(u.total, u.aleatoric + u.epistemic)
    assert (u.epistemic > 0).all()


def test_pyro_normal_and_categorical_sites():
    x = torch.linspace(-1, 1, 5)

    def regression(x, y=None):
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
        sigma = pyro.sample("sigma", dist.LogNormal(0.0, 1.0))
        with pyro.plate("data", len(x)):
            pyro.sample("y", dist.Normal(w * x, sigma), obs=y)

    samples = {"w": torch.tensor([1.0, 2.0, 3.0]), "sigma": torch.tensor([0.5, 1.0, 2.0])}
    d = pyro_predictive_distributions(regression, samples, x, site="y")
    torch.testing.assert_close(d.loc, samples["w"][:, None] * x)
    torch.testing.assert_close(d.scale, samples["sigma"][:, None].expand(3, 5))
    u = decompose_uncertainty(d)
    torch.testing.assert_close(u.aleatoric, torch.full((5,), (0.25 + 1 + 4) / 3))
    torch.testing.assert_close(u.epistemic, (samples["w"][:, None] * x).var(0, unbiased=False))

    def classifier(x, y=None):
        w = pyro.sample("w", dist.Normal(torch.zeros(3), 1.0).to_event(1))
        with pyro.plate("data", len(x)):
            pyro.sample("y", dist.Categorical(logits=x[:, None] * w), obs=y)

    w = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    d = pyro_predictive_distributions(classifier, {"w": w}, x, site="y")
    assert d.probs.shape == (4, 5, 3)
    torch.testing.assert_close(d.probs, (x[None, :, None] * w[:, None, :]).softmax(-1))


def test_pyro_bad_input():
    X = _pima_like()
    w = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="no sample site 'y'"):
        pyro_predictive_distributions(logistic_regression_model, {"w": w}, X, site="y")
    with pytest.raises(ValueError, match="not sample sites"):
        pyro_predictive_distributions(logistic_regression_model, {"w": w, "v": w}, X)
    with pytest.raises(ValueError, match="prior"):
        pyro_predictive_distributions(logistic_regression_model, {"obs": w}, X)

    def subsampled(X, y=None):
        w = pyro.sample("w", dist.Normal(torch.zeros(3), 1.0).to_event(1))
        with pyro.plate("data", len(X), subsample_size=5) as idx:
            pyro.sample("obs", dist.Bernoulli(logits=X[idx] @ w), obs=None)

    with pytest.raises(ValueError, match="subsample_size"):
        pyro_predictive_distributions(subsampled, {"w": w}, X)

    def robust(X, y=None):
        w = pyro.sample("w", dist.Normal(torch.zeros(3), 1.0).to_event(1))
        with pyro.plate("data", len(X)):
            pyro.sample("obs", dist.StudentT(3.0, X @ w, 1.0), obs=y)

    with pytest.raises(ValueError, match="StudentT"):
        pyro_predictive_distributions(robust, {"w": w}, X)
