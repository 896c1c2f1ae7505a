r"""Double well (the seed paper's Figure 2): the 2-D target :math:`p(x) \propto
\exp(-U(x))`, :math:`U(x) = a (x_1^2 - 1)^2 + x_2^2 / 2`, modes at :math:`x = (\pm 1,
0)`, barrier height :math:`a` between them, sampled by a deep ensemble (SGHMC at
temperature 0, i.e. SGD with momentum, many vectorised runs), one serial SGHMC chain
started in the right-hand well, and parallel SGHMC (the last draw of many short
vectorised chains). Matplotlib is imported only by the plotting function (Agg backend).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import MCMC as PyroMCMC
from torch import Tensor

from pyro_sgmcmc.chains import MCMC
from pyro_sgmcmc.diagnostics.ksd import ksd
from pyro_sgmcmc.experiments.report import (
    ensure_dir,
    format_columns,
    pyro_progbar,
    thin_to,
    timed,
    write_rows,
)
from pyro_sgmcmc.kernels import SGHMCKernel

__all__ = [
    "DOUBLE_WELL_QUICK",
    "DoubleWellResult",
    "double_well_model",
    "double_well_potential",
    "double_well_score",
    "exact_double_well_draws",
    "format_double_well",
    "main",
    "plot_double_well",
    "run_double_well",
]


_PRIOR_SCALE = 10.0


def double_well_potential(x: Tensor, barrier: float = 6.0) -> Tensor:
    r""":math:`U(x) = a (x_1^2 - 1)^2 + x_2^2 / 2` over the last dimension of ``x``.

    Examples:
        >>> double_well_potential(torch.tensor([[1.0, 0.0], [0.0, 0.0]]), barrier=6.0)
        tensor([0., 6.])
    """
    return barrier * (x[..., 0] ** 2 - 1.0) ** 2 + 0.5 * x[..., 1] ** 2


def double_well_score(x: Tensor, barrier: float = 6.0) -> Tensor:
    r"""The exact score :math:`\nabla \log p(x) = -\nabla U(x)`, rows of ``x`` ``(n, 2)``.

    Examples:
        >>> double_well_score(torch.tensor([[2.0, 1.0]]), barrier=1.0)
        tensor([[-24.,  -1.]])
    """
    g0 = -4.0 * barrier * x[..., 0] * (x[..., 0] ** 2 - 1.0)
    return torch.stack([g0, -x[..., 1]], dim=-1)


def double_well_model(barrier: float = 6.0) -> Callable[[], None]:
    r"""A Pyro model whose posterior is exactly :math:`\exp(-U(x))`.

    ``x`` gets a wide ``Normal(0, 10)`` prior (so that Pyro has a distribution to
    initialise and transform) and ``pyro.factor("well", -U(x) - log prior(x))``
    replaces that prior's log density by :math:`-U`. No data plate: the SGMCMC kernels
    sample it full batch, with ``num_data = 1`` (the potential is :math:`U` itself).
    """
    prior = dist.Normal(0.0, _PRIOR_SCALE).expand([2]).to_event(1)

    def model() -> None:
        x = pyro.sample("x", prior)
        pyro.factor("well", -double_well_potential(x, barrier) - prior.log_prob(x))

    return model


def exact_double_well_draws(n: int, barrier: float = 6.0, seed: int = 0) -> Tensor:
    """``n`` independent draws from :math:`\\exp(-U)` by rejection sampling.

    The proposal is :math:`N(0, \\mathrm{diag}(s^2, 1))` with :math:`s = 1.2`; ``x_2`` is
    then exactly Gaussian and the acceptance ratio depends on ``x_1`` only, bounded on
    a fine grid.
    """
    g = torch.Generator().manual_seed(seed)
    s = 1.2
    grid = torch.linspace(-4.0, 4.0, 200001, dtype=torch.float64)
    log_ratio = lambda x1: -barrier * (x1**2 - 1.0) ** 2 + 0.5 * (x1 / s) ** 2  # noqa: E731
    bound = float(log_ratio(grid).max()) + 1e-6
    kept, total = [], 0
    while total < n:
        x1 = s * torch.randn(20 * n + 1000, generator=g, dtype=torch.float64)
        accept = torch.rand(x1.shape, generator=g, dtype=torch.float64).log() < (
            log_ratio(x1) - bound
        )
        kept.append(x1[accept])
        total += int(accept.sum())
    x1 = torch.cat(kept)[:n]
    x2 = torch.randn(n, generator=g, dtype=torch.float64)
    return torch.stack([x1, x2], dim=1).float()


@dataclass
class DoubleWellResult:
    """One method's scores on the double well.

    ``right_fraction``: share of draws with :math:`x_1 > 0` (exact: 1/2);
    ``mean_abs_x1``: mean :math:`|x_1|` (the modes are at 1); ``within_sd_*``: sd about
    each well's own mean, pooled over the two wells.
    """

    method: str
    draws: int
    seconds: float
    ksd_rbf: float
    ksd_imq: float
    right_fraction: float
    mean_abs_x1: float
    within_sd_x1: float
    within_sd_x2: float


def _within_mode_sd(x: Tensor) -> tuple[float, float]:
    """Sd of each coordinate about its mode's mean, pooled over the two wells."""
    right = x[:, 0] > 0
    centred = torch.cat([x[right] - x[right].mean(0), x[~right] - x[~right].mean(0)])
    sd = centred.pow(2).mean(0).sqrt()
    return float(sd[0]), float(sd[1])


