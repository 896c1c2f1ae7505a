r"""The experiments behind the ``pyro-sgmcmc`` command: runs, tables and figures.

* **Pima** (:func:`run_pima`, the seed paper's Table 3 and Figure 11): Bayesian
  logistic regression on the bundled 768-row Pima data (8 standardised covariates,
  prior :math:`N(0, I)`, no intercept), sampled by Pyro's NUTS (the reference) and by
  the package's kernels. Each method is scored by the kernelized Stein discrepancy
  with the true full-data score (Gaussian/RBF and IMQ base kernels, bandwidth 1) on
  the same number of evenly thinned draws, wall time, minimum bulk ESS per second,
  and the largest error of a posterior mean in NUTS posterior sds.
* **Double well** (:func:`run_double_well`, the seed paper's Figure 2): the 2-D target
  :math:`p(x) \propto \exp(-U(x))`, :math:`U(x) = a (x_1^2 - 1)^2 + x_2^2 / 2`, modes at
  :math:`x = (\pm 1, 0)`, barrier height :math:`a` between them, sampled by a deep
  ensemble (SGHMC at temperature 0, i.e. SGD with momentum, many vectorised runs),
  one serial SGHMC chain started in the right-hand well, and parallel SGHMC (the last
  draw of many short vectorised chains).

Matplotlib is imported only by the plotting functions (with the Agg backend).
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import MCMC as PyroMCMC
from pyro.infer import NUTS, SVI, Trace_ELBO
from torch import Tensor

from pyro_sgmcmc.chains import MCMC
from pyro_sgmcmc.datasets import Dataset, logistic_regression_model
from pyro_sgmcmc.diagnostics import plots
from pyro_sgmcmc.diagnostics.ksd import ksd, potential_score
from pyro_sgmcmc.kernels import BAOAKernel, SGHMCKernel, SGLDKernel, SGNHTKernel
from pyro_sgmcmc.potential import PyroPotential

__all__ = [
    "DoubleWellResult",
    "MethodRun",
    "TableRow",
    "double_well_model",
    "double_well_potential",
    "double_well_score",
    "ensure_dir",
    "exact_double_well_draws",
    "format_double_well",
    "format_table",
    "iid_ksd_level",
    "min_bulk_ess",
    "pima_iid_ksd_level",
    "pima_table",
    "plot_double_well",
    "plot_marginals",
    "run_double_well",
    "run_pima",
    "thin_to",
    "write_rows",
]


# ------------------------------------------------------------------------------ helpers
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
    """One row of the Pima table (``None``: not applicable)."""

    method: str
    draws: int
    ksd_rbf: float
    ksd_imq: float
    seconds: float
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


def min_bulk_ess(draws: Tensor) -> float:
    """The smallest bulk ESS (arviz, rank-normalised) over the coordinates of one chain
    of draws ``(num_draws, dim)``; NaN with fewer than 4 draws."""
    import arviz as az

    if draws.shape[0] < 4:
        return math.nan
    x = draws.detach().to(torch.float64).cpu().numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(min(az.ess(x[None, :, i], method="bulk") for i in range(x.shape[1])))


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
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


def _fmt(value: float | None, spec: str, na: str = "n/a") -> str:
    return (
        na
        if value is None or (isinstance(value, float) and math.isnan(value))
        else (format(value, spec))
    )


# ------------------------------------------------------------------------------ Pima
#: The serial minibatch methods of the table: (name, kernel class, batch size).
PIMA_SERIAL = (
    ("SGLD (batch 32)", SGLDKernel, 32),
    ("SGHMC (full batch)", SGHMCKernel, None),
    ("SGHMC (batch 32)", SGHMCKernel, 32),
    ("SGNHT (batch 32)", SGNHTKernel, 32),
    ("BAOA (batch 32)", BAOAKernel, 32),
)


def _pima_nuts(data: Dataset, warmup: int, samples: int, jit: bool, progress: bool) -> MethodRun:
    kernel = NUTS(logistic_regression_model, jit_compile=jit, ignore_jit_warnings=True)
    mcmc = PyroMCMC(kernel, num_samples=samples, warmup_steps=warmup, disable_progbar=not progress)
    _, seconds = _timed(lambda: mcmc.run(data.X, data.y))
    return MethodRun("Pyro NUTS", mcmc.get_samples()["w"], seconds, warmup + samples)


def _pima_serial(
    data: Dataset,
    name: str,
    kernel_cls: type,
    batch_size: int | None,
    warmup: int,
    steps: int,
    thinning: int,
    jit: bool,
    progress: bool,
) -> MethodRun:
    kernel = kernel_cls(
        logistic_regression_model, subsample_size=batch_size, thinning=thinning, jit_compile=jit
    )
    num_samples = max(steps // thinning, 1)
    mcmc = PyroMCMC(
        kernel, num_samples=num_samples, warmup_steps=warmup, disable_progbar=not progress
    )
    _, seconds = _timed(lambda: mcmc.run(data.X, data.y))
    return MethodRun(name, mcmc.get_samples()["w"], seconds, warmup + num_samples * thinning)


def _pima_parallel(
    data: Dataset,
    chains: int,
    warmup: int,
    steps: int,
    batch_size: int,
    progress: bool,
    coupling: str = "independent",
) -> MethodRun:
    kernel = SGHMCKernel(logistic_regression_model, subsample_size=batch_size)
    mcmc = MCMC(
        kernel,
        num_samples=steps,
        warmup_steps=warmup,
        num_chains=chains,
        chain_method="vectorized",
        keep="last",
        chain_coupling=coupling,
        disable_progbar=not progress,
    )
    _, seconds = _timed(lambda: mcmc.run(data.X, data.y))
    pairs = ", antithetic pairs" if coupling == "antithetic" else ""
    return MethodRun(
        f"parallel SGHMC (batch {batch_size}, {chains} chains{pairs}, last draw)",
        mcmc.get_samples()["w"],
        seconds,
        warmup + steps,
        serial=False,
    )


#: The method groups of the Pima table, for ``run_pima(methods=...)``.
PIMA_GROUPS = ("sgmcmc", "parallel", "laplace", "vi", "ekf")


def _minibatch_map(guide, data: Dataset, batch_size: int, steps: int) -> None:
    """Fit an ``AutoLaplace`` guide's MAP with minibatch SVI (the model's data plate
    subsamples ``batch_size`` rows per step), the learning rate decaying 0.05 -> 1e-4
    and no gradient clipping (clipping a noisy gradient biases it)."""
    optim = pyro.optim.ClippedAdam(
        {"lr": 0.05, "lrd": (1e-4 / 0.05) ** (1 / steps), "clip_norm": float("inf")}
    )
    svi = SVI(logistic_regression_model, guide, optim, Trace_ELBO())
    for _ in range(steps):
        svi.step(data.X, data.y, subsample_size=batch_size)


def _draws(posterior, num_draws: int, seed: int) -> Tensor:
    return posterior.sample(num_draws, torch.Generator().manual_seed(seed))["w"]


def _pima_laplace(
    data: Dataset, structure: str, curvature: str, batch_size: int, steps: int, draws: int,
    seed: int,
) -> MethodRun:  # fmt: skip
    from pyro_sgmcmc.laplace import AutoDenseLaplace, AutoDiagonalLaplace

    pyro.clear_param_store()
    cls = AutoDenseLaplace if structure == "dense" else AutoDiagonalLaplace
    # Minibatch Adam freezes O(0.15 sd) of noise into the MAP; two Newton steps over the
    # full data (passes like the curvature's own) polish it.
    guide = cls(logistic_regression_model, curvature=curvature, newton_steps=2)

    def fit():
        _minibatch_map(guide, data, batch_size, steps)
        return guide.laplace_approximation(data.X, data.y).posterior

    posterior, seconds = _timed(fit)
    name = f"Laplace ({curvature.upper()}, {structure}; MAP: SVI batch {batch_size} + Newton)"
    return MethodRun(name, _draws(posterior, draws, seed), seconds, steps, serial=False)


def _pima_vi(
    data: Dataset, structure: str, batch_size: int, steps: int, draws: int, seed: int
) -> MethodRun:
    from pyro_sgmcmc.vi import fit_svi

    pyro.clear_param_store()
    optim = pyro.optim.ExponentialLR(
        {"optimizer": torch.optim.Adam, "optim_args": {"lr": 0.02}, "gamma": 0.01 ** (1 / steps)}
    )
    result, seconds = _timed(
        lambda: fit_svi(
            logistic_regression_model,
            (data.X, data.y),
            guide=structure,
            num_steps=steps,
            optim=optim,
            subsample_size=batch_size,
            num_particles=2,
            generator=torch.Generator().manual_seed(seed),
        )
    )
    name = f"VI ({structure}, STL, batch {batch_size})"
    return MethodRun(name, _draws(result.posterior, draws, seed), seconds, steps, serial=False)


def _pima_ekf(data: Dataset, batch_size: int, draws: int, seed: int) -> MethodRun:
    from pyro_sgmcmc.ekf import pyro_ekf

    potential = PyroPotential(logistic_regression_model, (data.X, data.y))
    posterior, seconds = _timed(
        lambda: pyro_ekf(
            potential,
            batch_size=batch_size,
            dense=True,
            curvature="hessian",
            num_iterations=3,
            generator=torch.Generator().manual_seed(seed),
        )
    )
    steps = math.ceil(data.X.shape[0] / batch_size)
    name = f"EKF (dense, one pass, batch {batch_size}, 3 iterations)"
    return MethodRun(name, _draws(posterior, draws, seed), seconds, steps, serial=False)


def run_pima(
    data: Dataset,
    *,
    methods: Sequence[str] = PIMA_GROUPS,
    seed: int = 0,
    nuts_warmup: int = 1000,
    nuts_samples: int = 8000,
    warmup: int = 2000,
    steps: int = 20000,
    thinning: int = 5,
    batch_size: int = 32,
    chains: int = 4000,
    parallel_warmup: int = 500,
    parallel_steps: int = 200,
    gaussian_steps: int = 3000,
    gaussian_draws: int = 4000,
    jit: bool = True,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
) -> list[MethodRun]:
    """Run the methods of the Pima table; the first run is the NUTS reference.

    Each run starts from ``pyro.set_rng_seed(seed)``, so each is reproducible on its
    own. ``methods`` picks groups of :data:`PIMA_GROUPS`: ``"sgmcmc"`` (serial SGLD,
    SGHMC full batch and minibatch, SGNHT, BAOA: ``warmup`` + ``steps`` sampler steps,
    every ``thinning``-th kept), ``"parallel"`` (``chains`` vectorised SGHMC chains,
    independent and in antithetic pairs, ``parallel_warmup`` + ``parallel_steps``
    steps, the last draw of each), and the Gaussian approximations ``"laplace"`` (dense
    GGN and EF, diagonal GGN; MAP by minibatch SVI, ``gaussian_steps`` steps),
    ``"vi"`` (dense and diagonal STL VI, ``gaussian_steps`` steps) and ``"ekf"``
    (dense, one pass), each scored on ``gaussian_draws`` draws of its Gaussian.
    """
    unknown = set(methods) - set(PIMA_GROUPS)
    if unknown:
        raise ValueError(f"unknown method groups {sorted(unknown)}; choose from {PIMA_GROUPS}")
    say = log or (lambda _msg: None)
    runs = []

    def add(run: MethodRun) -> None:
        runs.append(run)
        say(f"  {run.name}: {run.draws.shape[0]} draws, {run.steps} steps, {run.seconds:.1f} s")

    pyro.set_rng_seed(seed)
    say(f"Pyro NUTS (reference): {nuts_warmup} warm-up + {nuts_samples} draws")
    add(_pima_nuts(data, nuts_warmup, nuts_samples, jit, progress))
    for name, cls, batch in PIMA_SERIAL if "sgmcmc" in methods else ():
        batch = batch_size if batch is not None else None
        if batch is not None:
            name = name.replace("batch 32", f"batch {batch}")
        pyro.set_rng_seed(seed)
        say(f"{name}: {warmup} warm-up + {steps} steps, thinning {thinning}")
        add(_pima_serial(data, name, cls, batch, warmup, steps, thinning, jit, progress))
    for coupling in ("independent", "antithetic") if "parallel" in methods else ():
        pyro.set_rng_seed(seed)
        say(
            f"parallel SGHMC ({coupling}): {chains} chains x ({parallel_warmup} warm-up + "
            f"{parallel_steps} steps)"
        )
        add(
            _pima_parallel(
                data, chains, parallel_warmup, parallel_steps, batch_size, progress, coupling
            )
        )
    g_args = (batch_size, gaussian_steps, gaussian_draws, seed)
    if "laplace" in methods:
        for structure, curvature in (("dense", "ggn"), ("dense", "ef"), ("diagonal", "ggn")):
            pyro.set_rng_seed(seed)
            say(f"Laplace ({curvature}, {structure}): MAP by {gaussian_steps} SVI steps")
            add(_pima_laplace(data, structure, curvature, *g_args))
    if "vi" in methods:
        for structure in ("dense", "diagonal"):
            pyro.set_rng_seed(seed)
            say(f"VI ({structure}): {gaussian_steps} SVI steps")
            add(_pima_vi(data, structure, *g_args))
    if "ekf" in methods:
        pyro.set_rng_seed(seed)
        say("EKF (dense): one pass")
        add(_pima_ekf(data, batch_size, gaussian_draws, seed))
    return runs


def pima_table(runs: Sequence[MethodRun], data: Dataset, num_draws: int) -> list[TableRow]:
    """Score each run against the true posterior and against ``runs[0]`` (NUTS).

    KSD (RBF and IMQ base kernels, bandwidth 1) uses ``num_draws`` evenly thinned draws
    of every run and the exact full-data score; ESS/s and the mean error use all the
    retained draws. The reference's own mean error is ``None``.
    """
    reference = runs[0].draws
    ref_mean, ref_sd = reference.mean(0), reference.std(0)
    potential = PyroPotential(logistic_regression_model, (data.X, data.y))
    rows = []
    for i, run in enumerate(runs):
        x = thin_to(run.draws, num_draws)
        score = potential_score(potential, {"w": x})["w"]
        err = ((run.draws.mean(0) - ref_mean) / ref_sd).abs().max()
        ess = min_bulk_ess(run.draws) if run.serial else None
        rows.append(
            TableRow(
                method=run.name,
                draws=int(x.shape[0]),
                ksd_rbf=float(ksd(x, score, kernel="rbf", bandwidth=1.0)),
                ksd_imq=float(ksd(x, score, kernel="imq", bandwidth=1.0)),
                seconds=run.seconds,
                min_ess_per_s=None if ess is None else ess / run.seconds,
                max_mean_error=None if i == 0 else float(err),
            )
        )
    return rows


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


def pima_iid_ksd_level(data: Dataset, reference: Tensor, n: int) -> float:
    """:func:`iid_ksd_level` of ``n`` Pima draws, from the reference draws' scores."""
    potential = PyroPotential(logistic_regression_model, (data.X, data.y))
    return iid_ksd_level(potential_score(potential, {"w": reference})["w"], n)


