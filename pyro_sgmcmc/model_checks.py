"""The data checks at set-up: one pass over the whole data before the first step.

Pyro's MCMC runs without validation for speed, so data the likelihood cannot score
would otherwise give a silently wrong posterior (a Bernoulli ``y`` of 0s and 2s) or a
non-finite potential many steps later (NaN in ``y``). :class:`PyroPotential` calls
:func:`check_data` once, over all rows, and :func:`setup_failure` when the model fails
on its own arguments. Each problem is a :class:`ModelError` naming the site or argument,
the first bad entry and the fix:

* observed values outside their likelihood's support, or not finite (masked entries are
  skipped): :func:`check_observed_values`;
* non-finite covariates, where the likelihood is not finite: :func:`check_argument_values`;
* a tensor the data plate indexes whose size differs from the plate's
  (:class:`DataAccess` records the indexing): :func:`check_plate_indexing`;
* float64 data with float32 priors, and other failures: :func:`explain_failure`.

Integer or bool observations of a likelihood that scores floats (a Bernoulli
``y.long()``) are converted to the parameters' dtype (:func:`observed_casts`,
:class:`CastObserved`).
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pyro
import pyro.poutine as poutine
import torch

from pyro_sgmcmc.pyro_model import (
    ModelError,
    is_plate_site,
    observed_sites,
    plate_frame,
    sample_sites,
)

__all__ = [
    "CastObserved",
    "DataAccess",
    "check_argument_values",
    "check_data",
    "check_observed_values",
    "check_plate_indexing",
    "explain_failure",
    "first_index",
    "is_plate_index",
    "model_arg_names",
    "observed_casts",
    "observed_log_prob_finite",
    "plate_indexed",
    "setup_failure",
]

# One-off checks at set-up, over the whole data: Pyro's MCMC runs without validation for
# speed, so data the likelihood cannot score would otherwise give a silently wrong
# posterior or a non-finite potential many steps later.
_DTYPE_WORDS = ("dtype", "double", "scalar type", "same type", "expected both", "found float")


def model_arg_names(model: Callable, args: tuple, kwargs: dict) -> list[tuple[str, Any]]:
    """``(name, value)`` of the model's arguments, named by its signature where it has
    one (``'X'``), else by position (``'argument 0'``)."""
    try:
        bound = inspect.signature(model).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return [(f"argument {i}", a) for i, a in enumerate(args)] + list(kwargs.items())
    params = inspect.signature(model).parameters
    out: list[tuple[str, Any]] = []
    for name, value in bound.arguments.items():
        kind = params[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            out += [(f"{name}[{i}]", v) for i, v in enumerate(value)]
        elif kind is inspect.Parameter.VAR_KEYWORD:
            out += list(value.items())
        else:
            out.append((name, value))
    return out


def _tensors(named: list[tuple[str, Any]]) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors among named arguments, one level into lists, tuples and dicts."""
    for name, value in named:
        if torch.is_tensor(value):
            yield name, value
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                if torch.is_tensor(v):
                    yield f"{name}[{i}]", v
        elif isinstance(value, dict):
            for k, v in value.items():
                if torch.is_tensor(v):
                    yield f"{name}[{k!r}]", v


def first_index(mask: torch.Tensor) -> tuple[int, ...]:
    """The index of the first ``True`` entry of ``mask`` (row-major)."""
    return tuple(int(i) for i in mask.nonzero()[0])


def _index_text(index: tuple[int, ...]) -> str:
    return str(index[0]) if len(index) == 1 else str(index)


