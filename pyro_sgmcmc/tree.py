r"""Flat ``dict[str, Tensor]`` helpers: flatten/unflatten, functional module calls, and
maps over the (possibly nested) tensors of a batch.

Parameters everywhere in the package are a flat ``dict[str, Tensor]`` in one order
(``module.named_parameters()`` or Pyro's unconstrained sites);
:func:`flatten` and :func:`unflatten` move between that and one vector.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

__all__ = [
    "UNSUPPORTED",
    "batch_size",
    "check_like",
    "detached",
    "device_of",
    "flatten",
    "module_fn",
    "split_batch",
    "tree_add",
    "tree_leaves",
    "tree_map",
    "unflatten",
]

Params = dict[str, Tensor]
#: ``(params, x) -> output`` with the batch first.
ModelFn = Callable[[Params, Any], Tensor]
#: ``(params, x, y) -> (B,)`` per-example log-likelihoods.
LogLikFn = Callable[[Params, Any, Any], Tensor]
#: ``(params, x, generator) -> y``, one draw per row of ``x`` from the model.
SampleFn = Callable[[Params, Any, "torch.Generator | None"], Tensor]

#: Errors a missing forward-mode (or vmap) rule raises; then we fall back to reverse mode.
UNSUPPORTED = (RuntimeError, NotImplementedError)


def flatten(params: Mapping[str, Tensor], batch_dims: int = 0) -> Tensor:
    """Concatenate the parameters, each flattened row-major, in dict order.

    Args:
        params: a dict of tensors.
        batch_dims: leading dimensions shared by all entries (e.g. 1 for draws
            ``(S, *shape)``), kept in front.

    Examples:
        >>> flatten({"w": torch.tensor([[1.0, 2.0]]), "b": torch.tensor([3.0])})
        tensor([1., 2., 3.])
    """
    if not params:
        raise ValueError("params is empty: pass a dict of at least one tensor")
    parts = list(params.values())
    lead = parts[0].shape[:batch_dims]
    return torch.cat([p.reshape((*lead, -1)) for p in parts], dim=-1)


def unflatten(vec: Tensor, like: Mapping[str, Tensor]) -> Params:
    """Split the last dimension of ``vec`` into a dict shaped like ``like``.

    Leading dimensions of ``vec`` (e.g. draws) are kept in front of every entry.

    Examples:
        >>> unflatten(torch.arange(3.0), {"w": torch.zeros(1, 2), "b": torch.zeros(1)})
        {'w': tensor([[0., 1.]]), 'b': tensor([2.])}
    """
    sizes = [p.numel() for p in like.values()]
    if vec.dim() < 1 or vec.shape[-1] != sum(sizes):
        raise ValueError(
            f"vec's last dimension must have {sum(sizes)} entries (the parameters' total "
            f"size), got shape {tuple(vec.shape)}"
        )
    lead = vec.shape[:-1]
    parts = vec.split(sizes, dim=-1)
    return {
        k: part.reshape((*lead, *p.shape)) for (k, p), part in zip(like.items(), parts, strict=True)
    }


def module_fn(
    module: nn.Module, output_transform: Callable[[Any], Tensor] | None = None
) -> ModelFn:
    """``fn(params, x) = module(x)`` evaluated at ``params`` (``functional_call``).

    Parameters missing from ``params`` (and buffers) come from the module itself, so
    ``params`` may be a subset, e.g. only the last layer's.

    Examples:
        >>> net = torch.nn.Linear(2, 1)
        >>> fn = module_fn(net, lambda out: out.squeeze(-1))
        >>> fn({"weight": torch.ones(1, 2), "bias": torch.zeros(1)}, torch.ones(3, 2))
        tensor([2., 2., 2.])
    """

    def fn(params: Params, x: Any) -> Tensor:
        out = functional_call(module, params, (x,))
        return out if output_transform is None else output_transform(out)

    return fn


def check_like(v: Mapping[str, Tensor], params: Mapping[str, Tensor], name: str) -> None:
    if list(v.keys()) != list(params.keys()):
        raise ValueError(
            f"{name} must have the keys of params in the same order, {list(params)}; got {list(v)}"
        )
    for k, p in params.items():
        if v[k].shape != p.shape:
            raise ValueError(
                f"{name}['{k}'] has shape {tuple(v[k].shape)}, params['{k}'] {tuple(p.shape)}"
            )


def detached(params: Mapping[str, Tensor]) -> Params:
    """Curvature is a value, not part of the caller's graph (``nn.Parameter``s included)."""
    return {k: p.detach() for k, p in params.items()}


def tree_map(fn: Callable[[Tensor], Tensor], x: Any) -> Any:
    """Map over the tensors of an input: a tensor, a tuple/list or a dict of tensors."""
    if isinstance(x, Tensor):
        return fn(x)
    if isinstance(x, Mapping):
        return {k: tree_map(fn, v) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(tree_map(fn, v) for v in x)
    return x


def tree_leaves(x: Any) -> list[Tensor]:
    leaves: list[Tensor] = []

    def visit(t: Tensor) -> Tensor:
        leaves.append(t)
        return t

    tree_map(visit, x)
    return leaves


def batch_size(x: Any) -> int:
    sizes = [t.shape[0] if t.dim() else 0 for t in tree_leaves(x)]
    if not sizes or any(s != sizes[0] for s in sizes) or sizes[0] == 0:
        raise ValueError(
            f"inputs must be tensors sharing a non-empty batch (first) dimension, got sizes {sizes}"
        )
    return sizes[0]


def split_batch(batch: Any) -> tuple[Any, Any]:
    """``(x, y)`` from a loader's batch; a batch that is not a pair is ``x`` alone."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    return batch, None


def device_of(params: Mapping[str, Tensor]) -> torch.device:
    return next(iter(params.values())).device


def tree_add(acc: Any, new: Any) -> Any:
    if acc is None:
        return new
    if isinstance(new, Mapping):
        return {k: acc[k] + new[k] for k in new}
    return acc + new
