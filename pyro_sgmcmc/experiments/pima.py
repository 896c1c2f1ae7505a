r"""Pima (the seed paper's Table 3 and Figure 11): Bayesian logistic regression on the
bundled 768-row Pima data (8 standardised covariates, prior :math:`N(0, I)`, no
intercept), sampled by Pyro's NUTS (the reference), by the package's kernels and by its
Gaussian approximations. Each method is scored by the kernelized Stein discrepancy with
the true full-data score (Gaussian/RBF and IMQ base kernels, bandwidth 1) on the same
number of evenly thinned draws, wall time, minimum bulk ESS per second, and the largest
error of a posterior mean in NUTS posterior sds."""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Callable, Sequence

import pyro
import torch
from pyro.infer import MCMC as PyroMCMC
from pyro.infer import NUTS, SVI, Trace_ELBO
from torch import Tensor

from pyro_sgmcmc.chains import MCMC
from pyro_sgmcmc.datasets import Dataset, load_pima, logistic_regression_model
from pyro_sgmcmc.diagnostics import plots
from pyro_sgmcmc.diagnostics.ksd import ksd, median_bandwidth, potential_score
from pyro_sgmcmc.experiments import PAPER, PIMA_GROUPS
from pyro_sgmcmc.experiments.report import (
    MethodRun,
    RunResult,
    TableRow,
    ensure_dir,
    format_comparison,
    format_table,
    iid_ksd_level,
    min_bulk_ess,
    plot_marginals,
    pyro_progbar,
    thin_to,
    timed,
    write_rows,
)
from pyro_sgmcmc.kernels import BAOAKernel, SGHMCKernel, SGLDKernel, SGNHTKernel
from pyro_sgmcmc.potential import PyroPotential

