"""The ``pyro-sgmcmc`` command.

``pyro-sgmcmc pima`` samples the Bayesian logistic regression benchmark on the bundled
Pima data (768 rows, 8 standardised covariates, prior N(0, I), no intercept) with
Pyro's NUTS and with :class:`~pyro_sgmcmc.SGHMCKernel` at batch size 32, and prints
both posteriors side by side with the wall-time ratio.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import pyro
import torch
from pyro.infer import MCMC, NUTS
from pyro.ops.stats import effective_sample_size

from pyro_sgmcmc.datasets import load_pima, logistic_regression_model
from pyro_sgmcmc.kernels import SGHMCKernel


@dataclass
class RunResult:
    """Draws of one method and what they cost."""

    name: str
    draws: torch.Tensor  # (num_draws, dim)
    seconds: float
    steps: int

    @property
    def min_ess(self) -> float:
        ess = effective_sample_size(self.draws.unsqueeze(0), chain_dim=0, sample_dim=1)
        return float(ess.min())


def run_nuts(data, num_samples: int, warmup_steps: int, progress: bool) -> RunResult:
    kernel = NUTS(logistic_regression_model)
    mcmc = MCMC(
        kernel, num_samples=num_samples, warmup_steps=warmup_steps, disable_progbar=not progress
    )
    start = time.perf_counter()
    mcmc.run(data.X, data.y)
    seconds = time.perf_counter() - start
    return RunResult("Pyro NUTS", mcmc.get_samples()["w"], seconds, num_samples + warmup_steps)


def run_sghmc(
    data,
    num_steps: int,
    warmup_steps: int,
    batch_size: int,
    thinning: int,
    jit: bool,
    progress: bool,
) -> RunResult:
    kernel = SGHMCKernel(
        logistic_regression_model, subsample_size=batch_size, thinning=thinning, jit_compile=jit
    )
    num_samples = num_steps // thinning
    mcmc = MCMC(
        kernel, num_samples=num_samples, warmup_steps=warmup_steps, disable_progbar=not progress
    )
    start = time.perf_counter()
    mcmc.run(data.X, data.y)
    seconds = time.perf_counter() - start
    return RunResult(
        f"SGHMC (batch {batch_size})",
        mcmc.get_samples()["w"],
        seconds,
        warmup_steps + num_samples * thinning,
    )


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
            f"({r.seconds / r.steps * 1e6:.0f} us/step), min ESS {ess:.0f}, "
            f"{ess / r.seconds:.1f} ESS/s"
        )
    lines.append(
        f"wall-time ratio {other.name} / {reference.name}: {other.seconds / reference.seconds:.2f}"
    )
    return "\n".join(lines)


def cmd_pima(args: argparse.Namespace) -> int:
    pyro.set_rng_seed(args.seed)
    torch.set_num_threads(args.threads)
    data = load_pima()
    if args.quick:
        nuts_warmup, nuts_samples, sg_warmup, sg_steps = 300, 500, 1000, 5000
    else:
        nuts_warmup, nuts_samples = args.nuts_warmup, args.nuts_samples
        sg_warmup, sg_steps = args.warmup, args.steps
    print(
        f"Pima Indians diabetes: {len(data.y)} rows, {data.X.shape[1]} standardised "
        "covariates, prior N(0, I), Bernoulli-logit likelihood",
        flush=True,
    )
    nuts = run_nuts(data, nuts_samples, nuts_warmup, progress=not args.no_progress)
    sghmc = run_sghmc(
        data,
        sg_steps,
        sg_warmup,
        args.batch_size,
        args.thinning,
        jit=not args.no_jit,
        progress=not args.no_progress,
    )
    print()
    print(format_comparison(data.feature_names, nuts, sghmc))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyro-sgmcmc", description="Minibatch SGMCMC for Pyro: demos and benchmarks."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    pima = sub.add_parser("pima", help="NUTS vs SGHMC (batch 32) on the Pima data")
    pima.add_argument("--quick", action="store_true", help="short runs (about 10 s)")
    pima.add_argument("--seed", type=int, default=0)
    pima.add_argument("--batch-size", type=int, default=32)
    pima.add_argument("--warmup", type=int, default=2000, help="SGHMC warm-up steps")
    pima.add_argument("--steps", type=int, default=23000, help="SGHMC sampling steps")
    pima.add_argument("--thinning", type=int, default=5, help="SGHMC steps per kept draw")
    pima.add_argument("--nuts-warmup", type=int, default=1000)
    pima.add_argument("--nuts-samples", type=int, default=5000)
    pima.add_argument("--no-jit", action="store_true", help="do not trace the potential")
    pima.add_argument("--no-progress", action="store_true", help="hide progress bars")
    pima.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is fastest for this small model)"
    )
    pima.set_defaults(func=cmd_pima)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
