"""Tests of :mod:`pyro_sgmcmc.diagnostics`: kernelized Stein discrepancy, ArviZ
conversion, nested R-hat and the report.

KSD is checked against an independent O(n^2 d) reference written with explicit
kernel gradients and cross-Hessians (themselves checked against autograd), against the
population KSD of q = N(mu, 1) from p = N(0, 1) (a closed form for the RBF kernel,
derived below, and Gauss-Hermite quadrature for both kernels), and on orderings that
any discrepancy must respect. Nested R-hat is checked on hand-computed arrays and
against ArviZ's unsplit R-hat. Statistical checks use fixed seeds; each tolerance is
explained next to it.
"""

from __future__ import annotations

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyro.infer import MCMC
from scipy.spatial.distance import pdist

from pyro_sgmcmc import PyroPotential, SGHMCKernel, SGLDKernel
from pyro_sgmcmc.diagnostics import (
    Report,
    ksd,
    median_bandwidth,
    nested_rhat,
    potential_score,
    report,
    stein_kernel_matrix,
    to_inference_data,
)

F64 = torch.float64
PROPERTY = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def standard_normal_score(x):
    """Score of N(0, I): grad log p(x) = -x."""
    return -x


# ======================================================================================
# Independent reference: explicit gradients of the base kernel, one pair at a time.
def ref_kernel_derivatives(x, y, kernel, h, beta):
    """k(x, y), grad_x k, grad_y k and the cross-Hessian d^2 k / dx_i dy_j (d x d)."""
    r = x - y
    u = r @ r
    d = len(x)
    if kernel == "rbf":
        k = math.exp(-u / (2 * h**2))
        gx = -k * r / h**2
        gy = k * r / h**2
        hxy = k * (np.eye(d) / h**2 - np.outer(r, r) / h**4)
    else:
        a = 1 + u / h**2
        k = a**beta
        gx = 2 * beta / h**2 * a ** (beta - 1) * r
        gy = -gx
        hxy = -2 * beta / h**2 * a ** (beta - 1) * np.eye(d) - 4 * beta * (beta - 1) / h**4 * a ** (
            beta - 2
        ) * np.outer(r, r)
    return k, gx, gy, hxy


def ref_stein_kernel(x, y, sx, sy, kernel, h, beta=-0.5):
    k, gx, gy, hxy = ref_kernel_derivatives(x, y, kernel, h, beta)
    return sx @ sy * k + sx @ gy + sy @ gx + np.trace(hxy)


def ref_ksd_squared(x, s, kernel, h, beta=-0.5):
    """KSD^2 as the plain double loop over all ordered pairs."""
    n = len(x)
    total = 0.0
    for i in range(n):
        for j in range(n):
            total += ref_stein_kernel(x[i], x[j], s[i], s[j], kernel, h, beta)
    return total / n**2


@pytest.mark.parametrize("kernel,beta", [("rbf", -0.5), ("imq", -0.5), ("imq", -0.3)])
def test_reference_derivatives_match_autograd(kernel, beta):
    """The hand-written gradients and cross-Hessian of the reference agree with autograd."""
    h = 1.3
    g = torch.Generator().manual_seed(0)
    x0, y0 = torch.randn(2, 3, generator=g, dtype=F64)

    def k(x, y):
        u = ((x - y) ** 2).sum()
        return torch.exp(-u / (2 * h**2)) if kernel == "rbf" else (1 + u / h**2) ** beta

    gx, gy = torch.autograd.functional.jacobian(k, (x0, y0))
    hess = torch.autograd.functional.hessian(k, (x0, y0))[0][1]  # d^2 k / dx dy
    kv, rgx, rgy, rhxy = ref_kernel_derivatives(x0.numpy(), y0.numpy(), kernel, h, beta)
    np.testing.assert_allclose(kv, float(k(x0, y0)), rtol=1e-12)
    np.testing.assert_allclose(rgx, gx.numpy(), rtol=1e-10)
    np.testing.assert_allclose(rgy, gy.numpy(), rtol=1e-10)
    np.testing.assert_allclose(rhxy, hess.numpy(), rtol=1e-10, atol=1e-14)


