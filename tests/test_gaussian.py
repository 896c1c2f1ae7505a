"""Gaussian posteriors: draws, densities, tempering and penalties against torch.distributions."""

import pytest
import torch

from pyro_sgmcmc.curvature import flatten
from pyro_sgmcmc.gaussian import DenseGaussian, DiagonalGaussian


def _dense_case():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 5, generator=g, dtype=torch.float64)
    prec = a @ a.T + 5 * torch.eye(5, dtype=torch.float64)
    mean = {"w": torch.randn(2, 2, generator=g, dtype=torch.float64), "b": torch.ones(1).double()}
    return DenseGaussian(mean, prec), prec, mean


def test_dense_matches_torch_mvn():
    q, prec, mean = _dense_case()
    ref = torch.distributions.MultivariateNormal(flatten(mean), precision_matrix=prec)
    torch.testing.assert_close(q.covariance(), ref.covariance_matrix)
    torch.testing.assert_close(flatten(q.variance()), ref.covariance_matrix.diagonal())
    x = ref.sample((7,))
    draws = {"w": x[:, :4].reshape(7, 2, 2), "b": x[:, 4:]}
    torch.testing.assert_close(q.log_prob(draws), ref.log_prob(x))
    torch.testing.assert_close(q.to_distribution().log_prob(x), ref.log_prob(x))


def test_dense_draws_have_the_covariance():
    q, prec, _ = _dense_case()
    draws = flatten(q.sample(200_000, torch.Generator().manual_seed(1)), batch_dims=1)
    emp = torch.cov(draws.T)
    assert (emp - q.covariance()).abs().max() < 0.01 * q.covariance().abs().max()
    assert (draws.mean(0) - flatten(q.mean)).abs().max() < 0.01


def test_diagonal_matches_independent_normal():
    mean = {"a": torch.tensor([0.0, 1.0]), "s": torch.tensor(2.0)}
    q = DiagonalGaussian(mean, {"a": torch.tensor([4.0, 0.25]), "s": torch.tensor(1.0)})
    ref = torch.distributions.Normal(torch.tensor([0.0, 1.0, 2.0]), torch.tensor([0.5, 2.0, 1.0]))
    x = {"a": torch.tensor([0.3, -1.0]), "s": torch.tensor(2.5)}
    torch.testing.assert_close(q.log_prob(x), ref.log_prob(flatten(x)).sum())
    torch.testing.assert_close(
        q.penalty(x), -(ref.log_prob(flatten(x)) - ref.log_prob(ref.loc)).sum()
    )
    draws = q.sample(100_000, torch.Generator().manual_seed(0))
    assert draws["s"].shape == (100_000,)
    torch.testing.assert_close(draws["a"].std(0), torch.tensor([0.5, 2.0]), rtol=0.02, atol=0)


def test_tempering_scales_the_covariance():
    q, _, _ = _dense_case()
    torch.testing.assert_close(q.tempered(0.5).covariance(), 0.5 * q.covariance())
    d = DiagonalGaussian({"w": torch.zeros(2)}, {"w": torch.ones(2)})
    torch.testing.assert_close(d.tempered(4.0).variance()["w"], torch.full((2,), 4.0))
    with pytest.raises(ValueError, match="temperature"):
        d.tempered(0.0)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="positive definite"):
        DenseGaussian({"w": torch.zeros(2)}, torch.tensor([[1.0, 2.0], [2.0, 1.0]]))
    with pytest.raises(ValueError, match="shape"):
        DiagonalGaussian({"w": torch.zeros(2)}, {"w": torch.ones(3)})
    with pytest.raises(ValueError, match="positive"):
        DiagonalGaussian({"w": torch.zeros(2)}, {"w": torch.zeros(2)})


def test_posteriors_own_their_tensors():
    """Training the source further (a guide's loc, a module's weights) must not change a
    posterior already returned."""
    loc, prec = torch.zeros(2), torch.ones(2)
    d = DiagonalGaussian({"w": loc}, {"w": prec})
    q = DenseGaussian({"w": loc}, torch.eye(2))
    loc += 1.0
    prec *= 4.0
    assert torch.equal(d.mean["w"], torch.zeros(2)) and torch.equal(d.precision["w"], torch.ones(2))
    assert torch.equal(q.mean["w"], torch.zeros(2))
