"""What every experiment shares: its result records, thinning and ESS, timing, the CSV
and JSON writer, aligned text tables, the exact-draws KSD level and the marginals
figure."""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from pyro_sgmcmc.diagnostics import plots
from pyro_sgmcmc.diagnostics.ess import min_bulk_ess

__all__ = [
    "MethodRun",
    "RunResult",
    "TableRow",
    "ensure_dir",
    "fmt",
    "format_columns",
    "format_comparison",
    "format_table",
    "iid_ksd_level",
    "min_bulk_ess",
    "plot_marginals",
    "pyro_progbar",
    "thin_to",
    "timed",
    "write_rows",
]


@dataclass
class MethodRun:
    """The retained draws of one method and what they cost.

    Attributes:
        name: the method, as printed.
        draws: every retained draw, ``(num_draws, dim)``.
        seconds: wall time of the whole run, warm-up included.
        steps: gradient steps (sampler steps, or NUTS iterations) per chain.
        serial: one Markov chain (so that its ESS means something); ``False`` for the
            last draws of parallel chains.
    """

    name: str
    draws: Tensor
    seconds: float
    steps: int
    serial: bool = True


@dataclass
class TableRow:
    """One row of the Pima table (``None``: not applicable, e.g. the wall time of the
    exact-iid row, which is a computed level, not a run)."""

    method: str
    draws: int
    ksd_rbf: float
    ksd_imq: float
    seconds: float | None
    min_ess_per_s: float | None
    max_mean_error: float | None


def thin_to(draws: Tensor, n: int) -> Tensor:
    """``n`` evenly spaced rows of ``draws`` (all of them if there are at most ``n``).

    Examples:
        >>> thin_to(torch.arange(10.0)[:, None], 4).flatten().tolist()
        [0.0, 3.0, 6.0, 9.0]
    """
    if draws.shape[0] <= n:
        return draws
    idx = torch.linspace(0, draws.shape[0] - 1, n).round().long()
    return draws[idx]


def pyro_progbar(progress: bool) -> bool:
    """Whether to show ``pyro.infer.MCMC``'s own progress bar: only on a terminal (its
    carriage-return updates fill a log file; :class:`pyro_sgmcmc.MCMC` writes a few
    plain lines there instead)."""
    return progress and sys.stderr.isatty()


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def write_rows(rows: Sequence[Any], path_stem: str, meta: dict[str, Any] | None = None) -> list:
    """Write dataclass rows to ``path_stem.csv`` and ``path_stem.json`` (with ``meta``);
    returns the two paths."""
    dicts = [asdict(r) for r in rows]
    csv_path, json_path = f"{path_stem}.csv", f"{path_stem}.json"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dicts[0]))
        writer.writeheader()
        for d in dicts:
            writer.writerow({k: "" if v is None else v for k, v in d.items()})
    with open(json_path, "w") as f:
        json.dump({"settings": meta or {}, "rows": dicts}, f, indent=2)
    return [csv_path, json_path]


def fmt(value: float | None, spec: str, na: str = "n/a") -> str:
    return (
        na
        if value is None or (isinstance(value, float) and math.isnan(value))
        else (format(value, spec))
    )


def iid_ksd_level(score: Tensor, n: int, bandwidth: float = 1.0) -> float:
    r"""The KSD that ``n`` exact independent draws give on average, from scores of draws
    of the target: :math:`\sqrt{\mathbb E_p[k_p(x, x)] / n}` with :math:`k_p(x, x) =
    \lVert s(x) \rVert^2 + d / h^2` (RBF and IMQ alike). KSDs of ``n`` draws near this
    level are at the resolution of the statistic.

    Examples:
        >>> round(iid_ksd_level(torch.ones(10, 3), 4), 3)  # sqrt((3 + 3) / 4)
        1.225
    """
    d = score.shape[1]
    return math.sqrt((float(score.double().pow(2).sum(1).mean()) + d / bandwidth**2) / n)