def run_double_well(
    *,
    barrier: float = 6.0,
    chains: int = 2000,
    warmup: int = 1000,
    steps: int = 500,
    serial_thinning: int = 5,
    step_size: float = 0.005,
    alpha: float = 10.0,
    init_box: float = 1.5,
    seed: int = 0,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
) -> tuple[dict[str, Tensor], list[DoubleWellResult]]:
    """Deep ensemble, serial SGHMC and parallel SGHMC on :math:`\\exp(-U)`.

    * deep ensemble: ``chains`` vectorised SGHMC runs at temperature 0 (SGD with
      momentum), ``warmup`` steps, from a uniform start in ``[-init_box, init_box]^2``;
    * serial SGHMC: one chain started at ``(1, 0.5)`` in the right-hand well,
      ``warmup`` warm-up steps then ``chains`` draws ``serial_thinning`` steps apart;
    * parallel SGHMC: ``chains`` vectorised chains from the same uniform start,
      ``warmup`` + ``steps`` steps, the last draw of each.

    The quartic well is stiff away from the modes (:math:`U'' = a(12 x_1^2 - 4)`), so the
    step size is small and the friction high (SGD momentum ``1 - step_size * alpha``),
    and the start box is narrower than ``init_to_uniform``'s (-2, 2).

    Returns:
        The draws per method (``"exact"`` included: rejection sampling) and one
        :class:`DoubleWellResult` per method.
    """
    say = log or (lambda _msg: None)
    model = double_well_model(barrier)
    g = torch.Generator().manual_seed(seed)
    start = {"x": (torch.rand(chains, 2, generator=g) * 2.0 - 1.0) * init_box}
    kw = {"step_size": step_size, "alpha": alpha}
    draws: dict[str, Tensor] = {}
    seconds: dict[str, float] = {}

    pyro.set_rng_seed(seed)
    say(f"deep ensemble: {chains} vectorised SGHMC runs at T = 0, {warmup} steps")
    ens = MCMC(
        SGHMCKernel(model, temperature=0.0, **kw),
        num_samples=1,
        warmup_steps=warmup,
        num_chains=chains,
        keep="last",
        initial_params=start,
        disable_progbar=not progress,
    )
    _, seconds["deep ensemble"] = timed(ens.run)
    draws["deep ensemble"] = ens.get_samples()["x"]

    pyro.set_rng_seed(seed)
    say(f"serial SGHMC: 1 chain from (1, 0.5), {warmup} warm-up + {chains} x {serial_thinning}")
    ser = PyroMCMC(
        SGHMCKernel(model, thinning=serial_thinning, **kw),
        num_samples=chains,
        warmup_steps=warmup,
        initial_params={"x": torch.tensor([1.0, 0.5])},
        disable_progbar=not pyro_progbar(progress),
    )
    _, seconds["serial SGHMC"] = timed(ser.run)
    draws["serial SGHMC"] = ser.get_samples()["x"]

    pyro.set_rng_seed(seed)
    say(f"parallel SGHMC: {chains} vectorised chains, {warmup} warm-up + {steps} steps")
    par = MCMC(
        SGHMCKernel(model, **kw),
        num_samples=steps,
        warmup_steps=warmup,
        num_chains=chains,
        keep="last",
        initial_params=start,
        disable_progbar=not progress,
    )
    _, seconds["parallel SGHMC"] = timed(par.run)
    draws["parallel SGHMC"] = par.get_samples()["x"]

    draws["exact"], seconds["exact"] = timed(lambda: exact_double_well_draws(chains, barrier, seed))
    results = []
    for name, x in draws.items():
        score = double_well_score(x, barrier)
        sd1, sd2 = _within_mode_sd(x)
        results.append(
            DoubleWellResult(
                method=name,
                draws=int(x.shape[0]),
                seconds=seconds[name],
                ksd_rbf=float(ksd(x, score, kernel="rbf", bandwidth=1.0)),
                ksd_imq=float(ksd(x, score, kernel="imq", bandwidth=1.0)),
                right_fraction=float((x[:, 0] > 0).float().mean()),
                mean_abs_x1=float(x[:, 0].abs().mean()),
                within_sd_x1=sd1,
                within_sd_x2=sd2,
            )
        )
    return draws, results


