"""Many chains as one vectorised batch: :class:`MCMC`, a drop-in ``pyro.infer.MCMC``.

With ``chain_method="vectorized"`` the ``C`` chains of an SGMCMC kernel advance
together as one batch: one ``torch.func.vmap``-ed gradient per step (not a Python loop
over chains), each chain with its own minibatches and noise. Warm-up adaptation is
pooled over the chains (one preconditioner, one gradient-noise estimate, one
control-variate centre), which makes it more accurate than any single chain's.

At ``temperature=0`` each chain is an independent optimiser run: a deep ensemble. At
``temperature > 0`` the last draws of many short chains are the seed paper's
"parallel SGMCMC" (keep only them with ``keep="last"``).

``chain_method="distributed"`` spreads the chains over the processes of a ``torchrun``
launch, on one host or many, as one run (:mod:`pyro_sgmcmc.distributed`);
``"sequential"`` runs the chains one after another in this process; ``"parallel"`` is
Pyro's own behaviour (processes when the cores allow).

Long runs can save their state every ``checkpoint_every`` steps and resume exactly
(``checkpoint=PATH``), and stream their draws to disk instead of memory
(``stream_to=DIR``, :mod:`pyro_sgmcmc.store`).
"""

from __future__ import annotations

import operator
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyro
import pyro.infer
import torch
from pyro.infer.mcmc.api import _UnarySampler
from tqdm.auto import tqdm

from pyro_sgmcmc.distributed import ChainGroup
from pyro_sgmcmc.kernels import SGMCMCKernel
from pyro_sgmcmc.store import DiskSink, MemorySink, load_draws

__all__ = ["MCMC"]

_CHAIN_METHODS = ("vectorized", "distributed", "sequential", "parallel")


