"""Tests of :mod:`pyro_sgmcmc.curvature` against dense autograd matrices and closed forms.

Everything runs in float64 so that matrix-free products, dense matrices, diagonals and
Kronecker factors agree to 1e-10-ish; the Monte Carlo Fisher is checked against the GGN
within its sampling error.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.autograd.functional import hessian

from pyro_sgmcmc.curvature import (
    KFACFactors,
    Likelihood,
    accumulate_ef,
    accumulate_ggn,
    accumulate_mc_fisher,
    cg,
    dense_ef,
    dense_ggn,
    dense_mc_fisher,
    diag_ef,
    diag_ggn,
    diag_mc_fisher,
    flatten,
    fvp,
    ggnvp,
    hvp,
    kfac_factors,
    kfac_to_dense,
    kron_mvp,
    module_diag_ggn,
    module_fn,
    per_example_grads,
    unflatten,
)

# torch warns once when it loads its forward-mode decompositions (torch.jit.script inside).
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")

F64 = torch.float64
LIKELIHOODS = {
    "bernoulli": Likelihood("bernoulli"),
    "categorical": Likelihood("categorical"),
    "normal": Likelihood("normal", scale=0.7),
    "poisson": Likelihood("poisson"),
}
NUM_OUT = {"bernoulli": 2, "categorical": 3, "normal": 2, "poisson": 2}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def mlp(name: str, seed: int = 0, d_in: int = 3, hidden: int = 4) -> nn.Module:
    """A small tanh MLP with an output the size the likelihood wants; float64."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, NUM_OUT[name]))
    with torch.no_grad():  # keep Poisson rates moderate
        net[2].weight.mul_(0.5)
    return net.to(F64)


def problem(name: str, n: int = 6, seed: int = 0):
    """``(net, fn, params, x, y, lik, log_lik, sample_y)`` for a small MLP."""
    net, lik = mlp(name, seed), LIKELIHOODS[name]
    fn, params = module_fn(net), {k: p.detach() for k, p in net.named_parameters()}
    g = gen(seed + 1)
    x = torch.randn(n, 3, generator=g, dtype=F64)
    with torch.no_grad():
        y = lik.sample(fn(params, x), g)

    def log_lik(p, x, y):
        return lik.log_prob(fn(p, x), y)

    def sample_y(p, x, generator):
        return lik.sample(fn(p, x), generator)

    return net, fn, params, x, y, lik, log_lik, sample_y


def random_like(params, seed: int):
    g = gen(seed)
    return {k: torch.randn(p.shape, generator=g, dtype=p.dtype) for k, p in params.items()}


def dense_hessian(f, params) -> torch.Tensor:
    """Autograd's dense Hessian of ``f(params)`` over :func:`flatten` order."""
    return hessian(lambda theta: f(unflatten(theta, params)), flatten(params))


def close(a, b, tol=1e-9):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# ---------------------------------------------------------------------- dict helpers, hvp, cg
@settings(max_examples=25, deadline=None)
@given(st.lists(st.lists(st.integers(1, 3), min_size=0, max_size=3), min_size=1, max_size=4))
def test_flatten_unflatten_round_trip(shapes):
    params = {f"p{i}": torch.randn(s) for i, s in enumerate(shapes)}
    vec = flatten(params)
    assert vec.shape == (sum(p.numel() for p in params.values()),)
    back = unflatten(vec, params)
    assert list(back) == list(params)
    for k in params:
        assert back[k].shape == params[k].shape and torch.equal(back[k], params[k])
    torch.testing.assert_close(flatten(back), vec, rtol=0, atol=0)


def test_unflatten_rejects_wrong_size():
    with pytest.raises(ValueError, match="3 entries"):
        unflatten(torch.zeros(4), {"a": torch.zeros(3)})


@pytest.mark.parametrize("mode", ["auto", "forward", "reverse"])
def test_hvp_equals_dense_hessian(mode):
    g = gen(0)
    params = {
        "a": torch.randn(2, 3, generator=g, dtype=F64),
        "b": torch.randn(4, generator=g, dtype=F64),
    }
    m = torch.randn(6, 4, generator=g, dtype=F64)

    def f(p):
        a = p["a"].reshape(-1)
        return (torch.sin(a) * (m @ p["b"]) ** 2).sum() + torch.exp(a @ m @ p["b"] / 5)

    v = random_like(params, 1)
    hv = hvp(f, params, v, mode=mode)
    close(flatten(hv), dense_hessian(f, params) @ flatten(v))


