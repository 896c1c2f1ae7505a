r"""The Bayesian-LLM experiment's pieces: the last-word task on UDHR statements, the
fine-tuning windows, the potential of the last attention layer over cached trunk
states, the fine-tuning drivers (parallel and serial SGHMC, AdamW over seeds) and the
uncertainty metrics (TU, AU, EU and AUROC).

The potential is per scored token (the paper's loss on the last tokens of each window):
with :math:`N` scored tokens in the training windows, a batch :math:`B` of them and a
Gaussian prior :math:`\mathcal N(\theta_0, s^2 I)` centred on the pretrained weights,

.. math::

    \tilde U(\theta) = -\frac{1}{|B|} \sum_{j \in B} \log p_\theta(y_j \mid x_{<j})
        + \frac{\lVert \theta - \theta_0 \rVert^2}{2 s^2 N}.

transformers is needed only by the functions that touch a model (through
:mod:`pyro_sgmcmc.hf`, which imports it lazily).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.func import functional_call, grad, vmap

from pyro_sgmcmc.hf import CachedHead, TrunkCache, token_log_likelihood, trunk_hidden
from pyro_sgmcmc.predictive.uncertainty import decompose_uncertainty
from pyro_sgmcmc.samplers import sghmc

__all__ = [
    "Statement",
    "adamw_runs",
    "auroc",
    "book_windows",
    "generator_for",
    "last_word_statements",
    "member_log_probs",
    "sghmc_parallel",
    "sghmc_serial",
    "split_last_word",
    "statement_uncertainty",
    "token_potential",
    "window_batch",
]

Params = dict[str, Tensor]

_WORD = re.compile(r"[^\W\d_][\w'\u02bb\u2019-]*")


def generator_for(seed: int, method: str) -> torch.Generator:
    """A generator of its own per (seed, method), so any subset of methods reruns to the
    same numbers whatever else runs with it.

    Examples:
        >>> a, b = generator_for(0, "x"), generator_for(0, "x")
        >>> bool(torch.rand(1, generator=a) == torch.rand(1, generator=b))
        True
    """
    value = int.from_bytes(hashlib.sha256(f"{seed}:{method}".encode()).digest()[:7], "big")
    return torch.Generator().manual_seed(value)


# ============================================================================ the task
def split_last_word(text: str) -> tuple[str, str]:
    """``(context, word)``: the statement without its last word, and that word (letters,
    digits, apostrophes, the Polynesian glottal stop and hyphens; trailing punctuation
    dropped).

    Examples:
        >>> split_last_word("All are equal before the law.")
        ('All are equal before the', 'law')
        >>> split_last_word("E tatau ona faʻaaloalo i le tulafono.")
        ('E tatau ona faʻaaloalo i le', 'tulafono')
    """
    matches = list(_WORD.finditer(text))
    if not matches:
        raise ValueError(f"no word in {text!r}")
    m = matches[-1]
    return text[: m.start()].rstrip(), m.group(0).rstrip("-'\u2019")


class Statement(NamedTuple):
    """One statement of the last-word task: ``context`` token ids and the ``target``,
    the first token of the last word (as it follows the context, after a space)."""

    key: tuple[int, int]
    context: list[int]
    target: int


def last_word_statements(
    texts: Sequence[str], keys: Sequence[tuple[int, int]], tokenizer: Any
) -> list[Statement]:
    """The last-word task of each statement: predict the first token of its last word
    from the rest.

    The target is read from the tokens of ``context + " " + word`` after the context's
    own tokens (checked to be their prefix, so the context is tokenised as the model
    sees it)."""
    out = []
    for key, text in zip(keys, texts, strict=True):
        context, word = split_last_word(text)
        a = list(tokenizer(context)["input_ids"])
        b = list(tokenizer(f"{context} {word}")["input_ids"])
        if b[: len(a)] != a or len(b) <= len(a) or not a:
            raise ValueError(f"the context of {key} does not tokenise as a prefix")
        out.append(Statement(key, a, b[len(a)]))
    return out


def book_windows(
    ids: Tensor, count: int, length: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """``count`` windows of ``length`` tokens at random (sorted, distinct) offsets of
    ``ids``, and their next tokens: ``(inputs, targets)``, each ``(count, length)``.

    Examples:
        >>> x, y = book_windows(torch.arange(100), 3, 5, torch.Generator().manual_seed(0))
        >>> x.shape, bool((y == x + 1).all())
        (torch.Size([3, 5]), True)
    """
    room = ids.numel() - length
    if room < count:
        raise ValueError(f"{ids.numel()} tokens give fewer than {count} windows of {length}")
    starts = torch.randperm(room, generator=generator)[:count].sort().values
    idx = starts[:, None] + torch.arange(length + 1)
    win = ids[idx]
    return win[:, :-1], win[:, 1:]


# ============================================================================ potential
def token_potential(
    head: CachedHead, scored: int, theta0: Params, prior_sd: float, num_data: int
) -> Callable[[Params, dict[str, Tensor], Tensor], Tensor]:
    r"""``U(params, inputs, targets)``: the per-token potential :math:`\tilde U` (module
    docs) of a batch of cached windows, ``inputs = cache[idx].inputs()``, ``targets``
    the ``(B, scored)`` next tokens of the windows' last ``scored`` positions. Pure, so
    ``torch.func.grad`` and ``vmap`` (over members and their batches) apply."""
    inv = 1.0 / (2.0 * prior_sd**2 * num_data)

    def potential(params: Params, inputs: dict[str, Tensor], targets: Tensor) -> Tensor:
        logits = functional_call(head, params, (), {**inputs, "last": scored})
        nll = -token_log_likelihood(logits, targets).sum() / targets.numel()
        sq = sum(((params[k] - theta0[k]) ** 2).sum() for k in params)
        return nll + inv * sq

    return potential


def window_batch(cache: TrunkCache, targets: Tensor, idx: Tensor) -> tuple[dict, Tensor]:
    return {k: v[idx] for k, v in cache.inputs().items()}, targets[idx]


def sghmc_parallel(
    potential: Callable,
    starts: Params,
    cache: TrunkCache,
    targets: Tensor,
    *,
    steps: int,
    batch_size: int,
    step_size: float,
    alpha: float,
    temperature: float,
    num_data: int,
    generator: torch.Generator,
    on_step: Callable[[int, Tensor], None] | None = None,
) -> Params:
    """``K`` SGHMC chains (``starts``: ``(K, *shape)`` each, momenta from 0) as one
    vectorised batch: one vmapped forward/backward per step, each chain with its own
    minibatch of windows (iid with replacement). Returns the last state, ``(K, ...)``."""
    k = next(iter(starts.values())).shape[0]
    vgrad = vmap(grad(potential, has_aux=False), in_dims=(0, 0, 0))
    vloss = vmap(potential, in_dims=(0, 0, 0))
    state = sghmc.init({n: v.clone() for n, v in starts.items()})
    for t in range(steps):
        idx = torch.randint(len(cache), (k, batch_size), generator=generator)
        inputs, y = window_batch(cache, targets, idx)
        g = vgrad(state.params, inputs, y)
        if on_step is not None and (t % 10 == 0 or t == steps - 1):
            with torch.no_grad():
                on_step(t, vloss(state.params, inputs, y))
        state = sghmc.step(
            state, g, step_size, temperature=temperature, num_data=num_data, alpha=alpha,
            generator=generator,
        )  # fmt: skip
    return state.params


def sghmc_serial(
    potential: Callable,
    start: Params,
    cache: TrunkCache,
    targets: Tensor,
    *,
    steps: int,
    burn_in: int,
    draws: int,
    batch_size: int,
    step_size: float,
    alpha: float,
    temperature: float,
    num_data: int,
    generator: torch.Generator,
    on_step: Callable[[int, Tensor], None] | None = None,
) -> Params:
    """One SGHMC chain from ``start``; ``draws`` evenly spaced states after ``burn_in``
    steps (the last one is the final state), stacked ``(draws, ...)``."""
    keep = set(torch.linspace(burn_in, steps, draws).round().long().tolist())
    g_fn = grad(potential)
    state = sghmc.init({n: v.clone() for n, v in start.items()})
    kept: list[Params] = []
    for t in range(1, steps + 1):
        idx = torch.randint(len(cache), (batch_size,), generator=generator)
        inputs, y = window_batch(cache, targets, idx)
        g = g_fn(state.params, inputs, y)
        if on_step is not None and (t % 50 == 1 or t == steps):
            with torch.no_grad():
                on_step(t, potential(state.params, inputs, y)[None])
        state = sghmc.step(
            state, g, step_size, temperature=temperature, num_data=num_data, alpha=alpha,
            generator=generator,
        )  # fmt: skip
        if t in keep:
            kept.append({n: v.clone() for n, v in state.params.items()})
    return {n: torch.stack([p[n] for p in kept]) for n in start}


def adamw_runs(
    potential: Callable,
    starts: Params,
    cache: TrunkCache,
    targets: Tensor,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    generators: Sequence[torch.Generator],
    on_step: Callable[[int, Tensor], None] | None = None,
) -> Params:
    """``K`` AdamW fine-tunes (one per seed, each with its own minibatches) of the same
    potential (the MAP under the prior; no decoupled decay) as one vectorised batch.
    Adam is elementwise, so one optimiser over the stacked tensors is exactly ``K``
    separate ones."""
    k = next(iter(starts.values())).shape[0]
    params = {n: v.detach().clone().requires_grad_(True) for n, v in starts.items()}
    opt = torch.optim.AdamW(params.values(), lr=lr, weight_decay=0.0)
    vgrad = vmap(grad(potential), in_dims=(0, 0, 0))
    vloss = vmap(potential, in_dims=(0, 0, 0))
    for t in range(steps):
        idx = torch.stack(
            [torch.randint(len(cache), (batch_size,), generator=g) for g in generators[:k]]
        )
        inputs, y = window_batch(cache, targets, idx)
        detached = {n: v.detach() for n, v in params.items()}
        grads = vgrad(detached, inputs, y)
        if on_step is not None and (t % 10 == 0 or t == steps - 1):
            with torch.no_grad():
                on_step(t, vloss(detached, inputs, y))
        for n, p in params.items():
            p.grad = grads[n]
        opt.step()
    return {n: v.detach() for n, v in params.items()}


# ============================================================================ evaluation
def member_log_probs(
    model: Any, statements: Sequence[Statement], members: Params, chunk: int = 8
) -> Tensor:
    """``(S, M, V)`` next-token log-probabilities of every member (``members``:
    ``(S, ...)`` stacked parameters) at the end of each statement's context.

    Each statement's trunk is run once (unpadded, batch 1); the last layer and the head
    then run for all members at once (vmapped) at the last position only."""
    out = []
    for st in statements:
        cache = trunk_hidden(model, torch.tensor([st.context]), 1)
        head = CachedHead(model, cache)

        def one(p: Params, head: CachedHead = head, cache: TrunkCache = cache) -> Tensor:
            return functional_call(head, p, (), {**cache.inputs(), "last": 1})[0, -1]

        with torch.no_grad():
            s = next(iter(members.values())).shape[0]
            rows = [
                vmap(one)({n: v[i : i + chunk] for n, v in members.items()})
                for i in range(0, s, chunk)
            ]
        out.append(torch.cat(rows).log_softmax(-1))
    return torch.stack(out, 1)


class StatementScores(NamedTuple):
    """Per statement: the predictive's loss on the target and its TU, AU, EU (nats)."""

    loss: Tensor
    total: Tensor
    aleatoric: Tensor
    epistemic: Tensor


