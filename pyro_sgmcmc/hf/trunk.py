r"""Frozen-trunk caching: compute the frozen layers once, train the last ones from cache.

When only the last :math:`k` decoder layers hold trainable parameters (LoRA adapters
or named layers), the hidden states entering them do not change during training:

.. math::

    h_{L-k} = f_{L-k-1} \circ \dots \circ f_0(\mathrm{embed}(x)), \qquad
    \mathrm{logits}_\theta(x) = W_{\mathrm{out}}\, \mathrm{norm}\big(
        f^\theta_{L-1} \circ \dots \circ f^\theta_{L-k}(h_{L-k})\big).

:func:`trunk_hidden` runs the model once under ``torch.no_grad()`` and keeps
:math:`h_{L-k}` with the keyword inputs that layer received (the causal mask, the rotary
position embeddings, the position ids), captured by a forward pre-hook on layer
:math:`L-k`, which then stops the forward (the last layers and the head are not run).
:func:`head_logits` runs the last layers, the final norm and the (tied) output head from
that cache with the trainable parameters substituted through
:func:`torch.func.functional_call`, so it is exactly the full model's logits, is
differentiable in the parameters, and vectorises over a leading member dimension of
``params`` with :func:`torch.func.vmap` (parallel SGHMC or an ensemble in one forward).

With SmolLM2-135M the output head (576 x 49,152, tied to the input embedding) dominates
a step from cache; the 29 frozen layers are paid once per window.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from pyro_sgmcmc.hf.params import decoder_layers

__all__ = ["CachedHead", "TrunkCache", "head_logits", "trunk_hidden"]


class _Stop(Exception):
    """Raised by the pre-hook to end the forward once the cached inputs are captured."""


@dataclass
class TrunkCache:
    """The inputs of the last ``num_last_layers`` decoder layers, for a batch of windows.

    Attributes:
        hidden: ``(N, T, H)`` hidden states entering layer ``L - num_last_layers``.
        per_window: keyword inputs of that layer with a leading window dimension
            (e.g. a padding-aware attention mask), indexed with ``hidden``.
        shared: keyword inputs shared by all windows (e.g. a ``(1, 1, T, T)`` causal mask,
            the rotary ``(cos, sin)``, position ids), broadcast over windows.
        num_last_layers: :math:`k`.
    """

    hidden: Tensor
    per_window: dict[str, Tensor] = field(default_factory=dict)
    shared: dict[str, Any] = field(default_factory=dict)
    num_last_layers: int = 1

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def __getitem__(self, idx: Any) -> TrunkCache:
        """The cache of some windows (an index, slice or index tensor)."""
        if isinstance(idx, int):
            idx = slice(idx, idx + 1)
        return TrunkCache(
            self.hidden[idx],
            {k: v[idx] for k, v in self.per_window.items()},
            self.shared,
            self.num_last_layers,
        )

    def inputs(self) -> dict[str, Tensor]:
        """The batch-first inputs of :class:`CachedHead` (``hidden`` + per-window ones)."""
        return {"hidden": self.hidden, **self.per_window}

    def to(self, *args: Any, **kwargs: Any) -> TrunkCache:
        """A copy on another device (floating tensors also to another dtype)."""

        def move(v: Any) -> Any:
            if isinstance(v, Tensor):
                return v.to(*args, **kwargs) if v.is_floating_point() else v.to(
                    device=torch.empty(0).to(*args, **kwargs).device
                )
            if isinstance(v, tuple):
                return tuple(move(u) for u in v)
            return v

        return TrunkCache(
            move(self.hidden),
            {k: move(v) for k, v in self.per_window.items()},
            {k: move(v) for k, v in self.shared.items()},
            self.num_last_layers,
        )


def _common_keys(per_window: list[dict[str, Tensor]]) -> list[str]:
    """The keys every batch of per-window inputs has (none without padding)."""
    return sorted(set.intersection(*(set(p) for p in per_window))) if per_window else []


def _batch_of(v: Any) -> int | None:
    if isinstance(v, Tensor) and v.dim() > 0:
        return v.shape[0]
    return None


def _capture(model: nn.Module, layer: nn.Module, input_ids: Tensor, attention_mask):
    """One forward of ``model`` up to ``layer``: its hidden input and keyword inputs."""
    got: dict[str, Any] = {}

    def hook(module, args, kwargs):
        kwargs = dict(kwargs)
        got["hidden"] = args[0] if args else kwargs.pop("hidden_states")
        got["kwargs"] = kwargs
        raise _Stop

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    if "hidden" not in got:
        raise RuntimeError("the forward never reached the cached layer")
    return got["hidden"], got["kwargs"]


def trunk_hidden(
    model: nn.Module,
    input_ids: Tensor,
    num_last_layers: int = 1,
    *,
    attention_mask: Tensor | None = None,
    batch_size: int = 8,
) -> TrunkCache:
    """Run the frozen trunk once: the inputs of the last ``num_last_layers`` layers.

    Args:
        model: a Hugging Face causal LM (or its peft wrapper), in ``eval()`` mode. The
            layers before the last ``num_last_layers`` must be frozen for the cache to
            stay valid while training (checked).
        input_ids: ``(N, T)`` token windows.
        num_last_layers: :math:`k \\geq 1`, the layers :func:`head_logits` recomputes.
        attention_mask: optional ``(N, T)`` padding mask (1 = token).
        batch_size: windows per forward (memory).

    Returns:
        A :class:`TrunkCache` of the ``N`` windows.

    Examples:
        >>> from pyro_sgmcmc.hf import freeze_except, load_causal_lm
        >>> model = freeze_except(load_causal_lm("tiny")[0], "model.layers.1")
        >>> ids = torch.randint(256, (3, 16))
        >>> cache = trunk_hidden(model, ids, 1)
        >>> with torch.no_grad():
        ...     torch.allclose(head_logits(model, cache), model(ids).logits, atol=1e-5)
        True
    """
    layers = decoder_layers(model)
    k = int(num_last_layers)
    if not 1 <= k <= len(layers):
        raise ValueError(f"num_last_layers must be in 1..{len(layers)}, got {num_last_layers}")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    allowed = [_path(model, m) for m in layers[len(layers) - k :]]
    allowed += [_path(model, base.get_decoder().norm)]
    stale = [
        n
        for n, p in model.named_parameters()
        if p.requires_grad and not any(n.startswith(a + ".") for a in allowed)
    ]
    if stale:  # a tied output head is listed as the input embedding: stale as well
        raise ValueError(
            f"parameters outside the last {k} layer(s) are trainable ({stale[:3]}...): the "
            "cache would go stale; freeze them (freeze_except, add_lora) or raise "
            "num_last_layers"
        )
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (N, T) windows, got shape {tuple(input_ids.shape)}")
    n = input_ids.shape[0]
    hidden, per_window = [], []
    shared: dict[str, Any] = {}
    for s in range(0, n, batch_size):
        mask = None if attention_mask is None else attention_mask[s : s + batch_size]
        ids = input_ids[s : s + batch_size]
        h, kw = _capture(model, layers[len(layers) - k], ids, mask)
        b = ids.shape[0]
        hidden.append(h)
        if attention_mask is None:
            # Without padding the layer's other inputs (causal mask, rotary embeddings)
            # depend on positions only: keep one copy, broadcast over the windows.
            if s == 0:
                shared = {key: v[:1] if _batch_of(v) == b else v for key, v in kw.items()}
            continue
        # With padding, inputs with the batch in front are per window.
        per = {key: v for key, v in kw.items() if _batch_of(v) == b}
        if s == 0:
            shared = {key: v for key, v in kw.items() if key not in per}
        per_window.append(per)
    per_cat = {key: torch.cat([p[key] for p in per_window]) for key in _common_keys(per_window)}
    return TrunkCache(torch.cat(hidden), per_cat, shared, k)


def _path(root: nn.Module, target: nn.Module) -> str:
    for name, module in root.named_modules():
        if module is target:
            return name
    raise ValueError(f"{type(target).__name__} is not a submodule of {type(root).__name__}")


class CachedHead(nn.Module):
    """The last ``k`` layers, final norm and output head of ``model``, from a cache.

    Its children are ``model``'s own, so its parameter names equal
    ``model.named_parameters()``' (``functional_call`` and
    :class:`~pyro_sgmcmc.nn.ModulePotential` take the model's names as they are).
    ``forward(hidden, **per_window)`` returns the ``(B, T, V)`` logits; the shared
    keyword inputs (mask, rotary embeddings) come from the cache it was built with.
    ``forward(cache.inputs())`` (one dict, as ``module(x)`` callers such as
    :func:`~pyro_sgmcmc.laplace.module.module_laplace` pass it) works too.

    Args:
        model: the causal LM (or its peft wrapper).
        cache: a :class:`TrunkCache` of it (only its ``shared`` inputs and ``k`` are kept).
    """

    def __init__(self, model: nn.Module, cache: TrunkCache) -> None:
        super().__init__()
        for name, child in model.named_children():
            self.add_module(name, child)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        layers = decoder_layers(model)
        k = cache.num_last_layers
        self._layer_paths = [_path(model, m) for m in layers[len(layers) - k :]]
        self._norm_path = _path(model, base.get_decoder().norm)
        self._head_path = _path(model, base.get_output_embeddings())
        self._shared = dict(cache.shared)

    def forward(self, hidden: Tensor, last: int | None = None, **per_window: Tensor) -> Tensor:
        if isinstance(hidden, Mapping):  # cache.inputs() passed as one positional input
            return self.forward(**hidden, last=last, **per_window)
        kwargs = {**self._shared, **per_window}
        for p in self._layer_paths:
            out = self.get_submodule(p)(hidden, **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
        if last is not None:  # the head dominates: run it on the scored positions only
            hidden = hidden[:, hidden.shape[1] - last :]
        hidden = self.get_submodule(self._norm_path)(hidden)
        return self.get_submodule(self._head_path)(hidden)


def head_logits(
    model: nn.Module,
    cached: TrunkCache,
    params: Mapping[str, Tensor] | None = None,
    *,
    head: CachedHead | None = None,
    last: int | None = None,
) -> Tensor:
    """The ``(N, T, V)`` logits of the cached windows through the last layers and head.

    Exactly ``model(input_ids).logits`` of the windows the cache was built from, with
    ``params`` (a dict over some of ``model.named_parameters()``' names, typically
    :func:`~pyro_sgmcmc.hf.trainable_parameters`' values or a sample of them)
    substituted. Vectorises over a leading member dimension of ``params``::

        torch.func.vmap(lambda p: head_logits(model, cache, p))(stacked)  # (K, N, T, V)

    Args:
        model: the causal LM the cache came from.
        cached: a :class:`TrunkCache` (or a selection of its windows).
        params: parameter values to use instead of the module's (``None``: the module's).
        head: a prebuilt :class:`CachedHead` (saves rebuilding it in a loop).
        last: return the logits of the last ``last`` positions only, ``(N, last, V)``
            (the layers still attend over every position; the norm and the output head,
            the dominant cost, run on those positions only).
    """
    head = CachedHead(model, cached) if head is None else head
    inputs = cached.inputs()
    if last is not None:
        inputs["last"] = int(last)
    if params is None:
        return head(**inputs)
    return functional_call(head, dict(params), (), inputs)
