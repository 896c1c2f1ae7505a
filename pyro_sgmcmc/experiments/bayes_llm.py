r"""A Bayesian language model that knows what it does not know (the seed paper's section
5.3, Tables 1-2, Figures 7 and 10, Appendix F) at CPU scale: ``pyro-sgmcmc bayes-llm``.

All weights of SmolLM2-135M's last attention layer (q, k, v, o: 884,736 parameters)
are fine-tuned on English prose (a novel, its lines unwrapped, random windows, the loss
on their last tokens) with everything else frozen and the trunk's hidden states cached
once: a parallel SGHMC ensemble (``members`` chains, one vmapped forward per step), a
serial SGHMC chain (draws along one trajectory), AdamW over seeds, and the base
model. Each predicts the last word (its first token) of the Universal Declaration of
Human Rights' paragraphs in English, Samoan, Hawaiian, Maori and Tongan; the records
hold, per method x language x seed, the loss, the mean TU, AU and EU of the
next-token distribution, and the AUROC of English against the language using TU and
EU. Pieces in :mod:`~pyro_sgmcmc.experiments.bayes_llm_methods`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pyro_sgmcmc.experiments.bayes_llm_methods import (
    adamw_runs,
    auroc,
    book_windows,
    generator_for,
    last_word_statements,
    member_log_probs,
    sghmc_parallel,
    sghmc_serial,
    statement_uncertainty,
    token_potential,
    window_batch,
)
from pyro_sgmcmc.experiments.report import ensure_dir, format_columns, write_rows

__all__ = [
    "METHODS",
    "QUICK",
    "BayesLLMConfig",
    "BayesLLMRecord",
    "combine_runs",
    "format_auroc_table",
    "main",
    "plot_uncertainties",
    "run_bayes_llm",
]

#: The methods, in the order of the tables.
METHODS = ("base", "AdamW", "serial SGHMC", "parallel SGHMC")


@dataclass
class BayesLLMConfig:
    """Every setting of a run (the defaults are the full run's)."""

    source: str = "smollm2-135m"
    book: str = "pride_and_prejudice"
    window: int = 64  # tokens per fine-tuning window
    scored: int = 16  # the loss is on each window's last `scored` tokens
    num_windows: int = 512
    heldout_windows: int = 32
    batch_size: int = 8
    prior_sd: float = 0.05  # N(pretrained, sd^2) on every weight of the layer
    # SGHMC's temperature: T = 1 (the posterior) costs English more than the
    # fine-tune gains (docs/experiments/bayes_llm.md); 0.01 keeps its noise small
    temperature: float = 0.01
    step_size: float = 1e-3
    alpha: float = 100.0  # momentum decay step_size * alpha = 0.1 (SGD momentum 0.9)
    members: int = 8
    parallel_steps: int = 150
    serial_steps: int = 600
    serial_burn_in: int = 150
    serial_draws: int = 8
    adamw_seeds: int = 3
    adamw_steps: int = 150
    adamw_lr: float = 3e-5
    languages: tuple[str, ...] = ("smo", "haw", "mri", "ton")
    max_statements: int | None = None  # per language (None: all aligned paragraphs)
    methods: tuple[str, ...] = METHODS


#: ``--quick``: a tiny random Llama and a few statements (under a minute).
QUICK = dict(
    source="tiny",
    window=24,
    scored=8,
    num_windows=24,
    heldout_windows=4,
    batch_size=4,
    members=3,
    parallel_steps=4,
    serial_steps=8,
    serial_burn_in=4,
    serial_draws=3,
    adamw_seeds=2,
    adamw_steps=4,
    languages=("smo", "haw"),
    max_statements=5,
)


@dataclass
class BayesLLMRecord:
    """One method on one language's statements (``seed``: the AdamW seed; ``None`` for
    the others, whose seed is the run's).

    ``loss``: mean over statements of :math:`-\\log \\bar p(\\text{target})`;
    ``tu``/``au``/``eu``: mean total, aleatoric and epistemic uncertainty (nats);
    ``auroc_tu``/``auroc_eu``: English (negative) vs this language (positive) on the
    same aligned paragraphs, scored by TU or EU (``None`` for English itself, and EU
    of a single model, which is 0); ``heldout_loss``: mean token loss on held-out
    windows of the book (the fine-tune's own check); ``seconds``: the method's
    fine-tuning wall time."""

    method: str
    language: str
    seed: int | None
    members: int
    statements: int
    loss: float
    tu: float
    au: float
    eu: float
    auroc_tu: float | None
    auroc_eu: float | None
    heldout_loss: float
    seconds: float


def _stack(params: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    return {n: v[None].expand(k, *v.shape).clone() for n, v in params.items()}


def _heldout_loss(potential_nll, members, cache, targets) -> float:
    """Mean token loss of the members' mixture on the held-out windows."""
    inputs, y = window_batch(cache, targets, torch.arange(len(cache)))
    with torch.no_grad():
        lp = torch.stack(
            [
                potential_nll({n: v[i] for n, v in members.items()}, inputs)
                for i in range(next(iter(members.values())).shape[0])
            ]
        )  # (S, B, T, V) log-probs
    log_mean = lp.logsumexp(0) - math.log(lp.shape[0])
    return float(-log_mean.gather(-1, y[..., None]).mean())


def run_bayes_llm(cfg: BayesLLMConfig, seed: int = 0, log=print) -> tuple[list, dict]:
    """Fine-tune, evaluate, score: the records and the per-statement scores."""
    from pyro_sgmcmc.datasets import load_books, load_udhr, split_text, unwrap_lines
    from pyro_sgmcmc.hf import (
        CachedHead,
        freeze_except,
        load_causal_lm,
        trainable_parameters,
        trunk_hidden,
    )

    t0 = time.perf_counter()
    model, tok = load_causal_lm(cfg.source, seed=seed)
    last = model.config.num_hidden_layers - 1
    freeze_except(model, [f"model.layers.{last}.self_attn"])
    theta0 = {n: v.detach().clone() for n, v in trainable_parameters(model).items()}
    log(f"model {cfg.source}: {sum(v.numel() for v in theta0.values()):,} Bayesian parameters")

    # --- fine-tuning windows (train: the book's first 85%; held out: its end), the
    # lines unwrapped as the statements are (one line per paragraph)
    train_text, held_text = map(unwrap_lines, split_text(load_books([cfg.book])[cfg.book]))
    g = generator_for(seed, "windows")
    x, y = book_windows(torch.tensor(tok(train_text)["input_ids"]), cfg.num_windows, cfg.window, g)
    hx, hy = book_windows(
        torch.tensor(tok(held_text)["input_ids"]), cfg.heldout_windows, cfg.window, g
    )
    y, hy = y[:, -cfg.scored :], hy[:, -cfg.scored :]
    cache = trunk_hidden(model, x, 1)
    held_cache = trunk_hidden(model, hx, 1)
    head = CachedHead(model, cache)
    num_data = y.numel()
    potential = token_potential(head, cfg.scored, theta0, cfg.prior_sd, num_data)
    log(
        f"{len(x)} windows of {cfg.window} tokens ({num_data} scored), cached in "
        f"{time.perf_counter() - t0:.0f} s"
    )

    def heldout(members):
        def logp(p, inputs):
            return torch.func.functional_call(
                head, p, (), {**inputs, "last": cfg.scored}
            ).log_softmax(-1)

        return _heldout_loss(logp, members, held_cache, hy)

    # --- statements
    udhr_eng = load_udhr(["eng"])
    eng_all = last_word_statements(udhr_eng.texts["eng"], udhr_eng.keys, tok)
    eng_by_key = {s.key: s for s in eng_all}
    pairs = {}
    for lang in cfg.languages:
        u = load_udhr(["eng", lang])
        keys = u.keys[: cfg.max_statements] if cfg.max_statements else u.keys
        pairs[lang] = (keys, last_word_statements(u.texts[lang][: len(keys)], keys, tok))
    eng_keys = sorted({k for keys, _ in pairs.values() for k in keys})
    eng = [eng_by_key[k] for k in eng_keys]

    # --- methods: each yields (seed, stacked members, seconds)
    kw = dict(
        step_size=cfg.step_size,
        alpha=cfg.alpha,
        temperature=cfg.temperature,
        num_data=num_data,
        batch_size=cfg.batch_size,
    )
    fits: dict[str, list] = {}
    for method in cfg.methods:
        start = time.perf_counter()

        def progress(t, u, method=method):
            log(f"  {method} step {t}: U = {[round(float(v), 3) for v in u]}")

        if method == "base":
            fits[method] = [(None, _stack(theta0, 1), 0.0)]
            continue
        if method == "AdamW":
            gens = [generator_for(seed + s, "AdamW") for s in range(cfg.adamw_seeds)]
            out = adamw_runs(
                potential,
                _stack(theta0, cfg.adamw_seeds),
                cache,
                y,
                steps=cfg.adamw_steps,
                batch_size=cfg.batch_size,
                lr=cfg.adamw_lr,
                generators=gens,
                on_step=progress,
            )
            secs = time.perf_counter() - start
            fits[method] = [
                (seed + s, {n: v[s : s + 1] for n, v in out.items()}, secs / cfg.adamw_seeds)
                for s in range(cfg.adamw_seeds)
            ]
        elif method == "serial SGHMC":
            out = sghmc_serial(
                potential,
                theta0,
                cache,
                y,
                steps=cfg.serial_steps,
                burn_in=cfg.serial_burn_in,
                draws=cfg.serial_draws,
                generator=generator_for(seed, method),
                on_step=progress,
                **kw,
            )
            fits[method] = [(None, out, time.perf_counter() - start)]
        elif method == "parallel SGHMC":
            out = sghmc_parallel(
                potential,
                _stack(theta0, cfg.members),
                cache,
                y,
                steps=cfg.parallel_steps,
                generator=generator_for(seed, method),
                on_step=progress,
                **kw,
            )
            fits[method] = [(None, out, time.perf_counter() - start)]
        else:
            raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
        log(f"{method}: fitted in {time.perf_counter() - start:.0f} s")

    # --- evaluation
    records, per_statement = [], {}
    for method, runs in fits.items():
        for run_seed, members, secs in runs:
            s = next(iter(members.values())).shape[0]
            held = heldout(members)
            scores = {}
            for lang, sts in [("eng", eng)] + [(lang, p[1]) for lang, p in pairs.items()]:
                lp = member_log_probs(model, sts, members)
                scores[lang] = statement_uncertainty(lp, torch.tensor([st.target for st in sts]))
            eng_index = {k: i for i, k in enumerate(eng_keys)}
            for lang, sc in scores.items():
                tu_auc = eu_auc = None
                if lang != "eng":
                    sel = torch.tensor([eng_index[k] for k in pairs[lang][0]])
                    tu_auc = auroc(scores["eng"].total[sel], sc.total)
                    eu_auc = auroc(scores["eng"].epistemic[sel], sc.epistemic) if s > 1 else None
                records.append(BayesLLMRecord(
                    method, lang, run_seed, s, len(sc.loss), float(sc.loss.mean()),
                    float(sc.total.mean()), float(sc.aleatoric.mean()), float(sc.epistemic.mean()),
                    tu_auc, eu_auc, held, secs,
                ))  # fmt: skip
                per_statement[f"{method}|{lang}|{run_seed}"] = {
                    k: [round(float(v), 6) for v in getattr(sc, k)]
                    for k in ("loss", "total", "aleatoric", "epistemic")
                }
            log(
                f"{method} (seed {run_seed}): English loss {float(scores['eng'].loss.mean()):.3f}, "
                f"held-out book loss {held:.3f}"
            )
    return records, per_statement


# ============================================================================ reporting
def _mean_sd(values: Sequence[float]) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "-"
    m = sum(vals) / len(vals)
    if len(vals) == 1:
        return f"{m:.3f}"
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))
    return f"{m:.3f} ± {sd:.3f}"