class MCMC(pyro.infer.MCMC):
    """``pyro.infer.MCMC`` with vectorised chains for the SGMCMC kernels.

    Args:
        kernel: an SGMCMC kernel (for ``"vectorized"``), or any Pyro kernel otherwise.
        num_samples: draws kept per chain (each ``kernel.thinning`` steps apart).
        warmup_steps: warm-up steps (default ``num_samples``, as Pyro).
        initial_params: unconstrained initial values with a leading chain dimension.
        num_chains: number of chains ``C``.
        chain_method: ``"vectorized"``, ``"distributed"`` (vectorised blocks of chains in
            the processes of a ``torchrun`` launch: :mod:`pyro_sgmcmc.distributed`),
            ``"sequential"`` or ``"parallel"`` (Pyro's).
        keep: ``"all"`` draws, or only the ``"last"`` draw of each chain (memory
            ``C x params`` however long the run; ``num_samples`` then counts steps).
        checkpoint: a file path: the run (kernel state, generator states, draws so far)
            is saved there every ``checkpoint_every`` steps, and a run that finds the
            file resumes from it, producing exactly the draws of an uninterrupted run.
            Build the kernel and ``MCMC`` with the same arguments to resume.
        checkpoint_every: steps between checkpoints.
        stream_to: a directory: draws are written there (one ``.npy`` per site, see
            :mod:`pyro_sgmcmc.store`) instead of held in memory, and ``get_samples``
            returns them memory-mapped. For models whose draws do not fit in memory.
        stream_every: draws buffered in memory between writes.
        gather: in a distributed run, collect every process's draws on rank 0 (the
            other ranks keep their own block: :attr:`chains` says which).
        chain_rng: ``"batched"`` (one generator for all chains, fastest) or
            ``"per_chain"``: chain ``c`` draws its noise and minibatches from its own
            generator seeded ``kernel.rng_seed + c``, so it reproduces the run of that
            chain alone with ``rng_seed=kernel.rng_seed + c`` (up to floating-point
            rounding, and when warm-up adaptation, which pools the chains, is off).
        chain_coupling: ``"independent"`` chains, or ``"antithetic"`` pairs: chains
            ``2k`` and ``2k + 1`` start together, share their minibatches and receive
            opposite injected noise. Each chain is still a valid sampler, but on a
            near-Gaussian posterior a pair stays mirrored about the mode, so averages
            over the chains (and the KSD of their last draws) have a smaller Monte Carlo
            error than independent draws give, as NUTS's anti-correlated draws do.
            Diagnostics that assume independent chains (R-hat) see the pairs as they
            are: use it for estimates, not for convergence checks.
        hook_fn: as in ``pyro.infer.MCMC``: called after every step.
        mp_context: as in ``pyro.infer.MCMC`` (``"parallel"`` only).
        disable_progbar: hide the progress bar.
        disable_validation: as in ``pyro.infer.MCMC``.
        transforms: as in ``pyro.infer.MCMC``.
        save_params: as in ``pyro.infer.MCMC``: the sites to keep.

    Examples:
        >>> import pyro, pyro.distributions as dist, torch
        >>> from pyro_sgmcmc import MCMC, SGHMCKernel
        >>> def model(y):
        ...     mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        ...     with pyro.plate("data", len(y)) as idx:
        ...         pyro.sample("obs", dist.Normal(mu, 1.0), obs=y[idx])
        >>> y = 3.0 + torch.randn(500)
        >>> mcmc = MCMC(SGHMCKernel(model, subsample_size=25), num_samples=200,
        ...             warmup_steps=300, num_chains=64, disable_progbar=True)
        >>> mcmc.run(y)
        >>> mcmc.get_samples(group_by_chain=True)["mu"].shape
        torch.Size([64, 200])
    """

    def __init__(
        self,
        kernel,
        num_samples: int,
        warmup_steps: int | None = None,
        initial_params: dict | None = None,
        num_chains: int = 1,
        chain_method: str = "vectorized",
        keep: str = "all",
        chain_rng: str = "batched",
        chain_coupling: str = "independent",
        checkpoint: str | os.PathLike | None = None,
        checkpoint_every: int = 100,
        stream_to: str | os.PathLike | None = None,
        stream_every: int = 100,
        gather: bool = True,
        hook_fn=None,
        mp_context=None,
        disable_progbar: bool = False,
        disable_validation: bool = True,
        transforms: dict | None = None,
        save_params: list[str] | None = None,
    ) -> None:
        _check_count("num_samples", num_samples, 1)
        _check_count("num_chains", num_chains, 1)
        if warmup_steps is not None:
            _check_count("warmup_steps", warmup_steps, 0)
        if chain_method not in _CHAIN_METHODS:
            raise ValueError(f"chain_method must be one of {_CHAIN_METHODS}, got {chain_method!r}")
        if chain_rng not in ("batched", "per_chain"):
            raise ValueError(f"chain_rng must be 'batched' or 'per_chain', got {chain_rng!r}")
        if chain_coupling not in ("independent", "antithetic"):
            raise ValueError(
                f"chain_coupling must be 'independent' or 'antithetic', got {chain_coupling!r}"
            )
        if chain_coupling == "antithetic" and (
            chain_method != "vectorized" or chain_rng != "batched" or num_chains % 2
        ):
            raise ValueError(
                "chain_coupling='antithetic' pairs chains 2k and 2k + 1 of one vectorised "
                "batch: it needs chain_method='vectorized', chain_rng='batched' and an even "
                f"num_chains (got {chain_method!r}, {chain_rng!r}, {num_chains})"
            )
        if keep not in ("all", "last"):
            raise ValueError(f"keep must be 'all' or 'last', got {keep!r}")
        vectorized = chain_method in ("vectorized", "distributed")
        if vectorized and not isinstance(kernel, SGMCMCKernel):
            raise ValueError(
                f"chain_method={chain_method!r} needs an SGMCMC kernel (SGHMCKernel, ...); use "
                "chain_method='parallel' or 'sequential' for NUTS and other Pyro kernels"
            )
        for name, value in (("keep='last'", keep == "last"), ("checkpoint", checkpoint),
                            ("stream_to", stream_to)):  # fmt: skip
            if value and not vectorized:
                raise ValueError(
                    f"{name} is available with chain_method='vectorized' or 'distributed'"
                )
        if checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
        if stream_every < 1:
            raise ValueError(f"stream_every must be >= 1, got {stream_every}")
        self.checkpoint, self.checkpoint_every = checkpoint, checkpoint_every
        self.stream_to, self.stream_every, self.gather = stream_to, stream_every, gather
        self.chain_method, self.keep, self.chain_rng = chain_method, keep, chain_rng
        self.chain_coupling = chain_coupling
        self.group: ChainGroup | None = None
        super().__init__(
            kernel,
            num_samples,
            warmup_steps=warmup_steps,
            initial_params=None if vectorized else initial_params,
            num_chains=1 if vectorized else num_chains,
            hook_fn=hook_fn,
            mp_context=mp_context,
            disable_progbar=disable_progbar,
            disable_validation=disable_validation,
            transforms=transforms,
            save_params=save_params,
        )
        self.num_chains = num_chains
        self._diagnostics = [None] * num_chains
        self._vector_initial_params = initial_params if vectorized else None
        self._disable_progbar, self._hook = disable_progbar, hook_fn
        self._save_params = save_params
        if chain_method == "sequential" and num_chains > 1:
            self.sampler = _UnarySampler(
                kernel,
                num_samples,
                self.warmup_steps,
                num_chains,
                disable_progbar,
                initial_params=initial_params,
                hook=hook_fn,
            )

    def run(self, *args, **kwargs) -> None:
        """Run the chains; as ``pyro.infer.MCMC.run``."""
        if self.chain_method not in ("vectorized", "distributed"):
            super().run(*args, **kwargs)
            return
        with pyro.poutine.block(), pyro.validation_enabled(not self.disable_validation):
            self._run_vectorized(*args, **kwargs)

    def _setup_kernel(self, args, kwargs, resume) -> None:
        """Set the kernel up for this process's chains (all of them, or a block)."""
        kernel, group = self.kernel, self.group
        initial = self._vector_initial_params
        if resume is not None:
            initial = None  # the checkpoint's, this process's block already
            kernel.initial_params = resume["initial_params"]
        if group is None:
            kernel.num_chains = self.num_chains
            if initial is not None:
                kernel.initial_params = initial
            kernel.setup(self.warmup_steps, *args, **kwargs)
            return
        kernel.num_chains, kernel.chain_group = group.count, group
        block = slice(group.offset, group.offset + group.count)
        if initial is not None:
            kernel.initial_params = {k: torch.as_tensor(v)[block] for k, v in initial.items()}
            kernel.setup(self.warmup_steps, *args, **kwargs)
            return
        # Initial points from a stream that differs per process but not per call.
        seed = group.broadcast_object(int(torch.randint(0, 2**62, ()).item()))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + group.rank)
            kernel.setup(self.warmup_steps, *args, **kwargs)

    def _run_vectorized(self, *args, **kwargs) -> None:
        self._args, self._kwargs = args, kwargs
        args = [a.detach() if torch.is_tensor(a) else a for a in args]
        kernel = self.kernel
        self.group = None
        if self.chain_method == "distributed":
            device = _device_of(args, kwargs)
            self.group = ChainGroup(self.num_chains, device)
        chains = self.num_chains if self.group is None else self.group.count
        kernel.per_chain_rng = self.chain_rng == "per_chain"
        kernel.antithetic = self.chain_coupling == "antithetic"
        resume = _load_checkpoint(self)
        try:
            self._setup_kernel(args, kwargs, resume)
            initial_params = kernel.initial_params
            params = initial_params
            if self.transforms is None:
                self.transforms = kernel.transforms or {}
            names = self._save_params or sorted(params)
            sink = _make_sink(self, chains)
            start = 0
            if resume is not None:
                kernel.load_state_dict(resume["kernel"])
                sink.load_state_dict(resume["sink"])
                start = resume["step"]
                params = dict(kernel.current_params)
            total = self.warmup_steps + self.num_samples
            disable = self._disable_progbar or (self.group is not None and not self.group.is_main)
            progress = Progress(
                self.warmup_steps, self.num_samples, getattr(kernel, "thinning", 1),
                chains, start=start, disable=disable,
            )  # fmt: skip
            with progress:
                for i in range(start, total):
                    params = kernel.sample(params)
                    warm = i < self.warmup_steps
                    if self._hook is not None:
                        stage = "Warmup" if warm else "Sample"
                        self._hook(kernel, params, stage, i if warm else i - self.warmup_steps)
                    if not warm and (self.keep == "all" or i == total - 1):
                        sink.append({n: self._constrain(n, params[n]) for n in names})
                    progress.update(i, kernel.logging)
                    if self.checkpoint is not None and (i + 1) % self.checkpoint_every == 0:
                        _save_checkpoint(self, kernel, sink, i + 1, initial_params)
            sink.close()
            diagnostics = kernel.diagnostics()
        finally:
            kernel.num_chains, kernel.per_chain_rng, kernel.chain_group = None, False, None
            kernel.antithetic = False
            kernel.cleanup()
        self._samples = sink.result()
        last = self.num_samples - 1
        self._diagnostics = [_chain_diagnostics(diagnostics, c) for c in range(chains)]
        if self.keep == "last":
            # Only the last draw is kept: a divergence index refers to it or to nothing.
            self.num_samples = 1
            for d in self._diagnostics:
                d["divergences"] = [0] if last in d.get("divergences", []) else []
        if self.group is not None and self.gather:
            _gather(self)

    def _constrain(self, name: str, value: torch.Tensor) -> torch.Tensor:
        transform = self.transforms.get(name)
        return value if transform is None else transform.inv(value)

    def diagnostics(self):
        """As ``pyro.infer.MCMC.diagnostics``, over the chains this process holds."""
        with self._held_chains():
            return super().diagnostics()

    def summary(self, prob: float = 0.9) -> None:
        """As ``pyro.infer.MCMC.summary``, over the chains this process holds, with the
        kernel's warm-up problems (if any) printed first."""
        for problem in getattr(self.kernel, "warmup_report", {}).get("problems", []):
            print(f"WARM-UP PROBLEM: {problem}")
        with self._held_chains():
            super().summary(prob)

    @contextmanager
    def _held_chains(self):
        # A distributed rank (other than a gathering rank 0) holds a block of the chains.
        total = self.num_chains
        self.num_chains = len(self._diagnostics)
        try:
            yield
        finally:
            self.num_chains = total

    @property
    def chains(self) -> range:
        """The global indices of the chains whose draws this process holds."""
        group = getattr(self, "group", None)
        if group is None or (self.gather and group.is_main):
            return range(self.num_chains)
        return range(group.offset, group.offset + group.count)