# ======================================================================================
# 1. KSD against the independent reference
@pytest.mark.parametrize("kernel", ["rbf", "imq"])
@pytest.mark.parametrize("h", [0.7, 2.0])
def test_ksd_matches_reference_loop(kernel, h):
    """Gaussian target N(0, I_3), a small Gaussian sample off target: equal to 1e-5."""
    g = torch.Generator().manual_seed(1)
    x = 0.3 + 1.5 * torch.randn(12, 3, generator=g, dtype=F64)
    s = -x
    want = ref_ksd_squared(x.numpy(), s.numpy(), kernel, h)
    got = ksd(x, s, kernel=kernel, bandwidth=h) ** 2
    assert abs(float(got) - want) <= 1e-5 * max(1.0, abs(want))


def test_ksd_matches_reference_non_gaussian_scores_and_beta():
    """Arbitrary (non-Gaussian) scores and another IMQ exponent, through the matrix form."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(9, 4, generator=g, dtype=F64)
    s = torch.randn(9, 4, generator=g, dtype=F64)
    xn, sn = x.numpy(), s.numpy()
    want = ref_ksd_squared(xn, sn, "imq", 0.9, beta=-0.8)
    got = float(ksd(x, s, kernel="imq", bandwidth=0.9, beta=-0.8)) ** 2
    assert abs(got - want) <= 1e-8 * max(1.0, abs(want))
    block = stein_kernel_matrix(x[:3], s[:3], x[3:], s[3:], "imq", 0.9, -0.8)
    ref = [
        [
            ref_stein_kernel(xi, yj, si, sj, "imq", 0.9, -0.8)
            for yj, sj in zip(xn[3:], sn[3:], strict=True)
        ]
        for xi, si in zip(xn[:3], sn[:3], strict=True)
    ]
    np.testing.assert_allclose(block.numpy(), np.array(ref), rtol=1e-10)


@pytest.mark.parametrize("kernel", ["rbf", "imq"])
def test_single_point_closed_form(kernel):
    """One draw x with score s: KSD^2 = k_p(x, x) = |s|^2 + d / h^2 (both kernels at
    beta = -1/2: k(x, x) = 1 and tr grad_x grad_y k = d / h^2 at r = 0)."""
    x = torch.tensor([[0.5, -1.0, 2.0]], dtype=F64)
    s = torch.tensor([[1.0, 2.0, -0.5]], dtype=F64)
    h = 1.7
    want = math.sqrt(5.25 + 3 / h**2)
    assert math.isclose(float(ksd(x, s, kernel=kernel, bandwidth=h)), want, rel_tol=1e-12)


@pytest.mark.parametrize(
    "kernel,beta,factor", [("rbf", -0.5, 1.0), ("imq", -0.5, 1.0)] + [("imq", -0.25, 0.5)]
)
def test_sample_at_the_mode(kernel, beta, factor):
    """All draws at the mode (score 0): KSD^2 = -2 beta d / h^2 (IMQ), d / h^2 (RBF)."""
    d, h = 5, 0.8
    x = torch.zeros(7, d)
    got = float(ksd(x, torch.zeros_like(x), kernel=kernel, bandwidth=h, beta=beta))
    assert math.isclose(got, math.sqrt(factor * d) / h, rel_tol=1e-12)


# ======================================================================================
# 2. Population KSD for p = N(0, 1), q = N(mu, 1)
def rbf_population_ksd2(mu, h):
    """E_{x,y~q} k_p(x, y) for p = N(0,1), q = N(mu,1), k = exp(-(x-y)^2 / (2h^2)).

    With s(x) = -x, k_p = k [xy - (x-y)^2/h^2 + 1/h^2 - (x-y)^2/h^4]. Write x = mu + a,
    y = mu + b and z = a - b, w = a + b (independent N(0, 2)); xy = mu^2 + mu w +
    (w^2 - z^2)/4 and E[k] = A = (1 + 2/h^2)^(-1/2), E[k z^2] = B = 2 (1 + 2/h^2)^(-3/2).
    Then KSD^2 = mu^2 A + (2A - B)/4 + A/h^2 - B/h^2 - B/h^4, and the mu-free part
    vanishes (B = 2A h^2/(h^2 + 2)): KSD^2 = mu^2 / sqrt(1 + 2/h^2).
    """
    return mu**2 / math.sqrt(1 + 2 / h**2)


def quadrature_population_ksd2(mu, kernel, h, nodes=100):
    """Gauss-Hermite (probabilists') quadrature of E_{x,y~N(mu,1)} k_p(x, y)."""
    t, w = np.polynomial.hermite_e.hermegauss(nodes)
    w = w / math.sqrt(2 * math.pi)
    x = mu + t
    total = 0.0
    for xi, wi in zip(x, w, strict=True):
        for yj, wj in zip(x, w, strict=True):
            total += (
                wi
                * wj
                * ref_stein_kernel(
                    np.array([xi]), np.array([yj]), np.array([-xi]), np.array([-yj]), kernel, h
                )
            )
    return total


@pytest.mark.parametrize("mu,h", [(0.0, 1.0), (1.0, 1.0), (0.5, 2.5)])
def test_rbf_population_closed_form_matches_quadrature(mu, h):
    assert math.isclose(
        quadrature_population_ksd2(mu, "rbf", h), rbf_population_ksd2(mu, h), abs_tol=1e-8
    )


@pytest.mark.parametrize("kernel", ["rbf", "imq"])
def test_v_statistic_converges_to_population(kernel):
    """n = 2000 draws of N(1, 1) against p = N(0, 1), h = 1.

    E[V] = (E_q k_p(x, x) + (n - 1) KSD_pop^2) / n with E_q k_p(x, x) = E[x^2] + d/h^2 =
    2 + 1 (the diagonal bias). Over 100 seeds the V-statistic's sd was 0.027 (RBF); the
    tolerance 0.1 is about 4 sd. The IMQ population value comes from quadrature only.
    """
    mu, h, n = 1.0, 1.0, 2000
    pop = quadrature_population_ksd2(mu, kernel, h)
    if kernel == "rbf":
        assert math.isclose(pop, rbf_population_ksd2(mu, h), abs_tol=1e-8)
    expected = (mu**2 + 1 + 1 / h**2 + (n - 1) * pop) / n
    g = torch.Generator().manual_seed(3)
    x = mu + torch.randn(n, 1, generator=g, dtype=F64)
    got = float(ksd(x, standard_normal_score, kernel=kernel, bandwidth=h)) ** 2
    assert abs(got - expected) < 0.1, (got, expected)
    # Exact draws: only the O(1/n) diagonal bias is left (E = 2/n); sd ~ 1e-3 here.
    y = torch.randn(n, 1, generator=g, dtype=F64)
    exact = float(ksd(y, standard_normal_score, kernel=kernel, bandwidth=h)) ** 2
    assert exact < 0.01 < 0.5 * pop


# ======================================================================================
# 3. Orderings and invariances
@pytest.mark.parametrize("kernel", ["imq", "rbf"])
@pytest.mark.parametrize("bandwidth", [1.0, "median"])
def test_ordering_exact_shifted_wide(kernel, bandwidth):
    """Target N(0, I_2): exact draws < draws shifted by 0.5 sd < draws 3x too wide."""
    g = torch.Generator().manual_seed(4)
    z = torch.randn(600, 2, generator=g, dtype=F64)
    exact, shifted, wide = (
        float(ksd(v, standard_normal_score, kernel=kernel, bandwidth=bandwidth))
        for v in (z, z + 0.5, 3.0 * z)
    )
    assert exact < shifted < wide
    assert exact < 0.5 * shifted


@PROPERTY
@given(
    n=st.integers(1, 25),
    d=st.integers(1, 4),
    chunk=st.integers(1, 30),
    kernel=st.sampled_from(["imq", "rbf"]),
    seed=st.integers(0, 2**16),
)
def test_chunking_and_permutation_invariance(n, d, chunk, kernel, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=F64)
    s = torch.randn(n, d, generator=g, dtype=F64)
    full = ksd(x, s, kernel=kernel, chunk_size=n)
    chunked = ksd(x, s, kernel=kernel, chunk_size=chunk)
    perm = torch.randperm(n, generator=g)
    permuted = ksd(x[perm], s[perm], kernel=kernel, chunk_size=chunk)
    assert torch.allclose(full, chunked, rtol=1e-10, atol=1e-12)
    assert torch.allclose(full, permuted, rtol=1e-10, atol=1e-12)


def test_dict_input_equals_flat_input():
    """Sites are flattened and concatenated in sorted key order."""
    g = torch.Generator().manual_seed(5)
    samples = {"b": torch.randn(30, 2, 2, generator=g), "a": torch.randn(30, generator=g)}
    flat = torch.cat([samples["a"][:, None], samples["b"].reshape(30, 4)], dim=1)
    want = ksd(flat, -flat, bandwidth=1.3)
    score_dict = {k: -v for k, v in samples.items()}
    assert torch.allclose(ksd(samples, score_dict, bandwidth=1.3), want, rtol=1e-12)
    assert torch.allclose(ksd(samples, -flat, bandwidth=1.3), want, rtol=1e-12)
    as_callable = ksd(samples, lambda s: {k: -v for k, v in s.items()}, bandwidth=1.3)
    assert torch.allclose(as_callable, want, rtol=1e-12)


def test_float32_input_is_summed_in_float64():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(50, 3, generator=g)
    got = ksd(x, -x)
    assert got.dtype == F64
    assert torch.allclose(got, ksd(x.double(), -x.double()), rtol=1e-12)


def test_median_bandwidth_matches_scipy():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(40, 3, generator=g, dtype=F64)
    assert math.isclose(median_bandwidth(x), float(np.median(pdist(x.numpy()))), rel_tol=1e-12)
    assert median_bandwidth(torch.zeros(5, 2)) == 1.0
    assert median_bandwidth(torch.zeros(1, 2)) == 1.0
    h = median_bandwidth(x)
    assert torch.allclose(ksd(x, -x, bandwidth="median"), ksd(x, -x, bandwidth=h), rtol=1e-12)


def test_ksd_bad_input_errors():
    x = torch.randn(10, 2)
    with pytest.raises(ValueError, match="kernel"):
        ksd(x, -x, kernel="laplace")
    with pytest.raises(ValueError, match="beta"):
        ksd(x, -x, beta=0.5)
    with pytest.raises(ValueError, match="bandwidth"):
        ksd(x, -x, bandwidth=0.0)
    with pytest.raises(ValueError, match="bandwidth"):
        ksd(x, -x, bandwidth="silverman")
    with pytest.raises(ValueError, match="2-D"):
        ksd(torch.randn(10), torch.randn(10))
    with pytest.raises(ValueError, match="score flattens"):
        ksd(x, torch.randn(10, 3))
    with pytest.raises(ValueError, match="not finite at 1 draws"):
        s = -x.clone()
        s[4, 1] = float("nan")
        ksd(x, s)
    with pytest.raises(ValueError, match="same leading"):
        ksd({"a": torch.randn(10), "b": torch.randn(9)}, lambda s: s)


# ======================================================================================
# 4. Scores from a PyroPotential
def normal_gamma_model(y):
    mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=F64), 10.0))
    tau = pyro.sample("tau", dist.Gamma(torch.tensor(2.0, dtype=F64), 1.0))
    with pyro.plate("data", len(y)) as idx:
        pyro.sample("obs", dist.Normal(mu, tau.rsqrt()), obs=y[idx])


