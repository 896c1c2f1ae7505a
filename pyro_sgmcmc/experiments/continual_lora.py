r"""Continual learning with LoRA over a sequence of books (the seed paper's section 5.2,
Figures 5 and 6, Appendix E), at CPU scale with SmolLM2-135M.

Episodes are books; the last 15% of each book is held out
(:func:`~pyro_sgmcmc.datasets.split_text`). A model is LoRA-adapted (r = 8, alpha = 32
on the query, key and output projections of the last decoder layer, as in the paper) on
one book after another; after every episode
each method's test loss (mean negative log-likelihood per token) is measured on every
book. The methods, all MAP estimates found with AdamW on the potential of
:func:`pyro_sgmcmc.hf.lm_potential`:

* ``online AdamW``: episode :math:`t` starts from episode :math:`t-1`'s adapters under the
  fixed :math:`\mathcal N(0, s_0^2)` prior (the plain fine-tune that forgets);
* ``online Laplace``: episode :math:`t`'s prior is episode :math:`t-1`'s diagonal
  empirical-Fisher Laplace posterior :math:`\mathcal N(\mu_{t-1}, \Lambda_{t-1}^{-1})` with
  :math:`\Lambda_t = \Lambda_{t-1} + \sum_{w \in \text{book } t} g_w g_w^\top|_{\text{diag}}`,
  :math:`\Lambda_0 = s_0^{-2}` and :math:`g_w` the gradient of window :math:`w`'s
  log-likelihood at :math:`\mu_t` (one quadratic penalty, Huszár's amendment of EWC;
  the penalty's strength is the posterior's precision, no tuned factor);
* ``offline AdamW``: at episode :math:`t`, training continues on all books so far (the
  adapters' capacity; not an online method);
* ``single-episode AdamW``: adapters trained from scratch on one book only: the
  baseline of Figure 6 (its loss on its own book).

Frozen-trunk caching (:func:`pyro_sgmcmc.hf.trunk_hidden`) runs the 29 frozen layers
once per window; every step then costs the last layer and the 576 x 49,152 output head.
``--quick`` runs the same pipeline on a tiny random Llama with a byte tokenizer.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from pyro_sgmcmc.datasets import load_books, split_text
from pyro_sgmcmc.experiments.report import ensure_dir, write_rows

__all__ = [
    "METHODS",
    "ContinualLoraConfig",
    "ContinualRecord",
    "main",
    "relative_losses",
    "run_continual_lora",
]

METHODS = ("online AdamW", "online Laplace", "offline AdamW", "single-episode AdamW")

#: Moby Dick first: the later Austen novels are a different author, so forgetting it shows.
DEFAULT_BOOKS = ("moby_dick", "sense_and_sensibility", "pride_and_prejudice", "emma", "persuasion")


@dataclass
class ContinualLoraConfig:
    """Sizes of a run. Token counts are of the model's tokenizer."""

    model: str = "smollm2-135m"
    books: tuple[str, ...] = DEFAULT_BOOKS
    window: int = 256
    train_tokens: int = 12_288
    test_tokens: int = 2_048
    epochs: int = 1
    batch_size: int = 2
    lr: float = 5e-3
    prior_scale: float = 1.0
    lora_r: int = 8
    lora_alpha: float = 32.0
    held_out: float = 0.15
    skip_chars: int = 2_000
    ef_batch: int = 2
    laplace_scale: float = 1.0


QUICK = dict(
    model="tiny", books=DEFAULT_BOOKS[:3], window=32, train_tokens=640, test_tokens=192,
    epochs=2, batch_size=4, lr=1e-2, skip_chars=0,
)


@dataclass
class ContinualRecord:
    """The test loss of one method after one episode on one book."""

    method: str
    episode: int
    trained_on: str
    book: str
    book_index: int
    test_loss: float
    test_tokens: int
    seen: bool
    train_seconds: float
    seed: int


@dataclass
class _Book:
    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    train_cache: object = None
    test_cache: object = None
    extra: dict = field(default_factory=dict)