__all__ = [
    "IID_ROW",
    "PIMA_GROUPS",
    "PIMA_QUICK",
    "PIMA_SERIAL",
    "main",
    "pima_bandwidth",
    "pima_iid_ksd_level",
    "pima_table",
    "run_pima",
]


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
    bar = not pyro_progbar(progress)
    mcmc = PyroMCMC(kernel, num_samples=samples, warmup_steps=warmup, disable_progbar=bar)
    _, seconds = timed(lambda: mcmc.run(data.X, data.y))
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
        kernel,
        num_samples=num_samples,
        warmup_steps=warmup,
        disable_progbar=not pyro_progbar(progress),
    )
    _, seconds = timed(lambda: mcmc.run(data.X, data.y))
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
    _, seconds = timed(lambda: mcmc.run(data.X, data.y))
    pairs = ", antithetic pairs" if coupling == "antithetic" else ""
    return MethodRun(
        f"parallel SGHMC (batch {batch_size}, {chains} chains{pairs}, last draw)",
        mcmc.get_samples()["w"],
        seconds,
        warmup + steps,
        serial=False,
    )


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

    posterior, seconds = timed(fit)
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
    result, seconds = timed(
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
    posterior, seconds = timed(
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


#: The row of the table that gives the KSD exact independent draws have on average.
IID_ROW = "exact iid draws (expected KSD)"


def pima_table(
    runs: Sequence[MethodRun], data: Dataset, num_draws: int, bandwidth: float | None = None
) -> list[TableRow]:
    """Score each run against the true posterior and against ``runs[0]`` (NUTS).

    KSD (IMQ and RBF base kernels) uses ``num_draws`` evenly thinned draws of every run,
    the exact full-data score and one bandwidth for all rows: ``bandwidth``, by default
    the median heuristic on the reference's thinned draws (the posterior's own scale; a
    fixed bandwidth of 1, many posterior sds here, reduces the KSD to the norm of the
    mean score and ranks the methods by noise). ESS/s and the mean error use all the
    retained draws. The reference's row says how its draws were thinned; the second
    row, :data:`IID_ROW`, is the KSD exact independent draws give on average
    (:func:`~pyro_sgmcmc.experiments.report.iid_ksd_level`): a sampler's KSD scatters
    around it from one set of draws to another, so rows at or below it are all "as
    good as exact", and only rows well above it show error.
    """
    reference = runs[0].draws
    ref_mean, ref_sd = reference.mean(0), reference.std(0)
    h = float(bandwidth) if bandwidth is not None else pima_bandwidth(reference, num_draws)
    potential = PyroPotential(logistic_regression_model, (data.X, data.y))
    rows = []
    for i, run in enumerate(runs):
        x = thin_to(run.draws, num_draws)
        score = potential_score(potential, {"w": x})["w"]
        err = ((run.draws.mean(0) - ref_mean) / ref_sd).abs().max()
        ess = min_bulk_ess(run.draws) if run.serial else None
        name = run.name
        if i == 0:
            total = run.draws.shape[0]
            kept = "all" if total <= num_draws else f"{x.shape[0]} evenly spaced"
            name = f"{name} (reference; {kept} of its {total} draws)"
        rows.append(
            TableRow(
                method=name,
                draws=int(x.shape[0]),
                ksd_rbf=float(ksd(x, score, kernel="rbf", bandwidth=h)),
                ksd_imq=float(ksd(x, score, kernel="imq", bandwidth=h)),
                seconds=run.seconds,
                min_ess_per_s=None if ess is None else ess / run.seconds,
                max_mean_error=None if i == 0 else float(err),
            )
        )
        if i == 0:
            level = pima_iid_ksd_level(data, reference, int(x.shape[0]), h)
            rows.append(TableRow(IID_ROW, int(x.shape[0]), level, level, None, None, None))
    return rows


def pima_bandwidth(reference: Tensor, num_draws: int) -> float:
    """The KSD bandwidth of the table: the median heuristic on the reference's
    ``num_draws`` evenly thinned draws."""
    return median_bandwidth(thin_to(reference, num_draws))


def pima_iid_ksd_level(data: Dataset, reference: Tensor, n: int, bandwidth: float = 1.0) -> float:
    """:func:`iid_ksd_level` of ``n`` Pima draws, from the reference draws' scores (the
    same for the IMQ, exponent -1/2, and RBF base kernels)."""
    potential = PyroPotential(logistic_regression_model, (data.X, data.y))
    return iid_ksd_level(potential_score(potential, {"w": reference})["w"], n, bandwidth)


# ------------------------------------------------------------------------------ the command
#: --quick settings (the whole command in well under a minute on 2 cores).
PIMA_QUICK = {
    "nuts_warmup": 300,
    "nuts_samples": 1000,
    "warmup": 1000,
    "steps": 3000,
    "thinning": 3,
    "chains": 1000,
    "parallel_warmup": 300,
    "parallel_steps": 100,
    "gaussian_steps": 1000,
    "draws": 1000,
}


def main(args: argparse.Namespace) -> int:
    """``pyro-sgmcmc pima``: run, print the table, write the files to ``args.out``."""
    torch.set_num_threads(args.threads)
    settings = {k: getattr(args, k) for k in PIMA_QUICK}
    if args.quick:
        settings.update(PIMA_QUICK)
    num_draws = settings.pop("draws")
    data = load_pima()
    out = ensure_dir(args.out)
    progress = not args.no_progress
    start = time.perf_counter()
    print(
        f"Pima Indians diabetes: {len(data.y)} rows, {data.X.shape[1]} standardised "
        "covariates, prior N(0, I), Bernoulli-logit likelihood",
        flush=True,
    )
    runs = run_pima(
        data,
        methods=args.methods,
        gaussian_draws=num_draws,
        seed=args.seed,
        batch_size=args.batch_size,
        jit=not args.no_jit,
        progress=progress,
        log=lambda msg: print(msg, flush=True),
        **settings,
    )
    num_draws = min(num_draws, *(r.draws.shape[0] for r in runs))
    bandwidth = pima_bandwidth(runs[0].draws, num_draws)
    rows = pima_table(runs, data, num_draws, bandwidth)
    nuts = runs[0]
    sghmc = next((r for r in runs if r.name == f"SGHMC (batch {args.batch_size})"), None)
    compare = sghmc or (runs[1] if len(runs) > 1 else None)
    if compare is not None:
        print()
        print(f"Per coefficient, {nuts.name} vs {compare.name}:")
        print(
            format_comparison(
                data.feature_names,
                RunResult(nuts.name, nuts.draws, nuts.seconds, nuts.steps),
                RunResult(compare.name, compare.draws, compare.seconds, compare.steps),
            )
        )
    print()
    print(
        f"Table 3 of {PAPER}, on Pima, seed {args.seed}. KSD with the true score on "
        f"{num_draws} evenly thinned draws per method, IMQ (exponent -1/2) and RBF base "
        f"kernels with one bandwidth for all rows, h = {bandwidth:.3f} (the median "
        "heuristic on the reference's draws); min bulk ESS/s over all retained draws; wall "
        "time with warm-up; max|mean err| in NUTS posterior sds "
        f"({nuts.draws.shape[0]} NUTS draws)."
    )
    print(format_table(rows))
    level = rows[1].ksd_imq
    print(
        f"How to read the KSD: {num_draws} exact independent draws give {level:.3f} on "
        f"average (the '{IID_ROW}' row), and any sampler's KSD scatters around that level "
        "from one set of draws to another, NUTS's included (10-20% either way is common "
        "on this posterior). Rows "
        "at or below it are as good as exact draws by this statistic (below it is luck, "
        "or draws that alternate about the mean, not a better posterior); only rows well "
        "above it show error."
    )
    meta = {
        "seed": args.seed,
        "quick": args.quick,
        "batch_size": args.batch_size,
        "ksd_draws": num_draws,
        "ksd_bandwidth": bandwidth,
        "ksd_bandwidth_rule": "median heuristic on the reference's thinned draws",
        "ksd_iid_level": level,
        "jit": not args.no_jit,
        "threads": args.threads,
        **settings,
    }
    paths = write_rows(rows, os.path.join(out, "pima_table"), meta)
    fig = plot_marginals(
        runs,
        data.feature_names,
        os.path.join(out, "pima_marginals.png"),
        title="Pima logistic regression: posterior marginals, each method vs Pyro NUTS",
    )
    written = [*paths, fig]
    if sghmc is not None:
        written.append(os.path.join(out, "pima_trace.png"))
        plots.close(plots.plot_trace({"w": sghmc.draws[None]}, path=written[-1]))
    print(f"\nwrote {', '.join(written)}")
    print(f"total {time.perf_counter() - start:.0f} s")
    return 0