def normal_gamma_score(y, mu, eta):
    """grad of log p(mu, eta | y) in unconstrained space, eta = log tau (Jacobian e^eta):
    log p = -mu^2/200 + 2 eta - e^eta + sum_i [eta/2 - e^eta (y_i - mu)^2 / 2] + c."""
    tau = eta.exp()
    resid = y[None, :] - mu[:, None]
    d_mu = -mu / 100 + tau * resid.sum(1)
    d_eta = 2 - tau + len(y) / 2 - 0.5 * tau * (resid**2).sum(1)
    return {"mu": d_mu, "tau": d_eta}


@pytest.mark.parametrize("vectorize", [True, False])
def test_potential_score_is_the_full_data_score(vectorize):
    g = torch.Generator().manual_seed(8)
    y = 1.0 + torch.randn(40, generator=g, dtype=F64)
    pot = PyroPotential(normal_gamma_model, (y,), subsample_size=10)  # ignored: full data
    phi = {
        "mu": 1.0 + 0.3 * torch.randn(25, generator=g, dtype=F64),
        "tau": 0.3 * torch.randn(25, generator=g, dtype=F64),
    }
    got = potential_score(pot, phi, batch_size=7, vectorize=vectorize)
    want = normal_gamma_score(y, phi["mu"], phi["tau"])
    for k in want:
        assert torch.allclose(got[k], want[k], rtol=1e-10), k
    # KSD through the potential equals KSD with the analytic score.
    direct = ksd(phi, want, bandwidth=0.5)
    assert torch.allclose(ksd(phi, pot, bandwidth=0.5), direct, rtol=1e-10)