def test_cg_solves_spd_system_and_dict_interface_round_trips():
    g = gen(0)
    like = {"a": torch.zeros(3, 4, dtype=F64), "b": torch.zeros(8, dtype=F64)}
    q = torch.randn(20, 20, generator=g, dtype=F64)
    A = q @ q.T + 0.5 * torch.eye(20, dtype=F64)
    b = torch.randn(20, generator=g, dtype=F64)
    exact = torch.linalg.solve(A, b)

    x, info = cg(lambda v: A @ v, b, tol=1e-10)
    assert info.converged and info.iterations <= 60
    torch.testing.assert_close(x, exact, rtol=1e-6, atol=1e-6)

    # The same solve on dicts of tensors gives the same answer in the same shapes.
    xd, info_d = cg(lambda v: unflatten(A @ flatten(v), like), unflatten(b, like), tol=1e-10)
    assert list(xd) == ["a", "b"] and xd["a"].shape == (3, 4)
    torch.testing.assert_close(flatten(xd), exact, rtol=1e-6, atol=1e-6)
    assert info_d.iterations == info.iterations

    # Damping solves (A + lambda I) x = b; a warm start at the answer needs no iteration.
    xl, _ = cg(lambda v: A @ v, b, damping=2.0, tol=1e-10)
    torch.testing.assert_close(
        xl, torch.linalg.solve(A + 2.0 * torch.eye(20, dtype=F64), b), rtol=1e-6, atol=1e-6
    )
    _, warm = cg(lambda v: A @ v, b, x0=exact)
    assert warm.iterations == 0 and warm.converged
    _, capped = cg(lambda v: A @ v, b, tol=1e-14, max_iter=3)
    assert capped.iterations == 3 and not capped.converged


def test_cg_rejects_indefinite_operator():
    with pytest.raises(ValueError, match="not positive definite"):
        cg(lambda v: -v, torch.ones(3, dtype=F64))


# ---------------------------------------------------------------------- products vs dense
@pytest.mark.parametrize("name", list(LIKELIHOODS))
def test_ggnvp_and_fvp_match_dense_matrices(name):
    _, fn, params, x, y, lik, log_lik, _ = problem(name)
    G = dense_ggn(fn, params, x, lik)
    F_emp = dense_ef(per_example_grads(log_lik, params, x, y))
    assert G.shape == F_emp.shape == (26 if name != "categorical" else 31,) * 2
    close(G, G.T)
    assert torch.linalg.eigvalsh(G).min() > -1e-10  # PSD
    for seed in range(2):
        v = random_like(params, seed)
        for mode in ("forward", "reverse"):
            close(flatten(ggnvp(fn, params, x, v, lik, mode=mode)), G @ flatten(v))
            close(flatten(fvp(log_lik, params, x, y, v, mode=mode)), F_emp @ flatten(v))


@pytest.mark.parametrize("name", list(LIKELIHOODS))
def test_hessian_factor_and_hessian_mvp_agree(name):
    lik = LIKELIHOODS[name]
    g = gen(3)
    out = torch.randn(4, 2, 3, generator=g, dtype=F64)  # two outputs (tokens) x 3 per example
    u = torch.randn(4, 2, 3, generator=g, dtype=F64)
    cols = lik.hessian_factor(out)
    assert cols.shape == (6, 4, 2, 3)
    # sum_r L_r (L_r^T u) per example
    lu = (cols * u).flatten(2).sum(-1)  # (R, B)
    via_factor = (cols * lu[:, :, None, None]).sum(0)
    close(via_factor, lik.hessian_mvp(out, u))
    # and H is the Hessian of the negative log-likelihood in the output
    y = lik.sample(out, g)
    h = hessian(lambda f: -lik.log_prob(f.reshape(out.shape), y).sum(), out.reshape(-1))
    close(h @ u.reshape(-1), lik.hessian_mvp(out, u).reshape(-1))


def test_fvp_rejects_reduced_log_likelihood():
    _, fn, params, x, y, lik, _, _ = problem("normal")
    with pytest.raises(ValueError, match="one log-likelihood per example"):
        fvp(lambda p, x, y: lik.log_prob(fn(p, x), y).sum(), params, x, y, params)


