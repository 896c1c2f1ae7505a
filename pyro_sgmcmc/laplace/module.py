r"""Laplace approximations of a trained ``nn.Module`` (the PyTorch path).

Given the parameters :math:`\hat\theta` a user trained (the MAP of the summed negative
log-likelihood plus :math:`\tfrac{\delta}{2}\|\theta\|^2`, i.e. weight decay
:math:`\delta / N` on the mean loss), the Laplace approximation is

.. math::

    q(\theta) = \mathcal N\big(\hat\theta,\ \Lambda^{-1}\big), \qquad
    \Lambda = \frac{1}{T}\Big(C(\hat\theta) + \delta I\Big),

where :math:`C` is the curvature of :math:`-\sum_{i=1}^N \log p(y_i \mid x_i, \theta)`
accumulated over a data loader in one pass (:mod:`pyro_sgmcmc.curvature`: a sum over
the data, never a mean), :math:`\delta` the prior precision of a
:math:`\mathcal N(0, \delta^{-1} I)` prior and :math:`T` the temperature (the
cold-posterior :math:`p(\theta \mid y)^{1/T}`). Structures and the
:class:`~pyro_sgmcmc.gaussian.GaussianPosterior` each gives:

============ ====================================================== ===================
structure    curvature                                              posterior
============ ====================================================== ===================
``"diag"``   :func:`~pyro_sgmcmc.curvature.module_diag_ggn`         ``DiagonalGaussian``
             (:math:`O(P)` memory: millions of parameters)
``"kfac"``   :func:`~pyro_sgmcmc.curvature.kfac_factors` per        ``KFACGaussian``
             ``Linear``/``Conv2d``, diagonal for other parameters
``"dense"``  the full :math:`(P, P)` matrix (small models)          ``DenseGaussian``
============ ====================================================== ===================

and ``curvature`` picks the GGN (``"ggn"``, exact, equal to the Fisher for the
built-in canonical likelihoods), the empirical Fisher (``"ef"``) or a Monte Carlo
Fisher (``"mc"``).

Examples:
    Bayesian linear regression, where the Laplace approximation is exact:

    >>> import torch
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> from pyro_sgmcmc.curvature import Likelihood
    >>> _ = torch.manual_seed(0)
    >>> X = torch.randn(200, 3)
    >>> y = X @ torch.tensor([1.0, -2.0, 0.5]) + 0.5 * torch.randn(200)
    >>> net = torch.nn.Linear(3, 1)  # ... trained to the MAP; here solved directly:
    >>> Xb = torch.cat([X, torch.ones(200, 1)], 1)
    >>> prec = Xb.T @ Xb / 0.25 + torch.eye(4)
    >>> w = torch.linalg.solve(prec, Xb.T @ y / 0.25)
    >>> with torch.no_grad():
    ...     _ = net.weight.copy_(w[:3]), net.bias.copy_(w[3:])
    >>> loader = DataLoader(TensorDataset(X, y), batch_size=64)
    >>> q = module_laplace(net, loader, Likelihood("normal", scale=0.5), structure="dense",
    ...                    output_transform=lambda out: out.squeeze(-1))
    >>> torch.allclose(q.covariance(), torch.linalg.inv(prec), atol=1e-6)
    True
    >>> q_diag = module_laplace(net, loader, Likelihood("normal", scale=0.5),
    ...                         output_transform=lambda out: out.squeeze(-1))
    >>> torch.allclose(q_diag.variance()["weight"][0], 1 / prec.diagonal()[:3], atol=1e-6)
    True
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from pyro_sgmcmc.curvature import (
    Likelihood,
    accumulate_ef,
    accumulate_ggn,
    accumulate_mc_fisher,
    flatten,
    kfac_factors,
    module_diag_ggn,
    module_fn,
    per_example_grads,
)
from pyro_sgmcmc.gaussian import DenseGaussian, DiagonalGaussian, GaussianPosterior
from pyro_sgmcmc.gaussian.kronecker import KFACBlock, KFACGaussian, PriorPrecision
from pyro_sgmcmc.likelihoods import as_likelihood

__all__ = ["module_laplace"]

_STRUCTURES = ("diag", "kfac", "dense")
_CURVATURES = ("ggn", "ef", "mc")
_FAST_LAYERS = (nn.Linear, nn.Conv2d)


def _owners(module: nn.Module) -> dict[str, nn.Module]:
    """Trainable parameter name -> the module that holds it."""
    owners = {}
    for name, m in module.named_modules():
        prefix = f"{name}." if name else ""
        for k, p in m.named_parameters(recurse=False):
            if p.requires_grad:
                owners[prefix + k] = m
    return owners


def _prior_of(prior_precision: PriorPrecision, key: str, like: Tensor) -> Tensor:
    value = prior_precision[key] if isinstance(prior_precision, Mapping) else prior_precision
    return torch.as_tensor(value, dtype=like.dtype, device=like.device).expand_as(like)


class _Curvature:
    """The curvature pieces module_laplace needs, with one set of options."""

    def __init__(self, module, loader, lik, curvature, num_samples, generator, output_transform):
        self.module, self.loader, self.lik, self.curvature = module, loader, lik, curvature
        self.num_samples, self.generator = num_samples, generator
        self.output_transform = output_transform
        self.fn = module_fn(module, output_transform)

    def log_lik(self, p: dict[str, Tensor], x: Any, y: Any) -> Tensor:
        return self.lik.log_prob(self.fn(p, x), y)

    def sample_y(self, p: dict[str, Tensor], x: Any, generator: torch.Generator | None) -> Tensor:
        return self.lik.sample(self.fn(p, x), generator)

    def generic(self, params: dict[str, Tensor], diagonal: bool) -> Any:
        """Per-example Jacobians / gradients: any layer, memory O(B P) per batch."""
        if self.curvature == "ggn":
            return accumulate_ggn(self.fn, params, self.loader, self.lik, diagonal=diagonal)
        if self.curvature == "ef":
            return accumulate_ef(
                lambda p, b: per_example_grads(self.log_lik, p, *_pair(b)),
                params,
                self.loader,
                diagonal=diagonal,
            )
        return accumulate_mc_fisher(
            self.log_lik,
            self.sample_y,
            params,
            self.loader,
            self.num_samples,
            self.generator,
            diagonal=diagonal,
        )

    def diagonal(self, names: list[str]) -> dict[str, Tensor]:
        """Diagonal curvature of ``names``: layer by layer where it can, generic elsewhere."""
        owners = _owners(self.module)
        fast = [k for k in names if isinstance(owners[k], _FAST_LAYERS)]
        slow = [k for k in names if k not in fast]
        out: dict[str, Tensor] = {}
        if fast and slow:
            _check_reiterable(self.loader)
        if fast:
            out.update(
                module_diag_ggn(
                    self.module,
                    self.loader,
                    self.lik,
                    self.curvature,
                    num_samples=self.num_samples,
                    generator=self.generator,
                    output_transform=self.output_transform,
                    parameters=fast,
                )
            )
        if slow:
            params = dict(self.module.named_parameters())
            out.update(self.generic({k: params[k].detach() for k in slow}, diagonal=True))
        return {k: out[k] for k in names}


def _check_reiterable(loader: Iterable[Any]) -> None:
    if iter(loader) is loader:
        raise ValueError(
            "loader is a one-shot iterator, but this Laplace approximation passes over the "
            "data twice (Linear/Conv2d layers, then the other parameters): pass a "
            "DataLoader or a list of batches"
        )


def _pair(batch: Any) -> tuple[Any, Any]:
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise ValueError("curvature='ef' needs (x, y) batches with the observed targets")


def module_laplace(
    module: nn.Module,
    loader: Iterable[Any],
    likelihood: str | Likelihood,
    *,
    structure: str = "diag",
    curvature: str = "ggn",
    prior_precision: PriorPrecision = 1.0,
    temperature: float = 1.0,
    num_samples: int = 1,
    generator: torch.Generator | None = None,
    output_transform: Callable[[Any], Tensor] | None = None,
    max_dense_params: int = 20_000,
) -> GaussianPosterior:
    r"""The Laplace approximation of ``module`` at its current (trained) parameters.

    The mean is a copy of the module's trainable parameters (frozen ones are not part of
    the posterior); the precision is :math:`(C + \delta I) / T` with :math:`C` the
    curvature summed over one pass of ``loader`` (see the module docs).

    Args:
        module: the network at its MAP, evaluated as is (use ``eval()`` for dropout
            and batch norm). Its output (after ``output_transform``) is the
            likelihood's natural parameter, batch first.
        loader: ``(x, y)`` batches covering the training data once, e.g. a
            ``DataLoader`` (``y`` is used by ``curvature="ef"`` only). It is iterated
            once per kind of layer (a list or a ``DataLoader``, not a one-shot
            iterator, when ``"kfac"`` meets layers other than ``Linear``/``Conv2d``).
        likelihood: a :class:`~pyro_sgmcmc.curvature.Likelihood` or its name.
        structure: ``"diag"``, ``"kfac"`` or ``"dense"``.
        curvature: ``"ggn"``, ``"ef"`` or ``"mc"``.
        prior_precision: :math:`\delta > 0`: a scalar, or a dict over the trainable
            parameters' names (scalars; tensors shaped like the parameter for
            ``"diag"``/``"dense"`` and for K-FAC's non-block parameters). Under
            ``"kfac"`` a layer whose weight and bias have different :math:`\delta`
            gets separate weight and bias blocks.
        temperature: :math:`T > 0`.
        num_samples: draws per example for ``curvature="mc"``.
        generator: their source.
        output_transform: map from the module's output to the natural parameter
            (e.g. ``lambda out: out.squeeze(-1)`` for a ``(B, 1)`` regression head).
        max_dense_params: ``"dense"`` refuses models larger than this.

    Returns:
        A :class:`~pyro_sgmcmc.gaussian.DiagonalGaussian`,
        :class:`~pyro_sgmcmc.laplace.kfac.KFACGaussian` or
        :class:`~pyro_sgmcmc.gaussian.DenseGaussian` over the trainable parameters
        (``named_parameters()`` order).

    Raises:
        ValueError: an unknown structure or curvature, a dense model above
            ``max_dense_params``, or a non-positive prior precision where the
            curvature is zero.
    """
    if structure not in _STRUCTURES:
        raise ValueError(f"structure must be one of {_STRUCTURES}, got {structure!r}")
    if curvature not in _CURVATURES:
        raise ValueError(f"curvature must be one of {_CURVATURES}, got {curvature!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 for a Gaussian posterior, got {temperature}")
    mean = {k: p.detach().clone() for k, p in module.named_parameters() if p.requires_grad}
    if not mean:
        raise ValueError("module has no trainable parameter")
    if isinstance(prior_precision, Mapping) and set(prior_precision) != set(mean):
        raise ValueError(
            "prior_precision must have one entry per trainable parameter; missing "
            f"{sorted(set(mean) - set(prior_precision))}, unknown "
            f"{sorted(set(prior_precision) - set(mean))}"
        )
    lik = as_likelihood(likelihood)
    curv = _Curvature(module, loader, lik, curvature, num_samples, generator, output_transform)

    if structure == "diag":
        c = curv.diagonal(list(mean))  # fresh tensors: updated in place (memory O(P) once)
        for k in mean:
            c[k].add_(_prior_of(prior_precision, k, c[k])).div_(temperature)
        return DiagonalGaussian(mean, c)

    if structure == "dense":
        p = sum(m.numel() for m in mean.values())
        if p > max_dense_params:
            raise ValueError(
                f"structure='dense' needs a ({p}, {p}) matrix, above max_dense_params = "
                f"{max_dense_params}: use structure='kfac' or 'diag'"
            )
        dense = curv.generic(mean, diagonal=False)
        delta = flatten({k: _prior_of(prior_precision, k, m) for k, m in mean.items()})
        return DenseGaussian(mean, (dense + torch.diag(delta)) / temperature)

    if any(
        not (isinstance(m, _FAST_LAYERS) and m.weight.requires_grad)
        for m in _owners(module).values()
    ):  # parameters outside Kronecker blocks: a second pass for their diagonal
        _check_reiterable(loader)
    factors = kfac_factors(
        module,
        loader,
        lik,
        variant=curvature,
        num_samples=num_samples,
        generator=generator,
        output_transform=output_transform,
    )
    layers = dict(module.named_modules())
    blocks: dict[str, KFACBlock] = {}
    for name, f in factors.items():
        prefix = f"{name}." if name else ""
        weight, bias = prefix + "weight", prefix + "bias"
        A = f.A
        if f.bias and not layers[name].bias.requires_grad:  # a frozen bias: drop its column
            A, bias = A[:-1, :-1], None
        elif not f.bias:
            bias = None
        block = KFACBlock(weight, bias, A, f.G)
        if bias is not None and not torch.equal(
            _prior_of(prior_precision, weight, mean[weight]).reshape(-1)[:1],
            _prior_of(prior_precision, bias, mean[bias]).reshape(-1)[:1],
        ):
            blocks[name + ":weight"], blocks[name + ":bias"] = block.split_bias()
        else:
            blocks[name] = block
    covered = {k for b in blocks.values() for k in (b.weight, b.bias) if k is not None}
    others = [k for k in mean if k not in covered]
    diagonal = curv.diagonal(others) if others else {}
    return KFACGaussian(mean, blocks, diagonal, prior_precision, temperature=temperature)
