r"""The MCMCKernel glue shared by the SGMCMC kernels.

A kernel wires four small pieces together and runs their loop:

* a **potential** (:class:`~pyro_sgmcmc.potential.PyroPotential` from a Pyro model, or
  a user's ``potential_fn``) and an initial point (:mod:`~pyro_sgmcmc.kernels.init`);
* a **gradient estimator** (:mod:`~pyro_sgmcmc.kernels.gradients`: minibatch, with
  control variates by default when the per-example table fits);
* a **whitening** :math:`\theta = \mu + L z` (:mod:`~pyro_sgmcmc.kernels.whitening`):
  the sampler runs on :math:`z`, so a dense or diagonal mass matrix is one mechanism;
* a **warm-up adapter** (:mod:`~pyro_sgmcmc.kernels.warmup`): mode, preconditioner,
  control-variate centre, gradient noise :math:`\beta`, and the end-of-warm-up check.

The sampler itself is a pure step of :mod:`pyro_sgmcmc.samplers`; each algorithm
(:mod:`~pyro_sgmcmc.kernels.sgld`, ...) only says which step and with what arguments.

Non-finite steps are undone (the chain returns to its previous point, momenta at
rest) and counted in ``diagnostics()["divergences"]``; three in a row during warm-up
halve the step size; past ``max_divergences`` the run stops with a
:class:`~pyro_sgmcmc.potential.NonFiniteError` naming the step and the sites. A
warm-up that misses its own conditions is reported in ``diagnostics()["warmup"]``,
the progress bar and a warning, and raises
:class:`~pyro_sgmcmc.kernels.warmup_control.WarmupError` with ``strict=True``.
Noise and minibatches come from a ``torch.Generator`` seeded from torch's global
generator at ``setup``, so ``pyro.set_rng_seed`` fixes a run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from pyro.infer.autoguide.initialization import init_to_uniform
from pyro.infer.mcmc.mcmc_kernel import MCMCKernel
from torch import Tensor

from pyro_sgmcmc.kernels.checkpoint import CheckpointMixin
from pyro_sgmcmc.kernels.compile import trace_agrees
from pyro_sgmcmc.kernels.function_potential import FunctionPotential
from pyro_sgmcmc.kernels.gradients import (
    ControlVariateGradient,
    MinibatchGradient,
    wants_control_variates,
)
from pyro_sgmcmc.kernels.init import find_initial_params, initial_chains
from pyro_sgmcmc.kernels.stepping import SteppingMixin
from pyro_sgmcmc.kernels.warmup_control import WarmupMixin
from pyro_sgmcmc.kernels.whitening import Whitening
from pyro_sgmcmc.potential import PyroPotential
from pyro_sgmcmc.samplers.schedules import Schedule, as_schedule

# Distributed runs with one batched generator per process: rank r's seed is seed + r * this.
_RANK_SEED_STRIDE = 1_000_003


class SGMCMCKernel(SteppingMixin, WarmupMixin, CheckpointMixin, MCMCKernel):
    """Shared machinery of the SGMCMC kernels; use a subclass.

    Args:
        model: a Pyro model; or ``None`` with ``potential_fn``.
        potential_fn: instead of a model, ``potential_fn(params) -> -log p(params | y)``
            over a dict of unconstrained tensors (a stochastic but unbiased estimate is
            fine); pass ``initial_params`` to ``MCMC``.
        subsample_size: minibatch size through the model's data plate (``None``: full
            batch).
        step_size: step size, a float or a schedule ``t -> float``
            (:mod:`pyro_sgmcmc.samplers.schedules`), in per-datum units (an SGD learning
            rate); after mass adaptation, relative to the whitened posterior (unit
            curvature). Default: the kernel's ``default_step_size``.
        temperature: cold-posterior temperature :math:`T` (0 gives the optimiser).
        num_data: :math:`N` of the per-datum potential (default: the data plate's size;
            1 for ``potential_fn``).
        plate: name of the data plate, when it cannot be found automatically.
        batching: ``"iid"`` minibatches (default; independent, with replacement) or
            ``"epoch"`` (epoch-wise reshuffling, no gradient-noise correction).
        control_variates: ``"auto"`` (on when the per-example gradient table, data x
            parameters, has at most 2e7 entries), ``True`` or ``False``.
        adapt_mass_matrix: find the mode and learn a preconditioner during warm-up.
        full_mass: a dense preconditioner (NUTS's ``full_mass``); ``"auto"``: dense up
            to 200 parameters, diagonal above.
        thinning: sampler steps per retained draw.
        jit_compile: trace the minibatch potential with ``torch.jit.trace`` (as Pyro's
            HMC does; 2.4x faster per step on Pima). ``"auto"`` (default): trace when
            the traced potential and gradient match the eager ones at two parameter
            values on fresh minibatches (:mod:`~pyro_sgmcmc.kernels.compile`), else run
            eagerly; ``True``: trace it in warm-up (wrong for models with
            value-dependent Python control flow), and after warm-up run each step as one
            compiled graph (:mod:`~pyro_sgmcmc.kernels.fused`: gather, gradient, control
            variates, finiteness and update; serial and vectorised chains), checked
            against the eager step and run eagerly, with a warning, where it cannot be
            fused; ``False`` never.
        compile_backend: what compiles the fused step of ``jit_compile=True``:
            ``"inductor"`` (``torch.compile``; a one-off compilation of seconds, reported
            in ``diagnostics()["compile_seconds"]``, the fastest steps) or
            ``"torchscript"`` (no compilation, about 3x slower steps than inductor on
            Pima).
        max_divergences: non-finite steps tolerated before raising.
        init_strategy: a Pyro init strategy (retried, then ``init_to_median`` and
            ``init_to_feasible``, until the potential and gradient are finite).
        transforms: constrained -> unconstrained transforms (``potential_fn`` mode).
        rng_seed: seed of the kernel's generator (noise and minibatches); default: drawn
            from torch's global generator at ``setup``, so ``pyro.set_rng_seed`` fixes it.
        strict: raise :class:`~pyro_sgmcmc.kernels.warmup_control.WarmupError` when
            warm-up misses its own conditions (otherwise they are reported in
            ``diagnostics()["warmup"]`` and warned).
    """

    _sampler: Any = None
    #: Step size used when none is given.
    default_step_size: float = 0.1

    def __init__(
        self,
        model: Callable | None = None,
        potential_fn: Callable | None = None,
        *,
        subsample_size: int | None = None,
        step_size: float | Schedule | None = None,
        temperature: float = 1.0,
        num_data: int | None = None,
        plate: str | None = None,
        batching: str = "iid",
        control_variates: bool | str = "auto",
        adapt_mass_matrix: bool = True,
        full_mass: bool | str = "auto",
        thinning: int = 1,
        jit_compile: bool | str = "auto",
        max_divergences: int = 20,
        init_strategy: Callable = init_to_uniform,
        transforms: dict | None = None,
        rng_seed: int | None = None,
        strict: bool = False,
        compile_backend: str = "inductor",
    ) -> None:
        if (model is None) == (potential_fn is None):
            raise ValueError("give exactly one of `model` or `potential_fn`")
        if potential_fn is not None and subsample_size is not None:
            raise ValueError(
                "subsample_size needs a Pyro model with a data plate; a potential_fn does "
                "its own minibatching"
            )
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if thinning < 1:
            raise ValueError(f"thinning must be a positive integer, got {thinning}")
        if subsample_size is not None and subsample_size < 1:
            raise ValueError(f"subsample_size must be a positive integer, got {subsample_size}")
        if control_variates not in (True, False, "auto"):
            raise ValueError(
                f"control_variates must be True, False or 'auto', got {control_variates!r}"
            )
        if jit_compile not in (True, False, "auto"):
            raise ValueError(f"jit_compile must be True, False or 'auto', got {jit_compile!r}")
        if compile_backend not in ("inductor", "torchscript"):
            raise ValueError(
                f"compile_backend must be 'inductor' or 'torchscript', got {compile_backend!r}"
            )
        if full_mass not in (True, False, "auto"):
            raise ValueError(f"full_mass must be True, False or 'auto', got {full_mass!r}")
        self.model = model
        self.potential_fn = potential_fn
        self.subsample_size = subsample_size
        self.step_size = self.default_step_size if step_size is None else step_size
        self._schedule = as_schedule(self.step_size)
        self.temperature = float(temperature)
        self.num_data = num_data
        self.plate = plate
        self.batching = batching
        self.control_variates = control_variates
        self.adapt_mass_matrix = adapt_mass_matrix
        self.full_mass = full_mass
        self.thinning = int(thinning)
        self.jit_compile = jit_compile
        self.compile_backend = compile_backend
        self.max_divergences = max_divergences
        self.init_strategy = init_strategy
        self.transforms = transforms
        self.strict = strict
        self._initial_params: dict[str, Tensor] | None = None
        self.rng_seed = rng_seed
        #: Set by :class:`pyro_sgmcmc.MCMC` for vectorised chains: the leading chain dim,
        #: whether each chain draws from its own generator (seeded rng_seed + c), and for
        #: a torch.distributed run this process's block of chains (a ChainGroup).
        self.num_chains: int | None = None
        self.chain_group = None
        self.per_chain_rng = False
        #: Set by pyro_sgmcmc.MCMC(chain_coupling="antithetic"): chains 2k, 2k + 1 pair up.
        self.antithetic = False
        self.potential: PyroPotential | FunctionPotential | None = None
        self._log: dict[str, str] = {}

    # ------------------------------------------------------------------ Pyro's API
    @property
    def initial_params(self) -> dict[str, Tensor]:
        return self._initial_params

    @initial_params.setter
    def initial_params(self, params: dict[str, Tensor]) -> None:
        self._initial_params = {k: torch.as_tensor(v) for k, v in params.items()}

    def setup(self, warmup_steps: int, *args, **kwargs) -> None:
        seed = self.rng_seed
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()).item())
        group, offset = self.chain_group, 0
        if group is not None:
            # One run over all processes: rank 0's seed, chain c's generator seeded
            # seed + c wherever it runs, and a different batched stream per process.
            seed, offset = group.broadcast_object(seed), group.offset
        batched_seed = seed if group is None else seed + _RANK_SEED_STRIDE * group.rank
        self._generator = torch.Generator().manual_seed(batched_seed)
        self._build_potential(args, kwargs)
        params = self._initial_params
        self._chain_generators = None
        device = next(iter(params.values())).device
        if self.num_chains is not None:
            self._check_vectorisable(params)
            if self.per_chain_rng:
                self._chain_generators = [
                    torch.Generator(device=device).manual_seed(seed + offset + c)
                    for c in range(self.num_chains)
                ]
        if device.type != "cpu":
            # Every draw on the parameters' device: no host-to-device copy per step.
            self._generator = torch.Generator(device=device).manual_seed(batched_seed)
            if isinstance(self.potential, PyroPotential):
                self.potential.generator = self._generator
            indices = getattr(self.potential, "indices", None)
            if indices is not None:
                indices.generator = torch.Generator(device=device).manual_seed(batched_seed + 1)
        self._like = {k: (v[0] if self.num_chains is not None else v) for k, v in params.items()}
        if self.jit_compile == "auto" and isinstance(self.potential, PyroPotential):
            # Keep the trace only where it is exact (vectorised chains use vmap instead).
            probe = torch.Generator().manual_seed(batched_seed + 2)
            ok = self.num_chains is None and trace_agrees(self.potential, self._like, probe)
            self.potential.jit_compile = ok
        self._num_params = sum(v.numel() for v in self._like.values())
        self._warmup_steps = warmup_steps
        self._t = 0  # sampler steps taken
        self._calls = 0  # sample() calls
        self._divergences: list[list[int]] = [[] for _ in range(self.num_chains or 1)]
        self._num_nonfinite = torch.zeros(self.num_chains or 1, dtype=torch.long)
        self._warm_nonfinite = 0
        self._bad_streak = torch.zeros(self.num_chains or 1, dtype=torch.long)
        self._step_scale = 1.0
        self._beta: float | dict[str, Tensor] = 0.0
        self._step_cut = 1.0
        base = MinibatchGradient(self.potential, batched=self.num_chains is not None)
        cv = wants_control_variates(self.potential, self.control_variates, self._num_params)
        self.estimator = ControlVariateGradient(base) if cv else base
        self.adapter = self._make_adapter(warmup_steps, cv)
        self.whitening = Whitening.identity(self._like)
        if self.adapter is not None and self.adapter.optimising(0):
            self.adapter.start_mode(self.whitening.to_z(params))
            self._lr_scale = torch.ones(self.num_chains or 1, dtype=torch.float64)
        self._state = self._init_state(self.whitening.to_z(params))
        self._prev_state = self._state
        self.warmup_report: dict[str, Any] = {"problems": [], "notes": []}
        self._last_u = None
        # The fused sampling step of jit_compile=True (kernels/fused.py).
        self._fused, self._fused_off, self._fused_builds = None, False, 0
        self._pending: list = []
        self._params_cache = None
        #: What ran the fused sampling steps: "inductor", "torchscript" or None (eager).
        self.fused_backend: str | None = None
        self.compile_seconds = 0.0
        self._update_log()

    def _build_potential(self, args, kwargs) -> None:
        if self.model is None:
            if self.num_chains is not None:
                raise ValueError("vectorised chains need a Pyro model, not a potential_fn")
            self.potential = FunctionPotential(self.potential_fn, int(self.num_data or 1))
            if self._initial_params is None:
                raise ValueError("potential_fn mode needs initial_params (pass them to MCMC)")
            return
        self.potential = PyroPotential(
            self.model,
            args,
            kwargs,
            subsample_size=self.subsample_size,
            plate=self.plate,
            num_data=self.num_data,
            init_strategy=self.init_strategy,
            batching=self.batching,
            jit_compile=self.jit_compile is True,
            generator=self._generator,
        )
        self.transforms = self.potential.transforms
        if self._initial_params is not None:
            return
        if self.num_chains is None:
            self._initial_params = find_initial_params(self.potential, self.init_strategy)
            return
        params = initial_chains(
            self.potential, self.init_strategy, self.num_chains, self._generator
        )
        if self.antithetic:
            # Both chains of a pair start together; their noise then mirrors them.
            params = {k: v[0::2].repeat_interleave(2, dim=0) for k, v in params.items()}
        self._initial_params = params

    def _check_vectorisable(self, params: dict[str, Tensor]) -> None:
        for name, value in params.items():
            if value.dim() == 0 or value.shape[0] != self.num_chains:
                raise ValueError(
                    f"initial value of '{name}' has shape {tuple(value.shape)}: vectorised "
                    f"chains need a leading dimension of num_chains={self.num_chains}"
                )

    def sample(self, params: dict[str, Tensor]) -> dict[str, Tensor]:
        warm = self._calls < self._warmup_steps
        for _ in range(1 if warm else self.thinning):
            self._one_step(warm)
        self._calls += 1
        if self._calls == self._warmup_steps:
            self._end_warmup()
        if self._calls % 100 == 0 or self._calls in (1, self._warmup_steps):
            self._update_log()
        return self.current_params

    @property
    def current_params(self) -> dict[str, Tensor]:
        """The chain's (or chains') current unconstrained sites."""
        cache = self._params_cache
        if cache is not None and cache[0] is self._state:
            return cache[1]  # the fused step's output
        return self.whitening.to_params(self._state.params["z"])

    def logging(self) -> dict[str, str]:
        return self._log

    def diagnostics(self) -> dict[str, Any]:
        self._flush_fused()
        step = self._schedule(self._t) * self._step_scale
        report = {"problems": list(self.warmup_report["problems"]),
                  "notes": list(self.warmup_report["notes"])}  # fmt: skip
        if self.num_chains is not None:
            return {
                "divergences": [list(d) for d in self._divergences],
                "num_nonfinite_steps": self._num_nonfinite.tolist(),
                "step_size": step,
                "warmup": report,
                **self._compile_report(),
            }
        return {
            "divergences": list(self._divergences[0]),
            "num_nonfinite_steps": int(self._num_nonfinite[0]),
            "step_size": step,
            "warmup": report,
            **self._compile_report(),
        }

    def _compile_report(self) -> dict[str, Any]:
        if self.jit_compile is not True:
            return {}
        return {"fused_step": self.fused_backend, "compile_seconds": self.compile_seconds}

    def cleanup(self) -> None:
        # As Pyro's HMC: the next chain draws its own initial point unless MCMC sets one.
        self._initial_params = None
        self._prev_state = None
        self._fused, self._params_cache = None, None

    @property
    def inverse_mass_matrix(self) -> dict[str, Tensor] | Tensor | None:
        """The preconditioner :math:`D` in use: per-site diagonals, a dense ``(d, d)``
        matrix over the flattened sites, or ``None`` before adaptation."""
        if self.adapter is None or not self.adapter.adapt_mass or self._calls < 1:
            return None
        return self.whitening.inverse_mass()

    # ------------------------------------------------------------------ algorithms
    def _init_state(self, z: Tensor):
        return self._sampler.init({"z": z})

    def _sampler_kwargs(self, step_size: float) -> dict[str, Any]:
        return {}

    def _step_size(self) -> float:
        return self._schedule(self._t) * self._step_scale

    def _estimates_noise(self) -> bool:
        return False

    def _on_new_beta(self) -> None:
        pass

    @property
    def _optimising(self) -> bool:
        return self.adapter is not None and self.adapter.optimising(self._calls)

    def _update_log(self) -> None:
        self._flush_fused()
        u = "-" if self._last_u is None else f"{float(self._last_u.mean()):.4g}"
        self._log = {
            "step size": f"{self._step_size():.2e}",
            "U": u,
            "nonfinite": str(int(self._num_nonfinite.sum())),
        }
        if self._calls >= self._warmup_steps and self.adapter is not None:
            n = len(self.warmup_report["problems"])
            self._log["warm-up"] = "ok" if n == 0 else f"{n} PROBLEM(S)"
