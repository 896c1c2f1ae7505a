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
    "CastObserved",
    "DataAccess",
    "ModelError",
    "check_argument_values",
    "check_latents",
    "check_observed_values",
    "check_plate_indexing",
    "explain_failure",
    "find_data_plate",
    "full_batch_reason",
    "first_index",
    "is_identity_transform",
    "is_plate_index",
    "is_plate_site",
    "latent_site_names",
    "model_arg_names",
    "model_plate_subsample_size",
    "observed_casts",
    "observed_log_prob_finite",
    "observed_sites",
    "plate_frame",
    "plate_indexed",
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


# ---------------------------------------------------------------------- data checks
# One-off checks at set-up, over the whole data: Pyro's MCMC runs without validation for
# speed, so data the likelihood cannot score would otherwise give a silently wrong
# posterior or a non-finite potential many steps later.
_DTYPE_WORDS = ("dtype", "double", "scalar type", "same type", "expected both", "found float")


def model_arg_names(model: Callable, args: tuple, kwargs: dict) -> list[tuple[str, Any]]:
    """``(name, value)`` of the model's arguments, named by its signature where it has
    one (``'X'``), else by position (``'argument 0'``)."""
    import inspect

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
