"""Tests of :mod:`pyro_sgmcmc.nn`, the ``nn.Module`` potential, against closed forms.

The reference problem is conjugate Bayesian linear regression, ``nn.Linear(d, 1,
bias=False)`` with prior ``N(0, s^2 I)`` and Gaussian noise of known ``sigma``: the
posterior is ``N(mu, Sigma)`` with ``Sigma^-1 = X^T X / sigma^2 + I / s^2`` and
``mu = Sigma X^T y / sigma^2``, and ``-(1/N) log p(theta | y)`` has gradient
``(Sigma^-1 theta - X^T y / sigma^2) / N``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader, TensorDataset

from pyro_sgmcmc.nn import (
    ModulePotential,
    NonFinitePotentialError,
    bernoulli_log_likelihood,
    categorical_log_likelihood,
    normal_log_likelihood,
)
from pyro_sgmcmc.potential import NonFiniteError
from pyro_sgmcmc.samplers import sghmc, sgld

F64 = torch.float64
N, D, SIGMA, PRIOR_SCALE = 64, 2, 1.0, 1.0


def squeeze(out):
    return out.squeeze(-1)


def linreg(seed: int = 0):
    """Data, exact posterior and module potential of the conjugate regression.

    The columns of X are orthogonal (scales 1 and 1/2), so the posterior's covariance,
    its Hessian and the per-example gradient noise are all close to diagonal; that is
    where a diagonal gradient-noise correction (``beta``) is exact.
    """
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(N, D, generator=g, dtype=F64))
    X = q * math.sqrt(N) * torch.tensor([1.0, 0.5], dtype=F64)
    y = X @ torch.tensor([0.5, -1.0], dtype=F64) + SIGMA * torch.randn(N, generator=g, dtype=F64)
    precision = X.T @ X / SIGMA**2 + torch.eye(D, dtype=F64) / PRIOR_SCALE**2
    cov = torch.linalg.inv(precision)
    mean = cov @ X.T @ y / SIGMA**2
    net = nn.Linear(D, 1, bias=False).to(F64)
    pot = ModulePotential(
        net, normal_log_likelihood(SIGMA), prior=PRIOR_SCALE, num_data=N, output_transform=squeeze
    )
    return X, y, mean, cov, precision, pot


def exact_log_posterior(theta, X, y):
    """Unnormalised log posterior of the regression weights ``theta`` (shape ``(D,)``)."""
    prior = torch.distributions.Normal(0.0, PRIOR_SCALE).log_prob(theta).sum()
    lik = torch.distributions.Normal(X @ theta, SIGMA).log_prob(y).sum()
    return prior + lik


# ---------------------------------------------------------------------- 1. conjugate model
def test_full_batch_potential_and_grad_are_exact():
    X, y, mean, _, precision, pot = linreg()
    theta = torch.tensor([0.3, 0.7], dtype=F64)
    u, grads = pot.potential_and_grad({"weight": theta[None]}, (X, y))
    assert sorted(grads) == ["weight"] and grads["weight"].shape == (1, D)
    torch.testing.assert_close(u, -exact_log_posterior(theta, X, y) / N, rtol=0, atol=1e-10)
    expected = (precision @ theta - X.T @ y / SIGMA**2) / N
    torch.testing.assert_close(grads["weight"][0], expected, rtol=0, atol=1e-10)
    # ... and the potential's minimum is the exact posterior mean.
    _, at_mean = pot.potential_and_grad({"weight": mean[None]}, (X, y))
    assert at_mean["weight"].abs().max() < 1e-12


def test_minibatch_gradients_average_to_the_full_gradient_over_an_epoch():
    X, y, _, _, _, pot = linreg()
    params = {"weight": torch.tensor([[0.3, 0.7]], dtype=F64)}
    u_full, g_full = pot.potential_and_grad(params, (X, y))
    loader = DataLoader(
        TensorDataset(X, y), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    results = [pot.potential_and_grad(params, batch) for batch in loader]
    assert len(results) == N // 8
    u_avg = torch.stack([u for u, _ in results]).mean()
    g_avg = torch.stack([g["weight"] for _, g in results]).mean(0)
    torch.testing.assert_close(u_avg, u_full, rtol=0, atol=1e-12)
    torch.testing.assert_close(g_avg, g_full["weight"], rtol=0, atol=1e-12)
    # A single batch is a noisy estimate, not the full gradient.
    assert (results[0][1]["weight"] - g_full["weight"]).abs().max() > 1e-3


def run_sghmc_chains(temperature, seed, chains=200, batch_size=8, burn=300, keep=500):
    """SGHMC on the regression, ``chains`` independent chains as one ``vmap`` batch.

    Every chain draws its own independent batch (without replacement) every step, and
    the minibatch noise is compensated with ``beta`` from ``estimate_beta`` at the
    posterior mean. Returns the kept draws, ``(keep * chains, D)``, and the posterior.
    """
    X, y, mean, cov, _, pot = linreg()
    g = torch.Generator().manual_seed(seed)
    beta = pot.estimate_beta(
        {"weight": mean[None]}, (X, y), temperature=temperature, batch_size=batch_size
    )
    grads_of_chains = vmap(grad(pot.potential))  # params and batch both chain-first
    state = sghmc.init({"weight": torch.zeros(chains, 1, D, dtype=F64)})
    draws = []
    for t in range(burn + keep):
        idx = torch.rand(chains, N, generator=g).topk(batch_size, dim=1).indices
        batch = (X[idx], y[idx])
        grads = grads_of_chains(state.params, batch)
        if t == 0:  # the vmapped gradient is potential_and_grad's, chain by chain
            _, g0 = pot.potential_and_grad(
                {"weight": state.params["weight"][1]}, (X[idx[1]], y[idx[1]])
            )
            torch.testing.assert_close(grads["weight"][1], g0["weight"])
        # c = step_size * alpha = 0.04: the friction's bias on the variance is ~ c/2 = 2%.
        state = sghmc.step(
            state,
            grads,
            0.004,
            temperature=temperature,
            num_data=N,
            alpha=10.0,
            beta=beta,
            generator=g,
        )
        if t >= burn:
            draws.append(state.params["weight"][:, 0])
    return torch.cat(draws), mean, cov


@pytest.fixture
def one_thread():
    """Tiny tensors: intra-op threads only add overhead (and contend on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_sghmc_samples_the_exact_posterior_and_its_tempered_version(one_thread):
    """Mean within 0.15 (tempered) posterior sd, variances within 12% of the exact ones
    (Monte Carlo sd ~2.5%, friction bias ~2%), and T = 0.5 halves the variance: the
    ratio of the two runs' variances is 0.5 within 0.07 (14%)."""
    variances = {}
    for temperature, seed in [(1.0, 1), (0.5, 2)]:
        draws, mean, cov = run_sghmc_chains(temperature, seed)
        target_sd = (temperature * cov.diag()).sqrt()
        z = (draws.mean(0) - mean) / target_sd
        assert z.abs().max() < 0.15, (temperature, z)
        variances[temperature] = draws.var(0)
        ratio = variances[temperature] / (temperature * cov.diag())
        assert (ratio - 1).abs().max() < 0.12, (temperature, ratio)
    halving = variances[0.5] / variances[1.0]
    assert (halving - 0.5).abs().max() < 0.07, halving


def test_zero_temperature_sgld_is_sgd_with_weight_decay():
    """At T = 0 the samplers are optimisers of the mean loss, with weight decay
    1 / (N s^2) from the Normal(0, s) prior, as the module docstring says."""
    X, y, _, _, _, pot = linreg()
    net = nn.Linear(D, 1, bias=False).to(F64)
    net.weight.data.fill_(0.2)
    state = sgld.init({"weight": net.weight.detach()})
    opt = torch.optim.SGD(net.parameters(), lr=0.1, weight_decay=1 / (N * PRIOR_SCALE**2))
    for i in range(5):
        xb, yb = X[8 * i : 8 * i + 8], y[8 * i : 8 * i + 8]
        _, grads = pot.potential_and_grad(state.params, (xb, yb))
        state = sgld.step(state, grads, 0.1, temperature=0.0, num_data=N)
        opt.zero_grad()
        (0.5 * F.mse_loss(net(xb).squeeze(-1), yb) / SIGMA**2).backward()
        opt.step()
    torch.testing.assert_close(state.params["weight"], net.weight.detach(), rtol=0, atol=1e-12)


# ---------------------------------------------------------------------- 2. gradient noise
def test_per_example_grad_variance_matches_an_explicit_loop():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4)).to(F64)
    x, y = torch.randn(10, 3, dtype=F64), torch.randint(0, 4, (10,))
    pot = ModulePotential(net, categorical_log_likelihood, prior=1.0, num_data=100)
    rows = []
    for i in range(10):
        ll = categorical_log_likelihood(net(x[i : i + 1]), y[i : i + 1])[0]
        rows.append(torch.autograd.grad(ll, list(net.parameters())))
    expected = {
        name: torch.stack([r[j] for r in rows]).var(0)
        for j, (name, _) in enumerate(net.named_parameters())
    }
    got = pot.per_example_grad_variance(pot.params(), (x, y))
    assert list(got) == list(expected) == pot.names
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-10, atol=1e-12)