def format_auroc_table(records: Sequence[BayesLLMRecord]) -> str:
    """Tables 1-2's layout: per method and score (TU, EU), the AUROC for English against
    each language, and the loss per language (mean ± sd over AdamW seeds)."""
    langs = list(dict.fromkeys(r.language for r in records))
    others = [lang for lang in langs if lang != "eng"]
    rows = []
    for method in dict.fromkeys(r.method for r in records):
        rs = [r for r in records if r.method == method]
        for score in ("TU", "EU"):
            attr = f"auroc_{score.lower()}"
            if all(getattr(r, attr) is None for r in rs):
                continue
            cells = [f"{method} {score}"]
            cells += [
                _mean_sd([getattr(r, attr) for r in rs if r.language == lang]) for lang in others
            ]
            cells += [_mean_sd([r.loss for r in rs if r.language == lang]) for lang in langs]
            rows.append(cells)
    columns = [("method / score", 0)]
    columns += [(f"AUROC {lang}", 15) for lang in others]
    columns += [(f"loss {lang}", 15) for lang in langs]
    return format_columns(columns, rows)


def combine_runs(folders: Sequence[str]) -> list[BayesLLMRecord]:
    """The records of several runs (each folder's ``bayes_llm.json``), for a table over
    seeds: rows whose ``seed`` is ``None`` (one per run) get their run's seed.

    Each run must have its own seed, and all must share every other setting (checked).
    """
    records, seeds, settings = [], set(), None
    for folder in folders:
        with open(os.path.join(folder, "bayes_llm.json")) as f:
            data = json.load(f)
        meta = {k: v for k, v in data["settings"].items() if k not in ("seed", "seconds")}
        if settings is not None and meta != settings:
            diff = sorted(k for k in meta | settings if meta.get(k) != settings.get(k))
            raise ValueError(f"{folder}: settings differ from the first run's ({diff})")
        settings, seed = meta, data["settings"]["seed"]
        if seed in seeds:
            raise ValueError(f"{folder}: seed {seed} appears twice")
        seeds.add(seed)
        for row in data["rows"]:
            row = dict(row, seed=seed if row["seed"] is None else row["seed"])
            records.append(BayesLLMRecord(**row))
    return records