def statement_uncertainty(log_probs: Tensor, targets: Tensor) -> StatementScores:
    r"""The mixture predictive :math:`\bar p = \frac1S \sum_s p_s` of the members'
    log-probabilities ``(S, M, V)``: its loss :math:`-\log \bar p(y)` on each of the
    ``M`` targets, and TU = AU + EU by :func:`decompose_uncertainty` (entropy of
    :math:`\bar p`, mean member entropy, mutual information).

    Examples:
        >>> lp = torch.tensor([[[0.9, 0.1]], [[0.1, 0.9]]]).log()
        >>> s = statement_uncertainty(lp, torch.tensor([0]))
        >>> round(float(s.loss[0]), 4), round(float(s.total[0]), 4)
        (0.6931, 0.6931)
    """
    u = decompose_uncertainty(log_probs, "categorical", logits=True)
    log_mean = log_probs.logsumexp(0) - torch.log(torch.tensor(float(log_probs.shape[0])))
    loss = -log_mean.gather(-1, targets[:, None]).squeeze(-1)
    return StatementScores(loss, u.total, u.aleatoric, u.epistemic)


def auroc(negatives: Tensor, positives: Tensor) -> float:
    """The probability that a positive (out-of-distribution) statement scores above a
    negative (English) one, ties counted half: the area under the ROC curve.

    Examples:
        >>> auroc(torch.tensor([0.1, 0.2]), torch.tensor([0.3, 0.2]))
        0.875
    """
    neg, pos = negatives.double()[None, :], positives.double()[:, None]
    return float(((pos > neg).double() + 0.5 * (pos == neg).double()).mean())