class Progress:
    """The progress of a run in sampler steps (a thinned draw costs ``thinning`` steps).

    On a terminal, a tqdm bar with the kernel's figures; when stderr is not a terminal
    (a log file, CI), a few plain lines instead: the start, the end of warm-up, each
    quarter of the run and its end.
    """

    def __init__(
        self, warmup: int, samples: int, thinning: int, chains: int, *, start: int = 0,
        disable: bool = False, stream=None,
    ) -> None:  # fmt: skip
        self.warmup, self.thinning = warmup, thinning
        self.total = warmup + samples * thinning
        self.chains, self.start, self.disable = chains, start, disable
        self.stream = sys.stderr if stream is None else stream
        isatty = getattr(self.stream, "isatty", None)
        self.tty = bool(isatty and isatty())
        self._bar = None
        self._marks: list[int] = []
        self._t0 = time.perf_counter()

    def steps(self, iteration: int) -> int:
        """Sampler steps done after ``iteration`` calls of the kernel."""
        extra = max(iteration - self.warmup, 0)
        return min(iteration, self.warmup) + extra * self.thinning

    def __enter__(self) -> Progress:
        if self.disable:
            return self
        done = self.steps(self.start)
        if self.tty:
            self._bar = tqdm(
                total=self.total, initial=done, file=self.stream, unit="step",
                desc="Warmup" if self.start < self.warmup else "Sample",
            )  # fmt: skip
        else:
            self._marks = sorted({self.warmup, *(self.total * q // 4 for q in (1, 2, 3, 4))})
            self._marks = [m for m in self._marks if done < m]
            chains = f"{self.chains} chain{'s' if self.chains != 1 else ''}"
            self._line(
                f"MCMC: {chains}, {self.warmup} warm-up + {self.total - self.warmup} sampling "
                f"steps (thinning {self.thinning})" + (f", resuming at step {done}" if done else "")
            )
        return self

    def update(self, iteration: int, logging) -> None:
        """Record that call ``iteration`` (0-based) of the kernel is done."""
        if self.disable:
            return
        before, after = self.steps(iteration), self.steps(iteration + 1)
        stage = "Warmup" if iteration < self.warmup else "Sample"
        if self._bar is not None:
            if iteration == self.warmup:
                self._bar.set_description("Sample", refresh=False)
            first = iteration == self.start
            if first or iteration % 50 == 0 or after == self.total:
                self._bar.set_postfix(logging(), refresh=False)
            self._bar.update(after - before)
            return
        if self._marks and after >= self._marks[0]:
            while self._marks and after >= self._marks[0]:
                self._marks.pop(0)
            figures = ", ".join(f"{k}={v}" for k, v in logging().items())
            self._line(
                f"{stage}: step {after}/{self.total} ({100 * after // self.total}%), "
                f"{time.perf_counter() - self._t0:.1f} s" + (f", {figures}" if figures else "")
            )

    def _line(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.close()


def _check_count(name: str, value: Any, low: int) -> None:
    """A ``ValueError`` at construction for a count that is not an integer >= ``low``."""
    try:
        ok = not isinstance(value, bool) and operator.index(value) >= low
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _device_of(args, kwargs) -> torch.device:
    """The device of the model's first tensor argument (CPU if it has none)."""
    for value in (*args, *kwargs.values()):
        if torch.is_tensor(value):
            return value.device
    return torch.device("cpu")


def _chain_diagnostics(diagnostics: dict[str, Any], chain: int) -> dict[str, Any]:
    """One chain's entries of a vectorised kernel's diagnostics."""
    out = {}
    for key, value in diagnostics.items():
        out[key] = value[chain] if isinstance(value, list) else value
    return out


def _make_sink(mcmc: MCMC, chains: int) -> MemorySink | DiskSink:
    """Where ``mcmc``'s draws go: memory, or this process's directory under ``stream_to``."""
    if mcmc.stream_to is None:
        return MemorySink()
    directory = Path(mcmc.stream_to)
    if mcmc.group is not None:
        directory = directory / f"rank-{mcmc.group.rank:05d}"
    draws = 1 if mcmc.keep == "last" else mcmc.num_samples
    return DiskSink(directory, chains, draws, flush_every=mcmc.stream_every)


def _gather(mcmc: MCMC) -> None:
    """Rank 0 receives every rank's draws and diagnostics; the others keep theirs."""
    group = mcmc.group
    samples = None if mcmc.stream_to is not None else mcmc._samples
    parts = group.gather_objects((samples, mcmc._diagnostics))
    if not group.is_main:
        return
    if mcmc.stream_to is not None:
        mcmc._samples = load_draws(mcmc.stream_to)
    else:
        mcmc._samples = {n: torch.cat([p[0][n] for p in parts], dim=0) for n in mcmc._samples}
    mcmc._diagnostics = [d for p in parts for d in p[1]]


def _checkpoint_config(mcmc: MCMC) -> dict[str, Any]:
    """The settings a checkpoint must have been written with to be resumed."""
    return {
        "num_chains": mcmc.num_chains,
        "num_samples": mcmc.num_samples,
        "warmup_steps": mcmc.warmup_steps,
        "keep": mcmc.keep,
        "chain_rng": mcmc.chain_rng,
        "stream_to": None if mcmc.stream_to is None else str(mcmc.stream_to),
        "processes": 1 if mcmc.group is None else mcmc.group.world_size,
    }


def _checkpoint_path(mcmc: MCMC) -> str | None:
    """One file per process in a distributed run."""
    if mcmc.checkpoint is None or mcmc.group is None:
        return mcmc.checkpoint
    return f"{mcmc.checkpoint}.rank-{mcmc.group.rank:05d}"


def _load_checkpoint(mcmc: MCMC) -> dict[str, Any] | None:
    path = _checkpoint_path(mcmc)
    if path is None or not os.path.exists(path):
        return None
    saved = torch.load(path, weights_only=False)
    if saved["config"] != _checkpoint_config(mcmc):
        raise ValueError(
            f"checkpoint {path} was written by a run with {saved['config']}, "
            f"not {_checkpoint_config(mcmc)}: delete it or match the settings"
        )
    return saved


def _save_checkpoint(mcmc: MCMC, kernel, sink, step: int, initial_params) -> None:
    """Write atomically: a run killed while writing keeps the previous checkpoint.
    Streamed draws are flushed first, so the checkpoint never counts unwritten ones."""
    path = _checkpoint_path(mcmc)
    tmp = f"{path}.tmp"
    torch.save(
        {
            "config": _checkpoint_config(mcmc),
            "step": step,
            "sink": sink.state_dict(),
            "kernel": kernel.state_dict(),
            "initial_params": initial_params,
        },
        tmp,
    )
    os.replace(tmp, path)
