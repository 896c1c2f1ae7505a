"""Tests of :class:`pyro_sgmcmc.laplace.kfac.KFACGaussian` against dense Gaussians.

The reference is a :class:`DenseGaussian` whose precision is the block diagonal of
``kfac_to_dense`` blocks plus the diagonal part, scaled, plus the prior, over the
temperature; everything in float64 so the two agree to ~1e-10.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pyro_sgmcmc.curvature import KFACFactors, flatten, kfac_factors, kfac_to_dense, unflatten
from pyro_sgmcmc.gaussian import DenseGaussian
from pyro_sgmcmc.laplace.kfac import KFACBlock, KFACGaussian, blocks_from_factors

F64 = torch.float64


def close(a, b, tol=1e-9):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _problem(seed: int = 0):
    """A conv + MLP's K-FAC factors, plus a 'log_noise' parameter with a diagonal curvature."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(1, 2, 2),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(8, 3),
        nn.Tanh(),
        nn.Linear(3, 2, bias=False),
    ).to(F64)
    x = torch.randn(6, 1, 3, 3, generator=gen(seed), dtype=F64)
    factors = kfac_factors(net, [x], "categorical", variant="ggn")
    mean = {k: p.detach() for k, p in net.named_parameters()}
    mean["log_noise"] = torch.tensor([0.3, -0.2], dtype=F64)
    diagonal = {"log_noise": torch.tensor([2.0, 0.5], dtype=F64)}
    return net, factors, mean, diagonal


def _dense_reference(factors, mean, diagonal, delta, scale=1.0, temperature=1.0):
    """The dense precision over flatten(mean) order, built entry by entry."""
    p = sum(m.numel() for m in mean.values())
    prec = torch.zeros(p, p, dtype=F64)
    offsets, start = {}, 0
    for k, m in mean.items():
        offsets[k] = torch.arange(start, start + m.numel())
        start += m.numel()
    for layer, f in factors.items():
        keys = [f"{layer}.weight"] + ([f"{layer}.bias"] if f.bias else [])
        idx = torch.cat([offsets[k] for k in keys])
        prec[idx[:, None], idx[None, :]] = scale * kfac_to_dense(f)
    for k, c in diagonal.items():
        prec[offsets[k], offsets[k]] = scale * c
    delta_vec = flatten(
        {
            k: torch.as_tensor(delta[k] if isinstance(delta, dict) else delta, dtype=F64).expand_as(
                m
            )
            for k, m in mean.items()
        }
    )
    return DenseGaussian(mean, (prec + torch.diag(delta_vec)) / temperature)


@pytest.mark.parametrize("scale, temperature", [(1.0, 1.0), (3.0, 0.5)])
def test_kfac_gaussian_equals_dense(scale, temperature):
    _, factors, mean, diagonal = _problem()
    q = KFACGaussian(
        mean,
        blocks_from_factors(factors),
        diagonal,
        prior_precision=0.7,
        curvature_scale=scale,
        temperature=temperature,
    )
    ref = _dense_reference(factors, mean, diagonal, 0.7, scale, temperature)
    close(q.precision_matrix(), ref.precision_matrix())
    close(q.covariance(), ref.covariance())
    close(flatten(q.variance()), flatten(ref.variance()))
    close(q.log_det_precision(), ref.log_det_precision())
    # log_prob and penalty at a batch of points and at one point
    pts = unflatten(torch.randn(4, q.num_params, generator=gen(1), dtype=F64), mean)
    close(q.log_prob(pts), ref.log_prob(pts))
    one = {k: v[0] for k, v in pts.items()}
    close(q.penalty(one), ref.penalty(one))
    # the sampling map is a square root of the covariance: W W^T = Sigma exactly
    w = q._whitened_to_flat(torch.eye(q.num_params, dtype=F64))
    close(w.T @ w, ref.covariance())


def test_kfac_gaussian_samples_have_the_dense_covariance():
    _, factors, mean, diagonal = _problem()
    q = KFACGaussian(mean, blocks_from_factors(factors), diagonal, prior_precision=2.0)
    draws = q.sample(40000, gen(3))
    assert draws["0.weight"].shape == (40000, 2, 1, 2, 2)
    x = flatten(draws, 1)
    emp_mean, emp_cov = x.mean(0), torch.cov(x.T)
    sd = q.covariance().diagonal().sqrt()
    assert ((emp_mean - flatten(q.mean)).abs() / sd).max() < 5 / math.sqrt(40000)  # 5 sigma
    corr_err = (emp_cov - q.covariance()) / (sd[:, None] * sd[None, :])
    assert corr_err.abs().max() < 5 * math.sqrt(2 / 40000)  # 5 sigma of a covariance entry