def plot_uncertainties(per_statement: dict, path: str, language: str = "smo") -> str:
    """Figures 7 and 10: histograms of TU and EU per method, English vs ``language``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(k.split("|")[0] for k in per_statement))
    fig, axes = plt.subplots(2, len(methods), figsize=(3.2 * len(methods), 5.5), squeeze=False)
    for j, method in enumerate(methods):
        for i, (key, name) in enumerate((("total", "TU"), ("epistemic", "EU"))):
            ax = axes[i][j]
            for lang, color in (("eng", "tab:blue"), (language, "tab:red")):
                vals = [
                    v
                    for k, d in per_statement.items()
                    if k.split("|")[:2] == [method, lang]
                    for v in d[key]
                ]
                if vals:
                    ax.hist(vals, bins=20, alpha=0.55, color=color, label=lang, density=True)
            ax.set_title(f"{method}: {name}", fontsize=9)
            ax.set_xlabel("nats", fontsize=8)
            if i == 0 and j == 0:
                ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def config_from_args(args: argparse.Namespace) -> BayesLLMConfig:
    cfg = BayesLLMConfig()
    if args.quick:
        cfg = dataclasses.replace(cfg, **QUICK)
    for name in (
        "members",
        "parallel_steps",
        "serial_steps",
        "adamw_seeds",
        "adamw_steps",
        "max_statements",
        "num_windows",
        "prior_sd",
        "temperature",
    ):
        value = getattr(args, name, None)
        if value is not None:
            cfg = dataclasses.replace(cfg, **{name: value})
    if getattr(args, "methods", None):
        cfg = dataclasses.replace(cfg, methods=tuple(args.methods))
    if getattr(args, "languages", None):
        cfg = dataclasses.replace(cfg, languages=tuple(args.languages))
    return cfg


def main(args: argparse.Namespace) -> int:
    """``pyro-sgmcmc bayes-llm``: run, print the table, write records and figures."""
    out = ensure_dir(args.out)
    if getattr(args, "combine", None):
        table = format_auroc_table(combine_runs(args.combine))
        with open(os.path.join(out, "bayes_llm_combined_table.txt"), "w") as f:
            f.write(table + "\n")
        print(table)
        return 0
    torch.set_num_threads(args.threads)
    cfg = config_from_args(args)
    start = time.perf_counter()
    records, per_statement = run_bayes_llm(cfg, seed=args.seed)
    meta = {
        "seed": args.seed,
        "quick": args.quick,
        **dataclasses.asdict(cfg),
        "seconds": round(time.perf_counter() - start, 1),
    }
    write_rows(records, os.path.join(out, "bayes_llm"), meta)
    with open(os.path.join(out, "bayes_llm_statements.json"), "w") as f:
        json.dump(per_statement, f)
    table = format_auroc_table(records)
    with open(os.path.join(out, "bayes_llm_table.txt"), "w") as f:
        f.write(table + "\n")
    plot_uncertainties(per_statement, os.path.join(out, "bayes_llm_uncertainty.png"))
    print(table)
    print(
        f"\nwrote {out}/bayes_llm.json, .csv, _table.txt, _statements.json, _uncertainty.png "
        f"({time.perf_counter() - start:.0f} s)"
    )
    return 0
