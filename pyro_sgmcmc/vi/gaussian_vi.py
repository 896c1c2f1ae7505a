r"""Tempered stick-the-landing Gaussian VI for PyTorch potentials: pure functions over a
:class:`VIState`, and the :class:`GaussianVI` optimiser around them."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from pyro_sgmcmc.gaussian import DenseGaussian, DiagonalGaussian, GaussianPosterior
from pyro_sgmcmc.tree import flatten, unflatten
from pyro_sgmcmc.vi.svi import check_temperature

__all__ = [
    "GaussianVI",
    "VIState",
    "vi_entropy",
    "vi_init",
    "vi_log_prob",
    "vi_loss",
    "vi_posterior",
    "vi_sample",
]

Params = dict[str, Tensor]
#: ``(params, batch) -> scalar`` per-datum minibatch potential, differentiable in params.
Potential = Callable[[Params, Any], Tensor]

_LOG_2PI = math.log(2 * math.pi)


# ====================================================================== PyTorch: pure functions
class VIState(NamedTuple):
    r"""A Gaussian variational family :math:`\mathcal N(\mu, LL^\top)` over flat parameters.

    Attributes:
        mean: :math:`\mu`, a flat parameter dict.
        raw_scale: the unconstrained scale. Diagonal family: a dict like ``mean`` of
            :math:`\rho = \log\sigma`. Dense family: a ``(P, P)`` matrix :math:`R` over
            :func:`~pyro_sgmcmc.curvature.flatten` order with
            :math:`L = \mathrm{diag}(e^{\mathrm{diag} R})\,(I + \mathrm{tril}(R, -1))`:
            its diagonal holds the log row scales and its strict lower triangle a
            unit lower-triangular factor (the upper triangle is unused). As in Pyro's
            ``AutoMultivariateNormal``, every entry is then scale-free, which suits
            Adam's per-coordinate steps.
    """

    mean: Params
    raw_scale: Params | Tensor

    @property
    def dense(self) -> bool:
        """Whether the family has a full covariance."""
        return isinstance(self.raw_scale, Tensor)


def vi_init(
    params: Mapping[str, Tensor] | GaussianPosterior,
    *,
    dense: bool = False,
    init_scale: float = 1e-2,
) -> VIState:
    r"""The initial :class:`VIState`: mean ``params``, standard deviation ``init_scale``.

    Args:
        params: the initial mean (e.g. ``pot.params()``, or a MAP estimate); or a
            :class:`~pyro_sgmcmc.gaussian.GaussianPosterior` (e.g. a Laplace
            approximation) to start from its mean and covariance (its Cholesky factor
            for ``dense``, its marginal standard deviations otherwise).
        dense: a full covariance (:math:`P(P+1)/2` scale parameters) or a diagonal one.
        init_scale: the initial :math:`\sigma` of every coordinate (ignored when
            starting from a posterior).

    Examples:
        >>> s = vi_init({"w": torch.zeros(2)}, dense=True, init_scale=0.5)
        >>> s.raw_scale.diagonal().exp()
        tensor([0.5000, 0.5000])
    """
    if isinstance(params, GaussianPosterior):
        mean = {k: v.clone() for k, v in params.mean.items()}
        if dense:
            chol = torch.linalg.cholesky(params.covariance())
            d = chol.diagonal()
            raw = torch.tril(chol / d.unsqueeze(-1), -1) + torch.diag_embed(d.log())
            return VIState(mean, raw)
        return VIState(mean, {k: v.log() for k, v in params.stddev().items()})
    if not isinstance(params, Mapping) or not params:
        raise TypeError("params must be a non-empty dict of tensors or a GaussianPosterior")
    if not init_scale > 0:
        raise ValueError(f"init_scale must be positive, got {init_scale}")
    for k, v in params.items():
        if not (isinstance(v, Tensor) and v.is_floating_point()):
            raise TypeError(f"params[{k!r}] must be a floating-point tensor")
    mean = {k: v.detach().clone() for k, v in params.items()}
    if dense:
        flat = flatten(mean)
        eye = torch.eye(flat.numel(), dtype=flat.dtype, device=flat.device)
        return VIState(mean, eye * math.log(init_scale))
    return VIState(mean, {k: torch.full_like(v, math.log(init_scale)) for k, v in mean.items()})


def _scale_tril(raw: Tensor) -> Tensor:
    unit = torch.tril(raw, -1) + torch.eye(raw.shape[0], dtype=raw.dtype, device=raw.device)
    return raw.diagonal().exp().unsqueeze(-1) * unit


def _check_state(state: VIState) -> None:
    if not isinstance(state, VIState):
        raise TypeError(f"state must be a VIState (from vi_init), got {type(state).__name__}")
    p = sum(v.numel() for v in state.mean.values())
    if state.dense:
        if state.raw_scale.shape != (p, p):
            raise ValueError(
                f"a dense VIState needs a ({p}, {p}) raw_scale, got {tuple(state.raw_scale.shape)}"
            )
    elif list(state.raw_scale) != list(state.mean):
        raise ValueError("raw_scale must have the keys of mean, in the same order")


def vi_sample(
    state: VIState, num_samples: int | None = None, generator: torch.Generator | None = None
) -> Params:
    r"""Reparameterised draws :math:`\mu + L\epsilon`, differentiable in the state.

    Returns:
        A dict of ``(num_samples, *shape)`` tensors (no leading dimension when
        ``num_samples`` is ``None``).

    Examples:
        >>> s = vi_init({"w": torch.zeros(3)}, init_scale=2.0)
        >>> vi_sample(s, 100_000, torch.Generator().manual_seed(0))["w"].std(0).round()
        tensor([2., 2., 2.])
    """
    _check_state(state)
    mu = flatten(state.mean)
    s = 1 if num_samples is None else num_samples
    eps = torch.randn(s, mu.numel(), generator=generator, dtype=mu.dtype, device=mu.device)
    if state.dense:
        flat = mu + eps @ _scale_tril(state.raw_scale).T
    else:
        flat = mu + eps * flatten(state.raw_scale).exp()
    draws = unflatten(flat, state.mean)
    return {k: v[0] for k, v in draws.items()} if num_samples is None else draws


def vi_log_prob(
    state: VIState, params: Mapping[str, Tensor], *, stop_gradient: bool = False
) -> Tensor:
    r""":math:`\log q_\lambda(\theta)` at ``params`` (entries may share leading batch dims).

    Args:
        state: the variational parameters :math:`\lambda`.
        params: :math:`\theta`.
        stop_gradient: evaluate with :math:`\lambda` detached, so that the gradient
            flows through ``params`` only (the sticking-the-landing term).

    Examples:
        >>> s = vi_init({"w": torch.zeros(1)}, init_scale=1.0)
        >>> vi_log_prob(s, {"w": torch.zeros(1)})  # -log(2 pi) / 2
        tensor(-0.9189)
    """
    _check_state(state)
    first = next(iter(state.mean))
    batch_dims = params[first].dim() - state.mean[first].dim()
    mu = flatten(state.mean)
    raw = state.raw_scale
    if stop_gradient:
        mu = mu.detach()
        raw = raw.detach() if state.dense else {k: v.detach() for k, v in raw.items()}
    delta = flatten(params, batch_dims) - mu
    p = mu.numel()
    if state.dense:
        chol = _scale_tril(raw)
        lead = delta.shape[:-1]
        z = torch.linalg.solve_triangular(chol, delta.reshape(-1, p).T, upper=False).T
        maha = z.square().sum(-1).reshape(lead)
        log_det = raw.diagonal().sum()
    else:
        log_sigma = flatten(raw)
        maha = (delta * torch.exp(-log_sigma)).square().sum(-1)
        log_det = log_sigma.sum()
    return -0.5 * maha - log_det - 0.5 * p * _LOG_2PI


def vi_entropy(state: VIState) -> Tensor:
    r"""The entropy :math:`\mathbb H[q] = \sum_i \log L_{ii} + \tfrac P2 (1 + \log 2\pi)`.

    Examples:
        >>> vi_entropy(vi_init({"w": torch.zeros(1)}, init_scale=1.0))
        tensor(1.4189)
    """
    _check_state(state)
    if state.dense:
        log_det = state.raw_scale.diagonal().sum()
        p = state.raw_scale.shape[0]
    else:
        log_det = sum(v.sum() for v in state.raw_scale.values())
        p = sum(v.numel() for v in state.raw_scale.values())
    return log_det + 0.5 * p * (1.0 + _LOG_2PI)


def vi_loss(
    state: VIState,
    potential: Potential,
    batch: Any,
    *,
    num_data: int,
    temperature: float = 1.0,
    num_samples: int = 1,
    generator: torch.Generator | None = None,
    stl: bool = True,
) -> Tensor:
    r"""The minibatch estimate of the per-datum negative tempered ELBO, :math:`-\mathcal L_T/N`.

    .. math::

        \ell = \frac1S \sum_s \Big[\tilde U(\theta_s) + \frac TN \log
            q_{\bar\lambda}(\theta_s)\Big] \quad (\texttt{stl=True}), \qquad
        \ell = \frac1S \sum_s \tilde U(\theta_s) - \frac TN \mathbb H[q_\lambda]
            \quad (\texttt{stl=False}),

    with :math:`\theta_s = \mu + L\epsilon_s`. Both have the same expectation and the
    same expected gradient; the sticking-the-landing one's gradient vanishes draw by draw
    at the optimum of a Gaussian target (see the module docs), the analytic-entropy
    one's does not.

    Args:
        state: the variational parameters (leaves with ``requires_grad`` to train them).
        potential: ``(params, batch) -> scalar``, the per-datum minibatch potential
            :math:`\tilde U` (``ModulePotential.potential``,
            ``PyroPotential.potential``, or your own).
        batch: what ``potential`` takes (an ``(x, y)`` pair, plate indices, ...).
        num_data: :math:`N`, the size of the data set.
        temperature: :math:`T \ge 0`.
        num_samples: draws :math:`S` per estimate.
        generator: source of :math:`\epsilon`.
        stl: the sticking-the-landing estimator (default) or the analytic entropy.

    Examples:
        >>> pot = lambda p, batch: 0.5 * (p["w"] ** 2).sum()  # N(0, 1) with N = 1
        >>> s = vi_init({"w": torch.zeros(2)}, init_scale=1.0)  # q = the target
        >>> mu, rho = s.mean["w"].requires_grad_(), s.raw_scale["w"].requires_grad_()
        >>> loss = vi_loss(VIState({"w": mu}, {"w": rho}), pot, None, num_data=1)
        >>> [t.abs().max().item() for t in torch.autograd.grad(loss, [mu, rho])]
        [0.0, 0.0]
    """
    _check_state(state)
    check_temperature(temperature)
    if not num_data > 0:
        raise ValueError(f"num_data must be positive, got {num_data}")
    if not (isinstance(num_samples, int) and num_samples >= 1):
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    draws = vi_sample(state, num_samples, generator)
    loss = _mean_potential(potential, draws, batch, num_samples)
    tau = temperature / num_data
    if tau == 0:
        return loss
    if stl:
        return loss + tau * vi_log_prob(state, draws, stop_gradient=True).mean()
    return loss - tau * vi_entropy(state)


def _mean_potential(potential: Potential, draws: Params, batch: Any, num_samples: int) -> Tensor:
    """The mean of ``potential`` over the draws: one vmapped call, else a loop."""
    if num_samples > 1:
        try:
            values = torch.func.vmap(lambda theta: potential(theta, batch), randomness="different")(
                draws
            )
        except (RuntimeError, NotImplementedError, ValueError):
            values = None  # an operation without a batching rule (or a .item()): loop
        if values is not None and values.shape == (num_samples,):
            return values.mean()
    total = 0.0
    for s in range(num_samples):
        u = potential({k: v[s] for k, v in draws.items()}, batch)
        if not isinstance(u, Tensor) or u.dim() != 0:
            raise ValueError(
                "potential(params, batch) must return a scalar tensor (the mean loss of the "
                "batch plus -log p(params) / N)"
            )
        total = total + u
    return total / num_samples


def vi_posterior(state: VIState) -> GaussianPosterior:
    r"""The fitted :math:`q` as a :class:`~pyro_sgmcmc.gaussian.GaussianPosterior`.

    Diagonal: precision :math:`\sigma^{-2}`. Dense: precision :math:`(LL^\top)^{-1}`.

    Examples:
        >>> vi_posterior(vi_init({"w": torch.zeros(2)}, init_scale=0.5)).precision
        {'w': tensor([4., 4.])}
    """
    _check_state(state)
    mean = {k: v.detach() for k, v in state.mean.items()}
    if state.dense:
        return DenseGaussian(mean, torch.cholesky_inverse(_scale_tril(state.raw_scale.detach())))
    return DiagonalGaussian(
        mean, {k: torch.exp(-2 * v.detach()) for k, v in state.raw_scale.items()}
    )


class GaussianVI:
    r"""Gaussian VI over a minibatch potential, stepping a ``torch.optim`` optimiser.

    Holds the variational parameters as leaf tensors and an optimiser over them (Adam by
    default), and minimises :func:`vi_loss` one batch at a time.

    Args:
        potential: ``(params, batch) -> scalar`` per-datum potential, or an object with
            a ``potential`` method and a ``num_data`` attribute
            (:class:`~pyro_sgmcmc.nn.ModulePotential`,
            :class:`~pyro_sgmcmc.potential.PyroPotential`).
        params: the initial mean (or a posterior to start from, see :func:`vi_init`);
            defaults to ``potential.params()`` for a ``ModulePotential``.
        num_data: :math:`N` (read from ``potential.num_data`` when there is one).
        dense: a full covariance or a diagonal one.
        temperature: :math:`T \ge 0` of the target :math:`p(\theta \mid y)^{1/T}`.
        lr: Adam's learning rate.
        init_scale: the initial standard deviation.
        num_samples: draws per gradient estimate.
        stl: the sticking-the-landing gradient (default) or the analytic entropy.
        generator: source of the draws.
        optimizer: ``params_list -> torch.optim.Optimizer`` to use instead of Adam.

    Attributes:
        optimizer: the ``torch.optim`` optimiser (attach an LR scheduler to it).

    Examples:
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> from pyro_sgmcmc.nn import ModulePotential, bernoulli_log_likelihood
        >>> _ = torch.manual_seed(0)
        >>> X = torch.randn(256, 3)
        >>> y = torch.bernoulli(torch.sigmoid(X @ torch.tensor([2.0, -1.0, 0.0])))
        >>> pot = ModulePotential(torch.nn.Linear(3, 1), bernoulli_log_likelihood, prior=1.0,
        ...                       num_data=256, output_transform=lambda o: o.squeeze(-1))
        >>> vi = GaussianVI(pot, lr=0.02)
        >>> losses = vi.fit(DataLoader(TensorDataset(X, y), batch_size=64, shuffle=True),
        ...                 num_epochs=100)
        >>> q = vi.posterior()
        >>> q, q.mean["weight"].shape
        (DiagonalGaussian(num_params=4), torch.Size([1, 3]))
    """

    def __init__(
        self,
        potential: Potential | Any,
        params: Mapping[str, Tensor] | GaussianPosterior | None = None,
        *,
        num_data: int | None = None,
        dense: bool = False,
        temperature: float = 1.0,
        lr: float = 1e-2,
        init_scale: float = 1e-2,
        num_samples: int = 1,
        stl: bool = True,
        generator: torch.Generator | None = None,
        optimizer: Callable[[list[Tensor]], torch.optim.Optimizer] | None = None,
    ) -> None:
        check_temperature(temperature)
        if hasattr(potential, "potential") and callable(potential.potential):
            owner = potential
            self.potential = potential.potential
            num_data = num_data if num_data is not None else getattr(owner, "num_data", None)
            if params is None and hasattr(owner, "params"):
                params = owner.params()
            elif params is None and hasattr(owner, "initial_params"):
                params = owner.initial_params()
        elif callable(potential):
            self.potential = potential
        else:
            raise TypeError("potential must be a callable (params, batch) -> scalar")
        if params is None:
            raise ValueError("params (the initial mean) is required for a plain potential")
        if num_data is None:
            raise ValueError("num_data (the size of the data set N) is required")
        state = vi_init(params, dense=dense, init_scale=init_scale)
        mean = {k: v.detach().clone().requires_grad_(True) for k, v in state.mean.items()}
        if state.dense:
            raw: Params | Tensor = state.raw_scale.detach().clone().requires_grad_(True)
            leaves = [*mean.values(), raw]
        else:
            raw = {k: v.detach().clone().requires_grad_(True) for k, v in state.raw_scale.items()}
            leaves = [*mean.values(), *raw.values()]
        self._state = VIState(mean, raw)
        self.num_data = int(num_data)
        self.temperature = float(temperature)
        self.num_samples = num_samples
        self.stl = stl
        self.generator = generator
        self.optimizer = (
            optimizer(leaves) if optimizer is not None else torch.optim.Adam(leaves, lr=lr)
        )

    @property
    def state(self) -> VIState:
        """The current variational parameters (detached)."""
        raw = self._state.raw_scale
        return VIState(
            {k: v.detach() for k, v in self._state.mean.items()},
            raw.detach() if isinstance(raw, Tensor) else {k: v.detach() for k, v in raw.items()},
        )

    def loss(self, batch: Any) -> Tensor:
        """:func:`vi_loss` at the current parameters on ``batch`` (differentiable)."""
        return vi_loss(
            self._state,
            self.potential,
            batch,
            num_data=self.num_data,
            temperature=self.temperature,
            num_samples=self.num_samples,
            generator=self.generator,
            stl=self.stl,
        )

    def step(self, batch: Any) -> Tensor:
        """One optimiser step on ``batch``; returns the (detached) loss."""
        self.optimizer.zero_grad()
        loss = self.loss(batch)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def fit(self, batches: Iterable[Any], num_epochs: int = 1) -> Tensor:
        """Step over ``batches`` (a ``DataLoader``, a list of batches) ``num_epochs`` times.

        Returns:
            The mean loss of each epoch, a ``(num_epochs,)`` tensor.
        """
        history = []
        for _ in range(num_epochs):
            total, count = 0.0, 0
            for batch in batches:
                total = total + self.step(batch)
                count += 1
            if count == 0:
                raise ValueError("batches is empty")
            history.append(total / count)
        return torch.stack(history) if history else torch.zeros(0)

    def posterior(self) -> GaussianPosterior:
        """The current :math:`q` as a Gaussian posterior (see :func:`vi_posterior`)."""
        return vi_posterior(self._state)
