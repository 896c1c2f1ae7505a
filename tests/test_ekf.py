"""The extended Kalman filter over static parameters, against exact posteriors.

Conjugate Bayesian linear regression, ``y ~ N(Xw, s^2)``, ``w ~ N(0, a^2 I)`` (float64):
one pass of the dense filter with the exact curvature ``X_t^T X_t / s^2`` is the exact
posterior ``N(m, A^{-1})``, ``A = X^T X / s^2 + I / a^2``, whatever the minibatch sizes
and order. Logistic regression on Pima is checked against the Laplace approximation at
the MAP (exact Newton), which the full-batch iterated filter reproduces.
"""

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from pyro_sgmcmc.curvature import Likelihood, diag_ef, per_example_grads
from pyro_sgmcmc.datasets import load_pima, logistic_regression_model
from pyro_sgmcmc.ekf import (
    ef_terms,
    ekf_predict,
    ekf_update,
    ggn_terms,
    hessian_terms,
    module_ekf,
    pyro_ekf,
    pyro_gaussian_prior,
    run_ekf,
)
from pyro_sgmcmc.gaussian import DenseGaussian, DiagonalGaussian
from pyro_sgmcmc.nn import ModulePotential, normal_log_likelihood
from pyro_sgmcmc.potential import ModelError, PyroPotential

F64 = torch.float64
N, D, S, A_PRIOR = 300, 4, 0.5, 2.0


def _regression(X=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    if X is None:
        mix = torch.eye(D) + 0.3 * torch.ones(D, D)
        X = (torch.randn(N, D, generator=g) @ mix).to(F64)
    w = torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=F64)
    y = X @ w + S * torch.randn(X.shape[0], generator=g).to(F64)
    A = X.T @ X / S**2 + torch.eye(D, dtype=F64) / A_PRIOR**2
    m = torch.linalg.solve(A, X.T @ y / S**2)
    return X, y, A, m


def _prior(dense):
    q = DiagonalGaussian(
        {"w": torch.zeros(D, dtype=F64)}, {"w": torch.full((D,), A_PRIOR**-2, dtype=F64)}
    )
    return DenseGaussian(q.mean, q.precision_matrix()) if dense else q


LINEAR = ggn_terms(lambda p, x: x @ p["w"], Likelihood("normal", scale=S))


def _batches(X, y, sizes, seed):
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    out, i = [], 0
    while i < len(y):
        b = sizes[len(out) % len(sizes)]
        out.append((X[perm[i : i + b]], y[perm[i : i + b]]))
        i += b
    return out


def _model(X, y):
    w = pyro.sample("w", dist.Normal(X.new_zeros(D), A_PRIOR).to_event(1))
    with pyro.plate("data", X.shape[0]) as idx:
        pyro.sample("obs", dist.Normal(X[idx] @ w, S), obs=y[idx])