class DataAccess(torch.overrides.TorchFunctionMode):
    """Records how the model indexes its tensor arguments: ``(name, tensor, dim, index)``
    for every ``arg[..., idx, ...]`` or ``index_select`` with an integer tensor."""

    def __init__(self, named: list[tuple[str, Any]]) -> None:
        super().__init__()
        self._watched = {id(t): (name, t) for name, t in _tensors(named)}
        self.records: list[tuple[str, torch.Tensor, int, torch.Tensor]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if args and id(args[0]) in self._watched:
            name, tensor = self._watched[id(args[0])]
            if func is torch.Tensor.__getitem__:
                self._record_key(name, tensor, args[1])
            elif func in (torch.index_select, torch.Tensor.index_select) and len(args) > 2:
                self.records.append((name, tensor, int(args[1]), args[2]))
        return func(*args, **kwargs)

    def _record_key(self, name, tensor, key) -> None:
        key = key if isinstance(key, tuple) else (key,)
        ellipsis = any(k is Ellipsis for k in key)
        for pos, k in enumerate(key):
            if k is Ellipsis or k is None:
                if k is Ellipsis:
                    break
                continue
            if torch.is_tensor(k) and not k.dtype.is_floating_point and k.dtype != torch.bool:
                self.records.append((name, tensor, pos, k))
        if ellipsis:
            tail = key[[k is Ellipsis for k in key].index(True) + 1 :]
            for pos, k in enumerate(tail):
                if torch.is_tensor(k) and not k.dtype.is_floating_point and k.dtype != torch.bool:
                    self.records.append((name, tensor, pos - len(tail), k))


def check_argument_values(named: list[tuple[str, Any]], per_datum: set[str]) -> None:
    """NaN in any floating tensor argument, or +-inf in one the data plate indexes
    (``per_datum``), is a :class:`ModelError` naming the argument and its first bad
    entry."""
    for name, t in _tensors(named):
        if not t.dtype.is_floating_point or t.numel() == 0:
            continue
        bad = torch.isnan(t) if name not in per_datum else ~torch.isfinite(t)
        if bool(bad.any()):
            index = first_index(bad)
            value = float(t[index])
            raise ModelError(
                f"argument '{name}' holds {int(bad.sum())} non-finite value(s); the first, "
                f"{value}, at index {_index_text(index)}. Drop or impute those rows before "
                f"sampling, e.g. `keep = torch.isfinite({name})"
                + (".all(-1)" if t.dim() > 1 else "")
                + "` and index every per-datum tensor with it"
            )


def is_plate_index(index: torch.Tensor, indices: torch.Tensor) -> bool:
    """Whether ``index`` is the plate's ``indices`` (the tensor itself, or its values)."""
    if index is indices:
        return True
    return index.shape == indices.shape and bool(torch.equal(index, indices.to(index.device)))


def plate_indexed(records, indices: torch.Tensor) -> list:
    """The :class:`DataAccess` records whose index is the plate's ``indices``."""
    return [r for r in records if is_plate_index(r[3], indices)]


def check_plate_indexing(
    records, plate: str, size: int, indices: torch.Tensor, failed: BaseException | None = None
) -> None:
    """Each tensor argument indexed with the data plate's ``indices`` must have the
    plate's size along that dim (else part of the data is silently unused, or indexed out
    of range)."""
    for name, tensor, dim, _ in plate_indexed(records, indices):
        if -tensor.dim() > dim or dim >= tensor.dim():
            continue
        rows = tensor.shape[dim]
        if rows == size:
            continue
        what = (
            f"only its first {size} are used"
            if rows > size
            else "the plate's indices run past its end"
        )
        raise ModelError(
            f"plate '{plate}' has size {size} but argument '{name}', which the model indexes "
            f"with the plate's indices, has {rows} entries along dim {dim}: {what}. Give "
            f"every per-datum tensor the same leading size and the plate that size, e.g. "
            f"`pyro.plate('{plate}', {name}.shape[{dim}])`"
        ) from failed


def explain_failure(
    error: BaseException, named: list[tuple[str, Any]], latent_dtype: torch.dtype | None
) -> ModelError:
    """A :class:`ModelError` for a model that fails on its own arguments; a dtype clash
    between the data and the priors is named with its fix."""
    first = str(error).splitlines()[0] if str(error) else type(error).__name__
    default = torch.get_default_dtype() if latent_dtype is None else latent_dtype
    mixed = [
        (name, t.dtype)
        for name, t in _tensors(named)
        if t.dtype.is_floating_point and t.dtype != default
    ]
    if "Shape mismatch inside plate" in first:
        return ModelError(
            f"{first}: a plate's size must equal the number of rows of every tensor in it. "
            "Give the data plate the data's size, `with pyro.plate('data', len(y)) as idx`, "
            "and index every per-datum tensor with its indices (obs=y[idx])"
        )
    if mixed and any(w in first.lower() for w in _DTYPE_WORDS):
        names = ", ".join(f"'{n}' is {str(d).replace('torch.', '')}" for n, d in mixed)
        n0, d0 = mixed[0]
        cast = {torch.float32: ".float()", torch.float64: ".double()"}.get(default, ".to(dtype)")
        return ModelError(
            f"the model mixes dtypes: {names} while its priors and parameters are "
            f"{str(default).replace('torch.', '')} (torch's default dtype), and torch does not "
            f"mix them ({first}). Convert the data, `{n0} = {n0}{cast}`, or make "
            f"{str(d0).replace('torch.', '')} the default before building the model: "
            f"`torch.set_default_dtype({d0})`"
        )
    return ModelError(f"the model failed on its own arguments: {error}")


def observed_casts(trace, dtype: torch.dtype) -> dict[str, torch.dtype]:
    """Observed sites whose integer or bool values the likelihood cannot score as they
    are but can as ``dtype`` (e.g. ``Bernoulli`` with ``y.long()``): ``{name: dtype}``.

    Raises :class:`ModelError` for values no conversion helps.
    """
    casts = {}
    for name, site in observed_sites(trace):
        value, fn = site["value"], site["fn"]
        if not torch.is_tensor(value) or value.dtype.is_floating_point or value.is_complex():
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                fn.log_prob(value)
                continue
            except Exception:  # noqa: BLE001 - any failure: try the float dtype
                pass
            try:
                fn.log_prob(value.to(dtype))
            except Exception as e:  # noqa: BLE001
                raise ModelError(
                    f"observed site '{name}' holds {value.dtype} values that "
                    f"{type(fn).__name__} cannot score ({str(e).splitlines()[0]}): pass the "
                    "data with the dtype the likelihood expects (e.g. `y.float()`)"
                ) from e
        casts[name] = dtype
    return casts


class CastObserved(pyro.poutine.messenger.Messenger):
    """Converts the values of the named observed sites to a floating dtype (integer or
    bool data for a likelihood that scores floats)."""

    def __init__(self, casts: dict[str, torch.dtype]) -> None:
        super().__init__()
        self.casts = casts

    def _process_message(self, msg) -> None:
        dtype = self.casts.get(msg["name"])
        if dtype is not None and msg["type"] == "sample" and msg["is_observed"]:
            value = msg["value"]
            if torch.is_tensor(value) and value.dtype != dtype:
                msg["value"] = value.to(dtype)


def check_observed_values(trace, plate: str | None, indices: torch.Tensor | None) -> None:
    """Every observed value must be finite and in its likelihood's support (where not
    masked); else a :class:`ModelError` naming the site, the first bad datum and the fix.

    ``indices``: the data rows the trace's plate ``plate`` holds (``None``: all rows).
    """
    for name, site in observed_sites(trace):
        value, fn = site["value"], site["fn"]
        if not torch.is_tensor(value) or value.numel() == 0:
            continue
        event = len(fn.event_shape)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ok = fn.support.check(value)
            except Exception:  # noqa: BLE001 - a support that cannot check this value
                continue
        if value.dtype.is_floating_point:
            finite = torch.isfinite(value)
            if event:
                finite = finite.flatten(-event).all(-1)
            ok = ok & finite
        while ok.dim() > value.dim() - event and ok.dim() > 0:
            ok = ok.all(-1)
        ok = ok.expand(value.shape[: value.dim() - event]) if ok.dim() else ok
        mask = site["mask"]
        if mask is False:
            continue
        if torch.is_tensor(mask):
            ok, mask = torch.broadcast_tensors(ok, mask.bool())
            ok = ok | ~mask
        if bool(ok.all()):
            continue
        bad = ~ok
        index = first_index(bad) if bad.dim() else ()
        entry = value[index] if index else value
        frame = plate_frame(site, plate)
        where = f"entry {_index_text(index)}" if index else "its value"
        if frame is not None and index and -frame.dim <= len(index):
            row = index[frame.dim]
            row = int(indices[row]) if indices is not None else row
            where = f"data row {row} (entry {_index_text(index)} of the site)"
        shown = entry.tolist() if entry.numel() <= 8 else f"a {tuple(entry.shape)} tensor"
        non_finite = entry.dtype.is_floating_point and not bool(torch.isfinite(entry).all())
        if non_finite:
            fix = (
                "drop or impute the rows with missing values before sampling (e.g. "
                "`keep = torch.isfinite(y)` and index every per-datum tensor with it), or "
                "mask them with `poutine.mask`"
            )
        else:
            fix = (
                f"recode the data to the support of {type(fn).__name__} "
                f"({_support_text(fn.support)}), or choose a likelihood whose support "
                "covers them"
            )
        raise ModelError(
            f"observed site '{name}' has {int(bad.sum())} value(s) "
            + (
                "that are not finite"
                if non_finite
                else f"outside the support of {type(fn).__name__} ({_support_text(fn.support)})"
            )
            + f"; the first is {shown} at {where}. Fix: {fix}"
        )


def observed_log_prob_finite(trace, casts: dict[str, torch.dtype] | None = None) -> bool:
    """Whether every observed site's log-density is finite wherever it is not masked
    (values of the sites in ``casts`` converted to their dtype first)."""
    casts = casts or {}
    for name, site in observed_sites(trace):
        value = site["value"]
        if name in casts:
            value = value.to(casts[name])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                lp = site["fn"].log_prob(value)
            except Exception:  # noqa: BLE001 - a failure here is reported at the first step
                continue
        mask = site["mask"]
        if mask is False:
            continue
        ok = torch.isfinite(lp)
        if torch.is_tensor(mask):
            ok, mask = torch.broadcast_tensors(ok, mask.bool())
            ok = ok | ~mask
        if not bool(ok.all()):
            return False
    return True


def _support_text(support) -> str:
    C = torch.distributions.constraints
    if support is C.boolean:
        return "0 or 1"
    if support is C.nonnegative_integer:
        return "integers >= 0"
    if isinstance(support, C.integer_interval):

        def bound(b):
            if torch.is_tensor(b) and b.numel() > 1:
                return "its bound" if b.min() != b.max() else str(int(b.flatten()[0]))
            return str(int(b))

        return f"integers in [{bound(support.lower_bound)}, {bound(support.upper_bound)}]"
    if support is C.positive:
        return "positive values"
    if support is C.unit_interval:
        return "values in [0, 1]"
    return str(support).replace("constraints.", "")


# ---------------------------------------------------------------------- the entry points
def check_data(potential, prototype, named, access: DataAccess) -> dict[str, torch.dtype]:
    """One pass over the whole data before the first step; returns the observed sites
    whose integer or bool values are to be converted (:func:`observed_casts`).

    Every observed value must be finite and in its likelihood's support (where not
    masked); a likelihood that is not finite at valid observations is traced to a
    non-finite covariate. ``potential`` is the :class:`PyroPotential` being set up (its
    data plate found), ``prototype`` the model's trace on all its arguments, ``named``
    the arguments by name and ``access`` how the model indexed them.
    """
    plate, fixed = potential.plate_name, potential.model_subsample_size
    traces = [prototype]
    if fixed is None:
        check_observed_values(prototype, plate, None)
    else:
        # The plate takes exactly `fixed` indices: check the data chunk by chunk.
        traces = []
        device = prototype.nodes[plate]["value"].device
        for idx, _ in potential.index_chunks(fixed, device):
            cond = poutine.condition(potential.model, {plate: idx})
            with pyro.validation_enabled(False):
                tr = poutine.trace(cond).get_trace(*potential.model_args, **potential.model_kwargs)
            check_observed_values(tr, plate, idx)
            traces.append(tr)
    latents = [s["value"] for s in sample_sites(prototype).values()
               if not s["is_observed"] and torch.is_tensor(s["value"])]  # fmt: skip
    floats = [v.dtype for v in latents if v.dtype.is_floating_point]
    casts = observed_casts(prototype, floats[0] if floats else torch.get_default_dtype())
    if not all(observed_log_prob_finite(tr, casts) for tr in traces):
        # Valid observations, a non-finite likelihood: name a non-finite covariate.
        per_datum = set()
        if plate is not None:
            per_datum = {
                n for n, *_ in plate_indexed(access.records, prototype.nodes[plate]["value"])
            }
        check_argument_values(named, per_datum)
    return casts


def setup_failure(error: BaseException, partial, access: DataAccess, named, plate) -> ModelError:
    """The :class:`ModelError` for a model that fails on its own arguments (``partial``:
    the trace up to the failure): a plate whose indices run past a tensor's end, a
    non-finite covariate, or a dtype clash, named with its fix."""
    per_datum = set()
    for name, site in partial.nodes.items():
        if not is_plate_site(site) or (plate is not None and name != plate):
            continue
        records = plate_indexed(access.records, site["value"])
        per_datum |= {arg for arg, *_ in records}
        try:
            check_plate_indexing(records, name, site["fn"].size, site["value"])
        except ModelError as e:
            return e
    try:  # non-finite covariates make a distribution's parameters invalid
        check_argument_values(named, per_datum)
    except ModelError as e:
        return e
    sites = sample_sites(partial).values()
    floats = [s["value"].dtype for s in sites if not s["is_observed"]
              and torch.is_tensor(s["value"]) and s["value"].dtype.is_floating_point]  # fmt: skip
    return explain_failure(error, named, floats[0] if floats else None)