# ---------------------------------------------------------------------- GGN = Hessian, Fisher
def _linear_problem(name: str, n: int = 12, d: int = 3):
    g = gen(5)
    x = torch.randn(n, d, generator=g, dtype=F64)
    k = 3 if name == "categorical" else 1
    params = {
        "weight": 0.5 * torch.randn(k, d, generator=g, dtype=F64),
        "bias": 0.3 * torch.randn(k, generator=g, dtype=F64),
    }

    def fn(p, x):
        out = x @ p["weight"].T + p["bias"]
        return out if name == "categorical" else out.squeeze(-1)

    lik = LIKELIHOODS[name]
    with torch.no_grad():
        y = lik.sample(fn(params, x), g)
    return fn, params, x, y, lik


@pytest.mark.parametrize("name", list(LIKELIHOODS))
def test_ggn_is_the_hessian_of_a_linear_model(name):
    """Logistic, softmax, Poisson and linear-Gaussian regression: no residual term."""
    fn, params, x, y, lik = _linear_problem(name)
    exact = dense_hessian(lambda p: -lik.log_prob(fn(p, x), y).sum(), params)
    close(dense_ggn(fn, params, x, lik), exact)


def test_ggn_is_the_analytic_fisher_of_logistic_regression():
    fn, params, x, _, lik = _linear_problem("bernoulli")
    xb = torch.cat([x, torch.ones(len(x), 1, dtype=F64)], dim=1)  # [weight, bias] order
    p = torch.sigmoid(fn(params, x))
    close(dense_ggn(fn, params, x, lik), xb.T @ torch.diag(p * (1 - p)) @ xb)


@pytest.mark.parametrize("name", list(LIKELIHOODS))
def test_mc_fisher_converges_to_the_ggn(name):
    """Canonical links: E_y[g g^T] = J^T H J for any network, within MC error."""
    _, fn, params, x, _, lik, log_lik, sample_y = problem(name, n=4)
    G = dense_ggn(fn, params, x, lik)
    F_mc = dense_mc_fisher(log_lik, sample_y, params, x, 20000, gen(7))
    rel = torch.linalg.matrix_norm(F_mc - G) / torch.linalg.matrix_norm(G)
    assert rel < 0.03, f"{name}: relative Frobenius error {rel:.3f}"
    d_mc = diag_mc_fisher(log_lik, sample_y, params, x, 20000, gen(7))
    close(flatten(d_mc), torch.diagonal(F_mc))  # same draws, same chunks


# ---------------------------------------------------------------------- diag and accumulation
@pytest.mark.parametrize("name", list(LIKELIHOODS))
def test_diagonals_are_diagonals_of_dense(name):
    _, fn, params, x, y, lik, log_lik, sample_y = problem(name)
    close(flatten(diag_ggn(fn, params, x, lik)), torch.diagonal(dense_ggn(fn, params, x, lik)))
    grads = per_example_grads(log_lik, params, x, y)
    close(flatten(diag_ef(grads)), torch.diagonal(dense_ef(grads)))


@pytest.mark.parametrize("name", ["categorical", "poisson"])
def test_accumulation_over_batches_equals_full_batch(name):
    _, fn, params, x, y, lik, log_lik, sample_y = problem(name, n=10)
    batches = [(x[:3], y[:3]), (x[3:7], y[3:7]), (x[7:], y[7:])]
    for diagonal in (True, False):
        acc = accumulate_ggn(fn, params, batches, lik, diagonal=diagonal)
        full = diag_ggn(fn, params, x, lik) if diagonal else dense_ggn(fn, params, x, lik)
        close(flatten(acc) if diagonal else acc, flatten(full) if diagonal else full)

        def grads_fn(p, b):
            return per_example_grads(log_lik, p, *b)

        acc = accumulate_ef(grads_fn, params, batches, diagonal=diagonal)
        g = per_example_grads(log_lik, params, x, y)
        full = diag_ef(g) if diagonal else dense_ef(g)
        close(flatten(acc) if diagonal else acc, flatten(full) if diagonal else full)
    # The MC Fisher accumulates too (different draws: compare within MC error).
    acc = accumulate_mc_fisher(log_lik, sample_y, params, batches, 4000, gen(2))
    ref = flatten(diag_ggn(fn, params, x, lik))
    assert (flatten(acc) - ref).norm() / ref.norm() < 0.05


def test_accumulate_ef_takes_a_module_potential():
    from pyro_sgmcmc.nn import ModulePotential, categorical_log_likelihood

    net, fn, params, x, y, lik, log_lik, _ = problem("categorical")
    pot = ModulePotential(net, categorical_log_likelihood, prior=1.0, num_data=len(x))
    acc = accumulate_ef(pot.per_example_grads, params, [(x[:2], y[:2]), (x[2:], y[2:])])
    close(flatten(acc), flatten(diag_ef(per_example_grads(log_lik, params, x, y))))


