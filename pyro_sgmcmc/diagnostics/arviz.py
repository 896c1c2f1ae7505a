r"""ArviZ conversion and a convergence report for MCMC runs.

* :func:`to_inference_data` turns a :class:`pyro.infer.MCMC` run (this package's
  kernels or NUTS) or a dict of draws with a leading chain dimension into an
  ``arviz.InferenceData`` through ``arviz.from_dict``: the ``posterior`` group holds
  ``(chain, draw, ...)`` arrays and ``sample_stats`` a boolean ``diverging`` when the
  kernel records divergences.
* :func:`nested_rhat` is Margossian et al.'s nested :math:`\widehat R` for many short
  chains grouped in superchains.
* :func:`report` tabulates, per parameter coordinate, mean, sd, rank-normalised split
  :math:`\widehat R`, bulk and tail ESS (ArviZ), nested :math:`\widehat R`, optionally a
  reference run's mean and sd side by side, and the run's kernelized Stein discrepancy
  (:mod:`pyro_sgmcmc.diagnostics.ksd`).
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import arviz as az
import numpy as np
import pandas as pd
import torch
from torch import Tensor

from pyro_sgmcmc.diagnostics.ksd import ksd as _ksd
from pyro_sgmcmc.potential import PyroPotential

__all__ = ["Report", "nested_rhat", "report", "to_inference_data"]


# ------------------------------------------------------------------------------ inputs
def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _is_mcmc(obj: Any) -> bool:
    return hasattr(obj, "get_samples") and not isinstance(obj, Mapping)


def grouped_samples(mcmc_or_samples: Any) -> dict[str, np.ndarray]:
    """``{site: (chains, draws, ...)}`` as numpy arrays, checked for a common layout."""
    if _is_mcmc(mcmc_or_samples):
        samples = mcmc_or_samples.get_samples(group_by_chain=True)
    elif isinstance(mcmc_or_samples, Mapping):
        samples = mcmc_or_samples
    else:
        raise TypeError(
            "expected a pyro.infer.MCMC (after .run) or a dict of (chains, draws, ...) "
            f"arrays, got {type(mcmc_or_samples).__name__}"
        )
    if not samples:
        raise ValueError("there are no samples (did the MCMC run?)")
    out = {name: _to_numpy(v) for name, v in samples.items()}
    lead = None
    for name, v in out.items():
        if v.ndim < 2:
            raise ValueError(
                f"site {name!r} has shape {v.shape}: give (chains, draws, ...) arrays (add "
                "a chain dimension, e.g. x[None], for a single chain)"
            )
        if lead is None:
            lead = v.shape[:2]
        elif v.shape[:2] != lead:
            raise ValueError(
                f"site {name!r} has (chains, draws) = {v.shape[:2]}, other sites have {lead}"
            )
    return out


def _mcmc_divergences(mcmc: Any) -> Any:
    """Per-chain divergences recorded by the kernel, or ``None`` when it records none."""
    # Pyro's MCMC keeps each chain's kernel.diagnostics() in `_diagnostics`; reading it
    # avoids MCMC.diagnostics(), which also computes Pyro's own ESS/R-hat of every site.
    per_chain = getattr(mcmc, "_diagnostics", None)
    if isinstance(per_chain, list) and per_chain and all(isinstance(d, dict) for d in per_chain):
        if all("divergences" in d for d in per_chain):
            return [d["divergences"] for d in per_chain]
        return None
    try:
        diag = mcmc.diagnostics()
    except Exception:  # a runner without diagnostics, or one that fails on them
        return None
    return diag.get("divergences") if isinstance(diag, Mapping) else None


def _divergence_mask(divergences: Any, chains: int, draws: int) -> np.ndarray | None:
    """A ``(chains, draws)`` boolean array from Pyro's ``{"chain i": [draw indices]}``,
    a list of per-chain index lists, or a boolean array. Indices outside the draws
    (e.g. from a run that was later subsampled) are dropped."""
    if divergences is None:
        return None
    if isinstance(divergences, Mapping):
        keys = [f"chain {c}" for c in range(chains)]
        if not all(k in divergences for k in keys):
            raise ValueError(
                f"divergences has keys {sorted(divergences)}; expected {keys} (Pyro's layout)"
            )
        divergences = [divergences[k] for k in keys]
    if isinstance(divergences, (np.ndarray, Tensor)) and _to_numpy(divergences).dtype == bool:
        mask = _to_numpy(divergences)
        if mask.shape != (chains, draws):
            raise ValueError(
                f"a boolean divergences array must have shape (chains, draws) = "
                f"{(chains, draws)}, got {mask.shape}"
            )
        return mask.copy()
    if not isinstance(divergences, Sequence | np.ndarray | Tensor) or len(divergences) != chains:
        raise ValueError(
            f"divergences must give one list of draw indices per chain ({chains} chains)"
        )
    mask = np.zeros((chains, draws), dtype=bool)
    for c, idx in enumerate(divergences):
        idx = np.asarray(_to_numpy(idx), dtype=np.int64).reshape(-1)
        idx = idx[(idx >= 0) & (idx < draws)]
        mask[c, idx] = True
    return mask


def _from_dict(posterior: dict, sample_stats: dict | None, coords, dims) -> Any:
    """``arviz.from_dict`` in ArviZ 0.x (keyword groups) and 1.x (a dict of groups)."""
    with warnings.catch_warnings():
        # Many short chains are legitimate here; the (chain, draw) layout is explicit.
        warnings.filterwarnings("ignore", message="More chains", category=UserWarning)
        if "posterior" in inspect.signature(az.from_dict).parameters:
            return az.from_dict(
                posterior=posterior, sample_stats=sample_stats, coords=coords, dims=dims
            )
        groups = {"posterior": posterior}
        if sample_stats:
            groups["sample_stats"] = sample_stats
        return az.from_dict(groups, coords=coords, dims=dims)


def to_inference_data(
    mcmc_or_samples: Any,
    *,
    divergences: Any = None,
    coords: dict | None = None,
    dims: dict | None = None,
) -> Any:
    """An ``arviz.InferenceData`` of a run, through ``arviz.from_dict``.

    The ``posterior`` group holds each site as a ``(chain, draw, ...)`` array (from
    ``mcmc.get_samples(group_by_chain=True)``: constrained values, as Pyro returns
    them). When the run records divergences (``mcmc.diagnostics()["divergences"]``,
    Pyro's ``{"chain i": [draw indices]}``, kept by this package's kernels and by
    NUTS), ``sample_stats`` holds ``diverging``, a boolean ``(chain, draw)`` array;
    otherwise there is no ``sample_stats`` group.

    Args:
        mcmc_or_samples: a :class:`pyro.infer.MCMC` after ``run`` (or any object with
            ``get_samples(group_by_chain=True)``), or a dict of ``(chains, draws, ...)``
            tensors or arrays.
        divergences: overrides the recorded ones: Pyro's ``{"chain i": [...]}`` dict, a
            list of per-chain draw-index lists, or a boolean ``(chains, draws)`` array.
        coords: ArviZ coordinates, passed to ``from_dict``.
        dims: ArviZ dimension names per site, passed to ``from_dict``.

    Returns:
        The ``InferenceData``.

    Examples:
        >>> import torch
        >>> samples = {"mu": torch.randn(2, 100), "w": torch.randn(2, 100, 3)}
        >>> idata = to_inference_data(samples, divergences=[[3], []])
        >>> idata.posterior["w"].shape, int(idata.sample_stats["diverging"].sum())
        ((2, 100, 3), 1)
    """
    posterior = grouped_samples(mcmc_or_samples)
    if divergences is None and _is_mcmc(mcmc_or_samples):
        divergences = _mcmc_divergences(mcmc_or_samples)
    return _inference_data(posterior, divergences, coords, dims)


def _inference_data(posterior: dict[str, np.ndarray], divergences: Any, coords, dims) -> Any:
    chains, draws = next(iter(posterior.values())).shape[:2]
    mask = _divergence_mask(divergences, chains, draws)
    sample_stats = None if mask is None else {"diverging": mask}
    return _from_dict(posterior, sample_stats, coords, dims)


# ------------------------------------------------------------------------------ nested R-hat
def nested_rhat(draws: Any, num_superchains: int) -> float | np.ndarray:
    r"""Nested :math:`\widehat R` (Margossian, Hoffman, Sountsov, Riou-Durand, Vehtari &
    Gelman, 2024, *Bayesian Analysis*) for many short chains.

    The :math:`C = KM` chains are grouped in :math:`K` superchains of :math:`M` chains,
    superchain :math:`k` being chains :math:`kM, \dots, kM + M - 1` (contiguous: order
    the chains so that those sharing an initialisation sit together). With
    :math:`\theta^{(nmk)}` draw :math:`n \le N` of chain :math:`m` of superchain
    :math:`k`, chain means :math:`\bar\theta^{(\cdot mk)}`, superchain means
    :math:`\bar\theta^{(\cdot\cdot k)} = \frac1M \sum_m \bar\theta^{(\cdot mk)}` and
    :math:`\bar\theta^{(\cdot\cdot\cdot)} = \frac1K \sum_k \bar\theta^{(\cdot\cdot k)}`:

    .. math::

        \widehat B_\nu &= \frac{1}{K-1} \sum_k \big(\bar\theta^{(\cdot\cdot k)}
            - \bar\theta^{(\cdot\cdot\cdot)}\big)^2
            \quad\text{(between superchains)},\\
        \tilde B_k &= \frac{1}{M-1} \sum_m \big(\bar\theta^{(\cdot mk)}
            - \bar\theta^{(\cdot\cdot k)}\big)^2 \quad (0 \text{ if } M = 1),\\
        \tilde W_k &= \frac1M \sum_m \frac{1}{N-1} \sum_n \big(\theta^{(nmk)}
            - \bar\theta^{(\cdot mk)}\big)^2 \quad (0 \text{ if } N = 1),\\
        \widehat W_\nu &= \frac1K \sum_k \big(\tilde B_k + \tilde W_k\big)
            \quad\text{(within superchains)},\\
        \mathfrak n\widehat R &= \sqrt{1 + \widehat B_\nu / \widehat W_\nu}.

    It is close to 1 when the superchains agree, i.e. when chains started from
    different points have forgotten their start; the paper suggests
    :math:`\mathfrak n\widehat R < 1 + \delta` with :math:`\delta \approx 0.01`, and
    :math:`\widehat B_\nu / \widehat W_\nu` of order :math:`1/M` is expected even at
    stationarity when :math:`N` is small. With :math:`M = 1` it is the (unsplit)
    between/within ratio of ordinary :math:`\widehat R`.

    Args:
        draws: an array or tensor of shape ``(chains, draws, ...)``; trailing dimensions
            are separate parameters.
        num_superchains: :math:`K \ge 2`, dividing the number of chains.

    Returns:
        :math:`\mathfrak n\widehat R`, a float for ``(chains, draws)`` input, otherwise an
        array of the trailing shape.

    Examples:
        >>> import numpy as np
        >>> draws = np.array([[0.0, 2.0], [2.0, 4.0], [4.0, 6.0], [6.0, 8.0]])
        >>> round(nested_rhat(draws, 2), 6)  # B = 8, W = 2 + 2: sqrt(1 + 8/4)
        1.732051
    """
    x = _to_numpy(draws).astype(np.float64)
    if x.ndim < 2:
        raise ValueError(f"draws must have shape (chains, draws, ...), got {x.shape}")
    chains, n = x.shape[:2]
    k = int(num_superchains)
    if k < 2 or chains % k:
        raise ValueError(
            f"num_superchains must be >= 2 and divide the number of chains ({chains}), got "
            f"{num_superchains}"
        )
    m = chains // k
    if m == 1 and n == 1:
        raise ValueError(
            "one draw per chain and one chain per superchain leave no within-superchain "
            "variance: use more chains per superchain or more draws"
        )
    x = x.reshape(k, m, n, *x.shape[2:])
    chain_mean = x.mean(axis=2)  # (K, M, ...)
    super_mean = chain_mean.mean(axis=1)  # (K, ...)
    between_super = super_mean.var(axis=0, ddof=1)
    between_chain = chain_mean.var(axis=1, ddof=1) if m > 1 else np.zeros_like(super_mean)
    within_chain = x.var(axis=2, ddof=1).mean(axis=1) if n > 1 else np.zeros_like(super_mean)
    within_super = (between_chain + within_chain).mean(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.sqrt(1.0 + between_super / within_super)
    return float(out) if out.ndim == 0 else out


# ------------------------------------------------------------------------------ report
def coordinate_names(name: str, shape: tuple[int, ...]) -> list[str]:
    """One label per scalar coordinate of a site: ``name`` or ``name[i,j]``."""
    if not shape:
        return [name]
    return [f"{name}[{','.join(map(str, i))}]" for i in np.ndindex(*shape)]


def _stat(result: Any, name: str) -> np.ndarray:
    """A variable of an ArviZ diagnostic result (a Dataset, or a DataTree in ArviZ 1.x)."""
    try:
        return np.asarray(result[name])
    except KeyError:
        return np.asarray(result["posterior"][name])


def _reference_draws(reference: Any, event_shapes: dict[str, tuple]) -> dict[str, np.ndarray]:
    """``{site: (draws, ...)}`` from an MCMC, a ``(chains, draws, ...)`` dict or a
    ``(draws, ...)`` dict."""
    if _is_mcmc(reference):
        reference = reference.get_samples(group_by_chain=True)
    if not isinstance(reference, Mapping):
        raise TypeError(
            f"reference must be an MCMC or a dict of draws, got {type(reference).__name__}"
        )
    out = {}
    for name, shape in event_shapes.items():
        if name not in reference:
            continue
        v = _to_numpy(reference[name]).astype(np.float64)
        if v.shape[v.ndim - len(shape) :] != shape:
            raise ValueError(f"reference[{name!r}] has shape {v.shape}, the run has {shape}")
        lead = v.ndim - len(shape)
        if lead not in (1, 2):
            raise ValueError(
                f"reference[{name!r}] has shape {v.shape}: expected (draws, *{shape}) or "
                f"(chains, draws, *{shape})"
            )
        out[name] = v.reshape(-1, *shape)
    return out


@dataclass
class Report:
    """What :func:`report` returns; ``str(report)`` is a readable text table.

    Attributes:
        table: one row per parameter coordinate (``"w[0,1]"``), columns ``mean``,
            ``sd``, ``r_hat``, ``ess_bulk``, ``ess_tail``, ``nested_r_hat``, and with a
            reference ``ref_mean``, ``ref_sd``, ``diff_sds`` = (mean - ref_mean) /
            ref_sd and ``sd_ratio`` = sd / ref_sd.
        num_chains: chains in the run.
        num_draws: draws per chain.
        num_superchains: superchains used by nested R-hat.
        num_divergences: divergent draws recorded (``None``: the run records none).
        ksd: the run's kernelized Stein discrepancy (``None`` without ``score``).
        ksd_kwargs: the KSD settings (kernel, bandwidth, ...).
        warmup_problems: what the kernel's end-of-warm-up check reported (an SGMCMC
            kernel's ``warmup_report["problems"]``; empty when it passed or for other
            kernels): a run whose warm-up failed is not to be trusted.
    """

    table: pd.DataFrame
    num_chains: int
    num_draws: int
    num_superchains: int
    num_divergences: int | None = None
    ksd: float | None = None
    ksd_kwargs: dict | None = None
    warmup_problems: tuple[str, ...] = ()

    def __str__(self) -> str:
        lines = [f"WARM-UP PROBLEM: {p}" for p in self.warmup_problems]
        lines.append(f"{self.num_chains} chains x {self.num_draws} draws")
        if self.num_superchains >= 2:
            lines[-1] += (
                f"; nested R-hat over {self.num_superchains} superchains of "
                f"{self.num_chains // self.num_superchains} chains"
            )
        if self.num_divergences is not None:
            lines.append(f"divergences: {self.num_divergences}")
        if self.ksd is not None:
            opts = ", ".join(f"{k}={v}" for k, v in (self.ksd_kwargs or {}).items())
            lines.append(f"KSD: {self.ksd:.4g} ({opts})")
        lines.append(self.table.to_string(float_format=lambda v: f"{v:.4g}"))
        return "\n".join(lines)

    __repr__ = __str__


def _run_ksd(samples: dict[str, np.ndarray], score: Any, ksd_kwargs: dict) -> float:
    flat = {k: torch.as_tensor(v.reshape(-1, *v.shape[2:])) for k, v in samples.items()}
    if isinstance(score, PyroPotential):
        # MCMC draws are constrained: KSD lives where the potential does, unconstrained.
        flat = {k: score.transforms[k](v) if k in score.transforms else v for k, v in flat.items()}
    elif isinstance(score, Mapping):  # precomputed, laid out like the samples
        score = {k: torch.as_tensor(_to_numpy(v)) for k, v in score.items()}
        score = {
            k: v.reshape(-1, *v.shape[2:]) if v.dim() == flat[k].dim() + 1 else v
            for k, v in score.items()
        }
    return float(_ksd(flat, score, **ksd_kwargs))


def report(
    mcmc_or_samples: Any,
    reference: Any = None,
    score: Callable | Mapping | PyroPotential | None = None,
    *,
    num_superchains: int | None = None,
    divergences: Any = None,
    ksd_kwargs: dict | None = None,
) -> Report:
    r"""Per-coordinate convergence and accuracy table of an MCMC run.

    Columns: posterior ``mean`` and ``sd`` (ddof 1, over all chains and draws);
    ``r_hat``, the rank-normalised split :math:`\widehat R`, and ``ess_bulk`` /
    ``ess_tail`` (Vehtari et al., 2021; ``arviz.rhat`` / ``arviz.ess`` on
    :func:`to_inference_data`; ArviZ gives NaN for fewer than 4 draws, and ``r_hat``
    NaN for a single chain); ``nested_r_hat`` (:func:`nested_rhat`). With a
    ``reference`` (e.g. a long NUTS run) also its ``ref_mean`` and ``ref_sd``,
    ``diff_sds`` :math:`= (\text{mean} - \text{ref\_mean}) / \text{ref\_sd}` and
    ``sd_ratio`` :math:`= \text{sd} / \text{ref\_sd}`. With a ``score``, the
    kernelized Stein discrepancy of all the draws pooled
    (:func:`~pyro_sgmcmc.diagnostics.ksd.ksd`, IMQ kernel unless ``ksd_kwargs`` says
    otherwise).

    Args:
        mcmc_or_samples: a :class:`pyro.infer.MCMC` after ``run``, or a dict of
            ``(chains, draws, ...)`` draws.
        reference: another MCMC, or a dict of ``(chains, draws, ...)`` or ``(draws,
            ...)`` draws of (some of) the same sites.
        score: the full-data score :math:`\nabla \log p`: a
            :class:`~pyro_sgmcmc.potential.PyroPotential` (the draws, constrained as
            MCMC returns them, are mapped to its unconstrained space first); a callable
            taking a dict of ``(n, ...)`` draws as given; or precomputed scores laid out
            like the draws. The KSD's default bandwidth 1.0 suits a posterior on unit
            scale; otherwise pass ``ksd_kwargs={"bandwidth": "median"}``. A kernel's
            own potential (``mcmc.kernel.potential``) works too: scores always use all
            the data.
        num_superchains: :math:`K` for nested :math:`\widehat R` (chains ``kM ..
            kM + M - 1`` form superchain ``k``); default: every chain its own
            superchain. ``nested_r_hat`` is NaN for a single chain.
        divergences: overrides the recorded divergences (see :func:`to_inference_data`).
        ksd_kwargs: keyword arguments of :func:`~pyro_sgmcmc.diagnostics.ksd.ksd`
            (``kernel``, ``bandwidth``, ``chunk_size``, ...).

    Returns:
        A :class:`Report`: ``.table`` is a ``pandas.DataFrame``, ``str()`` a text table.

    Examples:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> samples = {"mu": torch.randn(4, 200, generator=g)}
        >>> rep = report(samples, reference={"mu": torch.randn(1000, generator=g)},
        ...              score=lambda s: {"mu": -s["mu"]}, num_superchains=2)
        >>> list(rep.table.columns)  # doctest: +NORMALIZE_WHITESPACE
        ['mean', 'sd', 'r_hat', 'ess_bulk', 'ess_tail', 'nested_r_hat',
         'ref_mean', 'ref_sd', 'diff_sds', 'sd_ratio']
        >>> bool(rep.table.loc["mu", "r_hat"] < 1.05), rep.ksd < 0.2
        (True, True)
    """
    samples = grouped_samples(mcmc_or_samples)  # in the run's dtype, for the score
    if divergences is None and _is_mcmc(mcmc_or_samples):
        divergences = _mcmc_divergences(mcmc_or_samples)
    idata = _inference_data(samples, divergences, None, None)
    chains, draws = next(iter(samples.values())).shape[:2]
    k = chains if num_superchains is None else int(num_superchains)
    rhat = az.rhat(idata, method="rank")
    ess_bulk = az.ess(idata, method="bulk")
    ess_tail = az.ess(idata, method="tail")
    event_shapes = {name: v.shape[2:] for name, v in samples.items()}
    ref = {} if reference is None else _reference_draws(reference, event_shapes)

    rows, index = [], []
    for name, v in samples.items():
        shape = event_shapes[name]
        flat = v.reshape(chains * draws, -1).astype(np.float64)
        if k >= 2:
            nr = np.reshape(nested_rhat(v, k), -1)
        else:
            nr = np.full(flat.shape[1], np.nan)
        cols = {
            "mean": flat.mean(0),
            "sd": flat.std(0, ddof=1) if flat.shape[0] > 1 else np.full(flat.shape[1], np.nan),
            "r_hat": _stat(rhat, name).reshape(-1),
            "ess_bulk": _stat(ess_bulk, name).reshape(-1),
            "ess_tail": _stat(ess_tail, name).reshape(-1),
            "nested_r_hat": nr,
        }
        if reference is not None:
            nan = np.full(flat.shape[1], np.nan)
            r = ref.get(name)
            ref_mean = nan if r is None else r.reshape(r.shape[0], -1).mean(0)
            ref_sd = nan if r is None else r.reshape(r.shape[0], -1).std(0, ddof=1)
            with np.errstate(divide="ignore", invalid="ignore"):
                cols.update(
                    ref_mean=ref_mean,
                    ref_sd=ref_sd,
                    diff_sds=(cols["mean"] - ref_mean) / ref_sd,
                    sd_ratio=cols["sd"] / ref_sd,
                )
        index += coordinate_names(name, shape)
        rows.append(pd.DataFrame(cols))
    table = pd.concat(rows, ignore_index=True)
    table.index = index

    num_div = None
    if "sample_stats" in idata.groups() and "diverging" in idata.sample_stats:
        num_div = int(np.asarray(idata.sample_stats["diverging"]).sum())
    ksd_value, opts = None, None
    if score is not None:
        opts = {"kernel": "imq", "bandwidth": 1.0, **(ksd_kwargs or {})}
        ksd_value = _run_ksd(samples, score, opts)
    table.attrs.update(ksd=ksd_value, num_divergences=num_div)
    return Report(
        table=table,
        num_chains=chains,
        num_draws=draws,
        num_superchains=k,
        num_divergences=num_div,
        ksd=ksd_value,
        ksd_kwargs=opts,
        warmup_problems=_warmup_problems(mcmc_or_samples),
    )


def _warmup_problems(run: Any) -> tuple[str, ...]:
    """The end-of-warm-up problems an SGMCMC kernel reported (none for other runs)."""
    report = getattr(getattr(run, "kernel", None), "warmup_report", None)
    return tuple(report["problems"]) if isinstance(report, dict) else ()
