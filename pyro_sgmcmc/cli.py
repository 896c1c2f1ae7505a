"""The ``pyro-sgmcmc`` command: a thin, fast front to :mod:`pyro_sgmcmc.experiments`.

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

This module only parses arguments: each subcommand runs the ``main(args)`` of its
experiment module, imported when it runs (so ``--help`` loads neither torch nor Pyro).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Any

from pyro_sgmcmc.experiments import PIMA_GROUPS

__all__ = ["build_parser", "main"]


def __getattr__(name: str) -> Any:
    # The comparison helpers live in the experiments' report module (loaded on use).
    if name in ("RunResult", "format_comparison"):
        return getattr(importlib.import_module("pyro_sgmcmc.experiments.report"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _method_groups(text: str) -> tuple[str, ...]:
    """``--methods``: ``all`` or a comma-separated list of :data:`PIMA_GROUPS`."""
    if text.strip() == "all":
        return PIMA_GROUPS
    groups = tuple(g.strip() for g in text.split(",") if g.strip())
    unknown = [g for g in groups if g not in PIMA_GROUPS]
    if unknown or not groups:
        raise argparse.ArgumentTypeError(
            f"unknown method groups {unknown}: give 'all' or a comma-separated list of "
            f"{', '.join(PIMA_GROUPS)}"
        )
    return groups


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
        default=PIMA_GROUPS,
        help="'all' (default) or a comma-separated list of "
        f"{', '.join(PIMA_GROUPS)} (NUTS, the reference, always runs)",
    )
    pima.add_argument(
        "--gaussian-steps", type=int, default=3000, help="SVI steps of the Laplace MAP and of VI"
    )
    pima.add_argument("--no-jit", action="store_true", help="do not trace the potentials")
    pima.add_argument("--no-progress", action="store_true", help="hide progress bars")
    pima.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is fastest for this small model)"
    )
    pima.set_defaults(experiment="pima")

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
    dw.set_defaults(experiment="double_well")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    experiment = importlib.import_module(f"pyro_sgmcmc.experiments.{args.experiment}")
    return experiment.main(args)


if __name__ == "__main__":
    sys.exit(main())