def test_accumulate_ef_takes_a_pyro_potential():
    """Logistic regression in Pyro: the diagonal EF is sum_i (y_i - p_i)^2 x_i^2."""
    import pyro
    import pyro.distributions as dist

    from pyro_sgmcmc.potential import PyroPotential

    g = gen(0)
    X = torch.randn(20, 2, generator=g, dtype=F64)
    y = torch.bernoulli(torch.full((20,), 0.5, dtype=F64), generator=g)

    def model(X, y):
        w = pyro.sample("w", dist.Normal(torch.zeros(2, dtype=F64), 1.0).to_event(1))
        with pyro.plate("data", X.shape[0]) as idx:
            pyro.sample("obs", dist.Bernoulli(logits=X[idx] @ w), obs=y[idx])

    pot = PyroPotential(model, (X, y), subsample_size=5)
    phi = {"w": torch.tensor([0.3, -0.8], dtype=F64)}
    idx = torch.arange(20).split(7)
    acc = accumulate_ef(pot.per_example_grads, phi, idx)
    p = torch.sigmoid(X @ phi["w"])
    close(acc["w"], ((y - p)[:, None] ** 2 * X**2).sum(0))


# ---------------------------------------------------------------------- K-FAC
def _layer_block(matrix: torch.Tensor, params, prefix: str) -> torch.Tensor:
    """The rows/columns of a dense matrix over ``params`` that belong to one layer."""
    offsets, start = {}, 0
    for k, p in params.items():
        offsets[k] = (start, start + p.numel())
        start += p.numel()
    idx = torch.cat([torch.arange(*offsets[k]) for k in params if k.rsplit(".", 1)[0] == prefix])
    return matrix[idx][:, idx]


@pytest.mark.parametrize("name", list(LIKELIHOODS))
def test_kfac_is_exact_for_one_datum(name):
    """With one example, kron(G, A) is the exact GGN (and EF) block of each Linear layer."""
    net, fn, params, x, y, lik, log_lik, _ = problem(name, n=1)
    G = dense_ggn(fn, params, x, lik)
    F_emp = dense_ef(per_example_grads(log_lik, params, x, y))
    ggn = kfac_factors(net, [(x, y)], lik, variant="ggn")
    ef = kfac_factors(net, [(x, y)], lik, variant="ef")
    assert list(ggn) == ["0", "2"]
    for layer in ("0", "2"):
        close(kfac_to_dense(ggn[layer]), _layer_block(G, params, layer))
        close(kfac_to_dense(ef[layer]), _layer_block(F_emp, params, layer))


def test_kfac_is_unaffected_by_in_place_activations():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).to(F64)
    inplace = nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True), nn.Linear(4, 2)).to(F64)
    inplace.load_state_dict(plain.state_dict())
    x = torch.randn(5, 3, generator=gen(0), dtype=F64)
    ref = kfac_factors(plain, [x], "categorical", variant="ggn")
    got = kfac_factors(inplace, [x], "categorical", variant="ggn")
    for layer in ref:
        close(got[layer].G, ref[layer].G)
        close(got[layer].A, ref[layer].A)


def test_kfac_mc_converges_to_kfac_ggn():
    net, _, _, x, y, lik, _, _ = problem("categorical", n=1)
    exact = kfac_factors(net, [x], lik, variant="ggn")
    mc = kfac_factors(net, [x], lik, variant="mc", num_samples=20000, generator=gen(4))
    for layer in exact:
        close(mc[layer].A, exact[layer].A)
        rel = (mc[layer].G - exact[layer].G).norm() / exact[layer].G.norm()
        assert rel < 0.03