def test_ksd_with_potential_orders_exact_posterior_first():
    """Conjugate normal mean: the exact posterior N(m, v) beats draws shifted by 0.5 sd."""
    g = torch.Generator().manual_seed(9)
    y = 2.0 + torch.randn(100, generator=g, dtype=F64)

    def model(y):
        mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=F64), 10.0))
        with pyro.plate("data", len(y)) as idx:
            pyro.sample("obs", dist.Normal(mu, 1.0), obs=y[idx])

    pot = PyroPotential(model, (y,))
    v = 1 / (1 / 100 + len(y))
    m = v * y.sum()
    z = torch.randn(300, generator=g, dtype=F64)
    exact = ksd({"mu": m + v**0.5 * z}, pot, bandwidth="median")
    shifted = ksd({"mu": m + v**0.5 * (z + 0.5)}, pot, bandwidth="median")
    assert exact < 0.5 * shifted
    with pytest.raises(ValueError, match="dict"):
        ksd(torch.zeros(3, 1), pot)
    with pytest.raises(ValueError, match="latent sites"):
        ksd({"nu": torch.zeros(3)}, pot)


# ======================================================================================
# 5. Nested R-hat
def test_nested_rhat_hand_computed():
    """K = 2 superchains of M = 2 chains, N = 2 draws. Chain means 1, 3, 5, 7; superchain
    means 2, 6: B = var(2, 6) = 8. Within: var of chain means 2 (both superchains) plus
    mean within-chain variance 2, so W = 4 and nR = sqrt(1 + 8/4) = sqrt(3)."""
    draws = np.array([[0.0, 2.0], [2.0, 4.0], [4.0, 6.0], [6.0, 8.0]])
    assert math.isclose(nested_rhat(draws, 2), math.sqrt(3.0), rel_tol=1e-12)
    # N = 1 (one draw per chain): the within-chain term is 0. Superchains (0, 2), (4, 6):
    # B = var(1, 5) = 8, W = var(0, 2) = 2, nR = sqrt(5).
    one_draw = np.array([[0.0], [2.0], [4.0], [6.0]])
    assert math.isclose(nested_rhat(one_draw, 2), math.sqrt(5.0), rel_tol=1e-12)
    # Tensors are accepted too.
    assert math.isclose(nested_rhat(torch.tensor(draws), 2), math.sqrt(3.0), rel_tol=1e-12)


