r"""The cold-posterior experiment (the seed paper's section 5.1, Figures 4, 8 and 9) at CPU
scale on real movie reviews: ``pyro-sgmcmc cold-posterior``.

For each seed: MLE and MAP (AdamW), diagonal Laplace at the MAP (empirical Fisher and
GGN; sampled and linearised predictives), diagonal STL VI (sampled and linearised) and
serial SGHMC from the MAP, at every temperature of the grid; then parallel SGHMC
(``parallel_chains`` vectorised chains from independent AdamW fits, one run per
temperature, split into ``seeds`` disjoint ensembles of ``ensemble_size`` chains; the
paper bootstraps 5 ensembles of 15 from 35 chains) and its ``T = 0`` limit, the deep
ensemble. Every (method, temperature, seed) is scored on the test split by NLL,
accuracy and ECE, with its wall time. The model, data and methods are in
:mod:`~pyro_sgmcmc.experiments.cold_posterior_methods`.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from pyro_sgmcmc.experiments.cold_posterior_methods import (
    QUICK,
    ColdPosteriorConfig,
    build_model,
    classification_metrics,
    fit_vi,
    laplace_posteriors,
    linearised_function_space,
    linearised_probs,
    load_data,
    make_potential,
    point_probs,
    sampled_probs,
    sghmc_parallel,
    sghmc_serial,
    train_adamw,
    train_adamw_parallel,
)
from pyro_sgmcmc.experiments.report import ensure_dir, format_columns, write_rows

__all__ = [
    "BAYESIAN_METHODS",
    "METHODS",
    "PREDICTIVE",
    "ColdPosteriorRecord",
    "format_cold_posterior",
    "main",
    "ensemble_subsets",
    "format_timing",
    "plot_cold_posterior",
    "read_records",
    "run_cold_posterior",
    "summarise",
]

#: Every method, in the order of the tables, and how it predicts.
PREDICTIVE = {
    "MLE": "point",
    "MAP": "point",
    "Laplace EF": "sampled",
    "Laplace EF (linearised)": "linearised",
    "Laplace GGN": "sampled",
    "Laplace GGN (linearised)": "linearised",
    "VI": "sampled",
    "VI (linearised)": "linearised",
    "serial SGHMC": "samples",
    "parallel SGHMC": "ensemble",
    "deep ensemble": "ensemble",
}
METHODS = tuple(PREDICTIVE)
#: The methods run at every temperature (the others have ``temperature = None``).
BAYESIAN_METHODS = tuple(m for m in METHODS if m not in ("MLE", "MAP", "deep ensemble"))


@dataclass
class ColdPosteriorRecord:
    """One method at one temperature (``None``: not tempered) and seed, on the test split.

    ``seconds``: wall time of this record's own work (its fit, sampling and
    prediction), with work shared between temperatures (a Laplace curvature, the
    linearisation of a Laplace posterior, parallel SGHMC's AdamW start) split evenly
    among them; the MAP that Laplace, VI and serial SGHMC start from is the MAP
    record's. For parallel SGHMC and the deep ensemble it is the wall time of all
    ``parallel_chains`` vectorised chains. ``draws``: parameter draws (or ensemble
    members) in the predictive; 0 for a point estimate.
    """

    method: str
    temperature: float | None
    seed: int
    predictive: str
    nll: float
    accuracy: float
    ece: float
    seconds: float
    draws: int


def _generator(
    seed: int, method: str, temperature: float | None, device: str = "cpu"
) -> torch.Generator:
    """A generator of its own for each (seed, method, temperature), so that any part of
    the grid reruns to the same numbers whatever else runs with it; on ``device``, where
    the noise it drives is drawn."""
    key = f"{seed}:{method}:{temperature!r}".encode()
    value = int.from_bytes(hashlib.sha256(key).digest()[:7], "big")
    return torch.Generator(device=device).manual_seed(value)


def ensemble_subsets(chains: int, size: int, count: int, seed: int) -> list[torch.Tensor]:
    """``count`` ensembles of ``size`` chains out of ``chains``: disjoint when there are
    enough chains (independent replications), else each drawn without replacement on
    its own (overlapping, as the paper bootstraps 5 ensembles of 15 from 35 chains).

    Examples:
        >>> [len(s) for s in ensemble_subsets(24, 8, 3, 0)]
        [8, 8, 8]
        >>> len(set(torch.cat(ensemble_subsets(24, 8, 3, 0)).tolist()))
        24
    """
    if not 1 <= size <= chains:
        raise ValueError(f"ensemble_size must be in [1, {chains}], got {size}")
    perm = torch.randperm(chains, generator=torch.Generator().manual_seed(seed))
    if size * count <= chains:
        return [perm[i * size : (i + 1) * size] for i in range(count)]
    return [
        torch.randperm(chains, generator=torch.Generator().manual_seed(seed + i))[:size]
        for i in range(count)
    ]


def run_cold_posterior(
    cfg: ColdPosteriorConfig,
    *,
    base_seed: int = 0,
    log: Callable[[str], None] | None = print,
    on_progress: Callable[[list[ColdPosteriorRecord]], None] | None = None,
) -> list[ColdPosteriorRecord]:
    """Every method at every temperature and seed; ``on_progress(records)`` after each
    block (to write partial results)."""
    say = log or (lambda _msg: None)
    start_all = time.perf_counter()
    data = load_data(cfg)
    x, y, xt, yt = data.x_train, data.y_train, data.x_test, data.y_test
    n, vocab = len(y), len(data.vocab)
    records: list[ColdPosteriorRecord] = []
    temps = tuple(cfg.temperatures)

    def add(method, temp, seed, probs, seconds, draws):
        m = classification_metrics(probs, yt)
        records.append(
            ColdPosteriorRecord(
                method, temp, seed, PREDICTIVE[method], m.nll, m.accuracy, m.ece, seconds, draws
            )
        )
        t = "" if temp is None else f" T={temp:g}"
        say(
            f"  [{time.perf_counter() - start_all:7.0f} s] {method}{t}: nll {m.nll:.4f} "
            f"acc {m.accuracy:.4f} ece {m.ece:.4f} ({seconds:.1f} s)"
        )

    def progress():
        if on_progress is not None:
            on_progress(records)

    say(
        f"data: {n} train / {len(yt)} test snippets, vocabulary {vocab}, "
        f"P = {sum(p.numel() for p in build_model(cfg, vocab, 0).parameters())} parameters"
    )
    for s in range(cfg.seeds):
        seed = base_seed + s
        say(f"seed {seed}")
        # MLE and MAP from the same initialisation.
        for method, prior in (("MLE", None), ("MAP", cfg.prior_variance)):
            t0 = time.perf_counter()
            net = build_model(cfg, vocab, seed)
            pot = make_potential(net, n, prior)
            params = train_adamw(
                pot,
                x,
                y,
                epochs=cfg.map_epochs,
                lr=cfg.adam_lr,
                batch_size=cfg.batch_size,
                generator=torch.Generator().manual_seed(seed),
            )
            add(
                method,
                None,
                seed,
                point_probs(net, params, xt, cfg.eval_batch),
                time.perf_counter() - t0,
                0,
            )
        map_params = params  # net, pot: the MAP's
        progress()

        # Laplace: the curvature once per seed at T = 1, tempered.
        for curvature, (q, seconds) in laplace_posteriors(
            net, x, y, cfg.prior_variance, cfg.batch_size
        ).items():
            name = f"Laplace {curvature.upper()}"
            share = seconds / len(temps)
            t0 = time.perf_counter()
            fg = linearised_function_space(net, q, xt, cfg.eval_batch)
            lin_share = (time.perf_counter() - t0) / len(temps)
            for temp in temps:
                t0 = time.perf_counter()
                gen = _generator(seed, name, temp, cfg.device)
                draws = q.tempered(temp).sample(cfg.param_draws, gen)
                probs = sampled_probs(net, draws, xt, cfg.eval_batch)
                add(name, temp, seed, probs, share + time.perf_counter() - t0, cfg.param_draws)
                t0 = time.perf_counter()
                probs = linearised_probs(fg, temp, cfg.logit_draws, gen)
                add(
                    f"{name} (linearised)",
                    temp,
                    seed,
                    probs,
                    share + lin_share + time.perf_counter() - t0,
                    cfg.param_draws,
                )
        progress()

        # VI: one fit per temperature, from the MAP mean.
        for temp in temps:
            t0 = time.perf_counter()
            gen = _generator(seed, "VI", temp, cfg.device)
            q = fit_vi(pot, map_params, x, y, temperature=temp, cfg=cfg, generator=gen)
            fit_seconds = time.perf_counter() - t0
            t0 = time.perf_counter()
            probs = sampled_probs(net, q.sample(cfg.param_draws, gen), xt, cfg.eval_batch)
            add("VI", temp, seed, probs, fit_seconds + time.perf_counter() - t0, cfg.param_draws)
            t0 = time.perf_counter()
            fg = linearised_function_space(net, q, xt, cfg.eval_batch)
            probs = linearised_probs(fg, 1.0, cfg.logit_draws, gen)
            add(
                "VI (linearised)",
                temp,
                seed,
                probs,
                fit_seconds + time.perf_counter() - t0,
                cfg.param_draws,
            )
        progress()

        # Serial SGHMC from the MAP.
        for temp in temps:
            t0 = time.perf_counter()
            gen = _generator(seed, "serial SGHMC", temp, cfg.device)
            chain = sghmc_serial(pot, map_params, x, y, temperature=temp, cfg=cfg, generator=gen)
            stacked = {k: torch.stack([d[k] for d in chain]) for k in chain[0]}
            probs = sampled_probs(net, stacked, xt, cfg.eval_batch)
            add("serial SGHMC", temp, seed, probs, time.perf_counter() - t0, len(chain))
        progress()

    # Parallel SGHMC: K chains from independent AdamW fits, one vectorised run per T.
    k = cfg.parallel_chains
    say(
        f"parallel SGHMC: {k} chains, AdamW start ({cfg.map_epochs} epochs), then "
        f"{cfg.parallel_epochs} SGHMC epochs per temperature"
    )
    t0 = time.perf_counter()
    nets = [build_model(cfg, vocab, 10_000 + base_seed * 1000 + c) for c in range(k)]
    starts = {
        name: torch.stack([dict(m.named_parameters())[name].detach() for m in nets])
        for name, _ in nets[0].named_parameters()
    }
    net = nets[0]
    pot = make_potential(net, n, cfg.prior_variance)
    gen = _generator(base_seed, "parallel SGHMC start", None, cfg.device)
    starts = train_adamw_parallel(
        pot,
        starts,
        x,
        y,
        epochs=cfg.map_epochs,
        lr=cfg.adam_lr,
        batch_size=cfg.batch_size,
        generator=gen,
    )
    start_share = (time.perf_counter() - t0) / (len(temps) + 1)
    subsets = ensemble_subsets(k, cfg.ensemble_size, cfg.seeds, base_seed)
    for temp in (0.0, *temps):
        t0 = time.perf_counter()
        gen = _generator(base_seed, "parallel SGHMC", temp, cfg.device)
        final = sghmc_parallel(pot, starts, x, y, temperature=temp, cfg=cfg, generator=gen)
        member_probs = sampled_probs(net, final, xt, cfg.eval_batch, members=True)  # (K, B)
        seconds = start_share + time.perf_counter() - t0
        for s, subset in enumerate(subsets):
            method = "deep ensemble" if temp == 0.0 else "parallel SGHMC"
            add(
                method,
                None if temp == 0.0 else temp,
                base_seed + s,
                member_probs[subset].mean(0),
                seconds,
                len(subset),
            )
        progress()
    say(f"total {time.perf_counter() - start_all:.0f} s")
    return records


# ============================================================================ summaries
def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    sd = (
        math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    )
    return m, sd


def summarise(records: Sequence[ColdPosteriorRecord]) -> list[dict]:
    """Mean and sd over seeds per (method, temperature), in :data:`METHODS` order."""
    groups: dict[tuple[str, float | None], list[ColdPosteriorRecord]] = {}
    for r in records:
        groups.setdefault((r.method, r.temperature), []).append(r)
    order = {m: i for i, m in enumerate(METHODS)}
    out = []
    for (method, temp), rs in sorted(
        groups.items(), key=lambda kv: (order[kv[0][0]], -1 if kv[0][1] is None else kv[0][1])
    ):
        row = {"method": method, "temperature": temp, "seeds": len(rs)}
        for key in ("nll", "accuracy", "ece", "seconds"):
            row[f"{key}_mean"], row[f"{key}_sd"] = _mean_sd([getattr(r, key) for r in rs])
        out.append(row)
    return out


def format_cold_posterior(summary: Sequence[dict], key: str = "nll", digits: int = 3) -> str:
    """One row per method, one column per temperature: mean ± sd of ``key``."""
    temps = sorted({r["temperature"] for r in summary if r["temperature"] is not None})
    cell = lambda r: f"{r[f'{key}_mean']:.{digits}f} ± {r[f'{key}_sd']:.{digits}f}"  # noqa: E731
    width = 2 * digits + 7
    columns = [("method", 0), ("untempered", width), *((f"T={t:g}", width) for t in temps)]
    rows = []
    for method in METHODS:
        mine = {r["temperature"]: r for r in summary if r["method"] == method}
        if not mine:
            continue
        rows.append(
            [
                method,
                cell(mine[None]) if None in mine else "",
                *(cell(mine[t]) if t in mine else "" for t in temps),
            ]
        )
    return format_columns(columns, rows)


def format_timing(summary: Sequence[dict]) -> str:
    """Wall time per method: mean seconds per (temperature, seed) record and in all (the
    ensembles of one parallel run share its time, counted once)."""
    rows = []
    for method in METHODS:
        mine = [r for r in summary if r["method"] == method]
        if mine:
            per = sum(r["seconds_mean"] for r in mine) / len(mine)
            shared = PREDICTIVE[method] == "ensemble"
            total = sum(r["seconds_mean"] * (1 if shared else r["seeds"]) for r in mine)
            rows.append([method, f"{per:.1f}", f"{total:.0f}"])
    return format_columns([("method", 0), ("s per record", 12), ("s in all", 8)], rows)


# ============================================================================ figures
_STYLE = {
    "Laplace EF": ("tab:orange", "--"),
    "Laplace EF (linearised)": ("tab:orange", "-"),
    "Laplace GGN": ("tab:red", "--"),
    "Laplace GGN (linearised)": ("tab:red", "-"),
    "VI": ("tab:green", "-"),
    "VI (linearised)": ("tab:green", "--"),
    "serial SGHMC": ("tab:blue", "-"),
    "parallel SGHMC": ("tab:purple", "-"),
}
_REFERENCES = {"MAP": "black", "MLE": "grey", "deep ensemble": "tab:purple"}


def plot_cold_posterior(
    summary: Sequence[dict], key: str, path: str, *, with_mle: bool = False, title: str = ""
) -> str:
    """``key`` (``"nll"`` or ``"accuracy"``) against T per method (mean ± 1 sd over
    seeds), the untempered methods as horizontal lines with ±1 sd bands. Left: every
    method; right: without the sampled Laplace predictives (a closer scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.6))
    for ax, skip_sampled_laplace in zip(axes, (False, True), strict=True):
        for i, (method, (color, ls)) in enumerate(_STYLE.items()):
            if skip_sampled_laplace and method in ("Laplace EF", "Laplace GGN"):
                continue
            rows = sorted(
                (r for r in summary if r["method"] == method and r["temperature"] is not None),
                key=lambda r: r["temperature"],
            )
            if not rows:
                continue
            shift = 1.0 + 0.03 * (i - len(_STYLE) / 2)  # separate the error bars a little
            ax.errorbar(
                [r["temperature"] * shift for r in rows],
                [r[f"{key}_mean"] for r in rows],
                yerr=[r[f"{key}_sd"] for r in rows],
                color=color,
                ls=ls,
                marker="o",
                ms=4,
                capsize=3,
                label=method,
            )
        for method, color in _REFERENCES.items():
            if method == "MLE" and not with_mle:
                continue
            rows = [r for r in summary if r["method"] == method]
            if not rows:
                continue
            m, sd = rows[0][f"{key}_mean"], rows[0][f"{key}_sd"]
            label = "deep ensemble (parallel SGHMC, T=0)" if method == "deep ensemble" else method
            ax.axhline(
                m, color=color, ls=":" if method == "deep ensemble" else "-.", lw=1.3, label=label
            )
            ax.axhspan(m - sd, m + sd, color=color, alpha=0.1)
        ax.set_xscale("log")
        ax.set_xlabel("temperature T")
        ax.set_ylabel({"nll": "test loss (NLL per snippet)", "accuracy": "test accuracy"}[key])
        ax.grid(alpha=0.3)
        ax.set_title("all methods" if not skip_sampled_laplace else "without sampled Laplace")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=6, fontsize=8, frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ============================================================================ the command