def format_table(rows: Sequence[TableRow]) -> str:
    """The Pima table as aligned text."""
    width = max(len("method"), *(len(r.method) for r in rows))
    head = (
        f"{'method':<{width}}  {'draws':>5}  {'KSD (RBF)':>9}  {'KSD (IMQ)':>9}  "
        f"{'time (s)':>8}  {'min ESS/s':>9}  {'max|mean err|':>13}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.method:<{width}}  {r.draws:>5d}  {r.ksd_rbf:9.4f}  {r.ksd_imq:9.4f}  "
            f"{r.seconds:8.1f}  {_fmt(r.min_ess_per_s, '9.1f'):>9}  "
            f"{_fmt(r.max_mean_error, '13.3f', '(reference)'):>13}"
        )
    return "\n".join(lines)


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


# ------------------------------------------------------------------------------ double well
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
    _, seconds["deep ensemble"] = _timed(ens.run)
    draws["deep ensemble"] = ens.get_samples()["x"]

    pyro.set_rng_seed(seed)
    say(f"serial SGHMC: 1 chain from (1, 0.5), {warmup} warm-up + {chains} x {serial_thinning}")
    ser = PyroMCMC(
        SGHMCKernel(model, thinning=serial_thinning, **kw),
        num_samples=chains,
        warmup_steps=warmup,
        initial_params={"x": torch.tensor([1.0, 0.5])},
        disable_progbar=not progress,
    )
    _, seconds["serial SGHMC"] = _timed(ser.run)
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
    _, seconds["parallel SGHMC"] = _timed(par.run)
    draws["parallel SGHMC"] = par.get_samples()["x"]

    draws["exact"], seconds["exact"] = _timed(
        lambda: exact_double_well_draws(chains, barrier, seed)
    )
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
    width = max(len("method"), *(len(r.method) for r in results))
    head = (
        f"{'method':<{width}}  {'draws':>5}  {'KSD (RBF)':>9}  {'KSD (IMQ)':>9}  "
        f"{'in x1>0':>7}  {'sd x1|mode':>10}  {'sd x2':>6}  {'time (s)':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(
            f"{r.method:<{width}}  {r.draws:>5d}  {r.ksd_rbf:9.4f}  {r.ksd_imq:9.4f}  "
            f"{r.right_fraction:7.3f}  {r.within_sd_x1:10.4f}  {r.within_sd_x2:6.3f}  "
            f"{r.seconds:8.1f}"
        )
    return "\n".join(lines)


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


def ensure_dir(path: str) -> str:
    """Create ``path`` (and parents) if needed; return it."""
    os.makedirs(path, exist_ok=True)
    return path