# ---------------------------------------------------------------------- exactness
@pytest.mark.parametrize("sizes", [[1], [7], [N], [5, 64, 1, 33]], ids=str)
@pytest.mark.parametrize("seed", [0, 1])
def test_dense_ekf_one_pass_is_the_exact_posterior(sizes, seed):
    X, y, A, m = _regression()
    q = run_ekf(_prior(dense=True), LINEAR, _batches(X, y, sizes, seed))
    torch.testing.assert_close(q.mean["w"], m, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(q.precision_matrix(), A, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("curvature", ["ggn", "hessian"])
def test_module_ekf_is_the_exact_posterior(curvature):
    X, y, A, m = _regression()
    net = torch.nn.Linear(D, 1, bias=False).to(F64)
    pot = ModulePotential(
        net,
        normal_log_likelihood(S),
        prior=A_PRIOR,
        num_data=N,
        output_transform=lambda o: o.squeeze(-1),
    )
    loader = DataLoader(TensorDataset(X, y), batch_size=32, shuffle=True)
    q = module_ekf(
        pot, loader, dense=True, curvature=curvature, likelihood=Likelihood("normal", scale=S)
    )
    torch.testing.assert_close(q.mean["weight"][0], m, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(q.precision_matrix(), A, rtol=1e-10, atol=1e-10)


def test_pyro_ekf_is_the_exact_posterior():
    X, y, A, m = _regression()
    pot = PyroPotential(_model, (X, y))
    q = pyro_ekf(
        pot,
        batch_size=32,
        dense=True,
        curvature="hessian",
        generator=torch.Generator().manual_seed(0),
    )
    assert list(q.mean) == ["w"]
    torch.testing.assert_close(q.mean["w"], m, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(q.precision_matrix(), A, rtol=1e-10, atol=1e-10)


def test_diagonal_ekf_is_exact_when_every_minibatch_is_orthogonal():
    g = torch.Generator().manual_seed(0)
    blocks = [torch.linalg.qr(torch.randn(32, D, generator=g, dtype=F64))[0] for _ in range(8)]
    X = torch.cat(
        [q * torch.linspace(2.0, 5.0, D, dtype=F64) for q in blocks]
    )  # X_t^T X_t diagonal
    X, y, A, m = _regression(X)
    assert torch.allclose(A, torch.diag(A.diagonal()))
    batches = [(X[i : i + 32], y[i : i + 32]) for i in range(0, 256, 32)]
    q = run_ekf(_prior(dense=False), LINEAR, batches[::-1])
    assert isinstance(q, DiagonalGaussian)
    torch.testing.assert_close(q.mean["w"], m, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(q.precision["w"], A.diagonal(), rtol=1e-10, atol=1e-10)


def test_diagonal_ekf_precision_is_the_mean_field_one_on_a_correlated_design():
    """The precision is exactly prior + diag(X^T X) / s^2 (mean-field VI's); the mean is
    not the posterior mean: each update is one Jacobi step that ignores correlations."""
    X, y, A, m = _regression()
    q = run_ekf(_prior(dense=False), LINEAR, _batches(X, y, [32], 0))
    torch.testing.assert_close(q.precision["w"], A.diagonal(), rtol=1e-12, atol=0)
    sd = torch.linalg.inv(A).diagonal().sqrt()
    assert ((q.mean["w"] - m) / sd).abs().max() > 1.0


def test_ef_ekf_agrees_between_the_module_and_pyro_paths():
    X, y, _, _ = _regression()
    pot = PyroPotential(_model, (X, y))
    qp = pyro_ekf(pot, batch_size=50, dense=True, shuffle=False)
    net = torch.nn.Linear(D, 1, bias=False).to(F64)
    mp = ModulePotential(
        net,
        normal_log_likelihood(S),
        prior=A_PRIOR,
        num_data=N,
        output_transform=lambda o: o.squeeze(-1),
    )
    qm = module_ekf(mp, [(X[i : i + 50], y[i : i + 50]) for i in range(0, N, 50)], dense=True)
    torch.testing.assert_close(qp.mean["w"], qm.mean["weight"][0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(qp.precision_matrix(), qm.precision_matrix(), rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------- logistic regression
@pytest.fixture(scope="module")
def pima():
    data = load_pima(dtype=F64)
    X, y = data.X, data.y
    w = torch.zeros(X.shape[1], dtype=F64)
    for _ in range(25):  # Newton to the MAP
        p = torch.sigmoid(X @ w)
        H = X.T @ (X * (p * (1 - p)).unsqueeze(-1)) + torch.eye(X.shape[1], dtype=F64)
        w = w + torch.linalg.solve(H, X.T @ (y - p) - w)
    p = torch.sigmoid(X @ w)
    H = X.T @ (X * (p * (1 - p)).unsqueeze(-1)) + torch.eye(X.shape[1], dtype=F64)
    return PyroPotential(logistic_regression_model, (X, y)), w, H


def test_full_batch_iterated_ekf_is_the_laplace_approximation(pima):
    pot, w, H = pima
    q = pyro_ekf(pot, dense=True, curvature="hessian", num_iterations=12)
    torch.testing.assert_close(q.mean["w"], w, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(q.precision_matrix(), H, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("num_iterations, tol", [(1, 1.5), (3, 0.75)])
def test_one_pass_ekf_on_pima_is_close_to_laplace(pima, num_iterations, tol):
    pot, w, H = pima
    sd = torch.linalg.inv(H).diagonal().sqrt()
    q = pyro_ekf(
        pot,
        batch_size=64,
        dense=True,
        curvature="hessian",
        num_iterations=num_iterations,
        generator=torch.Generator().manual_seed(0),
    )
    assert ((q.mean["w"] - w) / sd).abs().max() < tol
    ratio = q.stddev()["w"] / sd
    assert ratio.min() > 0.75 and ratio.max() < 1.1


def test_temperature_is_tempering_the_result(pima):
    """Prior precision, curvature and gradient divided by T = the result tempered by T."""
    pot, _, _ = pima
    base = hessian_terms(pot.per_example_log_likelihood)

    def cold(params, batch, diagonal):
        g, f = base(params, batch, diagonal)
        return {k: v / 0.5 for k, v in g.items()}, f / 0.5

    batches = [torch.arange(i, min(i + 100, 768)) for i in range(0, 768, 100)]
    prior = pyro_gaussian_prior(pot, dense=True)
    q = run_ekf(prior, base, batches, num_iterations=2)
    qt = run_ekf(prior.tempered(0.5), cold, batches, num_iterations=2)
    torch.testing.assert_close(qt.mean["w"], q.mean["w"])
    torch.testing.assert_close(qt.precision_matrix(), q.tempered(0.5).precision_matrix())


# ---------------------------------------------------------------------- predict step, terms
def test_predict_step():
    q = _prior(dense=False)
    out = ekf_predict(q, process_noise=0.5, forgetting=0.8)
    torch.testing.assert_close(out.variance()["w"], A_PRIOR**2 / 0.8 + 0.5 + 0 * q.mean["w"])
    dense = ekf_predict(_prior(dense=True), process_noise=0.5, forgetting=0.8)
    torch.testing.assert_close(dense.covariance(), torch.diag(out.variance()["w"]))
    assert ekf_predict(q) is q


def test_forgetting_discounts_old_minibatches():
    X, y, _, _ = _regression()
    batches = _batches(X, y, [60], 0)
    gamma = 0.7
    q = run_ekf(_prior(dense=True), LINEAR, batches, forgetting=gamma)
    k = len(batches)
    prec = gamma**k * torch.eye(D, dtype=F64) / A_PRIOR**2
    rhs = torch.zeros(D, dtype=F64)
    for t, (x, t_y) in enumerate(batches):
        weight = gamma ** (k - 1 - t)
        prec = prec + weight * x.T @ x / S**2
        rhs = rhs + weight * x.T @ t_y / S**2
    torch.testing.assert_close(q.precision_matrix(), prec)
    torch.testing.assert_close(q.mean["w"], torch.linalg.solve(prec, rhs))


def test_terms_agree_on_curvature():
    X, y, _, _ = _regression()
    params = {"w": torch.randn(D, dtype=F64, generator=torch.Generator().manual_seed(0))}
    batch = (X[:40], y[:40])
    ll = lambda p, x, t: Likelihood("normal", scale=S).log_prob(x @ p["w"], t)  # noqa: E731
    g_ggn, f_ggn = LINEAR(params, batch, False)
    g_h, f_h = hessian_terms(lambda p, b: ll(p, *b))(params, batch, False)
    g_ef, f_ef = ef_terms(lambda p, b: per_example_grads(ll, p, *b))(params, batch, True)
    torch.testing.assert_close(f_ggn, f_h)
    torch.testing.assert_close(g_ggn["w"], g_h["w"])
    torch.testing.assert_close(g_ef["w"], g_h["w"])
    torch.testing.assert_close(f_ef, diag_ef(per_example_grads(ll, params, *batch)))


# ---------------------------------------------------------------------- errors
def test_bad_inputs_raise():
    X, y, _, _ = _regression()
    with pytest.raises(ValueError, match="dense prior"):
        pyro_ekf(PyroPotential(_model, (X, y)), prior=_prior(dense=True))
    with pytest.raises(ValueError, match="not positive definite"):
        ekf_update(
            _prior(dense=True),
            lambda p, b, d: ({"w": torch.zeros(D, dtype=F64)}, -torch.eye(D, dtype=F64)),
            None,
        )
    with pytest.raises(ValueError, match="not positive"):
        ekf_update(
            _prior(dense=False),
            lambda p, b, d: ({"w": torch.zeros(D, dtype=F64)}, {"w": -torch.ones(D, dtype=F64)}),
            None,
        )
    with pytest.raises(ValueError, match="keys"):
        ekf_update(
            _prior(dense=False), lambda p, b, d: ({"v": torch.zeros(D)}, {"v": torch.ones(D)}), None
        )
    with pytest.raises(ValueError, match="forgetting"):
        ekf_predict(_prior(dense=False), forgetting=0.0)
    net = torch.nn.Linear(D, 1, bias=False).to(F64)
    mp = ModulePotential(net, normal_log_likelihood(S), prior=None, num_data=N)
    with pytest.raises(ValueError, match="prior="):
        module_ekf(mp, [])
    with pytest.raises(ValueError, match="likelihood="):
        module_ekf(
            mp,
            [],
            prior=DiagonalGaussian(mp.params(), {"weight": torch.ones(1, D, dtype=F64)}),
            curvature="ggn",
        )


def test_pyro_models_the_filter_cannot_see_raise():
    X, y, _, _ = _regression()

    def outside(X, y):
        w = pyro.sample("w", dist.Normal(X.new_zeros(D), 1.0).to_event(1))
        pyro.sample("extra", dist.Normal(w.sum(), 1.0), obs=torch.tensor(0.0, dtype=F64))
        with pyro.plate("data", X.shape[0]) as idx:
            pyro.sample("obs", dist.Normal(X[idx] @ w, 1.0), obs=y[idx])

    with pytest.raises(ModelError, match="outside the data plate"):
        pyro_ekf(PyroPotential(outside, (X, y)))

    def scale_prior(X, y):
        s = pyro.sample("s", dist.HalfNormal(1.0))
        with pyro.plate("data", X.shape[0]) as idx:
            pyro.sample("obs", dist.Normal(0.0, s), obs=y[idx])

    with pytest.raises(ModelError, match="prior="):
        pyro_ekf(PyroPotential(scale_prior, (X, y)))