def test_per_example_grads_of_the_regression_are_closed_form():
    X, y, _, _, _, pot = linreg()
    theta = torch.tensor([0.3, 0.7], dtype=F64)
    got = pot.per_example_grads({"weight": theta[None]}, (X, y))["weight"]
    expected = X * ((y - X @ theta) / SIGMA**2)[:, None]
    torch.testing.assert_close(got[:, 0], expected, rtol=0, atol=1e-12)


def test_estimate_beta_is_the_variance_of_random_minibatch_gradients():
    """beta * tau = Var[grad U~] over batches drawn without replacement: compared with
    4000 random batches (relative Monte Carlo error ~2%, tolerance 10%)."""
    X, y, mean, _, _, pot = linreg()
    params = {"weight": mean[None]}
    b, temperature = 8, 0.5
    beta = pot.estimate_beta(params, (X, y), temperature=temperature, batch_size=b)["weight"]
    g = torch.Generator().manual_seed(0)
    idx = torch.rand(4000, N, generator=g).topk(b, dim=1).indices
    grads = vmap(grad(pot.potential), in_dims=(None, 0))(params, (X[idx], y[idx]))["weight"]
    empirical = grads.var(0)
    expected = beta * temperature / N
    assert ((empirical / expected) - 1).abs().max() < 0.10, empirical / expected
    # A preconditioner D multiplies beta.
    inv_mass = {"weight": torch.tensor([[2.0, 3.0]], dtype=F64)}
    scaled = pot.estimate_beta(params, (X, y), temperature, inv_mass=inv_mass, batch_size=b)
    torch.testing.assert_close(scaled["weight"], beta * inv_mass["weight"])


