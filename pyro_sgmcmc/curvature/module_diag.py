r"""The fast diagonal GGN / Fisher of a network, layer by layer (memory :math:`O(P)`)."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from pyro_sgmcmc.curvature.layers import (
    KFAC_LAYERS,
    backprop,
    check_variant,
    conv_patches,
    layer_passes,
)
from pyro_sgmcmc.likelihoods import Likelihood, as_likelihood
from pyro_sgmcmc.tree import (
    Params,
)

__all__ = ["module_diag_ggn"]

#: Elements of one chunk of per-example weight gradients (or token-pair products) in
#: :func:`module_diag_ggn`'s layers with token or spatial dimensions.
_DIAG_CHUNK_ELEMENTS = 1 << 24


def _weight_rows(layer: nn.Module, inp: Tensor) -> Tensor:
    """The layer's inputs as ``(B, T, n)``: per example, ``T`` rows that multiply the weight."""
    if isinstance(layer, nn.Conv2d):
        return conv_patches(layer, inp)
    if inp.dim() < 2:
        raise ValueError(
            f"a Linear layer got an input of shape {tuple(inp.shape)}: inputs need a batch "
            "(first) dimension"
        )
    return inp.reshape(inp.shape[0], -1, inp.shape[-1])


def _layer_diag(layer: nn.Module, inp: Tensor, g_out: Tensor) -> tuple[Tensor, Tensor]:
    r""":math:`\sum_{i,r} (\partial_W)^2` and :math:`(\partial_b)^2` of one layer.

    ``g_out`` ``(R, *output.shape)`` are the R backpropagated columns at the layer's
    output. Per example and column the weight gradient is :math:`\sum_t g_{rit}
    a_{it}^\top`; its elementwise square is summed without storing all of them.
    """
    a = _weight_rows(layer, inp)  # (B, T, n)
    b, t, n = a.shape
    r = g_out.shape[0]
    if isinstance(layer, nn.Conv2d):
        g = g_out.flatten(3).transpose(2, 3)  # (R, B, C_out, H, W) -> (R, B, T, C_out)
    else:
        g = g_out.reshape(r, b, -1, g_out.shape[-1])
    m = g.shape[-1]
    if g.shape[2] != t:
        raise ValueError(f"the layer's output has {g.shape[2]} positions, its input {t}")
    if t == 1:  # one row per example: sum_i (sum_r g_ir^2) (a_i^2)^T, never a (B, m, n)
        s = torch.linalg.vector_norm(g[:, :, 0], dim=0).square()  # (B, m), no (R, B, m) temp
        return s.T @ a[:, 0].square(), s.sum(0)
    d_bias = g.sum(2).square().sum((0, 1))
    d_weight = a.new_zeros(m, n)
    if t <= r:
        # (sum_t g_t a_t)^2 = sum_{t,s} (g_t g_s)(a_t a_s): T^2 (m + n) per example.
        step = max(1, _DIAG_CHUNK_ELEMENTS // (t * t * (m + n)))
        for lo in range(0, b, step):
            gg = torch.einsum("rbtm,rbsm->btsm", g[:, lo : lo + step], g[:, lo : lo + step])
            aa = torch.einsum("btn,bsn->btsn", a[lo : lo + step], a[lo : lo + step])
            d_weight += gg.reshape(-1, m).T @ aa.reshape(-1, n)
    else:
        # Per-example gradients in chunks: R m n per example.
        step = max(1, _DIAG_CHUNK_ELEMENTS // (r * m * n))
        for lo in range(0, b, step):
            per_example = torch.einsum("rbtm,btn->rbmn", g[:, lo : lo + step], a[lo : lo + step])
            d_weight += per_example.square().sum((0, 1))
    return d_weight, d_bias


def _diag_layers(module: nn.Module, keep: Callable[[str], bool]) -> dict[str, nn.Module]:
    """The layers holding the kept trainable parameters; an error for unsupported ones."""
    layers = {}
    for name, m in module.named_modules():
        prefix = f"{name}." if name else ""
        own = [
            k for k, p in m.named_parameters(recurse=False) if p.requires_grad and keep(prefix + k)
        ]
        if not own:
            continue
        if not isinstance(m, KFAC_LAYERS) or set(own) - {"weight", "bias"}:
            raise ValueError(
                f"module_diag_ggn supports the parameters of nn.Linear and nn.Conv2d only; "
                f"layer '{name}' ({type(m).__name__}) has trainable parameters {own}. Freeze "
                "it (requires_grad_(False)) or use accumulate_ggn(module_fn(module), ...), "
                "which handles any layer through per-example Jacobians"
            )
        layers[name] = m
    if not layers:
        raise ValueError("module has no trainable parameter (among those asked for)")
    return layers


def module_diag_ggn(
    module: nn.Module,
    batches: Iterable[Any],
    likelihood: str | Likelihood,
    variant: str = "ggn",
    *,
    num_samples: int = 1,
    generator: torch.Generator | None = None,
    output_transform: Callable[[Any], Tensor] | None = None,
    max_columns: int | None = None,
    parameters: Collection[str] | None = None,
) -> Params:
    r"""Diagonal GGN (or empirical / Monte Carlo Fisher) of a network, layer by layer.

    The same diagonal as :func:`accumulate_ggn` (``variant="ggn"``), :func:`diag_ef`
    of per-example gradients (``"ef"``) or :func:`accumulate_mc_fisher` (``"mc"``), at
    memory :math:`O(P)` plus one batch's activations: no per-example Jacobian or
    gradient is stored, so it scales to millions of parameters and examples. The
    columns :math:`c_r` of the output curvature (as in :func:`kfac_factors`: the
    :meth:`Likelihood.hessian_factor` columns :math:`L_r`, :math:`H_i = \sum_r L_{ir}
    L_{ir}^\top`, for ``"ggn"``; the observed score for ``"ef"``; one score per draw
    :math:`y_s \sim p(y \mid f_i)`, over :math:`\sqrt S`, for ``"mc"``) are
    backpropagated together to every layer's output, :math:`g_{ir} = J_{z_i}^\top
    c_{ir}`, and a layer :math:`z = W a + b` adds

    .. math::

        \mathrm{diag}_W = \sum_i \sum_r \Big(\sum_t g_{irt}\, a_{it}^\top\Big)^{\odot 2},
        \qquad
        \mathrm{diag}_b = \sum_i \sum_r \Big(\sum_t g_{irt}\Big)^{\odot 2},

    the squared per-example, per-column gradient, since :math:`\mathrm{diag}(J_i^\top
    H_i J_i) = \sum_r (J_i^\top L_{ir})^{\odot 2}`. With one row per example
    (:math:`T = 1`, a plain MLP) this is :math:`(\sum_r g_{ir}^{\odot 2})^\top
    (a_i^{\odot 2})`, one matrix product per layer (BackPACK's ``DiagGGNExact``).
    Inputs of a ``Linear`` with extra (token) dimensions and the :math:`T` output
    positions of a ``Conv2d`` are summed *inside* the square, exactly: through the
    token-pair products :math:`\sum_{t,s} (g_t \cdot g_s)(a_t a_s)` when :math:`T
    \le R`, else through per-example gradients in chunks of examples.

    Args:
        module: the network, evaluated with its current parameters (``eval()`` mode
            for dropout and batch norm). Every module holding trainable parameters
            must be an ``nn.Linear`` or an ``nn.Conv2d`` (``groups=1``, zero padding);
            freeze the others or use :func:`accumulate_ggn`. Each layer runs once per
            forward, and each example's output depends on its own input only.
        batches: ``(x, y)`` pairs (``y`` only used by ``"ef"``) or inputs ``x``, e.g.
            a ``DataLoader``; ``module(x)`` is called, tensors are moved to the
            parameters' device.
        likelihood: a :class:`Likelihood` or its name.
        variant: ``"ggn"`` (exact, :math:`R` = outputs per example columns),
            ``"ef"`` (one column) or ``"mc"`` (``num_samples`` columns).
        num_samples: :math:`S`, the draws per example of ``"mc"``.
        generator: their source (draws match :func:`accumulate_mc_fisher`'s given
            the same generator and batches).
        output_transform: map from the module's output to the likelihood's natural
            parameter (e.g. ``lambda out: out.squeeze(-1)``).
        max_columns: backpropagate at most this many columns at once (memory
            ``max_columns`` times one batch's backward); all at once by default.
        parameters: names of the trainable parameters to compute (default: all);
            layers holding none of them may be of any type.

    Returns:
        A dict like the module's trainable ``named_parameters()`` (those in
        ``parameters``), summed over every example seen (no prior, no mean).

    Examples:
        >>> from pyro_sgmcmc.curvature import diag_ggn, module_fn
        >>> _ = torch.manual_seed(0)
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(),
        ...                           torch.nn.Linear(4, 2))
        >>> x, y = torch.randn(8, 3), torch.randint(2, (8,))
        >>> fast = module_diag_ggn(net, [(x[:5], y[:5]), (x[5:], y[5:])], "categorical")
        >>> ref = diag_ggn(module_fn(net), dict(net.named_parameters()), x, "categorical")
        >>> all(torch.allclose(fast[k], ref[k], atol=1e-6) for k in ref)
        True
    """
    lik = as_likelihood(likelihood)
    check_variant(variant, num_samples)
    if max_columns is not None and max_columns < 1:
        raise ValueError(f"max_columns must be a positive integer, got {max_columns}")
    if parameters is not None:
        parameters = set(parameters)
        named = {k for k, p in module.named_parameters() if p.requires_grad}
        if parameters - named:
            raise ValueError(
                f"parameters {sorted(parameters - named)} are not trainable parameters of module"
            )

    def keep(key: str) -> bool:
        return parameters is None or key in parameters

    layers = _diag_layers(module, keep)
    trainable = {k: p for k, p in module.named_parameters() if p.requires_grad and keep(k)}
    sums = {
        k: torch.zeros_like(p, memory_format=torch.contiguous_format) for k, p in trainable.items()
    }
    passes = layer_passes(
        module, layers, batches, lik, variant, num_samples, generator, output_transform,
        "module_diag_ggn",
    )  # fmt: skip
    for out, captured, cot in passes:
        names = list(captured)
        outputs = [captured[n][1] for n in names]
        step = cot.shape[0] if max_columns is None else max_columns
        for lo in range(0, cot.shape[0], step):
            grads = backprop(out, outputs, cot[lo : lo + step])
            for name, g_out in zip(names, grads, strict=True):
                layer = layers[name]
                d_weight, d_bias = _layer_diag(layer, captured[name][0], g_out.detach())
                prefix = f"{name}." if name else ""
                if prefix + "weight" in sums:
                    sums[prefix + "weight"] += d_weight.reshape(layer.weight.shape)
                if prefix + "bias" in sums:
                    sums[prefix + "bias"] += d_bias
    return sums