def test_nested_rhat_with_one_chain_per_superchain_is_unsplit_rhat():
    """M = 1: nR^2 = 1 + B/W while the classic (unsplit) R^2 = (N-1)/N + B/W."""
    rng = np.random.default_rng(10)
    x = rng.normal(size=(4, 50)) + np.array([0.0, 0.3, -0.2, 0.5])[:, None]
    import arviz as az

    classic = float(az.rhat(x, method="identity"))
    assert math.isclose(nested_rhat(x, 4) ** 2, classic**2 + 1 / 50, rel_tol=1e-10)


def test_nested_rhat_near_one_for_stationary_chains():
    """64 superchains x 8 chains x 10 draws, iid N(0, 1): B/W ~ 1/(M N)/(1 + 1/N) ~ 0.011,
    nR ~ 1.006; the bound 1.02 is ~3 sd of B/W (sd ~ sqrt(2/63) * 0.011)."""
    rng = np.random.default_rng(11)
    x = rng.normal(size=(64 * 8, 10, 3))
    nr = nested_rhat(x, 64)
    assert nr.shape == (3,)
    assert np.all(nr < 1.02)
    assert np.all(nr >= 1.0)


def test_nested_rhat_flags_superchains_in_different_modes():
    """Bimodal target +-3: superchains started in different modes never mix. B ~ 12,
    W ~ 1: nR ~ 3.6."""
    rng = np.random.default_rng(12)
    modes = np.repeat([-3.0, -3.0, 3.0, 3.0], 8)  # 4 superchains x 8 chains
    x = modes[:, None] + rng.normal(size=(32, 20))
    assert nested_rhat(x, 4) > 1.1
    # The same draws grouped so that every superchain holds both modes look fine-ish
    # per superchain mean but have a large within-superchain variance.
    mixed = x[np.argsort(np.tile(np.arange(8), 4), kind="stable")]
    assert nested_rhat(mixed, 4) < nested_rhat(x, 4)


