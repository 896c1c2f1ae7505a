r"""Layer plumbing shared by :func:`~pyro_sgmcmc.curvature.kfac_factors` and
:func:`~pyro_sgmcmc.curvature.module_diag_ggn`: supported layers, their input rows,
forward hooks that capture every layer's input and output, output cotangents and batched
backpropagation."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pyro_sgmcmc.likelihoods import Likelihood
from pyro_sgmcmc.tree import (
    UNSUPPORTED,
    split_batch,
    tree_map,
)

__all__ = [
    "check_variant",
    "KFAC_LAYERS",
    "VARIANTS",
    "backprop",
    "conv_patches",
    "layer_inputs",
    "layer_passes",
]

KFAC_LAYERS = (nn.Linear, nn.Conv2d)
VARIANTS = ("ef", "ggn", "mc")


def check_variant(variant: str, num_samples: int) -> None:
    """Refuse an unknown ``variant`` and, for ``"mc"``, a non-positive ``num_samples``."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if variant == "mc" and num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples}")


def conv_patches(layer: nn.Conv2d, inp: Tensor) -> Tensor:
    """The input patches ``(B, T, C_in * kh * kw)`` of a Conv2d, in ``weight.reshape(C_out, -1)``
    order, one row per output position (row-major over the output's ``H, W``)."""
    numeric_padding = not isinstance(layer.padding, str) or layer.padding == "valid"
    if layer.groups != 1 or layer.padding_mode != "zeros" or not numeric_padding:
        raise ValueError(
            "K-FAC supports Conv2d with groups=1 and zero padding given as numbers (or "
            f"'valid'); this layer has groups={layer.groups}, padding={layer.padding!r}, "
            f"padding_mode={layer.padding_mode!r}"
        )
    padding = 0 if isinstance(layer.padding, str) else layer.padding
    patches = F.unfold(
        inp, layer.kernel_size, dilation=layer.dilation, padding=padding, stride=layer.stride
    )  # (B, C_in * kh * kw, T)
    return patches.transpose(1, 2)


def layer_inputs(layer: nn.Module, inp: Tensor) -> tuple[Tensor, float]:
    """Rows :math:`a` (with the bias 1) and their weight in :math:`A` (KFC's 1/T for conv)."""
    if isinstance(layer, nn.Conv2d):
        patches = conv_patches(layer, inp)
        a = patches.reshape(-1, patches.shape[2])
        weight = 1.0 / patches.shape[1]
    else:
        a, weight = inp.reshape(-1, inp.shape[-1]), 1.0
    if layer.bias is not None:
        a = torch.cat([a, a.new_ones(a.shape[0], 1)], dim=1)
    return a, weight


def _output_cotangents(
    lik: Likelihood,
    out: Tensor,
    y: Any,
    variant: str,
    num_samples: int,
    generator: torch.Generator | None,
) -> Tensor:
    """Cotangents ``(R, *out.shape)`` on the network output whose backprops give the g's."""
    if variant == "ggn":
        return lik.hessian_factor(out)
    if variant == "ef":
        f = out.detach().requires_grad_(True)
        (col,) = torch.autograd.grad(lik.log_prob(f, y.to(out.device)).sum(), f)
        return col.unsqueeze(0)
    # num_samples copies of the batch, one draw each: every score in one pass.
    f = out.detach().repeat(num_samples, *([1] * (out.dim() - 1))).requires_grad_(True)
    (cols,) = torch.autograd.grad(lik.log_prob(f, lik.sample(f, generator)).sum(), f)
    return cols.reshape(num_samples, *out.shape) / math.sqrt(num_samples)


def backprop(out: Tensor, targets: Sequence[Tensor], cot: Tensor) -> list[Tensor]:
    """``(R, *target.shape)`` vector-Jacobian products, batched over the R cotangents."""
    try:
        grads = torch.autograd.grad(
            out, targets, cot, retain_graph=True, is_grads_batched=True, allow_unused=True
        )
    except UNSUPPORTED:  # an op without a batching rule: one backward per cotangent
        rows = [
            torch.autograd.grad(out, targets, c, retain_graph=True, allow_unused=True) for c in cot
        ]
        grads = tuple(
            None if rows[0][j] is None else torch.stack([r[j] for r in rows])
            for j in range(len(targets))
        )
    # A layer the output does not depend on has no curvature.
    return [
        t.new_zeros(cot.shape[:1] + t.shape) if g is None else g
        for t, g in zip(targets, grads, strict=True)
    ]


def layer_passes(
    module: nn.Module,
    layers: Mapping[str, nn.Module],
    batches: Iterable[Any],
    lik: Likelihood,
    variant: str,
    num_samples: int,
    generator: torch.Generator | None,
    output_transform: Callable[[Any], Tensor] | None,
    what: str,
) -> Iterator[tuple[Tensor, dict[str, tuple[Tensor, Tensor]], Tensor]]:
    """One forward pass per batch with hooks on ``layers``: yields the output, each
    layer's ``(input, output)`` in call order, and the output cotangents of ``variant``
    (:func:`_output_cotangents`), with the graph kept for :func:`backprop`."""
    device = next(iter(module.parameters())).device
    captured: dict[str, tuple[Tensor, Tensor]] = {}

    def hook(name: str) -> Callable:
        def record(layer: nn.Module, args: tuple, output: Tensor) -> Tensor:
            if name in captured:
                raise ValueError(
                    f"layer '{name}' ran twice in one forward pass (shared weights): "
                    f"{what} assumes each layer runs once"
                )
            captured[name] = (args[0].detach(), output)
            # Downstream gets a copy: an in-place op (ReLU(inplace=True)) must not
            # overwrite the tensor whose cotangent we ask for.
            return output.clone()

        return record

    seen = 0
    handles = [m.register_forward_hook(hook(name)) for name, m in layers.items()]
    try:
        for batch in batches:
            x, y = split_batch(tree_map(lambda t: t.to(device), batch))
            if variant == "ef" and y is None:
                raise ValueError("variant='ef' needs (x, y) batches with the observed targets")
            captured.clear()
            with torch.enable_grad():
                out = module(x)
                if output_transform is not None:
                    out = output_transform(out)
                cot = _output_cotangents(lik, out, y, variant, num_samples, generator)
            yield out, dict(captured), cot
            seen += out.shape[0]
    finally:
        for h in handles:
            h.remove()
        captured.clear()
    if seen == 0:
        raise ValueError("batches is empty")
