"""Tests of :func:`pyro_sgmcmc.laplace.module.module_laplace`.

Linear-Gaussian regression has an exact Gaussian posterior, and there the GGN is the
Hessian and K-FAC is exact (the output Hessian is a constant :math:`I / s^2`), so every
structure is checked against the closed form; a small MLP checks the bookkeeping
(K-FAC blocks, layers without a fast path, frozen parameters) against dense matrices.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pyro_sgmcmc.curvature import (
    Likelihood,
    dense_ggn,
    diag_ef,
    diag_ggn,
    flatten,
    kfac_factors,
    kfac_to_dense,
    module_fn,
    per_example_grads,
)
from pyro_sgmcmc.gaussian import DenseGaussian, DiagonalGaussian
from pyro_sgmcmc.laplace.kfac import KFACGaussian
from pyro_sgmcmc.laplace.module import module_laplace

F64 = torch.float64
S = 0.6  # noise scale


def close(a, b, tol=1e-9):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def _regression(delta: float = 2.0, n: int = 40):
    """nn.Linear(3, 2) at the exact posterior mean of a linear-Gaussian model."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, 3, generator=g, dtype=F64)
    W = torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.0, -1.0]], dtype=F64)
    Y = X @ W.T + S * torch.randn(n, 2, generator=g, dtype=F64)
    Xb = torch.cat([X, torch.ones(n, 1, dtype=F64)], 1)
    per_output = Xb.T @ Xb / S**2 + delta * torch.eye(4, dtype=F64)
    mean = torch.linalg.solve(per_output, Xb.T @ Y / S**2)  # (4, 2): one column per output
    net = nn.Linear(3, 2).to(F64)
    with torch.no_grad():
        net.weight.copy_(mean[:3].T)
        net.bias.copy_(mean[3])
    # Exact precision over [vec_r(W), b]: outputs are independent, so per weight row o,
    # entries (o, j) couple with (o, j') through Xb^T Xb / s^2; the bias of o is column 3.
    order = [o * 3 + j for o in range(2) for j in range(3)]
    precision = torch.zeros(8, 8, dtype=F64)
    for o in range(2):
        idx = torch.tensor([o * 3, o * 3 + 1, o * 3 + 2, 6 + o])
        precision[idx[:, None], idx[None, :]] = per_output
    assert order == list(range(6))
    loader = DataLoader(TensorDataset(X, Y), batch_size=16)
    return net, loader, X, Y, precision


@pytest.mark.parametrize("structure", ["dense", "diag", "kfac"])
def test_linear_gaussian_regression_is_exact(structure):
    net, loader, X, Y, precision = _regression()
    lik = Likelihood("normal", scale=S)
    q = module_laplace(net, loader, lik, structure=structure, prior_precision=2.0)
    close(flatten(q.mean), torch.cat([net.weight.detach().reshape(-1), net.bias.detach()]))
    # the mean is the MAP: the log-joint's gradient vanishes there
    fn = module_fn(net)
    params = {k: p.detach().clone().requires_grad_(True) for k, p in net.named_parameters()}
    log_joint = lik.log_prob(fn(params, X), Y).sum() - sum(
        p.square().sum() for p in params.values()
    )
    grads = torch.autograd.grad(log_joint, list(params.values()))
    assert max(g.abs().max() for g in grads) < 1e-9
    if structure == "diag":
        assert isinstance(q, DiagonalGaussian)
        close(flatten(q.precision), precision.diagonal())
    else:
        assert isinstance(q, DenseGaussian if structure == "dense" else KFACGaussian)
        close(q.precision_matrix(), precision)
        close(q.covariance(), torch.linalg.inv(precision))
    hot = module_laplace(net, loader, lik, structure=structure, prior_precision=2.0, temperature=4)
    close(flatten(hot.variance()), 4 * flatten(q.variance()))


def test_the_posterior_mean_is_a_copy():
    net, loader, *_ = _regression()
    q = module_laplace(net, loader, Likelihood("normal", scale=S))
    before = q.mean["weight"].clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    close(q.mean["weight"], before)


def _mlp():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(3, 4),
        nn.LayerNorm(4),
        nn.Tanh(),
        nn.Linear(4, 5, bias=False),
        nn.ReLU(),
        nn.Linear(5, 3),
    ).to(F64)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(13, 3, generator=g, dtype=F64)
    y = torch.randint(3, (13,), generator=g)
    return net, x, y, [(x[:5], y[:5]), (x[5:], y[5:])]


