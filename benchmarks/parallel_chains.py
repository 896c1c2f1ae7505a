"""Benchmark: parallel (vectorised) SGHMC chains and data-size scaling against Pyro's NUTS.

Everything is measured side by side in one process, on one torch thread, after a small
untimed call of every code path (the first ``torch.func`` call of a process imports
``torch._dynamo``, a one-time cost of a few seconds, reported separately). Every time is
taken on two clocks: wall and this process's CPU time. With one thread, CPU time leaves
out the time other processes hold the core, so it is close to the wall time on an idle
machine (shared caches still slow it somewhat under load); the summary judges each
target on both:

a. **Parallel SGMCMC on Pima** (768 rows, 8 standardised covariates, prior N(0, I)):
   ``C`` vectorised SGHMC chains (batch 32, defaults, ``keep="last"``), last draw of
   each, for several (warm-up, sampling) lengths, against ``C`` Pyro NUTS draws of one
   chain. KSD (RBF kernel, bandwidth 1, full-data score of the log posterior in
   unconstrained space, not divided by N) of each sample; max |mean error| in NUTS sds
   and sd ratios. Targets: KSD at most 1.5x NUTS's, wall time at most 1/10 of NUTS's
   (warm-up included in both). For scale, the KSDs of several samples of exact iid draws
   from the Gaussian with NUTS's mean and covariance (against its own score): one KSD
   of n draws is noisy, and NUTS's draws, antithetic here (ESS > n), score below them.
b. **Throughput**: 1000 vectorised chains x 2000 steps vs one chain x 2000 steps (Pima,
   same kernel settings; ``pyro_sgmcmc.MCMC`` vs ``pyro.infer.MCMC``). Target: time
   ratio at most 20x (at least 50x the draws per second).
c. **Data size** (synthetic logistic regression, d = 8, N = 1e3 ... 1e6 nested rows of
   one fixed-seed data set): SGHMC seconds per sampling step at batch 32 through
   ``pyro.infer.MCMC`` (jit off and on; the median step, best of a few rounds that
   interleave the sizes, robust to other processes on the machine), target: grows at
   most 1.2x from N = 1e3 to 1e6; Pyro NUTS seconds per gradient and per draw
   (initialised at the MAP, short runs; expected linear in N).
   At N = 1e5: min bulk ESS per second of serial SGHMC vs a short NUTS run (default
   initialisation), target at least 10x, with accuracy against the Laplace
   approximation at the MAP (exact to O(N^-1/2) here).

Run: ``python benchmarks/parallel_chains.py [--quick] [--out results.json]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
import warnings

import numpy as np
import pyro
import pyro.infer.mcmc.hmc
import pyro.infer.mcmc.nuts
import pyro.ops.integrator
import torch
from pyro.infer import MCMC, NUTS
from pyro.infer.autoguide.initialization import init_to_value

from pyro_sgmcmc import MCMC as VectorMCMC
from pyro_sgmcmc import PyroPotential, SGHMCKernel
from pyro_sgmcmc.datasets import load_pima, logistic_regression_model
from pyro_sgmcmc.diagnostics.ess import min_bulk_ess
from pyro_sgmcmc.diagnostics.ksd import ksd, potential_score

BATCH = 32
D_SYNTH = 8


def now() -> np.ndarray:
    """``[wall, cpu]`` seconds. Every duration below is such a pair: the wall clock is the
    figure asked for; this process's CPU time (one torch thread) is what the wall time
    would be on an otherwise idle machine, so the two differ when other processes load
    it."""
    return np.array([time.perf_counter(), time.process_time()])


def median_steps(stamps: list[np.ndarray]) -> np.ndarray:
    """Median ``[wall, cpu]`` duration between consecutive stamps (robust to load spikes)."""
    if len(stamps) < 2:
        return np.array([np.nan, np.nan])
    return np.median(np.diff(np.stack(stamps), axis=0), axis=0)


def wc(x: np.ndarray, spec: str = ".2f") -> str:
    """``wall (cpu)`` for printing."""
    return f"{x[0]:{spec}} ({x[1]:{spec}})"


def jsonable(obj):
    """Pairs as ``{"wall": ..., "cpu": ...}``, numpy scalars as floats."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return {"wall": obj[0].item(), "cpu": obj[1].item()}
    if isinstance(obj, (np.floating, np.integer, np.bool_)):
        return obj.item()
    return obj