def test_nested_rhat_vectorises_trailing_dims_and_validates():
    rng = np.random.default_rng(13)
    x = rng.normal(size=(6, 5, 2, 3))
    nr = nested_rhat(x, 3)
    assert nr.shape == (2, 3)
    for i in range(2):
        for j in range(3):
            assert math.isclose(nr[i, j], nested_rhat(x[..., i, j], 3), rel_tol=1e-12)
    with pytest.raises(ValueError, match="divide"):
        nested_rhat(x, 4)
    with pytest.raises(ValueError, match=">= 2"):
        nested_rhat(x, 1)
    with pytest.raises(ValueError, match="one draw per chain"):
        nested_rhat(np.zeros((4, 1)), 4)


# ======================================================================================
# 6. ArviZ conversion
def test_to_inference_data_round_trip_dict():
    g = torch.Generator().manual_seed(14)
    samples = {"mu": torch.randn(3, 40, generator=g), "w": torch.randn(3, 40, 2, 2, generator=g)}
    idata = to_inference_data(
        samples, divergences={"chain 0": [1, 5], "chain 1": [], "chain 2": [39]}
    )
    assert idata.posterior["mu"].shape == (3, 40)
    assert idata.posterior["w"].shape == (3, 40, 2, 2)
    np.testing.assert_array_equal(idata.posterior["w"].values, samples["w"].numpy())
    div = idata.sample_stats["diverging"].values
    assert div.dtype == bool and div.shape == (3, 40)
    assert sorted(zip(*np.nonzero(div), strict=True)) == [(0, 1), (0, 5), (2, 39)]
    # Lists per chain and boolean masks give the same; indices past the draws are dropped.
    same = to_inference_data(samples, divergences=[[1, 5, 400], [], [39]])
    np.testing.assert_array_equal(same.sample_stats["diverging"].values, div)
    masked = to_inference_data(samples, divergences=div)
    np.testing.assert_array_equal(masked.sample_stats["diverging"].values, div)
    # No divergence record: no sample_stats group.
    assert "sample_stats" not in to_inference_data(samples).groups()