def test_with_prior_precision_and_tempered_reuse_the_eigendecomposition():
    _, factors, mean, diagonal = _problem()
    q = KFACGaussian(mean, blocks_from_factors(factors), diagonal, prior_precision=1.0)
    q2 = q.with_prior_precision(5.0)
    assert q2._eigen is q._eigen and q.prior_precision == 1.0  # q unchanged
    fresh = KFACGaussian(mean, blocks_from_factors(factors), diagonal, prior_precision=5.0)
    close(q2.log_det_precision(), fresh.log_det_precision())
    close(q2.covariance(), fresh.covariance())
    hot = q.tempered(2.0).tempered(1.5)
    assert hot.temperature == 3.0 and hot._eigen is q._eigen
    close(hot.precision_matrix(), q.precision_matrix() / 3.0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        q.tempered(0.0)


def test_log_det_is_differentiable_in_the_prior_precision():
    _, factors, mean, diagonal = _problem()
    q = KFACGaussian(mean, blocks_from_factors(factors), diagonal, temperature=2.0)
    delta = torch.tensor(0.8, dtype=F64, requires_grad=True)
    qd = q.with_prior_precision(delta)
    (grad,) = torch.autograd.grad(qd.log_det_precision(), delta)
    # d/d delta log det((C + delta I) / T) = tr((C + delta I)^{-1}) = tr(Sigma) / T
    close(grad, qd.covariance().trace() / 2.0)


def test_per_parameter_prior_precision_and_split_bias():
    _, factors, mean, diagonal = _problem()
    blocks = blocks_from_factors(factors)
    delta = {k: 1.0 for k in mean}
    delta["3.bias"] = 4.0
    delta["log_noise"] = torch.tensor([1.0, 3.0], dtype=F64)  # a tensor outside blocks
    with pytest.raises(ValueError, match="split the block"):
        KFACGaussian(mean, blocks, diagonal, delta)
    weight_block, bias_block = blocks.pop("3").split_bias()
    blocks.update({"3.w": weight_block, "3.b": bias_block})
    q = KFACGaussian(mean, blocks, diagonal, delta)
    # Reference: the full block with the weight-bias cross terms dropped.
    ref = _dense_reference(factors, mean, diagonal, {**delta, "log_noise": delta["log_noise"]})
    prec = ref.precision_matrix().clone()
    start = sum(mean[k].numel() for k in ["0.weight", "0.bias"])
    w = torch.arange(start, start + 24)
    b = torch.arange(start + 24, start + 27)
    prec[w[:, None], b[None, :]] = 0
    prec[b[:, None], w[None, :]] = 0
    close(q.precision_matrix(), prec)
    close(q.log_det_precision(), torch.linalg.slogdet(prec)[1])


def test_bad_inputs_get_clear_errors():
    _, factors, mean, diagonal = _problem()
    blocks = blocks_from_factors(factors)
    with pytest.raises(ValueError, match="two blocks"):
        KFACGaussian(mean, {**blocks, "again": blocks["3"]}, diagonal)
    with pytest.raises(ValueError, match="needs A"):
        KFACGaussian(mean, {"3": blocks["3"]._replace(A=torch.eye(2, dtype=F64))}, diagonal)
    with pytest.raises(ValueError, match="not positive definite"):
        KFACGaussian(mean, blocks, diagonal, prior_precision=0.0)
    with pytest.raises(ValueError, match="no bias"):
        blocks["5"].split_bias()
    q = KFACGaussian(mean, blocks, diagonal)
    q.max_dense_params = 10
    with pytest.raises(ValueError, match="too large"):
        q.covariance()


def test_a_single_datum_block_is_the_exact_ggn_block():
    """One datum: kron(G, A) is exact, so a one-layer KFACGaussian is the exact posterior."""
    torch.manual_seed(0)
    layer = nn.Linear(3, 2).to(F64)
    x = torch.randn(1, 3, dtype=F64)
    f = kfac_factors(layer, [x], "categorical", variant="ggn")[""]
    assert isinstance(f, KFACFactors)
    q = KFACGaussian(dict(layer.named_parameters()), blocks_from_factors({"": f}), None, 0.5)
    assert isinstance(q.blocks[""], KFACBlock) and q.blocks[""].weight == "weight"
    from pyro_sgmcmc.curvature import dense_ggn, module_fn

    params = {k: p.detach() for k, p in layer.named_parameters()}
    exact = dense_ggn(module_fn(layer), params, x, "categorical") + 0.5 * torch.eye(8, dtype=F64)
    close(q.precision_matrix(), exact)
