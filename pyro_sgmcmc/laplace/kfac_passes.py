r"""The data pass of :class:`~pyro_sgmcmc.laplace.kfac.AutoKFACLaplace`: its layers,
their Kronecker factors and the diagonal curvature of every other latent.

:func:`find_kfac_layers` finds the network's ``nn.Linear`` layers whose weight is a
real-valued latent of the model (:class:`KFACLayer`); :func:`kfac_data_pass` runs the
model over every plate index in chunks, records each layer's input and output with
forward hooks and sums the factors :math:`A_\ell` and :math:`G_\ell`, backpropagating
the columns of each chunk's curvature (:func:`chunk_columns`, one observed site's in
:func:`curvature_columns`) to the layers' outputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from typing import NamedTuple

import pyro
import torch
from torch import Tensor, nn

from pyro_sgmcmc.curvature.layers import backprop
from pyro_sgmcmc.gaussian.kronecker import KFACBlock
from pyro_sgmcmc.laplace.chunks import (
    Accumulator,
    Site,
    check_local_latents,
    chunk_curvature,
    chunk_sites,
    chunks,
    ggn_outputs,
    grad_leaves,
    site_rows,
    weighted_rows,
)
from pyro_sgmcmc.potential import ModelError, PyroPotential
from pyro_sgmcmc.pyro_model import is_identity_transform, model_plate_subsample_size
from pyro_sgmcmc.tree import tree_add, unflatten

__all__ = [
    "KFACLayer",
    "chunk_columns",
    "curvature_columns",
    "find_kfac_layers",
    "kfac_data_pass",
]


class KFACLayer(NamedTuple):
    """A ``Linear`` layer given a Kronecker block, and its weight's and bias's sites."""

    module: nn.Linear
    weight: str  # the weight's sample site
    bias: str | None  # the bias's sample site (None: the bias is not a latent)


def _site_name(layer: nn.Module, attr: str) -> str:
    prefix = layer.__dict__.get("_pyro_name", "")
    return f"{prefix}.{attr}" if prefix else attr


def find_kfac_layers(
    network: nn.Module, pot: PyroPotential, phi: Mapping[str, Tensor]
) -> dict[str, KFACLayer]:
    """The network's Linear layers whose weight is a real-valued latent of the model.

    Args:
        network: the module holding the layers.
        pot: the model's potential.
        phi: the unconstrained latents, by site.

    Returns:
        ``{layer name: KFACLayer}``; a bias that is not a real-valued latent is ``None``.

    Raises:
        ModelError: a weight's shape is not the layer's, or no layer qualifies.
    """
    layers = {}
    for name, m in network.named_modules():
        if not isinstance(m, nn.Linear) or "weight" not in m.__dict__.get("_pyro_samples", {}):
            continue
        w = _site_name(m, "weight")
        if w not in phi or not is_identity_transform(pot.to_constrained[w]):
            continue  # not a latent here, or constrained: its own diagonal
        if phi[w].shape != (m.out_features, m.in_features):
            raise ModelError(
                f"site '{w}' has shape {tuple(phi[w].shape)}, but layer '{name}' needs "
                f"({m.out_features}, {m.in_features}): sample each weight once, with "
                "that shape (PyroSample(prior.expand([out, in]).to_event(2)))"
            )
        b = _site_name(m, "bias") if "bias" in m.__dict__["_pyro_samples"] else None
        if b is not None and (b not in phi or not is_identity_transform(pot.to_constrained[b])):
            b = None
        layers[name] = KFACLayer(m, w, b)
    if not layers:
        raise ModelError(
            "the network has no nn.Linear layer with a real-valued PyroSample weight "
            "among the model's latent sites: AutoKFACLaplace has nothing to factor "
            "(use AutoDiagonalLaplace)"
        )
    return layers


def curvature_columns(
    site: Site,
    plate: str | None,
    weights: Tensor | None,
    gen: torch.Generator,
    methods: dict[str, str],
    *,
    curvature: str,
    num_samples: int,
) -> tuple[Tensor, Tensor] | None:
    r"""``(target, cotangents (R, *target.shape))`` of one observed site's curvature.

    ``"ggn"``: the closed-form Fisher factor of the site's family (``None`` when it is
    constant); otherwise (or a family with no closed form) ``num_samples`` Monte Carlo
    scores over :math:`\sqrt S`. Records the method used in ``methods``.
    """
    fn = site.site["fn"]
    if curvature == "ggn":
        closed = ggn_outputs(site, plate)
        if closed == "constant":
            methods.setdefault(site.name, "ggn")
            return None
        if closed is not None:
            methods[site.name] = "ggn"
            values, factor = closed  # (b, m, k), (b, m, k, r)
            if weights is not None and site.inside and values.shape[0] == weights.numel():
                factor = factor * weights.to(factor.dtype)[:, None, None, None]
            return values, factor.movedim(-1, 0)
    methods[site.name] = "fisher"
    seed = int(torch.randint(2**62, (1,), generator=gen))
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        ys = fn.sample((num_samples,))
    with pyro.validation_enabled(False):
        lp = fn.log_prob(ys)
    rows = site_rows(site, plate, lp, sample_dims=1)  # (S, b)
    rows = weighted_rows(rows, weights, site) / math.sqrt(num_samples)
    if not rows.requires_grad:
        return None
    s = num_samples
    eye = torch.eye(s, dtype=rows.dtype, device=rows.device)
    return rows, eye[:, :, None].expand(s, s, rows.shape[-1])


def chunk_columns(
    sites: list[Site],
    pot: PyroPotential,
    weights: Tensor | None,
    gen: torch.Generator,
    methods: dict[str, str],
    *,
    curvature: str,
    num_samples: int,
) -> Iterator[tuple[Tensor, Tensor]]:
    """``(target, cotangents)`` pairs whose backprops give the g's of every site.

    ``"ef"``: one pair, the chunk's summed per-datum log-likelihood rows; otherwise
    :func:`curvature_columns` of each site.
    """
    if curvature == "ef":
        per_datum = None
        for s in sites:
            methods[s.name] = "ef"
            if not s.inside:
                continue  # a site outside the plate has no per-datum rows
            with pyro.validation_enabled(False):
                lp = s.site["fn"].log_prob(s.site["value"])
            rows = weighted_rows(site_rows(s, pot.plate_name, lp), weights, s)
            per_datum = rows if per_datum is None else per_datum + rows
        if per_datum is not None and per_datum.requires_grad:
            yield per_datum, torch.ones_like(per_datum).unsqueeze(0)
        return
    for s in sites:
        cols = curvature_columns(
            s, pot.plate_name, weights, gen, methods, curvature=curvature, num_samples=num_samples
        )
        if cols is not None:
            yield cols


def kfac_data_pass(
    pot: PyroPotential,
    phi: Mapping[str, Tensor],
    layers: dict[str, KFACLayer],
    *,
    curvature: str,
    batch_size: int,
    num_samples: int,
    seed: int,
) -> tuple[dict[str, KFACBlock], dict[str, Tensor], Tensor, dict[str, str]]:
    """K-FAC factors of the layers and the diagonal of the rest, over every plate index.

    Args:
        pot: the model's potential (it must have a data plate).
        phi: the unconstrained latents, by site (the mode).
        layers: the layers to factor, from :func:`find_kfac_layers`.
        curvature: ``"ggn"``, ``"fisher"`` or ``"ef"``.
        batch_size: plate indices per chunk.
        num_samples: Monte Carlo draws per datum for ``"fisher"``.
        seed: seed of the Monte Carlo draws.

    Returns:
        ``(blocks, diagonal, log_lik, methods)``: a :class:`KFACBlock` per layer (at
        temperature 1, no prior), the diagonal curvature of every other latent, the
        full-data log-likelihood and the method used per observed site.

    Raises:
        ModelError: no data plate, local latents, or a layer not run once on the
            plate's minibatch.
    """
    if pot.plate_name is None:
        raise ModelError(
            "AutoKFACLaplace needs a data plate: write the likelihood as `with "
            "pyro.plate('data', N) as idx: pyro.sample('obs', ..., obs=y[idx])`"
        )
    leaves = grad_leaves(phi)
    first = next(iter(leaves.values()))
    in_blocks = {k for lay in layers.values() for k in (lay.weight, lay.bias) if k}
    others = {k: v for k, v in leaves.items() if k not in in_blocks}
    acc = (
        Accumulator("diag", sum(v.numel() for v in others.values()), first.detach())
        if others
        else None
    )
    captured: dict[str, tuple[Tensor, Tensor, Tensor]] = {}

    def hook(name: str) -> Callable:
        def record(layer: nn.Module, args: tuple, output: Tensor) -> Tensor:
            if name in captured:
                raise ModelError(
                    f"layer '{name}' ran twice in one model call: K-FAC needs each "
                    "layer to run once, on the plate's minibatch"
                )
            captured[name] = (args[0].detach(), output, layer.weight)
            return output.clone()  # in-place ops downstream must not touch `output`

        return record

    a_sums: dict[str, Tensor] = {}
    g_sums: dict[str, Tensor] = {}
    methods: dict[str, str] = {}
    log_lik = first.new_zeros(())
    num_data = first.new_zeros(())
    gen = torch.Generator().manual_seed(seed)
    fixed = model_plate_subsample_size(pot)
    handles = [lay.module.register_forward_hook(hook(n)) for n, lay in layers.items()]
    try:
        for c, (idx, weights) in enumerate(chunks(pot, batch_size, first.device, fixed)):
            captured.clear()
            trace = pot.trace(leaves, idx)
            if c == 0:
                check_local_latents(pot, trace)
            sites = chunk_sites(pot, trace, first=c == 0)
            b = idx.numel()
            w = first.new_ones(b) if weights is None else weights.to(first.dtype)
            num_data = num_data + w.sum()
            names = [n for n in layers if n in captured]
            for n in names:
                lay = layers[n]
                a, _, used = captured[n]
                if c == 0 and not torch.equal(used, trace.nodes[lay.weight]["value"]):
                    raise ModelError(
                        f"layer '{n}' did not run with the value of site '{lay.weight}'"
                    )
                if a.dim() < 2 or a.shape[0] != b:
                    raise ModelError(
                        f"layer '{n}' got an input of shape {tuple(a.shape)} for a chunk of "
                        f"{b} plate indices: run the network on the plate's minibatch "
                        "(x[idx]), with the data first"
                    )
                rows = a.reshape(b, -1, a.shape[-1])
                if lay.bias is not None:
                    rows = torch.cat([rows, rows.new_ones(*rows.shape[:2], 1)], dim=-1)
                weighted = (rows * w[:, None, None]).reshape(-1, rows.shape[-1])
                a_sums[n] = tree_add(a_sums.get(n), weighted.T @ rows.reshape(-1, rows.shape[-1]))
            if names:
                outputs = [captured[n][1] for n in names]
                for target, cot in chunk_columns(
                    sites, pot, weights, gen, methods, curvature=curvature, num_samples=num_samples
                ):
                    grads = backprop(target, outputs, cot)
                    for n, g in zip(names, grads, strict=True):
                        g = g.detach().reshape(-1, g.shape[-1])
                        g_sums[n] = tree_add(g_sums.get(n), g.T @ g)
            if acc is not None:
                ll = chunk_curvature(
                    pot, others, sites, weights, curvature, acc, num_samples, gen, {}
                )
            else:
                with pyro.validation_enabled(False):
                    ll = sum(
                        weighted_rows(
                            site_rows(s, pot.plate_name, s.site["fn"].log_prob(s.site["value"])),
                            weights,
                            s,
                        ).sum()
                        for s in sites
                    )
            log_lik = log_lik + torch.as_tensor(ll).detach()
    finally:
        for h in handles:
            h.remove()
        captured.clear()
    blocks = {}
    for n, lay in layers.items():
        m = lay.module.out_features
        cols = lay.module.in_features + (lay.bias is not None)
        A = a_sums.get(n, first.new_zeros(cols, cols)) / num_data
        G = g_sums.get(n, first.new_zeros(m, m))
        blocks[n] = KFACBlock(lay.weight, lay.bias, A.detach(), G.detach())
    diagonal = unflatten(acc.value, others) if acc is not None else {}
    return blocks, diagonal, log_lik, methods
