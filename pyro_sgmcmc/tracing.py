"""Running a :class:`~pyro_sgmcmc.potential.PyroPotential`'s model: its Pyro trace at
given values and minibatch (:func:`trace_at`, :func:`run_model`, which turns shape
errors inside the data plate into a clear fix), the set-up check that the data plate's
sites have the minibatch's size (:func:`check_minibatch_shapes`), and the
``torch.jit`` trace of the potential (:func:`jit_potential`)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer.autoguide.initialization import InitMessenger
from torch import Tensor

from pyro_sgmcmc.pyro_model import ModelError, is_plate_site, site_batch_shape, site_frames

if TYPE_CHECKING:
    from pyro_sgmcmc.potential import PyroPotential

__all__ = ["check_minibatch_shapes", "jit_potential", "run_model", "trace_at"]


def run_model(potential: PyroPotential, model, validate: bool = False):
    """Trace ``model`` on ``potential``'s arguments; turn shape errors inside the data
    plate into a clear fix."""
    with pyro.validation_enabled(validate):
        try:
            return poutine.trace(model).get_trace(*potential.model_args, **potential.model_kwargs)
        except (ValueError, RuntimeError) as e:
            text = str(e)
            if potential.subsample_size is not None and (
                "Shape mismatch inside plate" in text
                or "must match the size" in text
                or "shape" in text.lower()
            ):
                raise ModelError(
                    f"{text.splitlines()[0]}. With subsample_size the observed data and "
                    "every per-datum covariate must be indexed with the plate's indices "
                    f"(obs=y[idx]): `with pyro.plate('{potential.plate_name}', N) as idx: "
                    "... obs=y[idx]`"
                ) from e
            raise


def trace_at(potential: PyroPotential, phi, indices, validate: bool = False):
    """The model's trace at unconstrained values ``phi``, with the data plate at
    ``indices`` (Pyro's own subsample if ``None``)."""
    data = potential.constrain(phi)
    if indices is not None:
        data[potential.plate_name] = indices
    return run_model(potential, poutine.condition(potential.model, data), validate)


def check_minibatch_shapes(potential: PyroPotential) -> None:
    """Trace once on a minibatch: the data plate's sites must have its batch size."""
    plate = potential.plate_name
    if plate is None:
        return
    # The first B rows: a fixed batch, so the check draws nothing from the generator.
    idx = torch.arange(potential.indices.batch_size, device=potential.indices.device)
    model = InitMessenger(potential.init_strategy)(poutine.condition(potential.model, {plate: idx}))
    tr = run_model(potential, model, validate=True)
    batch = idx.numel()
    for name, site in tr.nodes.items():
        if site["type"] != "sample" or is_plate_site(site) or not site["is_observed"]:
            continue
        if plate not in site_frames(site):
            continue
        dim = site_frames(site)[plate].dim
        shape = site_batch_shape(site)
        size = shape[dim] if -dim <= len(shape) else 1
        if size != batch:
            raise ModelError(
                f"observed site '{name}' has {size} rows at the plate's dim {dim} where "
                f"the minibatch has {batch}: index the data with the plate's indices, "
                f"`with pyro.plate('{plate}', N) as idx: ... obs=y[idx]`"
            )


def jit_potential(fn: Callable, phi: dict[str, Tensor], indices: Tensor) -> Callable:
    """``torch.jit.trace`` of the potential ``fn(phi, indices)`` for batches of this
    size, as a function of ``(indices, *phi.values())``."""
    names = list(phi)

    def potential(idx, *values):
        return fn(dict(zip(names, values, strict=True)), idx)

    with warnings.catch_warnings(), pyro.validation_enabled(False):
        warnings.simplefilter("ignore")  # tracer warnings about Python values
        return torch.jit.trace(potential, (indices, *phi.values()), check_trace=False)