def _tokens(tok, text: str, n: int) -> Tensor:
    # Tokenise a prefix a little longer than needed (about 4 characters per token).
    ids: list[int] = []
    chars = 6 * n + 100
    while len(ids) < n + 1:
        ids = list(tok(text[:chars])["input_ids"])
        if chars >= len(text):
            break
        chars *= 2
    if len(ids) < n + 1:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than {n + 1}")
    return torch.tensor(ids[: n + 1])


def prepare_books(cfg: ContinualLoraConfig, tok) -> list[_Book]:
    from pyro_sgmcmc.hf import token_windows

    books = []
    texts = load_books(list(cfg.books))
    for name in cfg.books:
        train, test = split_text(texts[name], cfg.held_out)
        train = train[cfg.skip_chars :]
        tx, ty = token_windows(_tokens(tok, train, cfg.train_tokens), cfg.window)
        vx, vy = token_windows(_tokens(tok, test, cfg.test_tokens), cfg.window)
        books.append(_Book(name, tx, ty, vx, vy))
    return books


def _adamw(pot, params: dict[str, Tensor], batches: list, cfg, generator) -> dict[str, Tensor]:
    """AdamW on the potential (MAP), ``cfg.epochs`` passes over shuffled ``batches``."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    opt = torch.optim.AdamW(list(leaves.values()), lr=cfg.lr, weight_decay=0.0)
    for _ in range(cfg.epochs):
        for i in torch.randperm(len(batches), generator=generator).tolist():
            opt.zero_grad()
            pot.potential(leaves, batches[i]).backward()
            opt.step()
    return {k: v.detach() for k, v in leaves.items()}


def _batches(book_list: list[_Book], size: int, generator) -> list:
    """Mini-batches of windows (shuffled across the given books)."""
    items = [(b, i) for b in book_list for i in range(len(b.train_x))]
    order = torch.randperm(len(items), generator=generator).tolist()
    out = []
    for s in range(0, len(order), size):
        chunk = [items[j] for j in order[s : s + size]]
        hidden = torch.cat([b.train_cache.hidden[i : i + 1] for b, i in chunk])
        y = torch.cat([b.train_y[i : i + 1] for b, i in chunk])
        out.append(({"hidden": hidden}, y))
    return out


def _test_loss(model, head, book: _Book, params, batch: int = 4) -> tuple[float, int]:
    from pyro_sgmcmc.hf import head_logits, token_log_likelihood

    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(book.test_x), batch):
            y = book.test_y[s : s + batch]
            logits = head_logits(model, book.test_cache[s : s + batch], params, head=head)
            total += -float(token_log_likelihood(logits, y).sum())
            count += int((y != -100).sum())
    return total / count, count


def run_continual_lora(
    cfg: ContinualLoraConfig,
    *,
    seed: int = 0,
    methods: tuple[str, ...] = METHODS,
    log: Callable[[str], None] = print,
) -> list[ContinualRecord]:
    """Run every method over the episodes; one record per method x episode x book.

    Episode 0 is the model before any adaptation (LoRA B = 0, so the pretrained model),
    recorded once under every method.
    """
    from pyro_sgmcmc.hf import (
        CachedHead,
        add_lora,
        diag_empirical_fisher,
        laplace_diag,
        lm_potential,
        load_causal_lm,
        trainable_parameters,
        trunk_hidden,
    )

    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
    t0 = time.perf_counter()
    model, tok = load_causal_lm(cfg.model, seed=seed)
    model = add_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, seed=seed)
    books = prepare_books(cfg, tok)
    for b in books:
        b.train_cache = trunk_hidden(model, b.train_x, 1)
        b.test_cache = trunk_hidden(model, b.test_x, 1)
    log(f"trunk cached for {len(books)} books in {time.perf_counter() - t0:.0f} s")
    head = CachedHead(model, books[0].train_cache)
    init = {k: v.detach().clone() for k, v in trainable_parameters(model).items()}
    records: list[ContinualRecord] = []

    def record(method, episode, params, seconds):
        trained = books[episode - 1].name if episode else "(pretrained)"
        for j, b in enumerate(books):
            if method == "single-episode AdamW" and j != episode - 1:
                continue
            loss, n = _test_loss(model, head, b, params)
            records.append(ContinualRecord(
                method, episode, trained, b.name, j, loss, n, j < episode, seconds, seed))

    def potential(n, prior):
        return lm_potential(model, books[0].train_cache, num_data=n, prior=prior,
                            check_finite=False)

    for method in methods:
        if method != "single-episode AdamW":
            record(method, 0, init, 0.0)
    state = {m: init for m in methods}
    q = None  # online Laplace's posterior
    for t, book in enumerate(books, start=1):
        for method in methods:
            start = time.perf_counter()
            if method == "offline AdamW":
                seen = books[:t]
            else:
                seen = [book]
            # the same shuffles for every method in an episode: episode 1 is one fit
            gen = torch.Generator().manual_seed(1000 * seed + t)
            batches = _batches(seen, cfg.batch_size, gen)
            n = sum(len(b.train_x) for b in seen)
            if method == "online Laplace" and q is not None:
                # the previous posterior; a laplace_scale != 1 multiplies its precision
                scale = cfg.laplace_scale
                prior = (q if scale == 1.0 else q.tempered(1.0 / scale)).log_prob
            else:
                prior = cfg.prior_scale
            pot = potential(n, prior)
            start_params = init if method == "single-episode AdamW" else state[method]
            params = _adamw(pot, start_params, batches, cfg, gen)
            if method == "online Laplace":
                ef_batches = [
                    ({"hidden": book.train_cache.hidden[s : s + cfg.ef_batch]},
                     book.train_y[s : s + cfg.ef_batch])
                    for s in range(0, len(book.train_x), cfg.ef_batch)
                ]
                ef = diag_empirical_fisher(pot, params, ef_batches)
                prev = 1.0 / cfg.prior_scale**2 if q is None else q.precision
                q = laplace_diag(params, ef, prev)
                flat = torch.cat([v.flatten() for v in q.precision.values()])
                log(f"  Laplace precision after episode {t}: median {flat.median():.3g}, "
                    f"10%-90% {flat.quantile(0.1):.3g}-{flat.quantile(0.9):.3g}")
            seconds = time.perf_counter() - start
            state[method] = params
            record(method, t, params, seconds)
            mine = [r for r in records if r.method == method and r.episode == t]
            log(
                f"episode {t} ({book.name}) {method}: {seconds:.0f} s; test loss "
                + ", ".join(f"{r.book}={r.test_loss:.3f}" for r in mine)
            )
    log(f"total {time.perf_counter() - t0:.0f} s")
    return records


def relative_losses(records: list[ContinualRecord]) -> list[dict]:
    """Figure 6: per method and episode, the mean over the books seen so far of the test
    loss minus the single-episode baseline's loss on that book."""
    base = {r.book: r.test_loss for r in records if r.method == "single-episode AdamW"}
    out = []
    for m in sorted({r.method for r in records} - {"single-episode AdamW"}):
        for t in sorted({r.episode for r in records if r.method == m}):
            rows = [r for r in records if r.method == m and r.episode == t and r.seen]
            if not rows or any(r.book not in base for r in rows):
                continue
            rel = [r.test_loss - base[r.book] for r in rows]
            out.append({"method": m, "episode": t, "relative_loss": sum(rel) / len(rel),
                        "books": len(rel)})
    return out


