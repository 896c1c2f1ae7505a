r"""The cold-posterior experiment's model, data and methods (the seed paper's section 5.1).

A CNN-LSTM sentiment classifier (Wenzel et al., 2020: embedding, 1-D convolution, ReLU,
max-pool, LSTM, linear) on Rotten Tomatoes critic snippets
(:func:`~pyro_sgmcmc.datasets.load_rotten_tomatoes`), a Bernoulli likelihood on one
logit and a :math:`\mathcal N(0, v)` prior on every weight (``prior_variance``, 0.1 by
default: the paper's :math:`1/40` at IMDB's 25,000 reviews has the same weight per
datum as 0.1 at these 6,403 snippets, and at :math:`1/40` the MAP here is the constant
classifier), fitted by each method through the library's public PyTorch path:

* MLE and MAP: AdamW on :class:`~pyro_sgmcmc.nn.ModulePotential`'s potential (flat
  prior for the MLE);
* Laplace: :func:`~pyro_sgmcmc.laplace.module_laplace` (diagonal, empirical Fisher or
  GGN) at the MAP, computed once per seed at :math:`T = 1` and tempered;
* VI: :class:`~pyro_sgmcmc.vi.GaussianVI` (diagonal, sticking-the-landing, tempered),
  one fit per temperature, from the MAP mean;
* serial SGHMC: :func:`pyro_sgmcmc.samplers.sghmc.step` from the MAP, burn-in and
  thinning;
* parallel SGHMC: the same step on ``K`` chains as one vectorised batch
  (``vmap(grad(potential))``, each chain its own initialisation, batches and noise),
  the last state of each chain kept.

Predictions: the point predictive at the fitted parameters (MLE, MAP); Monte Carlo
over parameter draws (:func:`~pyro_sgmcmc.predictive.mc_predictive`: sampled Laplace
and VI, SGHMC samples and ensembles); the linearised predictive
(:func:`~pyro_sgmcmc.predictive.linearized_predictive` with exact per-example
Jacobians, then :func:`~pyro_sgmcmc.predictive.predictive_distribution` by Monte Carlo
in logit space).

The LSTM is written out of ``nn.Linear`` gates (:class:`LSTMLayer`) rather than
``nn.LSTM``: on CPU ``nn.LSTM`` dispatches to oneDNN's ``mkldnn_rnn_layer``, which has
no forward-mode derivative (the linearised predictive's ``jvp``) and no ``vmap``
batching rule (parallel chains and per-example gradients fall back to a slow loop or
fail); the explicit cell is the same function and supports every ``torch.func``
transform.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.func import grad, vmap

from pyro_sgmcmc.datasets import PAD_ID, load_rotten_tomatoes
from pyro_sgmcmc.gaussian import GaussianPosterior
from pyro_sgmcmc.laplace import module_laplace
from pyro_sgmcmc.nn import ModulePotential, bernoulli_log_likelihood
from pyro_sgmcmc.predictive import (
    FunctionGaussian,
    linearized_predictive,
    mc_predictive,
    predictive_distribution,
)
from pyro_sgmcmc.samplers import sghmc
from pyro_sgmcmc.tree import module_fn
from pyro_sgmcmc.vi import GaussianVI

__all__ = [
    "CNNLSTM",
    "ColdPosteriorConfig",
    "ColdPosteriorData",
    "LSTMLayer",
    "Metrics",
    "build_model",
    "classification_metrics",
    "fit_vi",
    "laplace_posteriors",
    "left_pad",
    "linearised_function_space",
    "linearised_probs",
    "load_data",
    "make_potential",
    "point_probs",
    "sampled_probs",
    "sghmc_parallel",
    "sghmc_serial",
    "train_adamw",
    "train_adamw_parallel",
]

Params = dict[str, Tensor]


# ============================================================================ settings
@dataclass
class ColdPosteriorConfig:
    """Every setting of a run (the command's defaults are the full run's).

    Model: ``embed_dim``-dimensional embeddings of the training vocabulary,
    ``filters`` 1-D convolution filters of width ``kernel_size``, ReLU, max-pool by
    ``pool``, an LSTM of ``hidden`` units, a linear logit. Snippets are cut to
    ``max_length`` words and left-padded (the LSTM's last state follows the last word).
    """

    temperatures: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
    seeds: int = 3
    max_length: int = 32
    max_vocab: int | None = None
    min_count: int = 2
    train_subset: int | None = None
    test_subset: int | None = None
    embed_dim: int = 32
    filters: int = 32
    kernel_size: int = 5
    pool: int = 2
    hidden: int = 32
    prior_variance: float = 0.1
    batch_size: int = 32
    # MLE / MAP: AdamW (learning rate, epochs), no decoupled weight decay (the prior is
    # in the loss).
    map_epochs: int = 8
    adam_lr: float = 2e-3
    # Laplace and VI predictions: parameter draws, logit draws (linearised).
    param_draws: int = 50
    logit_draws: int = 10_000
    # VI: Adam from the MAP mean with sd vi_init_scale, vi_epochs per temperature,
    # learning rates vi_lr (means) and vi_scale_lr (log sds) decayed geometrically by
    # vi_lr_decay over the run.
    vi_epochs: int = 4
    vi_lr: float = 2e-3
    vi_scale_lr: float = 2e-2
    vi_lr_decay: float = 0.1
    vi_init_scale: float = math.exp(-3.0)
    # SGHMC (both): SGD-style step size and friction (momentum 1 - step_size * alpha).
    sghmc_step_size: float = 0.02
    sghmc_alpha: float = 5.0
    # Serial SGHMC from the MAP: burn-in epochs, then `serial_draws` draws evenly
    # spaced over `serial_epochs` more epochs.
    serial_burnin_epochs: int = 2
    serial_epochs: int = 4
    serial_draws: int = 16
    # Parallel SGHMC: `parallel_chains` chains, each from its own AdamW fit
    # (`map_epochs` from its own initialisation), then `parallel_epochs` SGHMC epochs
    # per temperature; `seeds` ensembles of `ensemble_size` chains, disjoint when
    # seeds * ensemble_size <= parallel_chains.
    parallel_chains: int = 24
    parallel_epochs: int = 4
    ensemble_size: int = 8
    eval_batch: int = 512
    device: str = "cpu"
    extra: dict[str, Any] = field(default_factory=dict)


QUICK = {
    "temperatures": (0.1, 1.0),
    "seeds": 2,
    "max_length": 16,
    "max_vocab": 500,
    "train_subset": 400,
    "test_subset": 300,
    "embed_dim": 8,
    "filters": 8,
    "hidden": 8,
    "map_epochs": 2,
    "param_draws": 4,
    "logit_draws": 200,
    "vi_epochs": 1,
    "serial_burnin_epochs": 1,
    "serial_epochs": 1,
    "serial_draws": 3,
    "parallel_chains": 4,
    "parallel_epochs": 2,
    "ensemble_size": 2,
    "eval_batch": 300,
}


# ============================================================================ data
class ColdPosteriorData(NamedTuple):
    """Left-padded token ids and 0/1 labels (float) of both splits, and the vocabulary."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    vocab: list[str]


def left_pad(tokens: Tensor, lengths: Tensor) -> Tensor:
    """Move each row's words to the end of the row, padding first.

    Examples:
        >>> left_pad(torch.tensor([[5, 6, 0], [7, 0, 0]]), torch.tensor([2, 1])).tolist()
        [[0, 5, 6], [0, 0, 7]]
    """
    width = tokens.shape[1]
    lengths = lengths.clamp(max=width)
    idx = torch.arange(width).expand_as(tokens) - (width - lengths).unsqueeze(1)
    out = tokens.gather(1, idx.clamp(min=0))
    return torch.where(idx >= 0, out, torch.full_like(out, PAD_ID))


def load_data(cfg: ColdPosteriorConfig) -> ColdPosteriorData:
    """The movie-split Rotten Tomatoes data, left-padded, optionally subsampled (the
    first rows of a fixed permutation, the same for every seed)."""
    data = load_rotten_tomatoes(
        max_length=cfg.max_length, max_vocab=cfg.max_vocab, min_count=cfg.min_count
    )

    def side(split, subset):
        x = left_pad(split.tokens, split.lengths)
        y = split.labels.float()
        if subset is not None and subset < len(y):
            keep = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234))[:subset]
            x, y = x[keep], y[keep]
        return x.to(cfg.device), y.to(cfg.device)

    x_train, y_train = side(data.train, cfg.train_subset)
    x_test, y_test = side(data.test, cfg.test_subset)
    return ColdPosteriorData(x_train, y_train, x_test, y_test, data.vocab)


