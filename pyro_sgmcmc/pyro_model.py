"""Pyro trace and plate plumbing, in one place.

What :class:`~pyro_sgmcmc.potential.PyroPotential`, the Laplace code and the predictive
code need to read a Pyro model's trace: which sites are plates, observed or latent,
which vectorised plate holds the data, whether a plate subsamples itself, whether the
data plate can be cut into chunks of indices, and the checks on latent sites. Every
function takes a trace (``poutine.trace(model).get_trace(...)``), a trace site, or an
object with a :class:`~pyro_sgmcmc.potential.PyroPotential`'s attributes (``model``,
``model_args``, ``model_kwargs``, ``plate_name``, ``plate_size``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pyro
import pyro.poutine as poutine
import torch
from pyro.poutine.subsample_messenger import _Subsample

__all__ = [
    "ModelError",
    "check_latents",
    "find_data_plate",
    "full_batch_reason",
    "is_identity_transform",
    "is_plate_site",
    "latent_site_names",
    "model_plate_subsample_size",
    "observed_sites",
    "plate_frame",
    "sample_sites",
    "site_batch_shape",
    "site_frames",
    "subsampled_frames",
    "subsampling_plate",
]


class ModelError(ValueError):
    """The model cannot be sampled as written; the message says what to change."""


# ---------------------------------------------------------------------- sites
def is_plate_site(site: dict) -> bool:
    """Whether a trace site is a plate's subsample site (not a random variable)."""
    return site["type"] == "sample" and isinstance(site["fn"], _Subsample)


def site_frames(site: dict) -> dict[str, Any]:
    """The site's plates (``CondIndepStackFrame``) by name."""
    return {f.name: f for f in site["cond_indep_stack"]}


def plate_frame(site: dict, plate: str | None):
    """The frame of plate ``plate`` at ``site`` (``None`` if the site is outside it)."""
    if plate is None:
        return None
    for frame in site["cond_indep_stack"]:
        if frame.name == plate:
            return frame
    return None


def sample_sites(trace) -> dict[str, dict]:
    """Every sample site that is not a plate, by name, in model order."""
    return {
        name: node
        for name, node in trace.nodes.items()
        if node["type"] == "sample" and not isinstance(node["fn"], _Subsample)
    }


def observed_sites(trace, latent_names=()) -> Iterator[tuple[str, dict]]:
    """The model's observed sites (latents conditioned to values, ``latent_names``, are
    excluded)."""
    for name, site in trace.nodes.items():
        if (
            site["type"] == "sample"
            and site["is_observed"]
            and not is_plate_site(site)
            and name not in latent_names
        ):
            yield name, site


def latent_site_names(trace) -> list[str]:
    """The latent (unobserved, non-plate) sample sites, in model order."""
    return [
        name
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"] and not is_plate_site(site)
    ]


def site_batch_shape(site: dict) -> torch.Size:
    """The shape of a site's value without its event dimensions."""
    value = site["value"]
    event = len(site["fn"].event_shape)
    return value.shape[: value.dim() - event] if event else value.shape


def subsampled_frames(site: dict) -> list:
    """The frames of the plates that subsample at ``site`` (size below full size)."""
    return [
        frame
        for frame in site["cond_indep_stack"]
        if frame.full_size is not None and frame.size != frame.full_size
    ]


def is_identity_transform(transform) -> bool:
    """Whether a ``biject_to(support)`` transform is the identity (support: the reals):
    an empty ``ComposeTransform``, maybe inside an ``IndependentTransform``."""
    T = torch.distributions.transforms
    if isinstance(transform, T.IndependentTransform):
        return is_identity_transform(transform.base_transform)
    return isinstance(transform, T.ComposeTransform) and not transform.parts


# ---------------------------------------------------------------------- the data plate
def find_data_plate(plates, observed, plate, subsample_size) -> str | None:
    """The data plate's name: ``plate`` if given, else the vectorised plate holding the
    observed sites (the outermost of nested ones), else ``None``.

    Args:
        plates: the model's plate sites by name.
        observed: its observed sites.
        plate: the name the user gave, or ``None``.
        subsample_size: the minibatch size the user asked for, or ``None``.
    """
    if plate is not None:
        if plate not in plates:
            raise ModelError(
                f"plate '{plate}' is not in the model; its plates are {sorted(plates)}"
            )
        return plate
    candidates = []
    for site in observed:
        for frame in site["cond_indep_stack"]:
            if frame.vectorized and frame.name in plates and frame.name not in candidates:
                candidates.append(frame.name)
    if len(candidates) > 1:
        # Nested plates: the outermost one (its dim furthest left) holds the data.
        dims = {}
        for site in observed:
            for frame in site["cond_indep_stack"]:
                if frame.name in candidates:
                    dims[frame.name] = frame.dim
        outer = min(candidates, key=lambda n: dims[n])
        if subsample_size is not None and list(dims.values()).count(dims[outer]) > 1:
            raise ModelError(
                f"several plates hold observed sites ({candidates}): name the data "
                "plate with plate='...'"
            )
        return outer
    if candidates:
        return candidates[0]
    if subsample_size is not None and any(
        not f.vectorized for s in observed for f in s["cond_indep_stack"]
    ):
        raise ModelError(
            "the observed sites sit in a sequential plate (`for i in pyro.plate(...)`): "
            "subsampling needs a vectorised plate, `with pyro.plate('data', N) as idx`"
        )
    return None