def test_kfac_conv2d_is_exact_when_it_is_a_dense_layer():
    """A conv whose kernel covers its input (one output position) on one datum."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3, 4)).to(F64)
    fn, params = module_fn(net), {k: p.detach() for k, p in net.named_parameters()}
    x, y = torch.randn(1, 2, 3, 3, dtype=F64), torch.tensor([2])
    factors = kfac_factors(net, [(x, y)], "categorical", variant="ggn")
    assert factors["0"].A.shape == (19, 19) and factors["0"].G.shape == (3, 3)
    G = dense_ggn(fn, params, x, "categorical")
    for layer in ("0", "3"):
        close(kfac_to_dense(factors[layer]), _layer_block(G, params, layer))


def test_kfac_conventions_mean_a_sum_g_and_batches():
    net, _, _, x, y, lik, _, _ = problem("normal", n=9)
    full = kfac_factors(net, [(x, y)], lik, variant="ef")
    split = kfac_factors(net, [(x[:4], y[:4]), (x[4:], y[4:])], lik, variant="ef")
    per_datum = [kfac_factors(net, [(x[i : i + 1], y[i : i + 1])], lik) for i in range(9)]
    for layer in full:
        close(split[layer].A, full[layer].A)
        close(split[layer].G, full[layer].G)
        close(full[layer].A, sum(f[layer].A for f in per_datum) / 9)  # a mean
        close(full[layer].G, sum(f[layer].G for f in per_datum))  # a sum


def test_kron_mvp_and_kfac_to_dense_orderings():
    g = gen(0)
    A, G = torch.randn(4, 4, generator=g, dtype=F64), torch.randn(2, 2, generator=g, dtype=F64)
    A, G = A @ A.T, G @ G.T
    V = torch.randn(2, 4, generator=g, dtype=F64)  # [W | b] with d_in = 3
    close(kron_mvp(A, G, V).reshape(-1), torch.kron(G, A) @ V.reshape(-1))
    # kfac_to_dense: [vec_r(W), b] order
    dense = kfac_to_dense(KFACFactors(A, G, bias=True))
    v_dict = torch.cat([V[:, :3].reshape(-1), V[:, 3]])
    out = kron_mvp(A, G, V)
    close(dense @ v_dict, torch.cat([out[:, :3].reshape(-1), out[:, 3]]))
    close(kfac_to_dense(KFACFactors(A, G, bias=False)), torch.kron(G, A))


def test_bad_inputs_get_clear_errors():
    _, fn, params, x, y, lik, _, _ = problem("categorical")
    with pytest.raises(ValueError, match="likelihood must be one of"):
        Likelihood("gamma")
    with pytest.raises(ValueError, match="keys of params"):
        ggnvp(fn, params, x, {"w": torch.zeros(1)}, lik)
    with pytest.raises(ValueError, match="variant must be"):
        kfac_factors(nn.Linear(2, 2), [torch.zeros(1, 2)], lik, variant="kfra")
    with pytest.raises(ValueError, match="needs \\(x, y\\) batches"):
        kfac_factors(nn.Linear(3, 3).to(F64), [x], lik, variant="ef")


@pytest.mark.parametrize("mode", ["auto", "reverse"])
def test_unused_parameters_have_zero_curvature(mode):
    params = {"a": torch.tensor([1.0, 2.0], dtype=F64), "unused": torch.ones(2, dtype=F64)}
    v = {k: torch.ones(2, dtype=F64) for k in params}
    hv = hvp(lambda p: (p["a"] ** 3).sum(), params, v, mode=mode)
    close(hv["a"], torch.tensor([6.0, 12.0], dtype=F64))
    close(hv["unused"], torch.zeros(2, dtype=F64))
    gv = ggnvp(lambda p, x: x @ p["a"], params, torch.ones(3, 2, dtype=F64), v, "normal", mode=mode)
    close(gv["a"], torch.full((2,), 6.0, dtype=F64))
    close(gv["unused"], torch.zeros(2, dtype=F64))


# ---------------------------------------------------------------------- module_diag_ggn
def _deep_mlp(name: str, seed: int = 0) -> nn.Module:
    """Bias and no-bias Linear layers, an in-place activation; float64."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Linear(3, 4),
        nn.ReLU(inplace=True),
        nn.Linear(4, 5, bias=False),
        nn.Tanh(),
        nn.Linear(5, NUM_OUT[name]),
    )
    with torch.no_grad():
        net[4].weight.mul_(0.5)
    return net.to(F64)


def _module_problem(name: str, n: int = 11, seed: int = 0):
    net, lik = _deep_mlp(name, seed), LIKELIHOODS[name]
    fn, params = module_fn(net), {k: p.detach() for k, p in net.named_parameters()}
    g = gen(seed + 1)
    x = torch.randn(n, 3, generator=g, dtype=F64)
    with torch.no_grad():
        y = lik.sample(fn(params, x), g)
    batches = [(x[:4], y[:4]), (x[4:5], y[4:5]), (x[5:], y[5:])]
    return net, fn, params, x, y, lik, batches