def format_double_well(results: Sequence[DoubleWellResult]) -> str:
    """The double-well scores as aligned text."""
    columns = [
        ("method", 0),
        ("draws", 5),
        ("KSD (RBF)", 9),
        ("KSD (IMQ)", 9),
        ("in x1>0", 7),
        ("sd x1|mode", 10),
        ("sd x2", 6),
        ("time (s)", 8),
    ]
    cells = [
        [
            r.method,
            f"{r.draws:>5d}",
            f"{r.ksd_rbf:9.4f}",
            f"{r.ksd_imq:9.4f}",
            f"{r.right_fraction:7.3f}",
            f"{r.within_sd_x1:10.4f}",
            f"{r.within_sd_x2:6.3f}",
            f"{r.seconds:8.1f}",
        ]
        for r in results
    ]
    return format_columns(columns, cells)


def plot_double_well(
    draws: dict[str, Tensor], barrier: float, path: str, max_points: int = 2000
) -> str:
    """Scatter of each method's draws over the contours of :math:`U` (the seed paper's
    Figure 2). Writes ``path`` (PNG) and returns it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lim1, lim2 = 2.0, 3.5
    g1, g2 = torch.meshgrid(
        torch.linspace(-lim1, lim1, 300), torch.linspace(-lim2, lim2, 300), indexing="ij"
    )
    u = double_well_potential(torch.stack([g1, g2], -1), barrier).numpy()
    names = list(draws)
    fig, axes = plt.subplots(1, len(names), figsize=(4.0 * len(names), 4.2), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        x = thin_to(draws[name], max_points).numpy()
        ax.contour(
            g1.numpy(),
            g2.numpy(),
            u,
            levels=np.linspace(0.25, 12, 12),
            cmap="Greys",
            linewidths=0.7,
        )
        # Collapsed points (a deep ensemble) are drawn as large crosses to be seen.
        if max(_within_mode_sd(draws[name])) < 1e-2:
            ax.scatter(x[:, 0], x[:, 1], s=80, alpha=0.7, color="tab:red", marker="x")
        else:
            ax.scatter(x[:, 0], x[:, 1], s=4, alpha=0.35, color="tab:red", edgecolors="none")
        right = float((draws[name][:, 0] > 0).float().mean())
        ax.set_title(f"{name}\n{x.shape[0]} points, {100 * right:.0f}% in x1 > 0", fontsize=10)
        ax.set_xlim(-lim1, lim1)
        ax.set_ylim(-lim2, lim2)
        ax.set_xlabel("x1")
    axes[0][0].set_ylabel("x2")
    fig.suptitle(f"double well U(x) = {barrier:g} (x1^2 - 1)^2 + x2^2 / 2, target exp(-U)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------ the command
DOUBLE_WELL_QUICK = {"chains": 1000, "warmup": 1000, "steps": 500}


def main(args: argparse.Namespace) -> int:
    """``pyro-sgmcmc double-well``: run, print the scores, write the files to ``args.out``."""
    torch.set_num_threads(args.threads)
    settings = {k: getattr(args, k) for k in DOUBLE_WELL_QUICK}
    if args.quick:
        settings.update(DOUBLE_WELL_QUICK)
    out = ensure_dir(args.out)
    start = time.perf_counter()
    print(
        f"Double well: target exp(-U), U(x) = {args.barrier:g} (x1^2 - 1)^2 + x2^2 / 2 "
        f"(modes (+-1, 0), barrier {args.barrier:g})",
        flush=True,
    )
    pyro.set_rng_seed(args.seed)
    draws, results = run_double_well(
        barrier=args.barrier,
        step_size=args.step_size,
        alpha=args.alpha,
        seed=args.seed,
        progress=not args.no_progress,
        log=lambda msg: print(msg, flush=True),
        **settings,
    )
    print()
    print(
        "KSD with the exact score -grad U (bandwidth 1); 'in x1>0': fraction of draws in the "
        "right-hand well (exact: 0.5); sd x1|mode: spread about each well's mean."
    )
    print(format_double_well(results))
    meta = {"seed": args.seed, "quick": args.quick, "barrier": args.barrier, **settings}
    paths = write_rows(results, os.path.join(out, "double_well"), meta)
    fig = plot_double_well(draws, args.barrier, os.path.join(out, "double_well.png"))
    print(f"\nwrote {', '.join([*paths, fig])}")
    print(f"total {time.perf_counter() - start:.0f} s")
    return 0
