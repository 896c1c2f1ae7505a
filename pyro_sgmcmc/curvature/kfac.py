r"""Kronecker-factored (K-FAC) curvature of ``nn.Linear`` and ``nn.Conv2d`` layers."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from pyro_sgmcmc.curvature.layers import (
    KFAC_LAYERS,
    backprop,
    check_variant,
    layer_inputs,
    layer_passes,
)
from pyro_sgmcmc.likelihoods import Likelihood, as_likelihood
from pyro_sgmcmc.tree import (
    tree_add,
)

__all__ = ["KFACFactors", "kfac_factors", "kfac_to_dense", "kron_mvp"]


class KFACFactors(NamedTuple):
    r"""Kronecker factors of one layer's curvature block, :math:`\approx G \otimes A`.

    Attributes:
        A: :math:`\frac1N \sum_i a_i a_i^\top`, input activations (a 1 appended for the
            bias), :math:`(d_{in} [+1])^2`; a mean over data.
        G: :math:`\sum_i \sum_r g_{ir} g_{ir}^\top`, gradients wrt the layer's output,
            :math:`d_{out}^2`; a sum over data.
        bias: whether the layer has a bias (the last row/column of ``A``).
    """

    A: Tensor
    G: Tensor
    bias: bool


def kron_mvp(A: Tensor, G: Tensor, V: Tensor) -> Tensor:
    r""":math:`(G \otimes A)\, \mathrm{vec}_r(V) = \mathrm{vec}_r(G V A^\top)`, never forming G ⊗ A.

    Args:
        A: ``(n, n)``; G: ``(m, m)``.
        V: ``(m, n)``, e.g. a direction in :math:`\tilde W = [W, b]` (``W`` reshaped to
            ``(d_out, -1)``).

    Returns:
        ``G @ V @ A.T``, shape ``(m, n)``.

    Examples:
        >>> A, G, V = torch.randn(3, 3), torch.randn(2, 2), torch.randn(2, 3)
        >>> torch.allclose(kron_mvp(A, G, V).reshape(-1), torch.kron(G, A) @ V.reshape(-1),
        ...                atol=1e-5)
        True
    """
    if A.shape[0] != V.shape[1] or G.shape[0] != V.shape[0]:
        raise ValueError(
            f"V must have shape (G.shape[0], A.shape[0]) = ({G.shape[0]}, {A.shape[0]}), "
            f"got {tuple(V.shape)}"
        )
    return G @ V @ A.T


def kfac_to_dense(factors: KFACFactors) -> Tensor:
    r"""The dense block ``kron(G, A)`` in the ``weight, bias`` order of :func:`flatten`.

    ``kron(G, A)`` is over :math:`\tilde W = [W, b]` row-major (entry ``(o, j)`` at
    ``o * n + j``); this permutes it to ``[vec_r(W), b]``, the layer's slice of a
    :func:`dense_ggn`. For checks and small layers only: it is
    :math:`(d_{out} d_{in})^2`.

    Examples:
        >>> f = KFACFactors(A=torch.eye(2), G=torch.eye(3), bias=True)
        >>> kfac_to_dense(f).shape
        torch.Size([6, 6])
    """
    A, G, bias = factors
    m, n = G.shape[0], A.shape[0]
    dense = torch.kron(G, A)
    if not bias:
        return dense
    idx = torch.arange(m * n, device=A.device).reshape(m, n)
    order = torch.cat([idx[:, :-1].reshape(-1), idx[:, -1]])  # weight entries, then bias
    return dense[order][:, order]


def kfac_factors(
    module: nn.Module,
    batches: Iterable[Any],
    likelihood: str | Likelihood,
    variant: str = "ef",
    *,
    num_samples: int = 1,
    generator: torch.Generator | None = None,
    output_transform: Callable[[Any], Tensor] | None = None,
) -> dict[str, KFACFactors]:
    r"""K-FAC factors of every ``nn.Linear`` and ``nn.Conv2d`` in ``module``.

    A layer with weight :math:`\tilde W = [W, b]` has per-example gradient
    :math:`\sum_r g_r a^\top`, so its curvature block is :math:`\sum_i (a_i a_i^\top)
    \otimes (\sum_r g_{ir} g_{ir}^\top)` over row-major :math:`\mathrm{vec}(\tilde W)`,
    which K-FAC approximates by ``kron(G, A)`` with :math:`A = \frac1N \sum_i a_i
    a_i^\top` and :math:`G = \sum_i \sum_r g_{ir} g_{ir}^\top`; exact for one datum.
    The :math:`g_{ir}` are the output cotangents :math:`c_{ir}` backpropagated to the
    layer's output, with, per ``variant``:

    * ``"ef"``: :math:`c_i = \nabla_f \log p(y_i \mid f_i)` at the observed :math:`y_i`
      (empirical Fisher).
    * ``"ggn"``: the columns :math:`L_r` of :meth:`Likelihood.hessian_factor`, so that
      :math:`\sum_r g_r g_r^\top = J_{out}^\top H J_{out}` (exact GGN/Fisher, "KFLR";
      one backward per output dimension of an example).
    * ``"mc"``: :math:`\nabla_f \log p(y_s \mid f_i) / \sqrt{S}` for :math:`S` =
      ``num_samples`` draws :math:`y_s` from the model (Monte Carlo Fisher, "KFAC-MC").

    Inputs of a ``Linear`` with extra dimensions (tokens) and the :math:`T` spatial
    positions of a ``Conv2d`` count as rows of :math:`a` and :math:`g`; for convolutions
    :math:`A` is also divided by :math:`T` (KFC, Grosse & Martens 2016).

    Args:
        module: the network, evaluated with its current parameters (use ``eval()`` for
            dropout and batch norm). Layers must run once per forward.
        batches: ``(x, y)`` pairs (``y`` only used by ``"ef"``) or inputs ``x``;
            ``module(x)`` is called.
        likelihood: a :class:`Likelihood` or its name.
        variant: ``"ef"``, ``"ggn"`` or ``"mc"``.
        num_samples: the number of draws of ``"mc"``.
        generator: their source.
        output_transform: map from the module's output to the likelihood's natural
            parameter (e.g. ``lambda out: out.squeeze(-1)``).

    Returns:
        ``{layer name: KFACFactors}``, names as in ``module.named_modules()``.

    Examples:
        >>> _ = torch.manual_seed(0)
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(),
        ...                           torch.nn.Linear(4, 2))
        >>> x, y = torch.randn(8, 3), torch.randint(2, (8,))
        >>> f = kfac_factors(net, [(x, y)], "categorical", variant="ggn")
        >>> {name: (tuple(k.A.shape), tuple(k.G.shape)) for name, k in f.items()}
        {'0': ((4, 4), (4, 4)), '2': ((5, 5), (2, 2))}
    """
    lik = as_likelihood(likelihood)
    check_variant(variant, num_samples)
    layers = {
        name: m
        for name, m in module.named_modules()
        if isinstance(m, KFAC_LAYERS) and m.weight.requires_grad
    }
    if not layers:
        raise ValueError("module has no trainable nn.Linear or nn.Conv2d layer for K-FAC")
    a_sums: dict[str, Tensor] = {}
    g_sums: dict[str, Tensor] = {}
    num_data = 0
    passes = layer_passes(
        module, layers, batches, lik, variant, num_samples, generator, output_transform, "K-FAC"
    )
    for out, captured, cot in passes:
        names = list(captured)
        grads = backprop(out, [captured[n][1] for n in names], cot)
        num_data += out.shape[0]
        for name, g_out in zip(names, grads, strict=True):
            layer = layers[name]
            a, w = layer_inputs(layer, captured[name][0])
            d_out = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
            channel_dim = -1 if isinstance(layer, nn.Linear) else 2  # (R, B, C, H, W)
            g = g_out.movedim(channel_dim, -1).reshape(-1, d_out)
            a_sums[name] = tree_add(a_sums.get(name), w * (a.T @ a))
            g_sums[name] = tree_add(g_sums.get(name), g.T @ g)
    return {
        name: KFACFactors(a_sums[name] / num_data, g_sums[name], layers[name].bias is not None)
        for name in a_sums
    }