# ---------------------------------------------------------------------- 3. dtypes
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtypes_round_trip(dtype):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(dtype)
    pot = ModulePotential(net, bernoulli_log_likelihood, prior=1.0, num_data=50)
    x, y = torch.randn(6, 3, dtype=dtype), torch.randint(0, 2, (6,)).to(dtype)
    params = pot.params()
    assert all(v.dtype == dtype for v in params.values())
    u, grads = pot.potential_and_grad(params, (x, y))
    assert u.dtype == dtype and u.shape == () and not u.requires_grad
    assert {k: (g.dtype, g.shape) for k, g in grads.items()} == {
        k: (dtype, v.shape) for k, v in params.items()
    }
    assert all(v.dtype == dtype for v in pot.per_example_grad_variance(params, (x, y)).values())
    assert all(v.dtype == dtype for v in pot.estimate_beta(params, (x, y)).values())
    state = sghmc.step(sghmc.init(params), grads, 0.01, num_data=50, alpha=5.0)
    assert all(v.dtype == dtype for v in state.params.values())
    pot.load_into(state.params)
    assert all(p.dtype == dtype for p in net.parameters())
    torch.testing.assert_close(pot.params(), state.params, rtol=0, atol=0)


def test_module_inputs_may_be_a_tuple_or_a_dict():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(2, 1), nn.Linear(3, 1)

        def forward(self, a, b):
            return (self.a(a) + self.b(b)).squeeze(-1)

    torch.manual_seed(0)
    net = TwoInputs().to(F64)
    pot = ModulePotential(net, normal_log_likelihood(0.5), prior=2.0, num_data=20)
    a, b, y = torch.randn(5, 2, dtype=F64), torch.randn(5, 3, dtype=F64), torch.randn(5, dtype=F64)
    u_tuple, g_tuple = pot.potential_and_grad(pot.params(), ((a, b), y))
    u_dict, g_dict = pot.potential_and_grad(pot.params(), ({"a": a, "b": b}, y))
    torch.testing.assert_close(u_tuple, u_dict)
    torch.testing.assert_close(g_tuple, g_dict)
    var = pot.per_example_grad_variance(pot.params(), ({"a": a, "b": b}, y))
    assert var["b.weight"].shape == (1, 3)


# ---------------------------------------------------------------------- 4. errors
def small_potential(log_likelihood=None, prior=1.0):
    torch.manual_seed(0)
    net = nn.Linear(3, 1)
    return ModulePotential(
        net,
        log_likelihood or normal_log_likelihood(1.0),
        prior=prior,
        num_data=10,
        output_transform=squeeze,
    )


X3, Y3 = torch.randn(4, 3), torch.randn(4)


