"""Plots where a picture beats a table: trace plots and marginals against a reference.

Both functions return a ``matplotlib`` figure (and write it when given ``path``); they
take what the rest of the library produces: a (``pyro_sgmcmc`` or Pyro) ``MCMC`` after
``run``, or dicts of draws.

Examples:
    >>> import torch
    >>> draws = {"w": torch.randn(4, 100, 2)}  # (chains, draws, ...)
    >>> fig = plot_trace(draws)
    >>> len(fig.axes)  # one row per coordinate: trace, density
    4
    >>> fig = plot_marginals({"NUTS": torch.randn(500, 2), "SGHMC": torch.randn(500, 2)},
    ...                      reference="NUTS", names=["w[0]", "w[1]"])
    >>> len(fig.axes)
    2
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from pyro_sgmcmc.diagnostics.arviz import coordinate_names, grouped_samples

__all__ = ["close", "kde", "plot_marginals", "plot_trace"]


def _pyplot():
    import matplotlib

    if os.environ.get("MPLBACKEND") is None and not matplotlib.get_backend().lower().startswith(
        ("module://matplotlib_inline", "module://ipykernel")
    ):
        matplotlib.use("Agg")  # headless unless a notebook backend is active
    import matplotlib.pyplot as plt

    return plt


def kde(x: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Gaussian kernel density estimate of the 1-D draws ``x`` on ``grid`` (Scott's
    bandwidth).

    Examples:
        >>> grid = np.linspace(-4, 4, 801)
        >>> dens = kde(np.random.default_rng(0).normal(size=5000), grid)
        >>> round(float(dens.sum() * (grid[1] - grid[0])), 2)
        1.0
    """
    x = np.asarray(x, dtype=float)
    n = x.shape[0]
    h = 1.06 * max(float(x.std()), 1e-12) * n ** (-1 / 5)
    z = (grid[:, None] - x[None, :]) / h
    return np.exp(-0.5 * z * z).sum(1) / (n * h * math.sqrt(2 * math.pi))


def close(fig) -> None:
    """Release a figure's memory (``matplotlib.pyplot.close``)."""
    _pyplot().close(fig)


def _save(fig, path: str | os.PathLike | None):
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def plot_trace(
    mcmc_or_samples: Any,
    sites: Sequence[str] | None = None,
    max_coords: int = 8,
    path: str | os.PathLike | None = None,
):
    """Trace plots: per coordinate, every chain's draws over time and its density.

    Args:
        mcmc_or_samples: an ``MCMC`` after ``run`` or ``{site: (chains, draws, ...)}``.
        sites: the sites to show (default: all, in name order).
        max_coords: the most coordinates shown (the first ones, site by site).
        path: write the figure there (PNG, PDF, ... by extension).

    Returns:
        The ``matplotlib.figure.Figure``.
    """
    samples = grouped_samples(mcmc_or_samples)
    names = sorted(samples) if sites is None else list(sites)
    series = []
    for name in names:
        if name not in samples:
            raise KeyError(f"no site {name!r}; the samples have {sorted(samples)}")
        value = samples[name]
        flat = value.reshape(*value.shape[:2], -1)
        for j, label in enumerate(coordinate_names(name, value.shape[2:])):
            series.append((label, flat[..., j]))
    series = series[:max_coords]
    plt = _pyplot()
    fig, axes = plt.subplots(
        len(series), 2, figsize=(10, 1.9 * len(series) + 0.4), squeeze=False,
        gridspec_kw={"width_ratios": [3, 1]},
    )  # fmt: skip
    for (label, chains), (ax_trace, ax_dens) in zip(series, axes, strict=True):
        lo, hi = np.nanmin(chains), np.nanmax(chains)
        pad = 0.05 * (hi - lo) + 1e-12
        grid = np.linspace(lo - pad, hi + pad, 200)
        for c, draws in enumerate(chains[:20]):  # more chains would be a blur
            (line,) = ax_trace.plot(draws, lw=0.6, alpha=0.8)
            if draws.size > 1:
                ax_dens.plot(kde(draws, grid), grid, lw=1.0, color=line.get_color())
            if c == 0:
                ax_trace.set_ylabel(label)
        ax_dens.set_xticks([])
        ax_dens.set_ylim(ax_trace.get_ylim())
    axes[-1, 0].set_xlabel("draw")
    axes[0, 0].set_title("trace (up to 20 chains)")
    axes[0, 1].set_title("density")
    fig.tight_layout()
    return _save(fig, path)


def _as_matrix(draws: Any) -> np.ndarray:
    """``(n, dim)`` from a tensor/array ``(n, ...)`` or a dict of them (sites in order)."""
    if isinstance(draws, Mapping):
        parts = [np.asarray(_to_numpy(v)).reshape(len(_to_numpy(v)), -1) for v in draws.values()]
        return np.concatenate(parts, axis=1)
    x = _to_numpy(draws)
    return x.reshape(x.shape[0], -1)


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        return value.detach().cpu().double().numpy()
    return np.asarray(value, dtype=float)


def plot_marginals(
    draws: Mapping[str, Any],
    reference: str | None = None,
    names: Sequence[str] | None = None,
    path: str | os.PathLike | None = None,
    title: str | None = None,
    columns: int = 4,
):
    """One panel per coordinate: each method's marginal density, against a reference.

    The seed paper's Figure 11. Draws are flattened per method to ``(n, dim)`` (a
    tensor ``(n, ...)`` or a dict of sites, in the same order for every method).

    Args:
        draws: ``{method: draws}``.
        reference: the method drawn as a dashed black line and used for each panel's
            range (default: the first).
        names: coordinate names (default ``x[0]``, ``x[1]``, ...).
        path: write the figure there.
        title: the figure's title.
        columns: panels per row.

    Returns:
        The ``matplotlib.figure.Figure``.
    """
    if not draws:
        raise ValueError("draws is empty: give {method: draws}")
    mats = {m: _as_matrix(d) for m, d in draws.items()}
    reference = next(iter(mats)) if reference is None else reference
    if reference not in mats:
        raise KeyError(f"reference {reference!r} is not one of {list(mats)}")
    dim = mats[reference].shape[1]
    for m, x in mats.items():
        if x.shape[1] != dim:
            raise ValueError(f"{m!r} has {x.shape[1]} coordinates, {reference!r} has {dim}")
    names = [f"x[{j}]" for j in range(dim)] if names is None else list(names)
    plt = _pyplot()
    cols = min(columns, dim)
    rows = math.ceil(dim / cols)
    others = [m for m in mats if m != reference]
    legend_cols = min(4, len(mats))
    legend_height = 0.2 * math.ceil(len(mats) / legend_cols) + 0.2  # inches
    height = 2.9 * rows + 0.5 + legend_height
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, height), squeeze=False)
    colors = plt.get_cmap("tab10" if len(others) <= 10 else "tab20").colors
    ref = mats[reference]
    for j, ax in enumerate(axes.flat):
        if j >= dim:
            ax.set_visible(False)
            continue
        mu, sd = ref[:, j].mean(), ref[:, j].std()
        grid = np.linspace(mu - 4.5 * sd, mu + 4.5 * sd, 200)
        for k, m in enumerate(others):
            color = colors[k % len(colors)]
            ax.plot(grid, kde(mats[m][:, j], grid), color=color, lw=1.2, label=m)
        ax.plot(grid, kde(ref[:, j], grid), color="black", lw=2.2, ls="--", label=reference)
        ax.set_title(names[j])
        ax.set_yticks([])
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=legend_cols, fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, legend_height / height, 1, 1))
    return _save(fig, path)
