r"""The extended Kalman filter's two steps, the curvature terms it takes, and the
filter over the batches of a PyTorch model."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from pyro_sgmcmc.curvature import (
    dense_ef,
    dense_ggn,
    diag_ef,
    diag_ggn,
)
from pyro_sgmcmc.gaussian import DenseGaussian, DiagonalGaussian, GaussianPosterior
from pyro_sgmcmc.likelihoods import Likelihood
from pyro_sgmcmc.nn import ModulePotential
from pyro_sgmcmc.tree import flatten, module_fn, unflatten

__all__ = [
    "Terms",
    "as_family",
    "ef_terms",
    "ekf_predict",
    "ekf_update",
    "ggn_terms",
    "hessian_terms",
    "module_ekf",
    "run_ekf",
]

Params = dict[str, Tensor]
#: ``(params, batch, diagonal) -> (grad, curvature)``: the gradient of the minibatch's
#: summed log-likelihood (a dict like ``params``) and the curvature of its summed negative
#: log-likelihood (a dict like ``params`` when ``diagonal``, else ``(P, P)`` over
#: :func:`~pyro_sgmcmc.curvature.flatten`).
Terms = Callable[[Params, Any, bool], tuple[Params, "Params | Tensor"]]

_CURVATURES = ("ef", "ggn", "hessian")


# ---------------------------------------------------------------------- the two steps
def ekf_predict(
    state: GaussianPosterior,
    *,
    process_noise: float | Mapping[str, Tensor] = 0.0,
    forgetting: float = 1.0,
) -> GaussianPosterior:
    r"""The predict step :math:`\Sigma \leftarrow \Sigma / \gamma + Q`; the mean is kept.

    Args:
        state: the current belief.
        process_noise: :math:`q \ge 0`, the variance added to every coordinate, or a
            dict like the mean of per-coordinate variances.
        forgetting: :math:`\gamma \in (0, 1]`; the precision is multiplied by it.

    Returns:
        The predicted belief (``state`` itself when :math:`q = 0, \gamma = 1`).

    Examples:
        >>> from pyro_sgmcmc.gaussian import DiagonalGaussian
        >>> q = DiagonalGaussian({"w": torch.zeros(2)}, {"w": torch.tensor([1.0, 4.0])})
        >>> ekf_predict(q, process_noise=0.75, forgetting=0.5).variance()
        {'w': tensor([2.7500, 1.2500])}
    """
    if not 0 < forgetting <= 1:
        raise ValueError(f"forgetting must lie in (0, 1], got {forgetting}")
    if isinstance(process_noise, Mapping):
        noise = {k: torch.as_tensor(process_noise[k]) for k in state.mean}
        if any(bool((v < 0).any()) for v in noise.values()):
            raise ValueError("process_noise must be >= 0")
        trivial = all(bool((v == 0).all()) for v in noise.values())
    else:
        if not process_noise >= 0:
            raise ValueError(f"process_noise must be >= 0, got {process_noise}")
        noise = {k: torch.full_like(v, float(process_noise)) for k, v in state.mean.items()}
        trivial = process_noise == 0
    if trivial and forgetting == 1:
        return state
    if isinstance(state, DiagonalGaussian):
        precision = {
            k: 1.0 / (1.0 / (forgetting * lam) + noise[k].to(lam))
            for k, lam in state.precision.items()
        }
        return DiagonalGaussian(state.mean, precision)
    cov = state.covariance() / forgetting
    cov = cov + torch.diag(flatten(noise).to(cov))
    return DenseGaussian(state.mean, torch.cholesky_inverse(torch.linalg.cholesky(cov)))


def ekf_update(
    state: GaussianPosterior, terms: Terms, batch: Any, *, num_iterations: int = 1
) -> GaussianPosterior:
    r"""The update step on one minibatch (see the module docs for the equations).

    Args:
        state: the predicted belief; a :class:`~pyro_sgmcmc.gaussian.DiagonalGaussian`
            gets a diagonal update, a :class:`~pyro_sgmcmc.gaussian.DenseGaussian` a
            dense one.
        terms: ``(params, batch, diagonal) -> (grad, curvature)`` of the minibatch's
            summed log-likelihood, e.g. from :func:`ef_terms`, :func:`ggn_terms` or
            :func:`hessian_terms`.
        batch: the minibatch, as ``terms`` takes it.
        num_iterations: :math:`K`; 1 is the EKF, more the iterated EKF.

    Returns:
        The posterior after the minibatch, of the same type as ``state``.

    Raises:
        ValueError: the new precision is not positive (definite), which an indefinite
            Hessian can cause; use ``"ef"``/``"ggn"`` or a stronger prior.

    Examples:
        >>> from pyro_sgmcmc.curvature import per_example_grads
        >>> from pyro_sgmcmc.gaussian import DiagonalGaussian
        >>> ll = lambda p, x, y: -0.5 * (y - x * p["b"]) ** 2  # y ~ N(b x, 1)
        >>> terms = ef_terms(lambda p, batch: per_example_grads(ll, p, *batch))
        >>> prior = DiagonalGaussian({"b": torch.zeros(1)}, {"b": torch.ones(1)})
        >>> ekf_update(prior, terms, (torch.ones(1), torch.full((1,), 2.0))).mean
        {'b': tensor([0.4000])}
    """
    if not isinstance(state, GaussianPosterior):
        raise TypeError(f"state must be a GaussianPosterior, got {type(state).__name__}")
    if not (isinstance(num_iterations, int) and num_iterations >= 1):
        raise ValueError(f"num_iterations must be a positive integer, got {num_iterations!r}")
    diagonal = isinstance(state, DiagonalGaussian)
    mu = flatten(state.mean)
    theta = mu
    for _ in range(num_iterations):
        params = unflatten(theta, state.mean)
        grad, curv = terms(params, batch, diagonal)
        g = flatten(_check_grad(grad, state.mean)).to(mu)
        if diagonal:
            lam = flatten(state.precision)
            f = flatten(_check_grad(curv, state.mean, "curvature")).to(mu)
            new_lam = lam + f
            if not bool((new_lam > 0).all()):
                raise ValueError(_NOT_PD)
            theta = theta + (g - lam * (theta - mu)) / new_lam
        else:
            if not isinstance(curv, Tensor) or curv.shape != (mu.numel(), mu.numel()):
                raise ValueError(
                    f"terms must return a ({mu.numel()}, {mu.numel()}) curvature for a dense "
                    f"state, got {type(curv).__name__} {getattr(curv, 'shape', '')}"
                )
            lam = state.precision_matrix()
            new_lam = lam + 0.5 * (curv + curv.T).to(mu)
            chol, info = torch.linalg.cholesky_ex(new_lam)
            if int(info) != 0:
                raise ValueError(_NOT_PD)
            r = g - lam @ (theta - mu)
            theta = theta + torch.cholesky_solve(r.unsqueeze(-1), chol).squeeze(-1)
    mean = unflatten(theta.detach(), state.mean)
    if diagonal:
        return DiagonalGaussian(mean, unflatten(new_lam.detach(), state.mean))
    return DenseGaussian(mean, new_lam.detach())


_NOT_PD = (
    "the EKF precision (prior + curvature) is not positive definite: the curvature is "
    "indefinite (a Hessian away from a mode?); use curvature='ef' or 'ggn', or a prior "
    "with more precision"
)


def _check_grad(grad: Any, like: Mapping[str, Tensor], what: str = "gradient") -> Params:
    if not isinstance(grad, Mapping) or list(grad) != list(like):
        raise ValueError(
            f"terms must return the {what} as a dict with the keys {list(like)} in order, "
            f"got {list(grad) if isinstance(grad, Mapping) else type(grad).__name__}"
        )
    for k, v in like.items():
        if grad[k].shape != v.shape:
            raise ValueError(
                f"{what}[{k!r}] has shape {tuple(grad[k].shape)}, the mean's is {tuple(v.shape)}"
            )
    return dict(grad)


def run_ekf(
    prior: GaussianPosterior,
    terms: Terms,
    batches: Iterable[Any],
    *,
    num_iterations: int = 1,
    process_noise: float | Mapping[str, Tensor] = 0.0,
    forgetting: float = 1.0,
) -> GaussianPosterior:
    r"""One pass of the filter over ``batches``: predict, then update, per minibatch.

    Args:
        prior: the initial belief; its type (diagonal or dense) is the filter's.
        terms: gradient and curvature of a minibatch (:func:`ef_terms`,
            :func:`ggn_terms`, :func:`hessian_terms`).
        batches: the minibatches, each datum once (a ``DataLoader``, a list).
        num_iterations: iterated-EKF steps per minibatch.
        process_noise: :math:`q` of :func:`ekf_predict`.
        forgetting: :math:`\gamma` of :func:`ekf_predict`.

    Returns:
        The posterior after the last minibatch (the prior if ``batches`` is empty).

    Examples:
        >>> from pyro_sgmcmc.curvature import per_example_grads
        >>> from pyro_sgmcmc.gaussian import DiagonalGaussian
        >>> ll = lambda p, x, y: -0.5 * (y - x * p["b"]) ** 2
        >>> terms = ef_terms(lambda p, batch: per_example_grads(ll, p, *batch))
        >>> prior = DiagonalGaussian({"b": torch.zeros(1)}, {"b": torch.ones(1)})
        >>> run_ekf(prior, terms, [(torch.ones(2), torch.ones(2))] * 3)
        DiagonalGaussian(num_params=1)
    """
    if not isinstance(prior, GaussianPosterior):
        raise TypeError(f"prior must be a GaussianPosterior, got {type(prior).__name__}")
    state = prior
    for batch in batches:
        state = ekf_predict(state, process_noise=process_noise, forgetting=forgetting)
        state = ekf_update(state, terms, batch, num_iterations=num_iterations)
    return state


# ---------------------------------------------------------------------- curvature terms
def ef_terms(per_example_grads: Callable[[Params, Any], Mapping[str, Tensor]]) -> Terms:
    r"""Gradient and empirical Fisher from per-example log-likelihood gradients.

    :math:`g = \sum_i g_i`, :math:`F = \sum_i g_i g_i^\top` (or its diagonal), from one
    call of ``per_example_grads``.

    Args:
        per_example_grads: ``(params, batch) -> (B, *shape)`` gradients per parameter:
            ``ModulePotential.per_example_grads`` (batches ``(x, y)``),
            ``PyroPotential.per_example_grads`` (batches of plate indices), or
            ``lambda p, b: per_example_grads(log_lik, p, *b)``.

    Examples:
        >>> from pyro_sgmcmc.curvature import per_example_grads
        >>> ll = lambda p, x, y: -0.5 * (y - x * p["b"]) ** 2
        >>> terms = ef_terms(lambda p, batch: per_example_grads(ll, p, *batch))
        >>> terms({"b": torch.zeros(1)}, (torch.ones(2), torch.tensor([1.0, 3.0])), True)
        ({'b': tensor([4.])}, {'b': tensor([10.])})
    """

    def terms(params: Params, batch: Any, diagonal: bool) -> tuple[Params, Params | Tensor]:
        per = per_example_grads(params, batch)
        grad = {k: per[k].sum(0) for k in params}
        return grad, diag_ef(per) if diagonal else dense_ef(per)

    return terms


def ggn_terms(fn: Callable[[Params, Any], Tensor], likelihood: str | Likelihood) -> Terms:
    r"""Gradient and exact GGN (the Fisher, for these likelihoods) of a model function.

    Batches are ``(x, y)``; the log-likelihood is ``likelihood.log_prob(fn(params, x),
    y)`` summed over the batch, and the curvature is
    :func:`~pyro_sgmcmc.curvature.diag_ggn` or :func:`~pyro_sgmcmc.curvature.dense_ggn`.

    Args:
        fn: ``(params, x) -> output`` with the batch first, e.g.
            :func:`~pyro_sgmcmc.curvature.module_fn` of an ``nn.Module``.
        likelihood: a :class:`~pyro_sgmcmc.curvature.Likelihood` or its name.

    Examples:
        >>> from pyro_sgmcmc.curvature import Likelihood
        >>> terms = ggn_terms(lambda p, x: x @ p["w"], Likelihood("normal", scale=0.5))
        >>> _, f = terms({"w": torch.zeros(2)}, (torch.eye(2), torch.ones(2)), True)
        >>> f  # diag(X^T X) / s^2
        {'w': tensor([4., 4.])}
    """
    lik = likelihood if isinstance(likelihood, Likelihood) else Likelihood(likelihood)

    def terms(params: Params, batch: Any, diagonal: bool) -> tuple[Params, Params | Tensor]:
        x, y = _pair(batch)
        params = {k: v.detach() for k, v in params.items()}
        grad = torch.func.grad(lambda p: lik.log_prob(fn(p, x), y).sum())(params)
        curv = (diag_ggn if diagonal else dense_ggn)(fn, params, x, lik)
        return dict(grad), curv

    return terms


def hessian_terms(log_likelihood: Callable[[Params, Any], Tensor]) -> Terms:
    r"""Gradient and Hessian of the minibatch's summed log-likelihood, by autograd.

    The curvature is :math:`-\nabla^2_\theta \log p(y_t \mid \theta)` as a dense
    :math:`(P, P)` matrix (or its diagonal), from :math:`P` backward passes: for small
    models (GLMs, the last layer of a network). It equals the GGN for linear-Gaussian
    models and for GLMs with a canonical link (logistic, Poisson regression).

    Args:
        log_likelihood: ``(params, batch) -> (B,)`` per-example (or a scalar summed)
            log-likelihood, e.g. ``PyroPotential.per_example_log_likelihood``.

    Examples:
        >>> ll = lambda p, batch: -0.5 * (batch[1] - batch[0] @ p["w"]) ** 2
        >>> terms = hessian_terms(ll)
        >>> _, h = terms({"w": torch.zeros(2)}, (torch.tensor([[1.0, 2.0]]), torch.ones(1)), False)
        >>> h
        tensor([[1., 2.],
                [2., 4.]])
    """

    def terms(params: Params, batch: Any, diagonal: bool) -> tuple[Params, Params | Tensor]:
        like = {k: v.detach() for k, v in params.items()}

        def total(flat: Tensor) -> Tensor:
            return log_likelihood(unflatten(flat, like), batch).sum()

        flat = flatten(like).requires_grad_(True)
        value = total(flat)
        (g,) = torch.autograd.grad(value, flat, create_graph=True)
        p = flat.numel()
        rows = [torch.autograd.grad(g[i], flat, retain_graph=i < p - 1)[0] for i in range(p)]
        hess = -torch.stack(rows).detach()
        grad = unflatten(g.detach(), like)
        if diagonal:
            return grad, unflatten(hess.diagonal().clone(), like)
        return grad, hess

    return terms


def _pair(batch: Any) -> tuple[Any, Any]:
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise ValueError(f"batches must be (x, y) pairs, got {type(batch).__name__}")
    return batch[0], batch[1]


# ---------------------------------------------------------------------- PyTorch models
def as_family(prior: GaussianPosterior, dense: bool) -> GaussianPosterior:
    if dense and isinstance(prior, DiagonalGaussian):
        return DenseGaussian(prior.mean, prior.precision_matrix())
    if not dense and isinstance(prior, DenseGaussian):
        raise ValueError(
            "a dense prior cannot start a diagonal filter: pass dense=True, or a "
            "DiagonalGaussian prior"
        )
    return prior


def module_ekf(
    potential: ModulePotential,
    batches: Iterable[Any],
    *,
    prior: GaussianPosterior | None = None,
    dense: bool = False,
    curvature: str = "ef",
    likelihood: str | Likelihood | None = None,
    num_iterations: int = 1,
    process_noise: float | Mapping[str, Tensor] = 0.0,
    forgetting: float = 1.0,
) -> GaussianPosterior:
    r"""One EKF pass over a ``DataLoader`` for an ``nn.Module`` model.

    Args:
        potential: the model, its per-example log-likelihood and prior
            (:class:`~pyro_sgmcmc.nn.ModulePotential`); the filter is over its sampled
            parameters.
        batches: ``(x, y)`` minibatches covering the data once (``x`` a tensor for
            ``curvature="ggn"``).
        prior: the initial belief; defaults to the potential's ``Normal(0, s)`` prior
            (a float ``prior=s``) centred at zero.
        dense: a full covariance (:math:`P^2` memory) or a diagonal one.
        curvature: ``"ef"`` (empirical Fisher), ``"ggn"`` (exact GGN; needs
            ``likelihood``) or ``"hessian"`` (dense autograd Hessian; small models).
        likelihood: the :class:`~pyro_sgmcmc.curvature.Likelihood` matching the
            potential's log-likelihood, for ``"ggn"``.
        num_iterations: iterated-EKF steps per minibatch.
        process_noise: :math:`q` of :func:`ekf_predict`.
        forgetting: :math:`\gamma` of :func:`ekf_predict`.

    Returns:
        A :class:`~pyro_sgmcmc.gaussian.DiagonalGaussian` or
        :class:`~pyro_sgmcmc.gaussian.DenseGaussian` over the module's parameters; use
        ``potential.load_into(q.mean)`` to predict with the mean.

    Examples:
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> from pyro_sgmcmc.nn import ModulePotential, bernoulli_log_likelihood
        >>> _ = torch.manual_seed(0)
        >>> X = torch.randn(512, 2)
        >>> y = torch.bernoulli(torch.sigmoid(X @ torch.tensor([2.0, -1.0])))
        >>> pot = ModulePotential(torch.nn.Linear(2, 1), bernoulli_log_likelihood, prior=1.0,
        ...                       num_data=512, output_transform=lambda o: o.squeeze(-1))
        >>> loader = DataLoader(TensorDataset(X, y), batch_size=64, shuffle=True)
        >>> q = module_ekf(pot, loader, dense=True, curvature="ggn", likelihood="bernoulli")
        >>> q, torch.allclose(q.mean["weight"], torch.tensor([[2.0, -1.0]]), atol=0.4)
        (DenseGaussian(num_params=3), True)
    """
    if not isinstance(potential, ModulePotential):
        raise TypeError(f"potential must be a ModulePotential, got {type(potential).__name__}")
    if curvature not in _CURVATURES:
        raise ValueError(f"curvature must be one of {_CURVATURES}, got {curvature!r}")
    if prior is None:
        if not isinstance(potential.prior, (int, float)):
            raise ValueError(
                "the potential's prior is not a Normal(0, s) (a float): pass prior=, a "
                "GaussianPosterior over the module's parameters"
            )
        params = potential.params()
        lam = 1.0 / float(potential.prior) ** 2
        prior = DiagonalGaussian(
            {k: torch.zeros_like(v) for k, v in params.items()},
            {k: torch.full_like(v, lam) for k, v in params.items()},
        )
    elif list(prior.mean) != potential.names:
        raise ValueError(
            f"prior must be over the module's sampled parameters {potential.names}, got "
            f"{list(prior.mean)}"
        )
    prior = as_family(prior, dense)
    if curvature == "ef":
        terms = ef_terms(potential.per_example_grads)
    elif curvature == "ggn":
        if likelihood is None:
            raise ValueError(
                "curvature='ggn' needs likelihood=, the Likelihood (e.g. 'bernoulli', "
                "Likelihood('normal', scale=s)) that matches the potential's log-likelihood"
            )
        terms = ggn_terms(module_fn(potential.module, potential.output_transform), likelihood)
    else:

        def summed(params: Params, batch: Any) -> Tensor:
            # potential = -(log prior / N + mean log-likelihood): undo both.
            b = _pair(batch)[1].shape[0]
            pot = potential.potential(params, batch)
            return -b * (pot + potential.log_prior(params) / potential.num_data)

        terms = hessian_terms(summed)
    return run_ekf(
        prior,
        terms,
        batches,
        num_iterations=num_iterations,
        process_noise=process_noise,
        forgetting=forgetting,
    )