# ----------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def count_gradients():
    """Count Pyro HMC/NUTS potential-gradient evaluations (``potential_grad`` calls)."""
    counter = [0]
    original = pyro.ops.integrator.potential_grad

    def counted(potential_fn, z):
        counter[0] += 1
        return original(potential_fn, z)

    modules = (pyro.ops.integrator, pyro.infer.mcmc.nuts, pyro.infer.mcmc.hmc)
    for module in modules:
        module.potential_grad = counted
    try:
        yield counter
    finally:
        for module in modules:
            module.potential_grad = original


def run_nuts(X, y, warmup: int, samples: int, seed: int, init: dict | None = None) -> dict:
    """One Pyro NUTS chain; seconds and gradient counts split into warm-up and sampling."""
    pyro.set_rng_seed(seed)
    kwargs = {} if init is None else {"init_strategy": init_to_value(values=init)}
    marks: list[tuple[np.ndarray, int]] = []
    with count_gradients() as grads:

        def hook(kernel, params, stage, i):
            if stage.startswith("Warmup") and i == warmup - 1:
                marks.append((now(), grads[0]))

        mcmc = MCMC(
            NUTS(logistic_regression_model, **kwargs),
            num_samples=samples,
            warmup_steps=warmup,
            disable_progbar=True,
            hook_fn=hook,
        )
        start = now()
        mcmc.run(X, y)
        end = now()
        total_grads = grads[0]
    mid, mid_grads = marks[0] if marks else (start, 0)
    return {
        "draws": mcmc.get_samples()["w"],
        "warmup": warmup,
        "samples": samples,
        "seconds": end - start,
        "warmup_seconds": mid - start,
        "sample_seconds": end - mid,
        "warmup_grads": mid_grads,
        "sample_grads": total_grads - mid_grads,
    }