@pytest.mark.parametrize("curvature", ["ggn", "ef"])
def test_diag_on_an_mlp_with_a_layer_norm(curvature):
    """Linear layers take the fast path, the LayerNorm the per-example one."""
    net, x, y, batches = _mlp()
    params = {k: p.detach() for k, p in net.named_parameters()}
    fn = module_fn(net)
    if curvature == "ggn":
        ref = diag_ggn(fn, params, x, "categorical")
    else:
        lik = Likelihood("categorical")
        grads = per_example_grads(lambda p, x, y: lik.log_prob(fn(p, x), y), params, x, y)
        ref = diag_ef(grads)
    q = module_laplace(net, batches, "categorical", curvature=curvature, prior_precision=0.5)
    assert list(q.mean) == list(params)
    close(flatten(q.precision), flatten(ref) + 0.5)


def test_kfac_on_an_mlp_blocks_and_diagonal_parts():
    net, x, y, batches = _mlp()
    net[5].bias.requires_grad_(False)  # a frozen bias leaves the posterior and the block
    params = {k: p.detach() for k, p in net.named_parameters() if p.requires_grad}
    delta = {k: 1.0 for k in params}
    delta["0.bias"] = 3.0  # differs from 0.weight's: the layer gets split blocks
    q = module_laplace(net, batches, "categorical", structure="kfac", prior_precision=delta)
    assert isinstance(q, KFACGaussian)
    assert sorted(q.blocks) == ["0:bias", "0:weight", "3", "5"]
    assert q.blocks["5"].bias is None and q.blocks["5"].A.shape == (5, 5)
    assert sorted(q.diagonal) == ["1.bias", "1.weight"]
    factors = kfac_factors(net, batches, "categorical", variant="ggn")
    # layer 3 (no bias) is its Kronecker block; layer 5's block drops the bias column
    p3 = q.precision_matrix()[24:28][:, 24:28]  # after 0.weight, 0.bias, 1.weight, 1.bias
    close(p3, (kfac_to_dense(factors["3"]) + torch.eye(20, dtype=F64))[:4, :4])
    f5 = factors["5"]
    block5 = kfac_to_dense(f5._replace(A=f5.A[:-1, :-1], bias=False))
    close(q.precision_matrix()[-15:, -15:], block5 + torch.eye(15, dtype=F64))
    # the LayerNorm's diagonal is the exact GGN diagonal
    fn = module_fn(net)
    ln = {k: params[k] for k in ["1.weight", "1.bias"]}
    ref = diag_ggn(fn, ln, x, "categorical")
    close(q.variance()["1.weight"], 1 / (ref["1.weight"] + 1.0))


def test_dense_ggn_of_an_mlp_and_errors():
    net, x, y, batches = _mlp()
    params = {k: p.detach() for k, p in net.named_parameters()}
    q = module_laplace(net, batches, "categorical", structure="dense", prior_precision=0.3)
    G = dense_ggn(module_fn(net), params, x, "categorical")
    close(q.precision_matrix(), G + 0.3 * torch.eye(G.shape[0], dtype=F64))
    with pytest.raises(ValueError, match="max_dense_params"):
        module_laplace(net, batches, "categorical", structure="dense", max_dense_params=10)
    with pytest.raises(ValueError, match="structure must be"):
        module_laplace(net, batches, "categorical", structure="full")
    with pytest.raises(ValueError, match="curvature must be"):
        module_laplace(net, batches, "categorical", curvature="hessian")
    with pytest.raises(ValueError, match="one-shot iterator"):
        module_laplace(net, iter(batches), "categorical", structure="kfac")
    with pytest.raises(ValueError, match="one entry per trainable parameter"):
        module_laplace(net, batches, "categorical", prior_precision={"0.weight": 1.0})
    with torch.no_grad():
        net[5].weight.zero_()  # no curvature upstream of the head: the prior must be positive
    with pytest.raises(ValueError, match="positive"):
        module_laplace(net, batches, "categorical", prior_precision=0.0)


def test_mc_curvature_is_close_to_the_ggn():
    net, x, y, batches = _mlp()
    ggn = module_laplace(net, batches, "categorical", prior_precision=1e-3)
    mc = module_laplace(
        net,
        batches,
        "categorical",
        curvature="mc",
        num_samples=2000,
        generator=torch.Generator().manual_seed(0),
        prior_precision=1e-3,
    )
    a, b = flatten(ggn.precision), flatten(mc.precision)
    assert (a - b).norm() / a.norm() < 0.05


def test_benchmark_script_smoke():
    """benchmarks/laplace_scale.py's timing and memory tasks on a tiny network, in-process."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "laplace_scale.py"
    spec = importlib.util.spec_from_file_location("laplace_scale", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    common = {"threads": 1, "hidden": [16], "n": 64, "batch_size": 32}
    res = bench.child({**common, "kind": "time", "repeats": 1, "laplace_torch": False})
    assert res["P"] == 784 * 16 + 16 + 16 * 10 + 10 and len(res["ours"]) == 1
    mem = bench.child({**common, "kind": "memory", "method": "ours"})
    assert mem["peak_mb"] >= mem["base_mb"] > 0