def config_from_args(args: argparse.Namespace) -> ColdPosteriorConfig:
    cfg = ColdPosteriorConfig(device=args.device)
    if args.quick:
        cfg = dataclasses.replace(cfg, **QUICK)
    if args.seeds is not None:
        cfg = dataclasses.replace(cfg, seeds=args.seeds)
    if args.temperatures is not None:
        cfg = dataclasses.replace(cfg, temperatures=tuple(args.temperatures))
    if args.prior_variance is not None:
        cfg = dataclasses.replace(cfg, prior_variance=args.prior_variance)
    return cfg


def write_outputs(records, cfg, args, out: str, figures: bool = True) -> list[str]:
    """The records (JSON, CSV), the summary (CSV) and, with ``figures``, the PNGs."""
    meta = {"seed": args.seed, "quick": args.quick, **dataclasses.asdict(cfg)}
    paths = write_rows(records, os.path.join(out, "cold_posterior"), meta)
    summary = summarise(records)
    import csv

    summary_path = os.path.join(out, "cold_posterior_summary.csv")
    with open(summary_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(summary[0]))
        writer.writeheader()
        for row in summary:
            writer.writerow({k: "" if v is None else v for k, v in row.items()})
    paths.append(summary_path)
    if figures:
        paths.append(
            plot_cold_posterior(
                summary,
                "nll",
                os.path.join(out, "cold_posterior_loss.png"),
                title="Test loss vs temperature (Figure 4)",
            )
        )
        paths.append(
            plot_cold_posterior(
                summary,
                "nll",
                os.path.join(out, "cold_posterior_loss_mle.png"),
                with_mle=True,
                title="Test loss vs temperature, MLE included (Figure 8)",
            )
        )
        paths.append(
            plot_cold_posterior(
                summary,
                "accuracy",
                os.path.join(out, "cold_posterior_accuracy.png"),
                with_mle=True,
                title="Test accuracy vs temperature (Figure 9)",
            )
        )
    return paths


