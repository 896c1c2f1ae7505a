"""The ``pyro-sgmcmc`` command.

``pyro-sgmcmc pima`` reproduces the seed paper's Table 3 on the bundled Pima data (768
rows, 8 standardised covariates, prior N(0, I), no intercept): Pyro's NUTS (the
reference), SGLD, SGHMC (full batch and batch 32), SGNHT, BAOA, parallel SGHMC
(the last draws of thousands of vectorised chains, independent and in antithetic
pairs), and the Gaussian approximations (Laplace with GGN and EF curvature, dense and
diagonal STL VI, a one-pass EKF), scored by KSD with the true score, wall time,
minimum bulk ESS/s and the largest posterior-mean error in NUTS sds. ``--methods``
picks groups (e.g. ``--methods laplace,vi``). It writes the table (CSV, JSON), the
marginals figure (the seed's Figure 11) and the serial SGHMC trace plot to ``--out``.

``pyro-sgmcmc double-well`` reproduces the seed's Figure 2: a deep ensemble, a serial
SGHMC chain and parallel SGHMC on a 2-D double well, with their KSDs.

The experiments themselves live in :mod:`pyro_sgmcmc.experiments`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import pyro
import torch

from pyro_sgmcmc import experiments as ex
from pyro_sgmcmc.datasets import load_pima
from pyro_sgmcmc.diagnostics import plots


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
        return ex.min_bulk_ess(self.draws)


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


# ------------------------------------------------------------------------------ pima
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


def _method_groups(text: str) -> tuple[str, ...]:
    """``--methods``: ``all`` or a comma-separated list of :data:`PIMA_GROUPS`."""
    if text.strip() == "all":
        return ex.PIMA_GROUPS
    groups = tuple(g.strip() for g in text.split(",") if g.strip())
    unknown = [g for g in groups if g not in ex.PIMA_GROUPS]
    if unknown or not groups:
        raise argparse.ArgumentTypeError(
            f"unknown method groups {unknown}: give 'all' or a comma-separated list of "
            f"{', '.join(ex.PIMA_GROUPS)}"
        )
    return groups


def cmd_pima(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    settings = {k: getattr(args, k) for k in PIMA_QUICK}
    if args.quick:
        settings.update(PIMA_QUICK)
    num_draws = settings.pop("draws")
    data = load_pima()
    out = ex.ensure_dir(args.out)
    progress = not args.no_progress
    start = time.perf_counter()
    print(
        f"Pima Indians diabetes: {len(data.y)} rows, {data.X.shape[1]} standardised "
        "covariates, prior N(0, I), Bernoulli-logit likelihood",
        flush=True,
    )
    runs = ex.run_pima(
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
    rows = ex.pima_table(runs, data, num_draws)
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
        f"Table 3 (seed paper), Pima, seed {args.seed}: KSD with the true score on {num_draws} "
        "evenly thinned draws per method (bandwidth 1); min bulk ESS/s over all retained "
        "draws, wall time with warm-up; max|mean err| in NUTS posterior sds "
        f"({nuts.draws.shape[0]} NUTS draws)."
    )
    print(ex.format_table(rows))
    level = ex.pima_iid_ksd_level(data, nuts.draws, num_draws)
    print(
        f"({num_draws} exact independent draws give a KSD of about {level:.2f} on average, RBF "
        "and IMQ alike: rows near that level are at the statistic's resolution.)"
    )
    meta = {
        "seed": args.seed,
        "quick": args.quick,
        "batch_size": args.batch_size,
        "ksd_draws": num_draws,
        "ksd_bandwidth": 1.0,
        "ksd_iid_level": level,
        "jit": not args.no_jit,
        "threads": args.threads,
        **settings,
    }
    paths = ex.write_rows(rows, os.path.join(out, "pima_table"), meta)
    fig = ex.plot_marginals(
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


# ------------------------------------------------------------------------------ double well
DOUBLE_WELL_QUICK = {"chains": 1000, "warmup": 1000, "steps": 500}


def cmd_double_well(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    settings = {k: getattr(args, k) for k in DOUBLE_WELL_QUICK}
    if args.quick:
        settings.update(DOUBLE_WELL_QUICK)
    out = ex.ensure_dir(args.out)
    start = time.perf_counter()
    print(
        f"Double well: target exp(-U), U(x) = {args.barrier:g} (x1^2 - 1)^2 + x2^2 / 2 "
        f"(modes (+-1, 0), barrier {args.barrier:g})",
        flush=True,
    )
    pyro.set_rng_seed(args.seed)
    draws, results = ex.run_double_well(
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
    print(ex.format_double_well(results))
    meta = {"seed": args.seed, "quick": args.quick, "barrier": args.barrier, **settings}
    paths = ex.write_rows(results, os.path.join(out, "double_well"), meta)
    fig = ex.plot_double_well(draws, args.barrier, os.path.join(out, "double_well.png"))
    print(f"\nwrote {', '.join([*paths, fig])}")
    print(f"total {time.perf_counter() - start:.0f} s")
    return 0


# ------------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyro-sgmcmc", description="Minibatch SGMCMC for Pyro: demos and benchmarks."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    pima = sub.add_parser(
        "pima",
        help="Table 3: NUTS vs SGLD, SGHMC, SGNHT, BAOA, parallel SGHMC on the Pima data",
        description="The seed paper's Table 3 and Figure 11 on the bundled Pima data.",
    )
    pima.add_argument("--quick", action="store_true", help="short runs (under a minute)")
    pima.add_argument("--seed", type=int, default=0)
    pima.add_argument("--out", default="out", help="folder for the table and figure")
    pima.add_argument("--batch-size", type=int, default=32)
    pima.add_argument("--warmup", type=int, default=2000, help="SGMCMC warm-up steps")
    pima.add_argument("--steps", type=int, default=20000, help="SGMCMC sampling steps")
    pima.add_argument("--thinning", type=int, default=5, help="SGMCMC steps per kept draw")
    pima.add_argument("--nuts-warmup", type=int, default=1000)
    pima.add_argument("--nuts-samples", type=int, default=8000)
    pima.add_argument("--chains", type=int, default=4000, help="parallel SGHMC chains")
    pima.add_argument("--parallel-warmup", type=int, default=500)
    pima.add_argument("--parallel-steps", type=int, default=200)
    pima.add_argument(
        "--draws", type=int, default=4000, help="draws per method for the KSD (evenly thinned)"
    )
    pima.add_argument(
        "--methods",
        type=_method_groups,
        default=ex.PIMA_GROUPS,
        help="'all' (default) or a comma-separated list of "
        f"{', '.join(ex.PIMA_GROUPS)} (NUTS, the reference, always runs)",
    )
    pima.add_argument(
        "--gaussian-steps", type=int, default=3000, help="SVI steps of the Laplace MAP and of VI"
    )
    pima.add_argument("--no-jit", action="store_true", help="do not trace the potentials")
    pima.add_argument("--no-progress", action="store_true", help="hide progress bars")
    pima.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is fastest for this small model)"
    )
    pima.set_defaults(func=cmd_pima)

    dw = sub.add_parser(
        "double-well",
        help="Figure 2: deep ensemble vs serial vs parallel SGHMC on a 2-D double well",
        description="The seed paper's Figure 2 on U(x) = a (x1^2 - 1)^2 + x2^2 / 2.",
    )
    dw.add_argument("--quick", action="store_true", help="short runs (about 20 s)")
    dw.add_argument("--seed", type=int, default=0)
    dw.add_argument("--out", default="out", help="folder for the figure and table")
    dw.add_argument("--barrier", type=float, default=6.0, help="a: the barrier height")
    dw.add_argument(
        "--chains", type=int, default=2000, help="ensemble members, parallel chains, serial draws"
    )
    dw.add_argument("--warmup", type=int, default=2000, help="warm-up (ensemble: all) steps")
    dw.add_argument("--steps", type=int, default=1000, help="parallel steps after warm-up")
    dw.add_argument("--step-size", type=float, default=0.005)
    dw.add_argument("--alpha", type=float, default=10.0, help="SGHMC friction")
    dw.add_argument("--no-progress", action="store_true", help="hide progress bars")
    dw.add_argument("--threads", type=int, default=1, help="torch threads")
    dw.set_defaults(func=cmd_double_well)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
