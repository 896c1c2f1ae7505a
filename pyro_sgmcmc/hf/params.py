r"""Choose what is Bayesian in a pretrained model: LoRA adapters or named layers.

Everything not chosen is frozen (``requires_grad=False``), so
:func:`trainable_parameters`, :class:`~pyro_sgmcmc.nn.ModulePotential` and the Laplace,
VI and SGMCMC code see exactly the chosen parameters, in ``named_parameters()`` order.

LoRA (Hu et al., 2021) replaces a frozen weight :math:`W_0` by
:math:`W_0 + \frac{\alpha}{r} B A` with :math:`A \in \mathbb R^{r \times d_{in}}`
(random init) and :math:`B \in \mathbb R^{d_{out} \times r}` (zero init, so the model
starts as the pretrained one); only :math:`A, B` are trainable. The paper's continual
experiment uses :math:`r = 8`, :math:`\alpha = 32` on the query, key and output
projections of the last layer: :func:`add_lora`'s defaults.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

from torch import Tensor, nn

from pyro_sgmcmc.hf.loading import require

__all__ = ["add_lora", "decoder_layers", "freeze_except", "trainable_parameters"]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder layers (a Hugging Face causal LM, possibly peft-wrapped).

    Raises:
        ValueError: ``model`` has no ``get_decoder().layers``.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(
            f"{type(model).__name__} has no decoder layers (model.get_decoder().layers): "
            "pass a Hugging Face causal LM such as LlamaForCausalLM"
        )
    return layers


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(
        name == p or name.startswith(p + ".") or fnmatch.fnmatchcase(name, p) for p in patterns
    )


def freeze_except(model: nn.Module, names: str | Iterable[str]) -> nn.Module:
    """Freeze every parameter except those named (in place); returns ``model``.

    Args:
        model: any module.
        names: parameter or module names (a module name keeps all its parameters, e.g.
            ``"model.layers.29.self_attn"``), or ``fnmatch`` patterns
            (``"model.layers.29.*"``).

    Raises:
        ValueError: a name matches no parameter (a typo would silently freeze all).

    Examples:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
        >>> list(trainable_parameters(freeze_except(net, ["1"])))
        ['1.weight', '1.bias']
    """
    patterns = [names] if isinstance(names, str) else list(names)
    named = dict(model.named_parameters())
    unmatched = [p for p in patterns if not any(_matches(k, [p]) for k in named)]
    if unmatched:
        raise ValueError(
            f"{unmatched} match no parameter of the model; names look like "
            f"{list(named)[:3]}"
        )
    for k, p in named.items():
        p.requires_grad_(_matches(k, patterns))
    return model


def _layer_indices(num_layers: int, layers: Sequence[int]) -> list[int]:
    out = []
    for i in layers:
        j = i + num_layers if i < 0 else i
        if not 0 <= j < num_layers:
            raise ValueError(f"layer {i} is out of range for a {num_layers}-layer model")
        out.append(j)
    return sorted(set(out))


def add_lora(
    model: nn.Module,
    *,
    r: int = 8,
    alpha: float = 32,
    target_modules: Sequence[str] = ("q_proj", "k_proj", "o_proj"),
    layers: Sequence[int] | None = (-1,),
    dropout: float = 0.0,
    seed: int | None = 0,
) -> Any:
    """Wrap ``model`` with peft LoRA adapters on ``target_modules`` of ``layers``.

    Only the adapters are trainable (peft freezes the rest). Negative layer indices
    count from the end; ``layers=None`` adapts every layer.

    Args:
        model: a Hugging Face causal LM (modified in place by peft).
        r: the adapters' rank.
        alpha: the LoRA scale numerator (the update is ``alpha / r * B @ A``).
        target_modules: the projections' names inside a layer.
        layers: which decoder layers.
        dropout: LoRA dropout (0 keeps the potential deterministic).
        seed: seeds the adapters' initialisation (the global RNG is left untouched);
            ``None`` uses the global RNG.

    Returns:
        The ``peft`` model (call it like the original; ``trainable_parameters`` lists
        ``...lora_A.default.weight`` and ``...lora_B.default.weight`` per module).

    Examples:
        >>> from pyro_sgmcmc.hf import load_causal_lm
        >>> model = add_lora(load_causal_lm("tiny")[0])
        >>> sum(v.numel() for v in trainable_parameters(model).values())
        2816
    """
    import torch

    peft = require("peft")
    indices = None
    if layers is not None:
        indices = _layer_indices(len(decoder_layers(model)), layers)
    config = peft.LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=list(target_modules),
        layers_to_transform=indices,
        lora_dropout=dropout,
        bias="none",
    )
    with warnings.catch_warnings():
        # peft 0.21 asks transformers 5 a deprecated question (is_gradient_checkpointing)
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated")
        if seed is None:
            return peft.get_peft_model(model, config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return peft.get_peft_model(model, config)


def trainable_parameters(model: nn.Module) -> dict[str, Tensor]:
    """The parameters with ``requires_grad`` (the live tensors, not copies), by name.

    Examples:
        >>> import torch
        >>> net = torch.nn.Linear(2, 1)
        >>> _ = net.bias.requires_grad_(False)
        >>> list(trainable_parameters(net))
        ['weight']
    """
    return {k: p for k, p in model.named_parameters() if p.requires_grad}