def read_records(path: str) -> tuple[list[ColdPosteriorRecord], dict]:
    """The records and settings of a ``cold_posterior.json``."""
    with open(path) as f:
        doc = json.load(f)
    return [ColdPosteriorRecord(**row) for row in doc["rows"]], doc["settings"]


def main(args: argparse.Namespace) -> int:
    """``pyro-sgmcmc cold-posterior``: run (or, with ``--replot``, read ``args.out``'s
    records), print the tables, write the files to ``args.out``."""
    torch.set_num_threads(args.threads)
    out = ensure_dir(args.out)
    start = time.perf_counter()
    if getattr(args, "replot", False):
        records, settings = read_records(os.path.join(out, "cold_posterior.json"))
        fields = {f.name for f in dataclasses.fields(ColdPosteriorConfig)}
        cfg = ColdPosteriorConfig(**{k: v for k, v in settings.items() if k in fields})
        cfg.temperatures = tuple(cfg.temperatures)
        args.seed, args.quick = settings.get("seed", args.seed), settings.get("quick", False)
    else:
        cfg = config_from_args(args)
        records = run_cold_posterior(
            cfg,
            base_seed=args.seed,
            on_progress=lambda rs: write_outputs(rs, cfg, args, out, figures=False),
        )
    summary = summarise(records)
    print("\nTest NLL (mean ± sd over seeds):")
    print(format_cold_posterior(summary, "nll"))
    print("\nTest accuracy:")
    print(format_cold_posterior(summary, "accuracy"))
    print("\nTest ECE:")
    print(format_cold_posterior(summary, "ece"))
    print("\nWall time:")
    print(format_timing(summary))
    paths = write_outputs(records, cfg, args, out)
    print(f"\nwrote {', '.join(paths)}")
    print(f"total {time.perf_counter() - start:.0f} s")
    return 0