@pytest.mark.parametrize("name", list(LIKELIHOODS))
def test_module_diag_ggn_equals_diag_ggn(name):
    net, fn, params, x, y, lik, batches = _module_problem(name)
    ref = diag_ggn(fn, params, x, lik)
    for max_columns in (None, 1):
        fast = module_diag_ggn(net, batches, lik, max_columns=max_columns)
        assert list(fast) == list(params) and "2.bias" not in fast
        close(flatten(fast), flatten(ref))


@pytest.mark.parametrize("name", ["categorical", "poisson"])
def test_module_diag_ef_and_mc_equal_their_per_example_versions(name):
    net, fn, params, x, y, lik, batches = _module_problem(name)

    def log_lik(p, x, y):
        return lik.log_prob(fn(p, x), y)

    def sample_y(p, x, generator):
        return lik.sample(fn(p, x), generator)

    ef = module_diag_ggn(net, batches, lik, variant="ef")
    close(flatten(ef), flatten(diag_ef(per_example_grads(log_lik, params, x, y))))
    # The same generator and batches give the same draws as accumulate_mc_fisher.
    mc = module_diag_ggn(net, batches, lik, variant="mc", num_samples=3, generator=gen(5))
    ref = accumulate_mc_fisher(log_lik, sample_y, params, batches, 3, gen(5))
    close(flatten(mc), flatten(ref))


@pytest.mark.parametrize("pooled", [False, True])
def test_module_diag_ggn_sums_tokens_inside_the_square(pooled):
    """Token inputs: per-token outputs (T <= R, pair products) or mean-pooled (T > R)."""
    torch.manual_seed(0)

    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.head = nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, x):  # (B, T, 3)
            h = torch.tanh(self.embed(x))
            return self.head(h.mean(1) if pooled else h)

    net = Tokens().to(F64)
    fn, params = module_fn(net), {k: p.detach() for k, p in net.named_parameters()}
    x = torch.randn(5, 4, 3, generator=gen(0), dtype=F64)  # T = 4 tokens, R = 2 or 8
    fast = module_diag_ggn(net, [x[:2], x[2:]], "categorical")
    close(flatten(fast), flatten(diag_ggn(fn, params, x, "categorical")))


def test_module_diag_ggn_conv2d_and_frozen_layers():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.Conv2d(3, 2, 2, bias=False),
        nn.Flatten(),
        nn.LayerNorm(8),
        nn.Linear(8, 3),
    ).to(F64)
    x = torch.randn(4, 2, 6, 6, generator=gen(0), dtype=F64)
    with pytest.raises(ValueError, match="'4' \\(LayerNorm\\)"):
        module_diag_ggn(net, [x], "categorical")
    # a subset of parameters: layers holding none of them may be of any type
    sub = module_diag_ggn(net, [x], "categorical", parameters=["2.weight", "0.bias"])
    assert list(sub) == ["0.bias", "2.weight"]
    full = {k: p.detach() for k, p in net.named_parameters()}
    ref = diag_ggn(module_fn(net), {k: full[k] for k in sub}, x, "categorical")
    close(flatten(sub), flatten(ref))
    with pytest.raises(ValueError, match="not trainable parameters"):
        module_diag_ggn(net, [x], "categorical", parameters=["nope"])
    net[4].requires_grad_(False)
    net[5].bias.requires_grad_(False)
    fn = module_fn(net)
    params = {k: p.detach() for k, p in net.named_parameters() if p.requires_grad}
    fast = module_diag_ggn(net, [x[:1], x[1:]], "categorical")
    assert list(fast) == ["0.weight", "0.bias", "2.weight", "5.weight"]
    close(flatten(fast), flatten(diag_ggn(fn, params, x, "categorical")))


def test_module_diag_ggn_bad_inputs():
    net, _, _, x, y, lik, _ = _module_problem("categorical")
    with pytest.raises(ValueError, match="variant must be"):
        module_diag_ggn(net, [x], lik, variant="kfra")
    with pytest.raises(ValueError, match="needs \\(x, y\\) batches"):
        module_diag_ggn(net, [x], lik, variant="ef")
    with pytest.raises(ValueError, match="batches is empty"):
        module_diag_ggn(net, [], lik)
    shared = nn.Linear(2, 2).to(F64)
    with pytest.raises(ValueError, match="ran twice"):
        module_diag_ggn(nn.Sequential(shared, nn.Tanh(), shared), [x[:, :2]], lik)