def check_latents(trace, plate_name: str | None, subsample_size: int | None) -> None:
    """Raise a :class:`ModelError` for discrete latents, and for latents inside a
    subsampled data plate."""
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site["is_observed"] or is_plate_site(site):
            continue
        fn = site["fn"]
        if fn.support.is_discrete:
            raise ModelError(
                f"latent site '{name}' is discrete ({type(fn).__name__}): gradient-based "
                "samplers need continuous latents; marginalise it out (e.g. with "
                "pyro.infer.config_enumerate and a mixture likelihood) or observe it"
            )
        if subsample_size is not None and plate_name in site_frames(site):
            raise ModelError(
                f"latent site '{name}' lies inside the subsampled plate "
                f"'{plate_name}': local (per-datum) latents are not supported with "
                "subsample_size; marginalise them out, move them outside the plate, or "
                "sample full batch (subsample_size=None)"
            )


def subsampling_plate(model: Callable, args: tuple, kwargs: dict, plate: str | None):
    """``(name, size)`` of a plate that subsamples itself in the model (else None)."""
    with pyro.validation_enabled(False):
        tr = poutine.trace(model).get_trace(*args, **kwargs)
    found = [
        (name, site["fn"].subsample_size)
        for name, site in tr.nodes.items()
        if site["type"] == "sample"
        and isinstance(site["fn"], _Subsample)
        and site["fn"].subsample_size is not None
        and site["fn"].subsample_size < site["fn"].size
        and (plate is None or name == plate)
    ]
    if len(found) > 1:
        raise ModelError(
            f"several plates subsample ({[n for n, _ in found]}): name the data plate "
            "with plate='...'"
        )
    return found[0] if found else None


def model_plate_subsample_size(potential) -> int | None:
    """The data plate's own ``subsample_size`` when the model fixes one (< its size).

    A plate written ``pyro.plate("data", N, subsample_size=B)`` only accepts index
    batches of exactly ``B``, so curvature chunks then have that size.
    """
    if potential.plate_name is None:
        return None
    one = torch.zeros(1, dtype=torch.long)
    cond = poutine.condition(potential.model, {potential.plate_name: one})
    try:
        with pyro.validation_enabled(False):
            poutine.trace(cond).get_trace(*potential.model_args, **potential.model_kwargs)
        return None
    except Exception as e:  # noqa: BLE001 - other failures are full_batch_reason's business
        if "subsample_size does not match" not in str(e):
            return None
    # The plate subsamples by itself: one run reads its size (cheap, it is a minibatch).
    with pyro.validation_enabled(False):
        tr = poutine.trace(potential.model).get_trace(
            *potential.model_args, **potential.model_kwargs
        )
    site = tr.nodes[potential.plate_name]
    sub = site["fn"].subsample_size
    return None if sub is None or sub >= site["fn"].size else int(sub)


def full_batch_reason(potential, fixed: int | None) -> str | None:
    """Why the data plate cannot be cut into chunks (``None`` when it can).

    One model run on a small batch of plate indices (latents drawn from the prior): the
    plate's observed sites must have that batch's size at the plate's dim, and no latent
    may sit inside the plate.
    """
    n = potential.plate_size
    k = fixed or min(2, n)
    if k >= n:
        return None
    idx = torch.arange(k)
    plate = potential.plate_name
    try:
        with pyro.validation_enabled(False), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tr = poutine.trace(poutine.condition(potential.model, {plate: idx})).get_trace(
                *potential.model_args, **potential.model_kwargs
            )
    except Exception as e:  # noqa: BLE001 - any failure means: not chunkable as written
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "Shape mismatch inside plate" in first:
            return (
                f"the model's observed sites do not index their data with the plate's indices "
                f"({first}; write `with pyro.plate('{plate}', N) as idx: ... obs=y[idx]`)"
            )
        return f"the model fails on a chunk of the plate's indices ({first})"
    for name, site in tr.nodes.items():
        if site["type"] != "sample" or is_plate_site(site):
            continue
        frame = plate_frame(site, plate)
        if frame is None:
            continue
        if not site["is_observed"]:
            return f"latent site '{name}' lies inside the data plate '{plate}'"
        shape = site_batch_shape(site)
        if -frame.dim <= len(shape) and shape[frame.dim] != k:
            return (
                f"observed site '{name}' does not index its data with the plate's indices "
                f"(write `with pyro.plate('{plate}', N) as idx: ... obs=y[idx]`)"
            )
    return None