@pytest.mark.parametrize(
    ("make", "batch", "params", "match"),
    [
        (small_potential, (X3, Y3[:3]), None, "x has 4 rows but y has 3.*share the batch"),
        (small_potential, (X3, Y3, Y3), None, r"must be an \(x, y\) pair"),
        (
            small_potential,
            (torch.randn(11, 3), torch.randn(11)),
            None,
            "size of the whole data set N, not the number of batches",
        ),
        (
            lambda: small_potential(lambda out, y: -F.mse_loss(out, y)),
            (X3, Y3),
            None,
            r"returned \(\); .*shape \(4,\).*reduction='none'",
        ),
        (
            lambda: small_potential(lambda out, y: -((out[:, None] - y[:, None]) ** 2)),
            (X3, Y3),
            None,
            r"returned \(4, 1\).*sum any other dimensions",
        ),
        (
            lambda: small_potential(prior=lambda p: p["weight"] ** 2),
            (X3, Y3),
            None,
            r"summed log prior .*add \.sum\(\)",
        ),
        (
            small_potential,
            (X3, Y3),
            {"wieght": torch.zeros(1, 3), "bias": torch.zeros(1)},
            r"missing \['weight'\], unexpected \['wieght'\]: start from pot.params\(\)",
        ),
        (small_potential, (X3.double(), Y3), None, r"cast the data \(x.to\(torch.float32\)\)"),
        (small_potential, (X3, torch.randn(4, 2)), None, "output_transform"),
        (lambda: small_potential(categorical_log_likelihood), (X3, Y3), None, r"y\.long\(\)"),
    ],
)
def test_bad_input_raises_valueerror_naming_the_fix(make, batch, params, match):
    pot = make()
    with pytest.raises(ValueError, match=match):
        pot.potential_and_grad(params or pot.params(), batch)


def test_bad_construction_raises():
    with pytest.raises(ValueError, match="prior scale must be positive"):
        small_potential(prior=-1.0)
    with pytest.raises(TypeError, match="prior must be a float"):
        small_potential(prior="normal")
    with pytest.raises(ValueError, match="num_data must be"):
        ModulePotential(nn.Linear(1, 1), bernoulli_log_likelihood, num_data=0)
    with pytest.raises(ValueError, match="no parameters with requires_grad"):
        ModulePotential(nn.Linear(1, 1).requires_grad_(False), bernoulli_log_likelihood, num_data=1)


def test_nonfinite_potential_names_the_cause():
    pot = small_potential()
    y = Y3.clone()
    y[2] = float("nan")
    with pytest.raises(NonFinitePotentialError, match=r"rows \[2\].*clean the data") as info:
        pot.potential_and_grad(pot.params(), (X3, y))
    assert isinstance(info.value, ValueError) and isinstance(info.value, NonFiniteError)
    diverged = {"weight": torch.tensor([[float("inf"), 0.0, 0.0]]), "bias": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"non-finite parameters \['weight'\].*step size"):
        pot.potential_and_grad(diverged, (X3, Y3))
    # With the check off, the caller gets the NaN back and decides.
    pot.check_finite = False
    u, _ = pot.potential_and_grad(pot.params(), (X3, y))
    assert torch.isnan(u)


# ---------------------------------------------------------------------- 5. load_into
def test_load_into_writes_the_values_back():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    pot = ModulePotential(net, categorical_log_likelihood, prior=None, num_data=10)
    params = pot.params()
    params["0.weight"].add_(1.0)  # a copy: the module is untouched
    assert not torch.equal(net[0].weight, params["0.weight"])
    new = {k: torch.randn_like(v) for k, v in params.items()}
    pot.load_into(new)
    for name, p in net.named_parameters():
        assert torch.equal(p.detach(), new[name]) and p.requires_grad
    x = torch.randn(5, 3)
    torch.testing.assert_close(net(x), functional_call(net, new, (x,)))
    with pytest.raises(ValueError, match="select a chain"):
        pot.load_into({k: v.expand(2, *v.shape) for k, v in new.items()})
    with pytest.raises(ValueError, match="missing"):
        pot.load_into({"0.weight": new["0.weight"]})


def test_flat_prior_is_the_mean_negative_log_likelihood():
    torch.manual_seed(0)
    net = nn.Linear(3, 2)
    pot = ModulePotential(net, categorical_log_likelihood, prior=None, num_data=10)
    x, y = torch.randn(5, 3), torch.randint(0, 2, (5,))
    u, _ = pot.potential_and_grad(pot.params(), (x, y))
    torch.testing.assert_close(u, F.cross_entropy(net(x), y).detach())