def format_columns(columns: Sequence[tuple[str, int]], rows: Sequence[Sequence[str]]) -> str:
    """Rows of text cells as an aligned table under a header and a rule.

    The first column (the method) is left-aligned to its widest entry; the others are
    right-aligned to their ``(title, width)``; columns are two spaces apart.

    Examples:
        >>> print(format_columns([("method", 0), ("x", 4)], [["a", "1.0"], ["bcdefgh", "22.5"]]))
        method      x
        -------------
        a         1.0
        bcdefgh  22.5
    """
    first = columns[0][0]
    width = max(len(first), *(len(r[0]) for r in rows))
    head = "  ".join([f"{first:<{width}}", *(f"{t:>{w}}" for t, w in columns[1:])])
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = (f"{c:>{w}}" for c, (_, w) in zip(r[1:], columns[1:], strict=True))
        lines.append("  ".join([f"{r[0]:<{width}}", *cells]))
    return "\n".join(lines)


def format_table(rows: Sequence[TableRow]) -> str:
    """The Pima table as aligned text."""
    columns = [
        ("method", 0),
        ("draws", 5),
        ("KSD (RBF)", 9),
        ("KSD (IMQ)", 9),
        ("time (s)", 8),
        ("min ESS/s", 9),
        ("max|mean err|", 13),
    ]
    cells = [
        [
            r.method,
            f"{r.draws:>5d}",
            f"{r.ksd_rbf:9.4f}",
            f"{r.ksd_imq:9.4f}",
            fmt(r.seconds, "8.1f", "-"),
            fmt(r.min_ess_per_s, "9.1f", "-" if r.seconds is None else "n/a"),
            fmt(r.max_mean_error, "13.3f", "(reference)" if i == 0 else "-"),
        ]
        for i, r in enumerate(rows)
    ]
    return format_columns(columns, cells)


def plot_marginals(
    runs: Sequence[MethodRun], names: Sequence[str], path: str, title: str | None = None
) -> str:
    """One panel per coefficient: each method's marginal density against ``runs[0]``'s
    (the seed paper's Figure 11). Writes ``path`` (PNG) and returns it."""
    fig = plots.plot_marginals(
        {run.name: run.draws for run in runs}, reference=runs[0].name, names=names, title=title
    )
    fig.savefig(path, dpi=120)
    plots.close(fig)
    return path


def ensure_dir(path: str) -> str:
    """Create ``path`` (and parents) if needed; return it."""
    os.makedirs(path, exist_ok=True)
    return path


@dataclass
class RunResult:
    """Draws of one method and what they cost."""

    name: str
    draws: torch.Tensor  # (num_draws, dim)
    seconds: float
    steps: int

    @property
    def min_ess(self) -> float:
        """Smallest bulk ESS over the coordinates (NaN with fewer than 4 draws)."""
        return min_bulk_ess(self.draws)


def format_comparison(names: Sequence[str], reference: RunResult, other: RunResult) -> str:
    """A per-coefficient table of both posteriors and a summary of cost and quality."""
    ref_mean, ref_sd = reference.draws.mean(0), reference.draws.std(0)
    mean, sd = other.draws.mean(0), other.draws.std(0)
    err = (mean - ref_mean) / ref_sd
    ratio = sd / ref_sd
    width = max(len(n) for n in names)
    lines = [
        f"{'':{width}}  {reference.name:^19}  {other.name:^19}  {'mean diff':>9}  {'sd':>6}",
        f"{'coefficient':{width}}  {'mean':>9} {'sd':>9}  {'mean':>9} {'sd':>9}  "
        f"{'(ref sd)':>9}  {'ratio':>6}",
    ]
    for i, n in enumerate(names):
        lines.append(
            f"{n:{width}}  {ref_mean[i]:9.4f} {ref_sd[i]:9.4f}  {mean[i]:9.4f} {sd[i]:9.4f}  "
            f"{err[i]:+9.3f}  {ratio[i]:6.3f}"
        )
    lines += [
        "",
        f"largest |mean diff|: {err.abs().max():.3f} ref sd;  sd ratio: "
        f"{ratio.min():.3f} to {ratio.max():.3f}",
    ]
    for r in (reference, other):
        ess = r.min_ess
        lines.append(
            f"{r.name:>19}: {r.seconds:7.2f} s, {r.steps} steps "
            f"({r.seconds / r.steps * 1e6:.0f} us/step), min bulk ESS {ess:.0f}, "
            f"{ess / r.seconds:.1f} ESS/s"
        )
    lines.append(
        f"wall-time ratio {other.name} / {reference.name}: {other.seconds / reference.seconds:.2f}"
    )
    return "\n".join(lines)