def test_to_inference_data_errors():
    with pytest.raises(ValueError, match="chain dimension"):
        to_inference_data({"mu": torch.randn(10)})
    with pytest.raises(ValueError, match="other sites"):
        to_inference_data({"a": torch.randn(2, 10), "b": torch.randn(2, 9)})
    with pytest.raises(ValueError, match="per chain"):
        to_inference_data({"a": torch.randn(2, 10)}, divergences=[[1]])
    with pytest.raises(TypeError, match="MCMC"):
        to_inference_data(torch.randn(2, 10))


class FakeRun:
    """Duck-typed runner: get_samples and Pyro-style diagnostics, without ``_diagnostics``."""

    def __init__(self, samples, diagnostics):
        self.samples, self._diag = samples, diagnostics

    def get_samples(self, group_by_chain=False):
        assert group_by_chain
        return self.samples

    def diagnostics(self):
        return self._diag


def test_to_inference_data_from_duck_typed_runner():
    samples = {"x": torch.zeros(2, 5)}
    run = FakeRun(samples, {"divergences": {"chain 0": [4], "chain 1": [0, 2]}})
    div = to_inference_data(run).sample_stats["diverging"].values
    assert div.tolist() == [[False] * 4 + [True], [True, False, True, False, False]]
    # A runner that records no divergences (the key is missing) converts without them.
    assert "sample_stats" not in to_inference_data(FakeRun(samples, {"x": {}})).groups()


def conjugate_model(y):
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    with pyro.plate("data", len(y)) as idx:
        pyro.sample("obs", dist.Normal(mu, 1.0), obs=y[idx])


def test_to_inference_data_from_pyro_mcmc_with_divergences():
    """A far too large SGLD step overflows: the kernel records the non-finite draws."""
    pyro.set_rng_seed(0)
    y = 1.0 + torch.randn(50)
    kernel = SGLDKernel(
        conjugate_model, step_size=50.0, adapt_mass_matrix=False, max_divergences=10**6
    )
    mcmc = MCMC(kernel, num_samples=30, warmup_steps=0, disable_progbar=True)
    mcmc.run(y)
    recorded = mcmc.diagnostics()["divergences"]["chain 0"]
    assert recorded  # the test needs some
    idata = to_inference_data(mcmc)
    assert idata.posterior["mu"].shape == (1, 30)
    np.testing.assert_array_equal(
        idata.posterior["mu"].values, mcmc.get_samples(group_by_chain=True)["mu"].numpy()
    )
    div = idata.sample_stats["diverging"].values[0]
    assert np.nonzero(div)[0].tolist() == sorted(set(recorded))


# ======================================================================================
# 7. Report
def test_report_on_a_real_sghmc_run():
    pyro.set_rng_seed(1)
    y = 1.0 + torch.randn(60)
    mcmc = MCMC(
        SGHMCKernel(conjugate_model, subsample_size=20),
        num_samples=100,
        warmup_steps=100,
        disable_progbar=True,
    )
    mcmc.run(y)
    v = 1 / (1 / 100 + len(y))
    m = float(v * y.sum())
    reference = {"mu": m + v**0.5 * torch.randn(2000)}  # exact posterior draws
    pot = PyroPotential(conjugate_model, (y,))
    rep = report(mcmc, reference=reference, score=pot)
    assert isinstance(rep, Report)
    table = rep.table
    assert list(table.columns) == [
        "mean", "sd", "r_hat", "ess_bulk", "ess_tail", "nested_r_hat",
        "ref_mean", "ref_sd", "diff_sds", "sd_ratio",
    ]  # fmt: skip
    assert list(table.index) == ["mu"]
    assert rep.num_divergences == 0 and rep.num_chains == 1 and rep.num_draws == 100
    assert math.isnan(table.loc["mu", "nested_r_hat"])  # one chain: no superchains
    # Loose accuracy checks on 100 correlated draws: mean within 1 posterior sd.
    assert abs(table.loc["mu", "diff_sds"]) < 1.0
    assert 0.3 < table.loc["mu", "sd_ratio"] < 3.0
    assert 0 < rep.ksd < 5.0 and table.attrs["ksd"] == rep.ksd
    text = str(rep)
    for word in ("KSD", "divergences: 0", "r_hat", "ess_bulk", "nested_r_hat", "mu"):
        assert word in text


