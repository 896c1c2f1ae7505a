r"""``nn.Module`` + log-likelihood + prior -> the minibatch potential of the samplers.

:class:`ModulePotential` gives a PyTorch model the same potential interface as
:class:`pyro_sgmcmc.potential.PyroPotential`, so a PyTorch user runs the pure steps of
:mod:`pyro_sgmcmc.samplers` (``sgld``, ``sghmc``, ``sgnht``, ``baoa``) in their own loop
over a ``DataLoader``. The parameters :math:`\theta` are the module's trainable
parameters as a flat ``dict[str, Tensor]`` (``module.named_parameters()`` order), and
the potential of a minibatch of size :math:`B` out of :math:`N` data is

.. math::

    \tilde U(\theta) = -\frac{1}{N}\Big[\log p(\theta)
        + \frac{N}{B} \sum_{i \in \text{batch}} \log p(y_i \mid x_i, \theta)\Big]
    = -\frac{\log p(\theta)}{N} - \frac{1}{B} \sum_{i \in \text{batch}}
        \log p(y_i \mid x_i, \theta),

an unbiased estimate of the per-datum potential :math:`U(\theta) = -\frac1N \log
p(\theta \mid y)` (up to a constant) whenever the batch is a uniform draw of the data,
as a shuffled ``DataLoader``'s batches are. The likelihood term is the usual mean
loss, so the step size is an SGD learning rate, and at temperature 0 the samplers are
exactly SGD (with momentum) on the loss plus :math:`-\log p(\theta)/N`: weight decay
:math:`1/(N s^2)` for a Normal(0, :math:`s`) prior.

The module is evaluated with :func:`torch.func.functional_call`, so sampled parameters
never touch the module until :meth:`ModulePotential.load_into` writes a sample back
for prediction. Buffers and frozen parameters (``requires_grad=False``) come from the
module itself. :meth:`ModulePotential.potential` is a pure function of ``(params,
batch)``, so ``torch.func.grad`` and ``torch.func.vmap`` apply to it: many chains as
one batch are ``vmap(grad(pot.potential))`` over parameters with a leading chain
dimension (the sampler steps are elementwise, so they take such parameters as is).

Examples:
    Bayesian linear regression sampled with SGHMC over a ``DataLoader``:

    >>> import torch
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> from pyro_sgmcmc.nn import ModulePotential, normal_log_likelihood
    >>> from pyro_sgmcmc.samplers import sghmc
    >>> _ = torch.manual_seed(0)
    >>> X = torch.randn(512, 3)
    >>> y = X @ torch.tensor([1.0, -2.0, 0.5]) + 0.5 * torch.randn(512)
    >>> model = torch.nn.Linear(3, 1)
    >>> pot = ModulePotential(
    ...     model, normal_log_likelihood(0.5), prior=1.0, num_data=len(X),
    ...     output_transform=lambda out: out.squeeze(-1))
    >>> loader = DataLoader(TensorDataset(X, y), batch_size=64, shuffle=True)
    >>> state, g, samples = sghmc.init(pot.params()), torch.Generator().manual_seed(1), []
    >>> for epoch in range(40):
    ...     for batch in loader:
    ...         _, grads = pot.potential_and_grad(state.params, batch)
    ...         state = sghmc.step(state, grads, 0.01, num_data=pot.num_data, alpha=10.0,
    ...                            generator=g)
    ...     if epoch >= 10:  # after burn-in, keep one draw per epoch
    ...         samples.append(state.params["weight"])
    >>> w = torch.stack(samples)  # (30, 1, 3) posterior draws
    >>> torch.allclose(w.mean(0), torch.tensor([[1.0, -2.0, 0.5]]), atol=0.1)
    True
    >>> pot.load_into(state.params)  # the module now predicts with the last draw
    >>> model(X[:2]).shape
    torch.Size([2, 1])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from pyro_sgmcmc.kernels.gradients import minibatch_beta
from pyro_sgmcmc.likelihoods import (
    LogLikelihood,
    bernoulli_log_likelihood,
    categorical_log_likelihood,
    normal_log_likelihood,
)
from pyro_sgmcmc.potential import NonFiniteError

__all__ = [
    "LogLikelihood",
    "ModulePotential",
    "NonFinitePotentialError",
    "bernoulli_log_likelihood",
    "categorical_log_likelihood",
    "normal_log_likelihood",
]

#: The module's input: a tensor, a tuple/list of positional inputs, or a dict of keyword ones.
Inputs = Tensor | Sequence[Tensor] | Mapping[str, Tensor]


class NonFinitePotentialError(NonFiniteError, ValueError):
    """The potential or its gradient is NaN or infinite (a ``ValueError`` as well, so that
    both ``except NonFiniteError`` and ``except ValueError`` catch it)."""


# ---------------------------------------------------------------------- the potential
def _leaves(x: Inputs) -> list[Tensor]:
    if isinstance(x, Tensor):
        return [x]
    if isinstance(x, Mapping):
        return list(x.values())
    return list(x)


def _map_inputs(fn: Callable[[Tensor], Tensor], x: Inputs) -> Inputs:
    if isinstance(x, Tensor):
        return fn(x)
    if isinstance(x, Mapping):
        return {k: fn(v) for k, v in x.items()}
    return type(x)(fn(v) for v in x)


class ModulePotential:
    """An ``nn.Module`` with a log-likelihood and a prior as a minibatch potential.

    Args:
        module: the network; its parameters with ``requires_grad`` are the ones sampled.
        log_likelihood: ``(output, y) -> (B,)`` per-example log-likelihoods (not a
            reduced loss), e.g. :func:`normal_log_likelihood`,
            :func:`bernoulli_log_likelihood`, :func:`categorical_log_likelihood`, or
            ``lambda out, y: -F.cross_entropy(out, y, reduction="none")``.
        prior: a positive float ``s`` for an isotropic ``Normal(0, s)`` on every sampled
            parameter, a callable ``params -> log p(params)`` returning the summed scalar
            log prior, or ``None`` for a flat (improper) prior.
        num_data: :math:`N`, the size of the data set (not the number of batches).
        output_transform: optional map applied to the module's output before the
            log-likelihood (e.g. ``lambda out: out.squeeze(-1)``, or picking ``.logits``).
        check_finite: raise :class:`NonFinitePotentialError` from
            :meth:`potential_and_grad` when the potential or a gradient is NaN/inf. It
            costs one host-device synchronisation per step; turn it off on a GPU once the
            model runs.

    Batches are ``(x, y)`` pairs (a ``DataLoader``'s ``[x, y]`` lists work): ``x`` a
    tensor, a tuple of positional inputs (``module(*x)``) or a dict of keyword inputs
    (``module(**x)``), every one with the batch first; ``y`` the targets. Dropout and
    batch norm follow ``module.train()`` / ``module.eval()``; use ``eval()`` for a
    deterministic potential and for :meth:`per_example_grad_variance`.

    Attributes:
        names: the sampled parameters' names, in ``named_parameters()`` order.
        num_data: :math:`N`.

    Examples:
        >>> net = torch.nn.Linear(2, 1)
        >>> pot = ModulePotential(net, bernoulli_log_likelihood, prior=1.0, num_data=100)
        >>> u, grads = pot.potential_and_grad(pot.params(), (torch.randn(8, 2), torch.ones(8)))
        >>> pot.names, u.shape, grads["weight"].shape
        (['weight', 'bias'], torch.Size([]), torch.Size([1, 2]))
    """

    def __init__(
        self,
        module: nn.Module,
        log_likelihood: LogLikelihood,
        prior: float | Callable[[dict[str, Tensor]], Tensor] | None = None,
        *,
        num_data: int,
        output_transform: Callable[[Any], Tensor] | None = None,
        check_finite: bool = True,
    ) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        if not callable(log_likelihood):
            raise TypeError("log_likelihood must be a callable (output, y) -> (B,) tensor")
        if isinstance(prior, bool) or not (
            prior is None or callable(prior) or isinstance(prior, (int, float))
        ):
            raise TypeError(
                "prior must be a float (the scale of a Normal(0, scale) prior), a callable "
                f"params -> log prior, or None; got {type(prior).__name__}"
            )
        if isinstance(prior, (int, float)) and not prior > 0:
            raise ValueError(f"prior scale must be positive, got {prior}")
        if not num_data > 0:
            raise ValueError(
                f"num_data must be the (positive) size of the data set, got {num_data}"
            )
        self.module = module
        self.log_likelihood = log_likelihood
        self.prior = prior
        self.num_data = num_data
        self.output_transform = output_transform
        self.check_finite = check_finite
        self.names = [k for k, p in module.named_parameters() if p.requires_grad]
        if not self.names:
            raise ValueError("the module has no parameters with requires_grad=True to sample")

    # ------------------------------------------------------------------ parameters
    def params(self) -> dict[str, Tensor]:
        """A detached copy of the module's sampled parameters, the sampler's start."""
        named = dict(self.module.named_parameters())
        return {k: named[k].detach().clone() for k in self.names}

    def load_into(self, params: dict[str, Tensor]) -> None:
        """Copy ``params`` (one sample) into the module in place, e.g. for prediction."""
        self._check_params(params)
        named = dict(self.module.named_parameters())
        for k in self.names:
            if params[k].shape != named[k].shape:
                raise ValueError(
                    f"params['{k}'] has shape {tuple(params[k].shape)} but the module's is "
                    f"{tuple(named[k].shape)}: load one sample (select a chain, e.g. "
                    "{k: v[i] for k, v in params.items()})"
                )
        with torch.no_grad():
            for k in self.names:
                named[k].copy_(params[k])

    def _check_params(self, params: Mapping[str, Tensor]) -> None:
        # functional_call would silently use the module's own value for a misspelt name.
        if params.keys() != set(self.names):
            missing = [k for k in self.names if k not in params]
            extra = [k for k in params if k not in self.names]
            raise ValueError(
                f"params must have exactly the module's sampled parameters {self.names}; "
                f"missing {missing}, unexpected {extra}: start from pot.params()"
            )

    # ------------------------------------------------------------------ evaluation
    def _split(self, batch: Sequence[Any]) -> tuple[Inputs, Tensor, int]:
        if not isinstance(batch, Sequence) or len(batch) != 2:
            raise ValueError(
                "batch must be an (x, y) pair, e.g. a DataLoader over TensorDataset(X, y); "
                f"got {type(batch).__name__}"
                + (f" of length {len(batch)}" if isinstance(batch, Sequence) else "")
            )
        x, y = batch
        leaves = _leaves(x)
        if not leaves or not all(isinstance(v, Tensor) for v in [*leaves, y]):
            raise ValueError("x (or each of its entries) and y must be tensors")
        b = y.shape[0] if y.dim() else 0
        for v in leaves:
            if v.dim() == 0 or v.shape[0] != b:
                raise ValueError(
                    f"x has {v.shape[0] if v.dim() else 0} rows but y has {b}: x and y "
                    "must share the batch (first) dimension; put the examples first"
                )
        if b > self.num_data:
            raise ValueError(
                f"the batch has {b} examples but num_data={self.num_data}: num_data is "
                "the size of the whole data set N, not the number of batches"
            )
        return x, y, b

    def _check_dtype(self, params: dict[str, Tensor], x: Inputs) -> None:
        dtype = next(iter(params.values())).dtype
        for v in _leaves(x):
            if v.is_floating_point() and v.dtype != dtype:
                raise ValueError(
                    f"x is {v.dtype} but the parameters are {dtype}: cast the data "
                    f"(x.to({dtype})) or the module (module.to({v.dtype}))"
                )

    def _forward(self, params: dict[str, Tensor], x: Inputs) -> Any:
        if isinstance(x, Tensor):
            args, kwargs = (x,), {}
        elif isinstance(x, Mapping):
            args, kwargs = (), dict(x)
        else:
            args, kwargs = tuple(x), {}
        out = functional_call(self.module, params, args, kwargs)
        return out if self.output_transform is None else self.output_transform(out)

    def _log_likelihoods(self, params: dict[str, Tensor], x: Inputs, y: Tensor, b: int) -> Tensor:
        ll = self.log_likelihood(self._forward(params, x), y)
        if not isinstance(ll, Tensor) or ll.shape != (b,):
            shape = tuple(ll.shape) if isinstance(ll, Tensor) else type(ll).__name__
            raise ValueError(
                f"log_likelihood(output, y) returned {shape}; it must return one "
                f"log-likelihood per example, shape ({b},): do not reduce over the batch "
                "(use reduction='none', not a mean loss) and sum any other dimensions per "
                f"example (e.g. ll.reshape({b}, -1).sum(1))"
            )
        return ll

    def log_prior(self, params: dict[str, Tensor]) -> Tensor:
        """The summed log prior :math:`\\log p(\\theta)` (0 for a flat prior)."""
        ref = next(iter(params.values()))
        if self.prior is None:
            return torch.zeros((), dtype=ref.dtype, device=ref.device)
        if callable(self.prior):
            lp = self.prior(params)
            if not isinstance(lp, Tensor) or lp.dim() != 0:
                shape = tuple(lp.shape) if isinstance(lp, Tensor) else type(lp).__name__
                raise ValueError(
                    f"prior(params) returned {shape}; it must return the summed log prior "
                    "as a scalar tensor (add .sum())"
                )
            return lp
        s = float(self.prior)
        n = sum(params[k].numel() for k in self.names)
        sq = sum((params[k] ** 2).sum() for k in self.names)
        return -0.5 * sq / s**2 - n * (math.log(s) + 0.5 * math.log(2 * math.pi))

    def potential(self, params: dict[str, Tensor], batch: Sequence[Any]) -> Tensor:
        """:math:`\\tilde U(\\theta)` on ``batch = (x, y)``, differentiable in ``params``.

        A pure function (no finiteness check), so ``torch.func.grad`` and
        ``torch.func.vmap`` apply to it.
        """
        self._check_params(params)
        x, y, b = self._split(batch)
        self._check_dtype(params, x)
        ll = self._log_likelihoods(params, x, y, b)
        return -(self.log_prior(params) / self.num_data + ll.mean())

    def potential_and_grad(
        self, params: dict[str, Tensor], batch: Sequence[Any]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The potential (detached scalar) and its gradient, a dict like ``params``.

        Raises:
            NonFinitePotentialError: the potential or a gradient is NaN/inf (when
                ``check_finite``), with which term and which parameters.
        """
        leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        u = self.potential(leaves, batch)
        grads = dict(zip(leaves, torch.autograd.grad(u, list(leaves.values())), strict=True))
        if self.check_finite:
            ok = torch.stack([torch.isfinite(u), *(g.isfinite().all() for g in grads.values())])
            if not bool(ok.all()):  # the one synchronisation per step
                raise self._nonfinite_error(params, batch, u, grads)
        return u.detach(), grads

    def _nonfinite_error(self, params, batch, u, grads) -> NonFinitePotentialError:
        x, y, b = self._split(batch)
        with torch.no_grad():
            lp = self.log_prior(params)
            ll = self._log_likelihoods(params, x, y, b)
        bad_params = [k for k, v in params.items() if not v.isfinite().all()]
        bad_grads = [k for k, g in grads.items() if not g.isfinite().all()]
        bad_rows = (~ll.isfinite()).nonzero().flatten().tolist()
        bad_data = any(v.is_floating_point() and not v.isfinite().all() for v in [*_leaves(x), y])
        return NonFinitePotentialError(
            f"the potential is {u.item()} with log prior {lp.item()}; non-finite "
            f"log-likelihood at batch rows {bad_rows[:10]}, non-finite parameters "
            f"{bad_params}, non-finite gradients {bad_grads}"
            + ("; the batch itself holds NaN/inf: clean the data" if bad_data else "")
            + ". Lower the step size (the chain may have diverged), check the data, or "
            "compute the log-likelihood stably (from logits, e.g. the built-in ones)"
        )

    # ------------------------------------------------------------------ gradient noise
    def per_example_grads(
        self, params: dict[str, Tensor], batch: Sequence[Any]
    ) -> dict[str, Tensor]:
        """Each example's log-likelihood gradient, shape ``(B, *param.shape)`` per name."""
        self._check_params(params)
        x, y, _ = self._split(batch)
        self._check_dtype(params, x)
        params = {k: v.detach() for k, v in params.items()}

        def one(p: dict[str, Tensor], xi: Inputs, yi: Tensor) -> Tensor:
            xi = _map_inputs(lambda v: v.unsqueeze(0), xi)
            return self._log_likelihoods(p, xi, yi.unsqueeze(0), 1)[0]

        try:
            return vmap(grad(one), in_dims=(None, 0, 0), randomness="different")(params, x, y)
        except RuntimeError:  # an op without a vmap batching rule: one gradient per example
            rows = [
                grad(one)(params, _map_inputs(lambda v, i=i: v[i], x), y[i])
                for i in range(y.shape[0])
            ]
            return {k: torch.stack([r[k] for r in rows]) for k in self.names}

    def per_example_grad_variance(
        self, params: dict[str, Tensor], batch: Sequence[Any]
    ) -> dict[str, Tensor]:
        """Variance over the batch (``B - 1`` denominator) of each example's log-likelihood
        gradient :math:`\\nabla_\\theta \\log p(y_i \\mid x_i, \\theta)`, per parameter.

        As :meth:`PyroPotential.per_example_grad_variance`; :meth:`estimate_beta` turns it
        into the gradient noise of the minibatch potential.
        """
        return {k: g.var(0) for k, g in self.per_example_grads(params, batch).items()}

    def estimate_beta(
        self,
        params: dict[str, Tensor],
        batch: Sequence[Any],
        temperature: float = 1.0,
        inv_mass: dict[str, Tensor] | None = None,
        batch_size: int | None = None,
    ) -> dict[str, Tensor]:
        """The gradient-noise estimate ``beta`` of ``sghmc``/``baoa``/``sgnht`` steps.

        For batches of :math:`B` drawn without replacement from :math:`N` data,
        :math:`\\mathrm{Var}[\\nabla \\tilde U] = (1 - B/N)\\, S^2 / B` with :math:`S^2`
        the per-example gradient variance, and the steps want
        :math:`\\beta = D\\, \\mathrm{Var}[\\nabla \\tilde U] / \\tau`, :math:`\\tau = T/N`.

        Args:
            params: where to estimate (the noise changes slowly; re-estimate now and then).
            batch: examples to estimate :math:`S^2` from; may be larger than the
                sampler's batches (less noisy).
            temperature: the sampler's :math:`T > 0`.
            inv_mass: the sampler's diagonal preconditioner :math:`D` (identity if None).
            batch_size: the sampler's :math:`B` (defaults to ``batch``'s size).

        This is the noise of *independent* batches (a random subset every step, e.g.
        ``DataLoader(..., sampler=RandomSampler(data, replacement=True))``). The batches
        of one epoch of a shuffled ``DataLoader`` partition the data, so their noise
        cancels over the epoch: when an epoch is short next to the chain's mixing time
        the effective noise is far smaller, and this ``beta`` over-compensates (a too
        cold posterior). There use ``beta=0`` (or a fraction of this one).
        """
        var = self.per_example_grad_variance(params, batch)
        b = batch_size or self._split(batch)[2]
        beta = minibatch_beta(var, b, self.num_data, temperature, replacement=False)
        return {k: v * (1.0 if inv_mass is None else inv_mass[k]) for k, v in beta.items()}
