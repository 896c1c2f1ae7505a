r"""Token windows, the token-level likelihood, and a language model's potential.

A text of tokens :math:`t_1, \dots, t_M` is cut into windows of :math:`L` inputs; every
window predicts its next tokens, and with a stride :math:`S < L` a window scores only
its last :math:`S` targets (the first window all of them), so every token is scored
once and, after the first window, with at least :math:`L - S` tokens of context. The
log-likelihood of a window :math:`w` is the sum over its scored positions :math:`j`,

.. math::

    \log p(w \mid \theta) = \sum_{j \in \text{scored}(w)}
        \log \operatorname{softmax}(\mathrm{logits}_\theta(w)_j)_{y_j},

and the windows are the data of :class:`~pyro_sgmcmc.nn.ModulePotential`
(:math:`N` = the number of windows): :func:`lm_potential` builds its potential
:math:`\tilde U(\theta) = -\log p(\theta)/N - \frac1B \sum_{w} \log p(w \mid \theta)`
over exactly the trainable parameters, from a :class:`~pyro_sgmcmc.hf.TrunkCache`.
Targets that are not scored hold :data:`IGNORE` (-100, the Hugging Face convention).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from pyro_sgmcmc.gaussian import DiagonalGaussian, GaussianPosterior
from pyro_sgmcmc.hf.trunk import CachedHead, TrunkCache
from pyro_sgmcmc.nn import ModulePotential

__all__ = [
    "IGNORE",
    "diag_empirical_fisher",
    "laplace_diag",
    "lm_potential",
    "token_log_likelihood",
    "token_windows",
]

#: The target id of positions that are not scored.
IGNORE = -100


def token_windows(
    ids: Tensor | list[int], length: int, stride: int | None = None
) -> tuple[Tensor, Tensor]:
    """Cut a token sequence into ``(inputs, targets)`` windows, each ``(N, length)``.

    Window :math:`j` covers ``ids[j*stride : j*stride + length + 1]``; its targets are
    its inputs shifted by one, with the first ``length - stride`` of them set to
    :data:`IGNORE` after the first window (already scored by the previous window).
    Tokens after the last full window are dropped.

    Args:
        ids: the 1-D token ids of a text.
        length: :math:`L`, inputs per window.
        stride: :math:`S \\le L` (default :math:`L`: disjoint windows).

    Examples:
        >>> x, y = token_windows(torch.arange(8), 4, 2)
        >>> x.tolist()
        [[0, 1, 2, 3], [2, 3, 4, 5]]
        >>> y.tolist()
        [[1, 2, 3, 4], [-100, -100, 5, 6]]
    """
    ids = torch.as_tensor(ids, dtype=torch.long)
    stride = length if stride is None else int(stride)
    if not 1 <= stride <= length:
        raise ValueError(f"stride must be in 1..length={length}, got {stride}")
    if ids.dim() != 1 or ids.numel() < length + 1:
        raise ValueError(f"need a 1-D sequence of at least {length + 1} tokens")
    n = (ids.numel() - length - 1) // stride + 1
    starts = torch.arange(n) * stride
    idx = starts[:, None] + torch.arange(length + 1)
    win = ids[idx]
    inputs, targets = win[:, :-1], win[:, 1:].clone()
    targets[1:, : length - stride] = IGNORE
    return inputs, targets


def token_log_likelihood(logits: Tensor, targets: Tensor, mask: Tensor | None = None) -> Tensor:
    """Per-window summed log-probabilities of the targets, shape ``(B,)``.

    Args:
        logits: ``(..., B, T, V)`` (leading dimensions, e.g. ensemble members, allowed).
        targets: ``(B, T)`` token ids; :data:`IGNORE` entries are not scored.
        mask: optional ``(B, T)`` weights (1 scores the position), multiplied in.

    Pure tensor operations (no ``ignore_index`` branch), so it runs under
    ``torch.func.vmap`` and ``grad``.

    Examples:
        >>> logits = torch.zeros(1, 2, 4)  # uniform over 4 tokens
        >>> token_log_likelihood(logits, torch.tensor([[1, -100]]))
        tensor([-1.3863])
    """
    keep = targets != IGNORE
    safe = torch.where(keep, targets, torch.zeros_like(targets))
    logp = logits.log_softmax(-1)
    picked = torch.gather(logp, -1, safe.expand(logp.shape[:-1]).unsqueeze(-1)).squeeze(-1)
    weight = keep.to(picked.dtype) if mask is None else keep.to(picked.dtype) * mask
    return (picked * weight).sum(-1)


def _prior(prior: Any) -> Any:
    if isinstance(prior, GaussianPosterior):
        return prior.log_prob
    return prior


def lm_potential(
    model: nn.Module,
    cache: TrunkCache,
    *,
    num_data: int,
    prior: float | GaussianPosterior | Callable[[dict[str, Tensor]], Tensor] | None = None,
    **kwargs: Any,
) -> ModulePotential:
    """The potential of ``model``'s trainable parameters over cached token windows.

    A :class:`~pyro_sgmcmc.nn.ModulePotential` over a :class:`~pyro_sgmcmc.hf.CachedHead`
    (so its parameter names are ``model``'s) with :func:`token_log_likelihood`. Its
    batches are ``(cache[idx].inputs(), targets[idx])``.

    Args:
        model: the causal LM with only its chosen parameters trainable.
        cache: :func:`~pyro_sgmcmc.hf.trunk_hidden` of the windows (any of them: only
            the shared inputs are kept; the batches carry the hidden states).
        num_data: :math:`N`, the number of training windows.
        prior: a Normal(0, s) scale, a Gaussian posterior (a previous episode's Laplace,
            VI or EKF posterior over the same names: its normalised log density), a
            callable ``params -> log p``, or ``None`` (flat).
        **kwargs: passed to ``ModulePotential`` (e.g. ``check_finite=False``).

    Examples:
        >>> from pyro_sgmcmc.hf import add_lora, load_causal_lm, trunk_hidden
        >>> model = add_lora(load_causal_lm("tiny")[0])
        >>> x, y = token_windows(torch.randint(256, (200,)), 32)
        >>> cache = trunk_hidden(model, x, 1)
        >>> pot = lm_potential(model, cache, num_data=len(x), prior=1.0)
        >>> u, g = pot.potential_and_grad(pot.params(), (cache[:4].inputs(), y[:4]))
        >>> len(g), u.shape
        (6, torch.Size([]))
    """
    return ModulePotential(
        CachedHead(model, cache), token_log_likelihood, _prior(prior), num_data=num_data, **kwargs
    )


def diag_empirical_fisher(
    potential: ModulePotential, params: Mapping[str, Tensor], batches: Iterable[Any]
) -> dict[str, Tensor]:
    r"""The diagonal empirical Fisher :math:`\sum_w (\nabla_\theta \log p(w \mid \theta))^2`
    summed over every window of ``batches``, at ``params``.

    With windows as the data this is the EF of a :class:`DiagonalGaussian` Laplace
    posterior: its precision is this plus the prior's precision (see
    :func:`laplace_diag`).

    Examples:
        >>> from pyro_sgmcmc.nn import normal_log_likelihood
        >>> net = torch.nn.Linear(1, 1, bias=False)
        >>> pot = ModulePotential(net, normal_log_likelihood(1.0), num_data=4,
        ...                       output_transform=lambda o: o.squeeze(-1))
        >>> x, y = torch.ones(4, 1), torch.ones(4)
        >>> with torch.no_grad():
        ...     _ = net.weight.fill_(0.0)
        >>> diag_empirical_fisher(pot, pot.params(), [(x, y)])["weight"]
        tensor([[4.]])
    """
    total: dict[str, Tensor] = {}
    for batch in batches:
        grads = potential.per_example_grads(dict(params), batch)
        for k, g in grads.items():
            sq = g.square().sum(0)
            total[k] = sq if k not in total else total[k] + sq
    if not total:
        raise ValueError("batches is empty")
    return total


def laplace_diag(
    mean: Mapping[str, Tensor],
    curvature: Mapping[str, Tensor],
    prior_precision: float | Mapping[str, Tensor],
) -> DiagonalGaussian:
    r"""A diagonal Laplace posterior :math:`\mathcal N(\mu, (\Lambda_0 + C)^{-1})`.

    ``prior_precision`` is the precision :math:`\Lambda_0` of the prior the MAP ``mean``
    was found under: a scalar, or per-parameter tensors, e.g. the previous episode's
    posterior precision, so that :math:`\Lambda_t = \Lambda_{t-1} + C_t` accumulates the
    curvature of all episodes (a single quadratic penalty, Huszár 2018).

    Examples:
        >>> q = laplace_diag({"w": torch.zeros(2)}, {"w": torch.tensor([1.0, 3.0])}, 1.0)
        >>> q.precision["w"]
        tensor([2., 4.])
    """
    prec = {}
    for k, c in curvature.items():
        p0 = prior_precision if isinstance(prior_precision, (int, float)) else prior_precision[k]
        prec[k] = c.detach() + p0
    return DiagonalGaussian({k: v.detach().clone() for k, v in mean.items()}, prec)
