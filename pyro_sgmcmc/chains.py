"""Many chains as one vectorised batch: :class:`MCMC`, a drop-in ``pyro.infer.MCMC``.

With ``chain_method="vectorized"`` the ``C`` chains of an SGMCMC kernel advance
together as one batch: one ``torch.func.vmap``-ed gradient per step (not a Python loop
over chains), each chain with its own minibatches and noise. Warm-up adaptation is
pooled over the chains (one preconditioner, one gradient-noise estimate, one
control-variate centre), which makes it more accurate than any single chain's.

At ``temperature=0`` each chain is an independent optimiser run: a deep ensemble. At
``temperature > 0`` the last draws of many short chains are the seed paper's
"parallel SGMCMC" (keep only them with ``keep="last"``).

``chain_method="sequential"`` runs the chains one after another in this process;
``"parallel"`` is Pyro's own behaviour (processes when the cores allow).
"""

from __future__ import annotations

import os
from typing import Any

import pyro
import pyro.infer
import torch
from pyro.infer.mcmc.api import _UnarySampler
from tqdm.auto import tqdm

from pyro_sgmcmc.kernels import SGMCMCKernel

__all__ = ["MCMC"]


class MCMC(pyro.infer.MCMC):
    """``pyro.infer.MCMC`` with vectorised chains for the SGMCMC kernels.

    Args:
        kernel: an SGMCMC kernel (for ``"vectorized"``), or any Pyro kernel otherwise.
        num_samples: draws kept per chain (each ``kernel.thinning`` steps apart).
        warmup_steps: warm-up steps (default ``num_samples``, as Pyro).
        initial_params: unconstrained initial values with a leading chain dimension.
        num_chains: number of chains ``C``.
        chain_method: ``"vectorized"``, ``"sequential"`` or ``"parallel"`` (Pyro's).
        keep: ``"all"`` draws, or only the ``"last"`` draw of each chain (memory
            ``C x params`` however long the run; ``num_samples`` then counts steps).
        checkpoint: a file path: the run (kernel state, generator states, draws so far)
            is saved there every ``checkpoint_every`` steps, and a run that finds the
            file resumes from it, producing exactly the draws of an uninterrupted run.
            Build the kernel and ``MCMC`` with the same arguments to resume.
        checkpoint_every: steps between checkpoints.
        chain_rng: ``"batched"`` (one generator for all chains, fastest) or
            ``"per_chain"``: chain ``c`` draws its noise and minibatches from its own
            generator seeded ``kernel.rng_seed + c``, so it reproduces the run of that
            chain alone with ``rng_seed=kernel.rng_seed + c`` (up to floating-point
            rounding, and when warm-up adaptation, which pools the chains, is off).
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
        checkpoint: str | os.PathLike | None = None,
        checkpoint_every: int = 100,
        hook_fn=None,
        mp_context=None,
        disable_progbar: bool = False,
        disable_validation: bool = True,
        transforms: dict | None = None,
        save_params: list[str] | None = None,
    ) -> None:
        if chain_method not in ("vectorized", "sequential", "parallel"):
            raise ValueError(
                f"chain_method must be 'vectorized', 'sequential' or 'parallel', got "
                f"{chain_method!r}"
            )
        if chain_rng not in ("batched", "per_chain"):
            raise ValueError(f"chain_rng must be 'batched' or 'per_chain', got {chain_rng!r}")
        if keep not in ("all", "last"):
            raise ValueError(f"keep must be 'all' or 'last', got {keep!r}")
        if chain_method == "vectorized" and not isinstance(kernel, SGMCMCKernel):
            raise ValueError(
                "chain_method='vectorized' needs an SGMCMC kernel (SGHMCKernel, ...); use "
                "chain_method='parallel' or 'sequential' for NUTS and other Pyro kernels"
            )
        if keep == "last" and chain_method != "vectorized":
            raise ValueError("keep='last' is available with chain_method='vectorized'")
        if checkpoint is not None and chain_method != "vectorized":
            raise ValueError("checkpoint is available with chain_method='vectorized'")
        if checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
        self.checkpoint, self.checkpoint_every = checkpoint, checkpoint_every
        self.chain_method, self.keep, self.chain_rng = chain_method, keep, chain_rng
        vectorized = chain_method == "vectorized"
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
        if self.chain_method != "vectorized":
            super().run(*args, **kwargs)
            return
        with pyro.poutine.block(), pyro.validation_enabled(not self.disable_validation):
            self._run_vectorized(*args, **kwargs)

    def _run_vectorized(self, *args, **kwargs) -> None:
        self._args, self._kwargs = args, kwargs
        args = [a.detach() if torch.is_tensor(a) else a for a in args]
        kernel, chains = self.kernel, self.num_chains
        kernel.num_chains = chains
        kernel.per_chain_rng = self.chain_rng == "per_chain"
        if self._vector_initial_params is not None:
            kernel.initial_params = self._vector_initial_params
        resume = self._load_checkpoint()
        if resume is not None:
            kernel.initial_params = resume["initial_params"]
        try:
            kernel.setup(self.warmup_steps, *args, **kwargs)
            initial_params = kernel.initial_params
            params = initial_params
            names = self._save_params or sorted(params)
            kept: dict[str, list[torch.Tensor]] = {n: [] for n in names}
            start = 0
            if resume is not None:
                kernel.load_state_dict(resume["kernel"])
                kept, start = resume["kept"], resume["step"]
                params = dict(kernel._state.params)
            total = self.warmup_steps + self.num_samples
            with tqdm(
                total=total,
                initial=start,
                disable=self._disable_progbar,
                desc="Warmup" if start <= self.warmup_steps else "Sample",
            ) as bar:
                for i in range(start, total):
                    params = kernel.sample(params)
                    warm = i < self.warmup_steps
                    if self._hook is not None:
                        stage = "Warmup" if warm else "Sample"
                        self._hook(kernel, params, stage, i if warm else i - self.warmup_steps)
                    if not warm and (self.keep == "all" or i == total - 1):
                        for n in names:
                            kept[n].append(params[n].detach().clone())
                    if i == self.warmup_steps:
                        bar.set_description("Sample", refresh=False)
                    if i % 50 == 0 or i == total - 1:
                        bar.set_postfix(kernel.logging(), refresh=False)
                    bar.update()
                    if self.checkpoint is not None and (i + 1) % self.checkpoint_every == 0:
                        self._save_checkpoint(kernel, kept, i + 1, initial_params)
            diagnostics = kernel.diagnostics()
        finally:
            kernel.num_chains, kernel.per_chain_rng = None, False
            kernel.cleanup()
        samples = {n: torch.stack(v, dim=1) for n, v in kept.items()}  # (C, S, ...)
        if self.transforms is None:
            self.transforms = kernel.transforms or {}
        self._samples = {
            n: self.transforms[n].inv(z) if n in self.transforms else z for n, z in samples.items()
        }
        last = self.num_samples - 1
        self._diagnostics = [_chain_diagnostics(diagnostics, c) for c in range(chains)]
        if self.keep == "last":
            # Only the last draw is kept: a divergence index refers to it or to nothing.
            self.num_samples = 1
            for d in self._diagnostics:
                d["divergences"] = [0] if last in d.get("divergences", []) else []

    def _checkpoint_config(self) -> dict[str, Any]:
        return {
            "num_chains": self.num_chains,
            "num_samples": self.num_samples,
            "warmup_steps": self.warmup_steps,
            "keep": self.keep,
            "chain_rng": self.chain_rng,
        }

    def _load_checkpoint(self) -> dict[str, Any] | None:
        if self.checkpoint is None or not os.path.exists(self.checkpoint):
            return None
        saved = torch.load(self.checkpoint, weights_only=False)
        if saved["config"] != self._checkpoint_config():
            raise ValueError(
                f"checkpoint {self.checkpoint} was written by a run with {saved['config']}, "
                f"not {self._checkpoint_config()}: delete it or match the settings"
            )
        return saved

    def _save_checkpoint(self, kernel, kept, step: int, initial_params) -> None:
        """Write atomically: a run killed while writing keeps the previous checkpoint."""
        tmp = f"{self.checkpoint}.tmp"
        torch.save(
            {
                "config": self._checkpoint_config(),
                "step": step,
                "kept": kept,
                "kernel": kernel.state_dict(),
                "initial_params": initial_params,
            },
            tmp,
        )
        os.replace(tmp, self.checkpoint)


def _chain_diagnostics(diagnostics: dict[str, Any], chain: int) -> dict[str, Any]:
    """One chain's entries of a vectorised kernel's diagnostics."""
    out = {}
    for key, value in diagnostics.items():
        out[key] = value[chain] if isinstance(value, list) else value
    return out