def test_report_many_chains_superchains_and_coordinates():
    """Stuck superchains show up in nested R-hat; coordinates are named site[i,j]."""
    rng = np.random.default_rng(15)
    offsets = np.repeat([0.0, 0.0, 5.0, 5.0], 4)[:, None, None]
    samples = {"w": offsets + rng.normal(size=(16, 30, 2)), "s": rng.normal(size=(16, 30))}
    rep = report(samples, num_superchains=4, divergences=np.zeros((16, 30), bool))
    assert list(rep.table.index) == ["w[0]", "w[1]", "s"]
    assert (rep.table.loc[["w[0]", "w[1]"], "nested_r_hat"] > 1.5).all()
    assert rep.table.loc["s", "nested_r_hat"] < 1.1
    assert (rep.table.loc[["w[0]", "w[1]"], "r_hat"] > 1.5).all()
    assert rep.ksd is None and "KSD" not in str(rep)
    # Precomputed scores laid out like the draws, and other KSD settings.
    scores = {k: -v for k, v in samples.items()}
    rep2 = report(samples, score=scores, ksd_kwargs={"kernel": "rbf", "bandwidth": "median"})
    flat = {k: torch.as_tensor(v.reshape(480, *v.shape[2:])) for k, v in samples.items()}
    want = ksd(flat, {k: -v for k, v in flat.items()}, kernel="rbf", bandwidth="median")
    assert math.isclose(rep2.ksd, float(want), rel_tol=1e-12)
    assert rep2.num_superchains == 16  # default: each chain its own superchain


# ------------------------------------------------------------------------------ plots
def test_trace_plot_draws_each_chain_of_each_coordinate(tmp_path):
    from pyro_sgmcmc.diagnostics import plots

    draws = {"w": torch.randn(3, 50, 2), "s": torch.rand(3, 50)}
    fig = plots.plot_trace(draws, path=tmp_path / "trace.png")
    assert (tmp_path / "trace.png").stat().st_size > 0
    assert [ax.get_ylabel() for ax in fig.axes[::2]] == ["s", "w[0]", "w[1]"]
    assert all(len(ax.lines) == 3 for ax in fig.axes)  # 3 chains: traces and densities
    np.testing.assert_array_equal(fig.axes[2].lines[1].get_ydata(), draws["w"][1, :, 0].numpy())
    with pytest.raises(KeyError, match="no site 'z'"):
        plots.plot_trace(draws, sites=["z"])
    plots.close(fig)


def test_marginals_plot_has_one_panel_per_coordinate_and_the_reference_dashed():
    from pyro_sgmcmc.diagnostics import plots

    g = torch.Generator().manual_seed(0)
    runs = {"NUTS": torch.randn(400, 3, generator=g), "SGHMC": torch.randn(400, 3, generator=g)}
    fig = plots.plot_marginals(runs, reference="NUTS", names=["a", "b", "c"])
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in visible] == ["a", "b", "c"]
    assert [line.get_linestyle() for line in visible[0].lines] == ["-", "--"]
    grid = visible[0].lines[1].get_xdata()
    density = visible[0].lines[1].get_ydata()
    assert abs(np.trapezoid(density, grid) - 1) < 0.02  # a density over +-4.5 sd
    with pytest.raises(ValueError, match="coordinates"):
        plots.plot_marginals({"a": torch.zeros(5, 2), "b": torch.zeros(5, 3)})
    plots.close(fig)