def epoch_batches(
    n: int, batch_size: int, generator: torch.Generator, device: str = "cpu"
) -> Iterator[Tensor]:
    """Index batches of one shuffled epoch (the last, smaller batch dropped)."""
    perm = torch.randperm(n, generator=generator, device=generator.device).to(device)
    for start in range(0, n - batch_size + 1, batch_size):
        yield perm[start : start + batch_size]


# ============================================================================ the model
class LSTMLayer(nn.Module):
    """A single-layer LSTM over ``(B, T, input)``, returning the last hidden state ``(B,
    hidden)``; gates ``i, f, g, o`` as in ``nn.LSTM``: an ``nn.Linear`` from the inputs
    (applied once to the whole sequence) and a recurrent matrix ``weight_hh``. The
    recurrent weight is a plain parameter, not an ``nn.Linear``, because it runs once per
    time step: layer-by-layer curvature (``module_diag_ggn``) assumes one call per layer,
    and :func:`~pyro_sgmcmc.laplace.module_laplace` sends such parameters through
    per-example Jacobians instead.

    Examples:
        >>> LSTMLayer(3, 4)(torch.zeros(2, 5, 3)).shape
        torch.Size([2, 4])
    """

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.input_gates = nn.Linear(input_size, 4 * hidden_size)
        self.weight_hh = nn.Parameter(
            torch.empty(4 * hidden_size, hidden_size).uniform_(-1, 1) / math.sqrt(hidden_size)
        )

    def forward(self, x: Tensor) -> Tensor:
        h = x.new_zeros(x.shape[0], self.hidden_size)
        c = torch.zeros_like(h)
        gates_x = self.input_gates(x)
        for t in range(x.shape[1]):
            i, f, g, o = (gates_x[:, t] + h @ self.weight_hh.T).chunk(4, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
        return h


class CNNLSTM(nn.Module):
    """Embedding, 1-D convolution, ReLU, max-pool, LSTM, linear: one logit per snippet.

    Examples:
        >>> net = CNNLSTM(vocab_size=50, embed_dim=4, filters=3, kernel_size=3, pool=2,
        ...               hidden=5)
        >>> net(torch.randint(0, 50, (7, 12))).shape  # (batch,): the logit of "fresh"
        torch.Size([7])
    """

    def __init__(
        self,
        vocab_size: int,
        embed_dim: int,
        filters: int,
        kernel_size: int,
        pool: int,
        hidden: int,
    ) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.conv = nn.Conv1d(embed_dim, filters, kernel_size)
        self.pool = pool
        self.lstm = LSTMLayer(filters, hidden)
        self.out = nn.Linear(hidden, 1)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.embedding(tokens).transpose(1, 2)  # (B, E, L)
        h = torch.relu(self.conv(h))
        h = nn.functional.max_pool1d(h, self.pool).transpose(1, 2)  # (B, L', F)
        return self.out(self.lstm(h)).squeeze(-1)


def build_model(cfg: ColdPosteriorConfig, vocab_size: int, seed: int) -> CNNLSTM:
    """A freshly initialised :class:`CNNLSTM` (PyTorch's default initialisation)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = CNNLSTM(vocab_size, cfg.embed_dim, cfg.filters, cfg.kernel_size, cfg.pool, cfg.hidden)
    return net.to(cfg.device)


def make_potential(net: nn.Module, num_data: int, prior_variance: float | None) -> ModulePotential:
    """The Bernoulli potential with a ``N(0, prior_variance)`` prior (``None``: flat)."""
    prior = None if prior_variance is None else math.sqrt(prior_variance)
    return ModulePotential(
        net, bernoulli_log_likelihood, prior=prior, num_data=num_data, check_finite=False
    )


# ============================================================================ fitting
def train_adamw(
    pot: ModulePotential,
    x: Tensor,
    y: Tensor,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    generator: torch.Generator,
) -> Params:
    """AdamW (no decoupled decay) on the potential from the module's parameters; the
    module ends at the result, which is returned (detached)."""
    params = dict(pot.module.named_parameters())
    opt = torch.optim.AdamW(params.values(), lr=lr, weight_decay=0.0)
    for _ in range(epochs):
        for idx in epoch_batches(len(y), batch_size, generator, str(x.device)):
            opt.zero_grad()
            pot.potential(params, (x[idx], y[idx])).backward()
            opt.step()
    return pot.params()


def train_adamw_parallel(
    pot: ModulePotential,
    starts: Params,
    x: Tensor,
    y: Tensor,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    generator: torch.Generator,
) -> Params:
    """``K`` independent AdamW runs as one vectorised batch (``starts``: ``(K, *shape)``
    each), each chain with its own shuffled batches. Adam is elementwise, so one
    ``AdamW`` over the stacked tensors is exactly ``K`` separate ones."""
    k = next(iter(starts.values())).shape[0]
    params = {name: v.detach().clone().requires_grad_(True) for name, v in starts.items()}
    opt = torch.optim.AdamW(params.values(), lr=lr, weight_decay=0.0)
    grads_of_chains = vmap(grad(pot.potential), in_dims=(0, 0))
    n = len(y)
    for _ in range(epochs):
        perms = torch.stack(
            [torch.randperm(n, generator=generator, device=generator.device) for _ in range(k)]
        )
        perms = perms.to(x.device)
        for start in range(0, n - batch_size + 1, batch_size):
            idx = perms[:, start : start + batch_size]
            grads = grads_of_chains({k_: v.detach() for k_, v in params.items()}, (x[idx], y[idx]))
            for name, p in params.items():
                p.grad = grads[name]
            opt.step()
    return {name: v.detach() for name, v in params.items()}


def laplace_posteriors(
    net: nn.Module, x: Tensor, y: Tensor, prior_variance: float, batch_size: int
) -> dict[str, tuple[GaussianPosterior, float]]:
    """Diagonal Laplace at the module's (MAP) parameters, at ``T = 1``, with the
    empirical Fisher (``"ef"``) and the GGN (``"ggn"``): each with its wall time."""
    batches = [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(y), batch_size)]
    out = {}
    for curvature in ("ef", "ggn"):
        start = time.perf_counter()
        q = module_laplace(
            net,
            batches,
            "bernoulli",
            structure="diag",
            curvature=curvature,
            prior_precision=1.0 / prior_variance,
        )
        out[curvature] = (q, time.perf_counter() - start)
    return out


def fit_vi(
    pot: ModulePotential,
    mean: Params,
    x: Tensor,
    y: Tensor,
    *,
    temperature: float,
    cfg: ColdPosteriorConfig,
    generator: torch.Generator,
) -> GaussianPosterior:
    """Diagonal STL VI at ``temperature`` from ``mean`` with sd ``cfg.vi_init_scale``:
    Adam (``cfg.vi_lr`` for the means, ``cfg.vi_scale_lr`` for the log sds), one draw
    per step, both rates decayed geometrically by ``cfg.vi_lr_decay`` over the run."""
    num_means = len(mean)

    def adam(leaves: list[Tensor]) -> torch.optim.Optimizer:
        # GaussianVI hands the diagonal family's leaves as [*means, *log_sds].
        if len(leaves) != 2 * num_means:
            raise ValueError("expected the means and log sds of a diagonal family")
        return torch.optim.Adam(
            [
                {"params": leaves[:num_means], "lr": cfg.vi_lr},
                {"params": leaves[num_means:], "lr": cfg.vi_scale_lr},
            ]
        )

    vi = GaussianVI(
        pot,
        mean,
        temperature=temperature,
        init_scale=cfg.vi_init_scale,
        optimizer=adam,
        num_samples=1,
        generator=generator,
    )
    steps_per_epoch = len(y) // cfg.batch_size
    total = max(1, cfg.vi_epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.ExponentialLR(vi.optimizer, cfg.vi_lr_decay ** (1 / total))
    for _ in range(cfg.vi_epochs):
        for idx in epoch_batches(len(y), cfg.batch_size, generator, str(x.device)):
            vi.step((x[idx], y[idx]))
            sched.step()
    return vi.posterior()


def sghmc_serial(
    pot: ModulePotential,
    start: Params,
    x: Tensor,
    y: Tensor,
    *,
    temperature: float,
    cfg: ColdPosteriorConfig,
    generator: torch.Generator,
) -> list[Params]:
    """One SGHMC chain from ``start``: ``cfg.serial_burnin_epochs`` of burn-in, then
    ``cfg.serial_draws`` draws evenly spaced over ``cfg.serial_epochs`` epochs."""
    state = sghmc.init(start)
    steps_per_epoch = len(y) // cfg.batch_size
    burnin = cfg.serial_burnin_epochs * steps_per_epoch
    sampling = cfg.serial_epochs * steps_per_epoch
    thin = max(1, sampling // cfg.serial_draws)
    draws, step = [], 0
    while len(draws) < cfg.serial_draws:
        for idx in epoch_batches(len(y), cfg.batch_size, generator, str(x.device)):
            _, grads = pot.potential_and_grad(state.params, (x[idx], y[idx]))
            state = sghmc.step(
                state,
                grads,
                cfg.sghmc_step_size,
                temperature=temperature,
                num_data=pot.num_data,
                alpha=cfg.sghmc_alpha,
                generator=generator,
            )
            step += 1
            if step > burnin and (step - burnin) % thin == 0:
                draws.append(state.params)
                if len(draws) == cfg.serial_draws:
                    break
    return draws


def sghmc_parallel(
    pot: ModulePotential,
    starts: Params,
    x: Tensor,
    y: Tensor,
    *,
    temperature: float,
    cfg: ColdPosteriorConfig,
    generator: torch.Generator,
) -> Params:
    """``K`` SGHMC chains as one vectorised batch (``starts``: ``(K, *shape)`` each), each
    with its own shuffled batches, for ``cfg.parallel_epochs`` epochs; returns the last
    state of every chain, ``(K, *shape)``."""
    k = next(iter(starts.values())).shape[0]
    grads_of_chains = vmap(grad(pot.potential), in_dims=(0, 0))
    state = sghmc.init(starts)
    n, b = len(y), cfg.batch_size
    for _ in range(cfg.parallel_epochs):
        perms = torch.stack(
            [torch.randperm(n, generator=generator, device=generator.device) for _ in range(k)]
        )
        perms = perms.to(x.device)
        for start in range(0, n - b + 1, b):
            idx = perms[:, start : start + b]  # (K, B): chain k's batch
            grads = grads_of_chains(state.params, (x[idx], y[idx]))
            state = sghmc.step(
                state,
                grads,
                cfg.sghmc_step_size,
                temperature=temperature,
                num_data=pot.num_data,
                alpha=cfg.sghmc_alpha,
                generator=generator,
            )
    return state.params


# ============================================================================ predictions
class Metrics(NamedTuple):
    """Test negative log-likelihood (nats per snippet), accuracy and expected
    calibration error (10 equal-width bins of the predicted class's probability)."""

    nll: float
    accuracy: float
    ece: float


def classification_metrics(probs: Tensor, y: Tensor, bins: int = 10) -> Metrics:
    """:class:`Metrics` of predicted probabilities of label 1.

    Examples:
        >>> m = classification_metrics(torch.tensor([0.9, 0.2, 0.6]), torch.tensor([1.0, 0.0, 0.0]))
        >>> round(m.accuracy, 3), round(m.nll, 3)
        (0.667, 0.415)
    """
    p = probs.double().clamp(1e-12, 1 - 1e-12)
    y = y.double()
    nll = -(y * p.log() + (1 - y) * (1 - p).log()).mean()
    pred = (p > 0.5).double()
    acc = (pred == y).double().mean()
    conf = torch.where(pred == 1, p, 1 - p)
    which = ((conf - 0.5) * 2 * bins).long().clamp(0, bins - 1)  # confidence is in [0.5, 1]
    ece = p.new_zeros(())
    for j in range(bins):
        m = which == j
        if m.any():
            ece += m.double().mean() * ((pred[m] == y[m]).double().mean() - conf[m].mean()).abs()
    return Metrics(float(nll), float(acc), float(ece))


def point_probs(net: nn.Module, params: Params, x: Tensor, eval_batch: int) -> Tensor:
    """P(label 1) at one parameter setting (MLE, MAP)."""
    fn = module_fn(net)
    with torch.no_grad():
        return torch.cat(
            [torch.sigmoid(fn(params, x[i : i + eval_batch])) for i in range(0, len(x), eval_batch)]
        )


def sampled_probs(
    net: nn.Module,
    draws: Params,
    x: Tensor,
    eval_batch: int,
    chunk_size: int = 10,
    members: bool = False,
) -> Tensor:
    """The Monte Carlo predictive over parameter draws ``(S, *shape)`` (sampled
    Laplace / VI, SGHMC samples, ensembles): the same draws for every test example.
    ``members``: each draw's probabilities ``(S, B)`` instead of their mean ``(B,)``."""
    fn = module_fn(net)
    parts = []
    for i in range(0, len(x), eval_batch):
        pred = mc_predictive(
            fn, draws, x[i : i + eval_batch], likelihood="bernoulli", chunk_size=chunk_size
        )
        parts.append(torch.sigmoid(pred.outputs) if members else pred.mean)
    return torch.cat(parts, dim=-1)


def linearised_function_space(
    net: nn.Module, posterior: GaussianPosterior, x: Tensor, eval_batch: int
) -> FunctionGaussian:
    """The linearised Gaussian over the logits, ``N(f(x; mu), J Sigma J^T)`` (exact
    per-example Jacobians; the variances only)."""
    fn = module_fn(net)
    parts = [
        linearized_predictive(fn, posterior, x[i : i + eval_batch], full_covariance=False)
        for i in range(0, len(x), eval_batch)
    ]
    return FunctionGaussian(
        torch.cat([p.mean for p in parts]), torch.cat([p.variance for p in parts])
    )


def linearised_probs(
    fg: FunctionGaussian, scale: float, num_samples: int, generator: torch.Generator
) -> Tensor:
    """P(label 1) of the linearised predictive with its logit variance multiplied by
    ``scale`` (a Laplace posterior tempered to ``T`` has ``T`` times the variance),
    averaged over ``num_samples`` logit draws."""
    scaled = FunctionGaussian(fg.mean, fg.variance * scale)
    return predictive_distribution(
        scaled, "bernoulli", link_approx="mc", num_samples=num_samples, generator=generator
    ).probs