def run_sghmc(X, y, warmup: int, samples: int, seed: int, jit: bool = False) -> dict:
    """One serial SGHMC chain through ``pyro.infer.MCMC``; total seconds and the median
    seconds per sampling step."""
    pyro.set_rng_seed(seed)
    stamps: list[np.ndarray] = []

    def hook(kernel, params, stage, i):
        if stage.startswith("Sample"):
            stamps.append(now())

    kernel = SGHMCKernel(logistic_regression_model, subsample_size=BATCH, jit_compile=jit)
    mcmc = MCMC(
        kernel, num_samples=samples, warmup_steps=warmup, disable_progbar=True, hook_fn=hook
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = now()
        mcmc.run(X, y)
        end = now()
    return {
        "draws": mcmc.get_samples()["w"],
        "seconds": end - start,
        "warmup_seconds": stamps[0] - start,
        "sample_seconds": end - stamps[0],
        "warnings": sorted({str(w.message) for w in caught}),
        "step_median_s": median_steps(stamps),
        "step_mean_s": (stamps[-1] - stamps[0]) / (len(stamps) - 1),
    }


def run_vectorised(
    X, y, chains: int, warmup: int, samples: int, seed: int, keep="last", coupling="independent"
):
    """``chains`` vectorised SGHMC chains; draws (C, S, d), total seconds, and the median
    seconds per sampling step."""
    pyro.set_rng_seed(seed)
    stamps: list[np.ndarray] = []

    def hook(kernel, params, stage, i):
        if stage.startswith("Sample"):
            stamps.append(now())

    mcmc = VectorMCMC(
        SGHMCKernel(logistic_regression_model, subsample_size=BATCH),
        num_samples=samples,
        warmup_steps=warmup,
        num_chains=chains,
        keep=keep,
        chain_coupling=coupling,
        disable_progbar=True,
        hook_fn=hook,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = now()
        mcmc.run(X, y)
        end = now()
    return {
        "warnings": sorted({str(w.message) for w in caught}),
        "draws": mcmc.get_samples(group_by_chain=True)["w"],
        "seconds": end - start,
        "step_median_s": median_steps(stamps),
    }


def newton_map(X, y, iters: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """MAP of the logistic regression with a N(0, I) prior, and the Laplace sds."""
    X64, y64 = X.double(), y.double()
    w = torch.zeros(X.shape[1], dtype=torch.float64)
    eye = torch.eye(X.shape[1], dtype=torch.float64)
    for _ in range(iters):
        p = torch.sigmoid(X64 @ w)
        grad = X64.T @ (y64 - p) - w
        hess = X64.T @ (X64 * (p * (1 - p))[:, None]) + eye
        step = torch.linalg.solve(hess, grad)
        w = w + step
        if float(step.abs().max()) < 1e-10:
            break
    p = torch.sigmoid(X64 @ w)
    hess = X64.T @ (X64 * (p * (1 - p))[:, None]) + eye
    return w.to(X.dtype), torch.linalg.inv(hess).diagonal().sqrt().to(X.dtype)


def synthetic_data(n: int, d: int = D_SYNTH, seed: int = 0):
    """Logistic regression data: x ~ N(0, I), w ~ N(0, I), y ~ Bernoulli(sigmoid(x.w))."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(d, generator=gen)
    X = torch.randn(n, d, generator=gen)
    y = torch.bernoulli(torch.sigmoid(X @ w), generator=gen)
    return X, y


def exact_gaussian_ksds(draws: torch.Tensor, reps: int, seed: int = 0) -> list[float]:
    """KSDs (RBF, bandwidth 1) of ``reps`` samples of ``len(draws)`` exact iid draws from
    the Gaussian with the mean and covariance of ``draws``, each against that Gaussian's
    own score: the size and spread of the KSD of exact draws, at this n, d and scale."""
    gen = torch.Generator().manual_seed(seed)
    x64 = draws.double()
    mean = x64.mean(0)
    chol = torch.linalg.cholesky(torch.cov(x64.T))
    precision = torch.cholesky_inverse(chol)
    values = []
    for _ in range(reps):
        z = torch.randn(x64.shape, generator=gen, dtype=torch.float64)
        x = mean + z @ chol.T
        values.append(float(ksd(x, -(x - mean) @ precision, kernel="rbf", bandwidth=1.0)))
    return values


def fmt_ok(ok) -> str:
    """MET / NOT MET; for a ``[wall, cpu]`` pair of booleans, ``wall (cpu)``."""
    if isinstance(ok, np.ndarray):
        return f"{fmt_ok(bool(ok[0]))} ({fmt_ok(bool(ok[1]))} on CPU time)"
    return "MET" if ok else "NOT MET"


# ----------------------------------------------------------------------------- (a)
def parallel_vs_nuts(cfg: dict, results: dict) -> None:
    data = load_pima()
    X, y = data.X, data.y
    n = cfg["a_draws"]
    nuts = run_nuts(X, y, cfg["a_nuts_warmup"], n, seed=100)
    ref = nuts["draws"]
    ref_mean, ref_sd = ref.mean(0), ref.std(0)
    potential = PyroPotential(logistic_regression_model, (X, y))  # full data

    def ksd_of(draws):
        score = potential_score(potential, {"w": draws})["w"]
        value = float(ksd(draws, score, kernel="rbf", bandwidth=1.0))
        # E[KSD^2] of n exact iid draws: E_p[k_p(x, x)] / n, k_p(x, x) = |s|^2 + d / h^2.
        floor = float(
            ((score.double().square().sum(1) + draws.shape[1]).mean() / len(draws)).sqrt()
        )
        return value, floor

    t0 = now()
    nuts_ksd, nuts_floor = ksd_of(ref)
    ksd_seconds = now() - t0
    exact = exact_gaussian_ksds(ref, cfg["a_exact_reps"])
    exact_mean = float(np.mean(exact))
    out = {
        "nuts": {
            "warmup": nuts["warmup"],
            "draws": n,
            "seconds": nuts["seconds"],
            "sample_seconds": nuts["sample_seconds"],
            "ksd": nuts_ksd,
            "iid_ksd_floor": nuts_floor,
            "exact_gaussian_ksds": exact,
            "min_bulk_ess": min_bulk_ess(ref),
            "grads_per_draw": nuts["sample_grads"] / n,
        },
        "ksd_seconds": ksd_seconds,
        "parallel": [],
    }
    print(
        f"\n(a) Pima, {n} draws; times are wall (CPU) seconds. Pyro NUTS: {nuts['warmup']} "
        f"warm-up + {n} draws in {wc(nuts['seconds'], '.1f')} s (sampling "
        f"{wc(nuts['sample_seconds'], '.1f')} s), {out['nuts']['grads_per_draw']:.1f} "
        f"gradients/draw, min bulk ESS {out['nuts']['min_bulk_ess']:.0f}; KSD {nuts_ksd:.4f} "
        f"(sqrt E[KSD^2] of {n} exact draws: {nuts_floor:.4f}); one KSD incl. scores "
        f"{wc(ksd_seconds, '.1f')} s\n"
        f"    KSD of {n} exact draws from the Gaussian with NUTS's mean and covariance "
        f"(against its own score), {len(exact)} samples: mean {exact_mean:.4f}, range "
        f"{min(exact):.4f}-{max(exact):.4f} (the 'exact' reference below)\n"
        f"    {n} vectorised SGHMC chains, batch {BATCH}, defaults, keep='last', independent "
        "or in antithetic pairs (chain_coupling); its time includes set-up and warm-up, as "
        "NUTS's"
    )
    print(
        f"{'chains':>11} {'warm-up+steps':>14} {'seconds':>13} {'t / NUTS':>15} "
        f"{'t / NUTS smp':>15} {'KSD':>7} {'KSD/NUTS':>8} {'KSD/exact':>9} "
        f"{'max|err|sd':>10} {'sd ratio':>13}"
    )
    settings = [(c, w, s) for c in ("independent", "antithetic") for w, s in cfg["a_settings"]]
    for coupling, warmup, steps in settings:
        run = run_vectorised(X, y, n, warmup, steps, seed=1, coupling=coupling)
        draws = run["draws"][:, -1]
        value, _ = ksd_of(draws)
        err = ((draws.mean(0) - ref_mean) / ref_sd).abs()
        ratio = draws.std(0) / ref_sd
        row = {
            "coupling": coupling,
            "warmup": warmup,
            "steps": steps,
            "chains": n,
            "seconds": run["seconds"],
            "step_median_s": run["step_median_s"],
            "time_ratio": run["seconds"] / nuts["seconds"],
            "time_ratio_vs_nuts_sampling": run["seconds"] / nuts["sample_seconds"],
            "ksd": value,
            "ksd_ratio": value / nuts_ksd,
            "ksd_ratio_vs_exact_mean": value / exact_mean,
            "max_abs_mean_error_sd": float(err.max()),
            "sd_ratio_min": float(ratio.min()),
            "sd_ratio_max": float(ratio.max()),
            "warnings": run["warnings"],
        }
        row["ksd_target_met"] = row["ksd_ratio"] <= 1.5
        row["time_target_met"] = row["time_ratio"] <= 0.1
        out["parallel"].append(row)
        print(
            f"{coupling:>11} {warmup:>6}+{steps:<7} {wc(row['seconds']):>13} "
            f"{wc(row['time_ratio'], '.3f'):>15} "
            f"{wc(row['time_ratio_vs_nuts_sampling'], '.3f'):>15} {value:>7.4f} "
            f"{row['ksd_ratio']:>8.2f} {row['ksd_ratio_vs_exact_mean']:>9.2f} "
            f"{row['max_abs_mean_error_sd']:>10.3f} "
            f"{row['sd_ratio_min']:>6.3f}-{row['sd_ratio_max']:<6.3f}"
        )
        for message in run["warnings"]:
            print(f"    warning: {message}")
    results["a_pima_parallel"] = out


# ----------------------------------------------------------------------------- (b)
def throughput(cfg: dict, results: dict) -> None:
    data = load_pima()
    X, y = data.X, data.y
    chains, warmup, samples = cfg["b_chains"], cfg["b_warmup"], cfg["b_samples"]
    vec = run_vectorised(X, y, chains, warmup, samples, seed=2, keep="all")
    one = run_sghmc(X, y, warmup, samples, seed=2, jit=False)
    one_jit = run_sghmc(X, y, warmup, samples, seed=2, jit=True)
    ratio = vec["seconds"] / one["seconds"]
    out = {
        "chains": chains,
        "steps": warmup + samples,
        "warmup": warmup,
        "vectorised_seconds": vec["seconds"],
        "single_seconds": one["seconds"],
        "single_jit_seconds": one_jit["seconds"],
        "time_ratio": ratio,
        "throughput_ratio": chains / ratio,
        "time_ratio_vs_jit": vec["seconds"] / one_jit["seconds"],
        "step_ratio_sampling": vec["step_median_s"] / one["step_median_s"],
        "vectorised_step_median_ms": vec["step_median_s"] * 1e3,
        "single_step_median_ms": one["step_median_s"] * 1e3,
        "single_jit_step_median_ms": one_jit["step_median_s"] * 1e3,
        "target_met": ratio <= 20,
    }
    results["b_throughput"] = out
    print(
        f"\n(b) Pima, {chains} vectorised chains (pyro_sgmcmc.MCMC) vs 1 chain "
        f"(pyro.infer.MCMC), {warmup} warm-up + {samples} steps each, SGHMC defaults, "
        f"batch {BATCH}; wall (CPU)\n"
        f"    seconds: {chains} chains {wc(vec['seconds'])}; 1 chain {wc(one['seconds'])}; "
        f"1 chain with jit {wc(one_jit['seconds'])}\n"
        f"    time ratio {wc(ratio)}x, throughput {wc(out['throughput_ratio'], '.0f')}x; vs "
        f"the jit single chain {wc(out['time_ratio_vs_jit'])}x\n"
        f"    median sampling step: {wc(out['vectorised_step_median_ms'])} ms vs "
        f"{wc(out['single_step_median_ms'])} ms (jit {wc(out['single_jit_step_median_ms'])}), "
        f"ratio {wc(out['step_ratio_sampling'])}x"
    )


# ----------------------------------------------------------------------------- (c)
def scaling(cfg: dict, results: dict) -> None:
    X_all, y_all = synthetic_data(max(cfg["c_sizes"]))
    # SGHMC per-step cost: the sizes interleaved, in rounds; per (N, jit) the fastest
    # round's median step, so that a stretch of load from other processes does not land
    # on one size only.
    sg_runs: dict = {}
    for _ in range(cfg["c_rounds"]):
        for n in cfg["c_sizes"]:
            for jit in (False, True):
                run = run_sghmc(
                    X_all[:n], y_all[:n], cfg["c_sg_warmup"], cfg["c_sg_steps"], seed=3, jit=jit
                )
                best = sg_runs.get((n, jit))
                sg_runs[(n, jit)] = {
                    key: run[key] if best is None else np.minimum(run[key], best[key])
                    for key in ("warmup_seconds", "step_median_s", "step_mean_s")
                }
    rows = []
    print(
        f"\n(c) synthetic logistic regression, d = {D_SYNTH}, nested prefixes of one data "
        f"set (seed 0). SGHMC batch {BATCH} through pyro.infer.MCMC, {cfg['c_sg_warmup']} "
        f"warm-up (one control-variate window) + {cfg['c_sg_steps']} steps, median sampling "
        f"step, best of {cfg['c_rounds']} interleaved rounds; NUTS initialised at the "
        f"MAP, per leapfrog gradient and per draw in the sampling phase. CPU-time figures; "
        f"wall in the JSON"
    )
    print(
        f"{'N':>7} {'SG warm s':>9} {'SG us/step':>10} {'jit warm s':>10} {'jit us/step':>11} "
        f"{'NUTS w+d':>9} {'ms/grad':>8} {'ms/draw':>8} {'grad/draw':>9} {'NUTS s':>7} "
        f"{'draw/SGstep':>11}"
    )
    for n in cfg["c_sizes"]:
        X, y = X_all[:n], y_all[:n]
        sg, sg_jit = sg_runs[(n, False)], sg_runs[(n, True)]
        w_map, _ = newton_map(X, y)
        warmup, draws = cfg["c_nuts"][n]
        nuts = run_nuts(X, y, warmup, draws, seed=4, init={"w": w_map})
        row = {
            "N": n,
            "sghmc_warmup_s": sg["warmup_seconds"],
            "sghmc_step_us": sg["step_median_s"] * 1e6,
            "sghmc_step_mean_us": sg["step_mean_s"] * 1e6,
            "sghmc_jit_warmup_s": sg_jit["warmup_seconds"],
            "sghmc_jit_step_us": sg_jit["step_median_s"] * 1e6,
            "sghmc_jit_step_mean_us": sg_jit["step_mean_s"] * 1e6,
            "nuts_warmup": warmup,
            "nuts_draws": draws,
            "nuts_seconds": nuts["seconds"],
            "nuts_sample_grads": nuts["sample_grads"],
            "nuts_ms_per_grad": nuts["sample_seconds"] / max(nuts["sample_grads"], 1) * 1e3,
            "nuts_ms_per_draw": nuts["sample_seconds"] / draws * 1e3,
            "nuts_grads_per_draw": nuts["sample_grads"] / draws,
        }
        row["nuts_draw_in_sghmc_steps"] = row["nuts_ms_per_draw"] * 1e3 / row["sghmc_step_us"]
        rows.append(row)
        print(
            f"{n:>7.0e} {row['sghmc_warmup_s'][1]:>9.2f} {row['sghmc_step_us'][1]:>10.0f} "
            f"{row['sghmc_jit_warmup_s'][1]:>10.2f} {row['sghmc_jit_step_us'][1]:>11.0f} "
            f"{warmup:>4}+{draws:<4} {row['nuts_ms_per_grad'][1]:>8.2f} "
            f"{row['nuts_ms_per_draw'][1]:>8.1f} {row['nuts_grads_per_draw']:>9.1f} "
            f"{row['nuts_seconds'][1]:>7.1f} {row['nuts_draw_in_sghmc_steps'][1]:>11.0f}",
            flush=True,
        )
    first, last = rows[0], rows[-1]
    growth = {
        "N": last["N"] / first["N"],
        "sghmc_step": last["sghmc_step_us"] / first["sghmc_step_us"],
        "sghmc_jit_step": last["sghmc_jit_step_us"] / first["sghmc_jit_step_us"],
        "nuts_per_grad": last["nuts_ms_per_grad"] / first["nuts_ms_per_grad"],
        "nuts_per_draw": last["nuts_ms_per_draw"] / first["nuts_ms_per_draw"],
    }
    growth["target_met"] = (growth["sghmc_step"] <= 1.2) & (growth["sghmc_jit_step"] <= 1.2)
    print(
        f"    N = {first['N']:.0e} -> {last['N']:.0e} ({growth['N']:.0f}x data), wall (CPU): "
        f"SGHMC step {wc(growth['sghmc_step'])}x, jit {wc(growth['sghmc_jit_step'])}x; NUTS "
        f"per gradient {wc(growth['nuts_per_grad'], '.0f')}x, per draw "
        f"{wc(growth['nuts_per_draw'], '.0f')}x"
    )
    results["c_scaling"] = {"rows": rows, "growth": growth}

    # Minimum bulk ESS per second at N = 1e5.
    n = cfg["c_ess_n"]
    X, y = X_all[:n], y_all[:n]
    w_map, laplace_sd = newton_map(X, y)
    entries = {"nuts": run_nuts(X, y, *cfg["c_ess_nuts"], seed=5)}
    for label, jit in (("sghmc", False), ("sghmc_jit", True)):
        entries[label] = run_sghmc(X, y, *cfg["c_ess_sg"], seed=5, jit=jit)
    ess_out: dict = {"N": n}
    print(
        f"\n    ESS/s at N = {n:.0e}: NUTS {cfg['c_ess_nuts'][0]} warm-up + "
        f"{cfg['c_ess_nuts'][1]} draws (default init_to_uniform); serial SGHMC "
        f"{cfg['c_ess_sg'][0]} warm-up + {cfg['c_ess_sg'][1]} steps (defaults, batch {BATCH}, "
        f"all kept). ESS/s over the whole run (warm-up included) and over the sampling phase "
        f"only; CPU time (wall in the JSON); accuracy against the Laplace approximation"
    )
    print(
        f"    {'run':>10} {'seconds':>8} {'warm-up s':>9} {'min ESS':>8} {'ESS/s':>7} "
        f"{'xNUTS':>6} {'smp ESS/s':>9} {'xNUTS':>6} {'max|err| Laplace sd':>19} "
        f"{'sd ratio':>13}"
    )
    for label, run in entries.items():
        draws = run["draws"]
        ess = min_bulk_ess(draws)
        err = ((draws.mean(0) - w_map) / laplace_sd).abs()
        ratio = draws.std(0) / laplace_sd
        ess_out[label] = {
            "seconds": run["seconds"],
            "warmup_seconds": run["seconds"] - run["sample_seconds"],
            "draws": len(draws),
            "min_bulk_ess": ess,
            "ess_per_second": ess / run["seconds"],
            "ess_per_sampling_second": ess / run["sample_seconds"],
            "max_abs_mean_error_laplace_sd": float(err.max()),
            "sd_ratio_min": float(ratio.min()),
            "sd_ratio_max": float(ratio.max()),
            "warnings": run.get("warnings", []),
        }
    base = ess_out["nuts"]["ess_per_second"]
    base_sampling = ess_out["nuts"]["ess_per_sampling_second"]
    for label in entries:
        e = ess_out[label]
        e["vs_nuts"] = e["ess_per_second"] / base
        e["vs_nuts_sampling"] = e["ess_per_sampling_second"] / base_sampling
        print(
            f"    {label:>10} {e['seconds'][1]:>8.1f} {e['warmup_seconds'][1]:>9.1f} "
            f"{e['min_bulk_ess']:>8.0f} {e['ess_per_second'][1]:>7.1f} {e['vs_nuts'][1]:>6.2f} "
            f"{e['ess_per_sampling_second'][1]:>9.1f} {e['vs_nuts_sampling'][1]:>6.2f} "
            f"{e['max_abs_mean_error_laplace_sd']:>19.3f} {e['sd_ratio_min']:>6.3f}-"
            f"{e['sd_ratio_max']:<6.3f}"
        )
        for message in e["warnings"]:
            print(f"      warning: {message}")
    ess_out["target_met"] = ess_out["sghmc"]["vs_nuts"] >= 10
    results["c_ess_1e5"] = ess_out


# ----------------------------------------------------------------------------- main
def summary(results: dict) -> None:
    """One line per target, judged on wall time and on CPU time."""
    rows = []
    for r in results["a_pima_parallel"]["parallel"]:
        setting = f"(a) {r['coupling'][:4]} {r['warmup']}+{r['steps']}"
        ksd_ratio = np.array([r["ksd_ratio"]] * 2)
        rows.append((f"{setting} KSD / NUTS KSD", ksd_ratio, "<= 1.5", ksd_ratio <= 1.5))
        rows.append(
            (f"{setting} time / NUTS time", r["time_ratio"], "<= 0.1", r["time_target_met"])
        )
    b = results["b_throughput"]
    rows.append(("(b) time 1000 chains / 1 chain", b["time_ratio"], "<= 20", b["target_met"]))
    g = results["c_scaling"]["growth"]
    for key, name in (("sghmc_step", "SGHMC step"), ("sghmc_jit_step", "SGHMC jit step")):
        rows.append((f"(c) {name} cost 1e6 / 1e3", g[key], "<= 1.2", g[key] <= 1.2))
    e = results["c_ess_1e5"]
    rows.append(
        ("(c) SGHMC / NUTS min ESS/s, 1e5", e["sghmc"]["vs_nuts"], ">= 10", e["target_met"])
    )
    rows.append(
        (
            "(c) same, SGHMC with jit",
            e["sghmc_jit"]["vs_nuts"],
            ">= 10",
            e["sghmc_jit"]["vs_nuts"] >= 10,
        )
    )
    print(f"\n{'target':<36} {'wall':>8} {'CPU':>8} {'goal':>7}  wall / CPU")
    for name, value, goal, ok in rows:
        print(
            f"{name:<36} {value[0]:>8.3f} {value[1]:>8.3f} {goal:>7}  "
            f"{fmt_ok(bool(ok[0]))} / {fmt_ok(bool(ok[1]))}"
        )


def warm_up_process(results: dict) -> None:
    """Run every code path once, small, so one-time costs (imports, first vmap) are not
    timed in the benchmarks; report the first vectorised call's extra time."""
    data = load_pima()
    start = now()
    run_vectorised(data.X, data.y, 8, 30, 5, seed=0)
    first = now() - start
    start = now()
    run_vectorised(data.X, data.y, 8, 30, 5, seed=0)
    second = now() - start
    run_sghmc(data.X, data.y, 30, 5, seed=0)
    run_sghmc(data.X, data.y, 30, 5, seed=0, jit=True)
    run_nuts(data.X, data.y, 5, 5, seed=0)
    potential = PyroPotential(logistic_regression_model, (data.X, data.y))
    potential_score(potential, {"w": torch.zeros(4, data.X.shape[1])})
    results["one_time_first_vectorised_call_s"] = first - second
    print(
        f"one-time cost of the first vectorised call in a process (torch._dynamo import "
        f"etc.): {wc(first - second, '.1f')} s wall (CPU), excluded from the timings below"
    )


def config(quick: bool) -> dict:
    if quick:
        return {
            "a_draws": 1000,
            "a_nuts_warmup": 300,
            "a_settings": [(200, 50), (300, 100)],
            "a_exact_reps": 5,
            "b_chains": 1000,
            "b_warmup": 100,
            "b_samples": 400,
            "c_sizes": [10**3, 10**4, 10**5, 10**6],
            "c_sg_warmup": 40,
            "c_sg_steps": 500,
            "c_rounds": 1,
            "c_nuts": {10**3: (20, 20), 10**4: (20, 20), 10**5: (10, 10), 10**6: (5, 5)},
            "c_ess_n": 10**5,
            "c_ess_nuts": (50, 100),
            "c_ess_sg": (1000, 3000),
        }
    return {
        "a_draws": 5000,
        "a_nuts_warmup": 1000,
        "a_settings": [(100, 50), (200, 50), (300, 100), (500, 200)],
        "a_exact_reps": 10,
        "b_chains": 1000,
        "b_warmup": 500,
        "b_samples": 1500,
        "c_sizes": [10**3, 10**4, 10**5, 10**6],
        "c_sg_warmup": 40,
        "c_sg_steps": 1000,
        "c_rounds": 5,
        "c_nuts": {10**3: (100, 100), 10**4: (50, 100), 10**5: (30, 50), 10**6: (20, 30)},
        "c_ess_n": 10**5,
        "c_ess_nuts": (100, 200),
        "c_ess_sg": (1000, 20000),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (< 3 minutes)")
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = config(args.quick)
    results: dict = {
        "quick": args.quick,
        "config": {
            k: v if k != "c_nuts" else {str(n): s for n, s in v.items()} for k, v in cfg.items()
        },
    }
    start = now()
    warm_up_process(results)
    parallel_vs_nuts(cfg, results)
    throughput(cfg, results)
    scaling(cfg, results)
    summary(results)
    results["total_seconds"] = now() - start
    print(f"\ntotal {wc(results['total_seconds'], '.0f')} s wall (CPU)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(jsonable(results), f, indent=2)


if __name__ == "__main__":
    main()