_STYLE = {
    "online AdamW": ("tab:red", "-"),
    "online Laplace": ("tab:blue", "-"),
    "offline AdamW": ("tab:gray", "--"),
    "single-episode AdamW": ("black", ":"),
}


def plot_figure5(records: list[ContinualRecord], path: str) -> str:
    """One panel per book: test loss over episodes, episode boundaries dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    books = sorted({(r.book_index, r.book) for r in records})
    episodes = sorted({r.episode for r in records})
    fig, axes = plt.subplots(len(books), 1, figsize=(7, 1.9 * len(books)), sharex=True)
    axes = [axes] if len(books) == 1 else list(axes)
    for ax, (j, name) in zip(axes, books, strict=True):
        for m in [m for m in METHODS if m != "single-episode AdamW"]:
            rows = sorted((r.episode, r.test_loss) for r in records
                          if r.method == m and r.book == name)
            if rows:
                c, ls = _STYLE[m]
                ax.plot(*zip(*rows, strict=True), color=c, ls=ls, marker="o", ms=3, label=m)
        single = [r.test_loss for r in records
                  if r.method == "single-episode AdamW" and r.book == name]
        if single:
            ax.axhline(single[0], color="black", ls=":", lw=1, label="single-episode AdamW")
        for e in episodes[1:]:
            ax.axvline(e - 0.5, color="0.8", ls="--", lw=0.8)
        ax.axvspan(j + 0.5, j + 1.5, color="tab:green", alpha=0.08)
        ax.set_ylabel("test loss")
        ax.set_title(f"book {j + 1}: {name} (trained in episode {j + 1}, shaded)", fontsize=9)
    axes[0].legend(fontsize=7, ncol=2)
    axes[-1].set_xlabel("episode (0 = pretrained)")
    axes[-1].set_xticks(episodes)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_figure6(records: list[ContinualRecord], path: str) -> str:
    """Mean test loss over the books seen so far, relative to the single-episode baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rel = relative_losses(records)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for m in [m for m in METHODS if m != "single-episode AdamW"]:
        rows = sorted((r["episode"], r["relative_loss"]) for r in rel if r["method"] == m)
        if rows:
            c, ls = _STYLE[m]
            ax.plot(*zip(*rows, strict=True), color=c, ls=ls, marker="o", label=m)
    ax.axhline(0.0, color="black", ls=":", lw=1)
    if not rel:
        ax.text(0.5, 0.5, "no single-episode baseline in this run", ha="center",
                transform=ax.transAxes)
    ax.set_xlabel("episode")
    ax.set_xticks(sorted({r["episode"] for r in rel}) or [1])
    ax.set_ylabel("mean test loss over seen books\nminus single-episode AdamW")
    if rel:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def format_grid(records: list[ContinualRecord]) -> str:
    """A text table: rows method x episode, columns books (``*`` = not yet seen)."""
    books = sorted({(r.book_index, r.book) for r in records})
    lines = ["method                 ep  " + "  ".join(f"{n[:12]:>12}" for _, n in books)]
    keys = sorted({(METHODS.index(r.method), r.episode) for r in records})
    for mi, t in keys:
        cells = []
        for _, name in books:
            r = [r for r in records if r.method == METHODS[mi] and r.episode == t
                 and r.book == name]
            cells.append(f"{r[0].test_loss:>11.3f}{'' if r[0].seen else '*'}" if r else " " * 12)
        lines.append(f"{METHODS[mi]:<22} {t:>3}  " + "  ".join(f"{c:>12}" for c in cells))
    return "\n".join(lines)


def config_from_args(args: argparse.Namespace) -> ContinualLoraConfig:
    cfg = ContinualLoraConfig(**(QUICK if args.quick else {}))
    names = ("books", "train_tokens", "test_tokens", "epochs", "lr", "batch_size", "laplace_scale")
    for name in names:
        value = getattr(args, name, None)
        if value is not None:
            setattr(cfg, name, tuple(value) if name == "books" else value)
    return cfg


def main(args: argparse.Namespace) -> int:
    """``pyro-sgmcmc continual-lora``: run, print the grid, write records and figures."""
    torch.set_num_threads(args.threads)
    out = ensure_dir(args.out)
    cfg = config_from_args(args)
    start = time.perf_counter()
    methods = tuple(getattr(args, "methods", None) or METHODS)
    records = run_continual_lora(cfg, seed=args.seed, methods=methods)
    wall = time.perf_counter() - start
    print("\nTest loss per token (* = book not yet trained on):")
    print(format_grid(records))
    print("\nMean loss over seen books minus single-episode AdamW (Figure 6):")
    for r in relative_losses(records):
        print(f"  {r['method']:<16} episode {r['episode']}: {r['relative_loss']:+.4f}")
    meta = {"seed": args.seed, "quick": args.quick, "wall_seconds": round(wall, 1),
            "threads": args.threads, "methods": list(methods),
            **dataclasses.asdict(cfg)}
    paths = write_rows(records, os.path.join(out, "continual_lora"), meta)
    paths.append(plot_figure5(records, os.path.join(out, "continual_lora_books.png")))
    paths.append(plot_figure6(records, os.path.join(out, "continual_lora_relative.png")))
    print(f"\nwrote {', '.join(paths)}")
    print(f"total {wall:.0f} s")
    return 0 if all(math.isfinite(r.test_loss) for r in records) else 1
