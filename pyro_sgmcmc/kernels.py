r"""SGMCMC kernels for :class:`pyro.infer.MCMC`.

Each kernel wraps one pure sampler of :mod:`pyro_sgmcmc.samplers` and a minibatch
potential (:class:`~pyro_sgmcmc.potential.PyroPotential` built from a Pyro model, or a
user's ``potential_fn``). Swap ``NUTS(model)`` for ``SGHMCKernel(model,
subsample_size=32)`` and the rest of a Pyro workflow (``MCMC``, ``get_samples``,
``summary``, ``arviz.from_pyro``, ``Predictive``) stays as it is.

What a kernel adds to the bare sampler:

* **Warm-up** (at ``temperature > 0``, 20 or more warm-up steps), in Stan's layout
  (:mod:`pyro_sgmcmc.samplers.adaptation`):

  1. the initial buffer (15%) runs the sampler at temperature 0, i.e. as its
     optimiser, to reach the mode, preconditioned RMSprop-like by
     ``min(1, F^-1/2)`` from the per-example empirical Fisher :math:`F`, so that stiff
     coordinates neither overflow nor stall;
  2. doubling windows estimate the posterior variance of the draws; after each the
     diagonal preconditioner becomes that variance times :math:`N/T` (the step size
     is then relative to a whitened target with unit curvature). A chain that is
     still drifting, or unstable, inflates its variance, so the estimate is capped
     at 4x the inverse empirical Fisher at the window's mean (the per-datum
     curvature near the mode) and at 4x the previous window's; a slowly mixing one
     sees too little of the posterior, so it is floored at 1/4 of the buffer's
     ``min(1, F^-1/2)``. The
     **control variates** are re-centred at the window's mean;

  3. the last 10% samples with everything frozen.

  With ``beta="auto"`` the minibatch gradient noise is estimated throughout from
  per-example gradients (of the control-variate estimator, once it is on) and
  subtracted from the injected noise (Chen et al., 2014); the friction rises to
  ``beta / 2`` where needed, and the step size shrinks to keep
  ``step_size * friction <= sigma^2``.
* **Control variates** (``control_variates="auto"``: on when the per-example
  gradient table, data x parameters, has at most 2e7 entries): the minibatch
  gradient becomes :math:`\nabla\tilde U_B(\theta) - \nabla\tilde U_B(\hat\theta)
  + \nabla U(\hat\theta)`, still unbiased, with noise that vanishes as
  :math:`\theta \to \hat\theta` (Baker et al., 2019). One pass over the data per
  window, then an O(B) gather per step.
* **Thinning.** Pyro's MCMC has none; here each retained draw is ``thinning``
  sampler steps (warm-up steps are never thinned).
* **Non-finite steps.** A step whose potential or gradient is NaN/inf is undone
  (the chain returns to the previous point and its momenta are reset) and counted
  in ``diagnostics()["divergences"]``; past ``max_divergences`` such steps the run
  stops with a :class:`~pyro_sgmcmc.potential.NonFiniteError` naming the step and
  the sites.
* **Reproducibility.** Noise and minibatches come from a ``torch.Generator`` seeded
  from torch's global generator at ``setup``, so ``pyro.set_rng_seed`` fixes a run.
"""

from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Callable
from typing import Any

import torch
from pyro.infer.autoguide.initialization import init_to_uniform
from pyro.infer.mcmc.mcmc_kernel import MCMCKernel
from torch import Tensor

from pyro_sgmcmc.curvature import hvp
from pyro_sgmcmc.potential import NonFiniteError, PyroPotential
from pyro_sgmcmc.samplers import baoa, sghmc, sgld, sgnht
from pyro_sgmcmc.samplers._common import AntitheticPairs
from pyro_sgmcmc.samplers.adaptation import WelfordVariance, adaptation_windows
from pyro_sgmcmc.samplers.schedules import Schedule, as_schedule

__all__ = ["BAOAKernel", "SGHMCKernel", "SGLDKernel", "SGMCMCKernel", "SGNHTKernel"]

#: Largest per-example gradient table (data x parameters) that control variates keep.
_MAX_CV_TABLE = 2e7
#: Largest factor by which one adaptation window may raise the inverse mass.
_MAX_MASS_GROWTH = 4.0
#: Largest inverse mass relative to the inverse empirical Fisher at the window's centre.
_MAX_FISHER_RATIO = 4.0
#: Rademacher probes per Hutchinson estimate of the Hessian's diagonal (models without
#: a data plate).
_CURVATURE_PROBES = 4
#: Data per estimate of the empirical Fisher and of the gradient noise during warm-up.
_ESTIMATION_BATCH = 256
# Distributed runs with one batched generator per process: rank r's seed is seed + r * this.
_RANK_SEED_STRIDE = 1_000_003


def _expand_mask(mask: Tensor, like: Tensor) -> Tensor:
    """A per-chain mask ``(C,)`` shaped to broadcast against ``like`` ``(C, ...)``."""
    return mask.reshape(mask.shape + (1,) * (like.dim() - 1))


def _finite(u: Tensor, grads: dict[str, Tensor]) -> Tensor:
    """Whether the potential and every gradient are finite, per chain (``u``'s shape).

    One reduction instead of one check per site: a NaN or inf anywhere makes the sum
    non-finite.
    """
    return torch.isfinite(u + sum(g.reshape(*u.shape, -1).sum(-1) for g in grads.values()))


def _select_chains(mask: Tensor, where_true, where_false):
    """The sampler state taking the chains in ``mask`` from ``where_true``."""
    fields = {}
    for field, a, b in zip(where_true._fields, where_true, where_false, strict=True):
        if isinstance(a, dict):
            fields[field] = {k: torch.where(_expand_mask(mask, b[k]), a[k], b[k]) for k in a}
        else:
            fields[field] = torch.where(_expand_mask(mask, b), a, b)
    return type(where_true)(**fields)


def _inverse_fisher(grads: dict[str, Tensor]) -> dict[str, Tensor]:
    """:math:`D = \\min(1, F^{-1/2})` from the diagonal empirical Fisher
    :math:`F = \\overline{g_i^2}` of the per-example gradients, RMSprop's scaling.

    Used only while the initial buffer optimises towards the mode: each coordinate
    then moves about one step size per step however steep it is, so stiff
    coordinates do not overflow and far-off ones do not stall (``1/F`` stalls where the
    gradient is large, and underestimates curvature where the model fits badly).
    """
    return {k: torch.clamp(g.square().mean(0), min=1.0).rsqrt() for k, g in grads.items()}


class _FunctionPotential:
    """A user's ``potential_fn(params) -> -log p`` behind the PyroPotential interface."""

    def __init__(self, potential_fn: Callable, num_data: int) -> None:
        self.potential_fn = potential_fn
        self.num_data = num_data
        self.subsample_size = None
        self.transforms: dict = {}

    def next_indices(self) -> None:
        return None

    def potential_and_grad(self, phi, indices=None):
        leaves = {k: v.detach().requires_grad_(True) for k, v in phi.items()}
        u = self.potential_fn(leaves) / self.num_data
        grads = torch.autograd.grad(u, list(leaves.values()), allow_unused=True)
        grads = [
            torch.zeros_like(v) if g is None else g
            for v, g in zip(leaves.values(), grads, strict=True)
        ]
        return u.detach(), dict(zip(leaves, grads, strict=True))

    def nonfinite_sites(self, phi, indices=None) -> list[str]:
        u, grads = self.potential_and_grad(phi)
        bad = [] if torch.isfinite(u) else ["potential_fn"]
        return bad + [f"{k} (gradient)" for k, g in grads.items() if not torch.isfinite(g).all()]


class SGMCMCKernel(MCMCKernel):
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
            rate); after mass adaptation, relative to the whitened posterior. Default:
            the kernel's ``default_step_size``.
        temperature: cold-posterior temperature :math:`T` (0 gives the optimiser).
        num_data: :math:`N` of the per-datum potential (default: the data plate's size;
            1 for ``potential_fn``).
        plate: name of the data plate, when it cannot be found automatically.
        batching: ``"iid"`` minibatches (default; independent, with replacement) or
            ``"epoch"`` (epoch-wise reshuffling, no gradient-noise correction).
        adapt_mass_matrix: learn a diagonal preconditioner during warm-up.
        thinning: sampler steps per retained draw.
        jit_compile: trace the minibatch potential with ``torch.jit.trace`` (as Pyro's
            HMC does); about 2x faster per step for small models. Not for models with
            value-dependent Python control flow.
        max_divergences: non-finite steps tolerated before raising.
        init_strategy: a Pyro init strategy.
        transforms: constrained -> unconstrained transforms (``potential_fn`` mode).
        rng_seed: seed of the kernel's generator (noise and minibatches); default: drawn
            from torch's global generator at ``setup``, so ``pyro.set_rng_seed`` fixes it.
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
        thinning: int = 1,
        jit_compile: bool = False,
        max_divergences: int = 20,
        init_strategy: Callable = init_to_uniform,
        transforms: dict | None = None,
        rng_seed: int | None = None,
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
        self.thinning = int(thinning)
        self.jit_compile = jit_compile
        self.max_divergences = max_divergences
        self.init_strategy = init_strategy
        self.transforms = transforms
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
        self.potential: PyroPotential | _FunctionPotential | None = None
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
        if self.model is not None:
            self.potential = PyroPotential(
                self.model,
                args,
                kwargs,
                subsample_size=self.subsample_size,
                plate=self.plate,
                num_data=self.num_data,
                init_strategy=self.init_strategy,
                batching=self.batching,
                jit_compile=self.jit_compile,
                generator=self._generator,
            )
            self.transforms = self.potential.transforms
            if self._initial_params is None:
                self._initial_params = self._draw_initial_params()
                if self.antithetic and self.num_chains is not None:
                    # Both chains of a pair start together; their noise then mirrors them.
                    self._initial_params = {
                        k: v[0::2].repeat_interleave(2, dim=0)
                        for k, v in self._initial_params.items()
                    }
        else:
            if self.num_chains is not None:
                raise ValueError("vectorised chains need a Pyro model, not a potential_fn")
            self.potential = _FunctionPotential(self.potential_fn, int(self.num_data or 1))
            if self._initial_params is None:
                raise ValueError("potential_fn mode needs initial_params (pass them to MCMC)")
        params = self._initial_params
        self._chain_generators = None
        if self.num_chains is not None:
            self._check_vectorisable(params)
            if self.per_chain_rng:
                device = next(iter(params.values())).device
                self._chain_generators = [
                    torch.Generator(device=device).manual_seed(seed + offset + c)
                    for c in range(self.num_chains)
                ]
        device = next(iter(params.values())).device
        if device.type != "cpu":
            self._generator = torch.Generator(device=device).manual_seed(batched_seed)
            if isinstance(self.potential, PyroPotential) and self.potential.indices is not None:
                self.potential.indices.generator = torch.Generator().manual_seed(batched_seed + 1)
        self._warmup_steps = warmup_steps
        self._t = 0  # sampler steps taken
        self._calls = 0  # sample() calls
        self._divergences: list[list[int]] = [[] for _ in range(self.num_chains or 1)]
        self._num_nonfinite = torch.zeros(self.num_chains or 1, dtype=torch.long)
        self._inv_mass: dict[str, Tensor] | None = None
        self._beta: float | dict[str, Tensor] = 0.0
        # The windows centre the control variates too, so they run without adaptation.
        self._windows = adaptation_windows(warmup_steps) if self.temperature > 0 else []
        self._window_start = int(0.15 * warmup_steps)
        # The initial buffer runs the sampler at T = 0 (its optimiser) to reach the mode:
        # variance windows on a still-drifting chain would overestimate the mass.
        self._buffer_end = self._window_start if self._windows else 0
        self._welford = WelfordVariance()
        self._fisher_scale: dict[str, Tensor] | None = None
        self._chain_rms: dict[str, Tensor] | None = None  # vectorised initial buffer
        self._noise: deque[dict[str, Tensor]] = deque(maxlen=20)
        self._cv: tuple[dict[str, Tensor], dict[str, Tensor]] | None = None
        self._cv_enabled = self._wants_control_variates(params)
        self._state = self._init_state(params)
        self._prev_state = self._state
        self._last_u = torch.tensor(float("nan"))
        self._update_log()

    def _draw_initial_params(self) -> dict[str, Tensor]:
        if self.num_chains is None:
            return self.potential.initial_params()
        first = self.potential.initial_params()
        if self.init_strategy is not init_to_uniform:
            draws = [first] + [self.potential.initial_params() for _ in range(self.num_chains - 1)]
            return {k: torch.stack([d[k] for d in draws]) for k in first}
        # init_to_uniform for all chains at once: U(-2, 2) in unconstrained space, redrawn
        # where the potential is not finite (as Pyro's initialisation retries).
        params = {
            k: torch.rand((self.num_chains, *v.shape), dtype=v.dtype, device=v.device) * 4.0 - 2.0
            for k, v in first.items()
        }
        for _ in range(100):
            u, grads = self.potential.batched_potential_and_grad(params, None)
            bad = ~_finite(u, grads)
            if not bad.any():
                return params
            params = {
                k: torch.where(_expand_mask(bad, v), torch.rand_like(v) * 4.0 - 2.0, v)
                for k, v in params.items()
            }
        raise NonFiniteError(
            f"no finite initial point for {int(bad.sum())} chains in 100 tries of "
            "init_to_uniform; pass initial_params or another init_strategy"
        )

    def _check_vectorisable(self, params: dict[str, Tensor]) -> None:
        for name, value in params.items():
            if value.dim() == 0 or value.shape[0] != self.num_chains:
                raise ValueError(
                    f"initial value of '{name}' has shape {tuple(value.shape)}: vectorised "
                    f"chains need a leading dimension of num_chains={self.num_chains}"
                )

    def _wants_control_variates(self, params) -> bool:
        pot = self.potential
        subsampled = (
            isinstance(pot, PyroPotential)
            and pot.subsample_size is not None
            and pot.subsample_size < pot.plate_size
        )
        if not subsampled or self.control_variates is False:
            if self.control_variates is True:
                raise ValueError("control_variates=True needs a Pyro model with subsample_size")
            return False
        per_chain = sum(v[0].numel() if self.num_chains else v.numel() for v in params.values())
        size = pot.plate_size * per_chain
        if size > _MAX_CV_TABLE:
            if self.control_variates is True:
                raise ValueError(
                    f"control variates would store {size:.3g} per-example gradient entries "
                    f"(data x parameters, limit {_MAX_CV_TABLE:.0e}); pass "
                    "control_variates=False"
                )
            return False
        return True

    def sample(self, params: dict[str, Tensor]) -> dict[str, Tensor]:
        warm = self._calls < self._warmup_steps
        for _ in range(1 if warm else self.thinning):
            self._one_step(warm)
        self._calls += 1
        if self._calls % 100 == 0 or self._calls == self._warmup_steps:
            self._update_log()
        return dict(self._state.params)

    def logging(self) -> dict[str, str]:
        return self._log

    #: What ``setup`` and the run build up: everything a resumed run needs.
    _RUNTIME_STATE = (
        "_t", "_calls", "_warmup_steps", "_divergences", "_num_nonfinite", "_inv_mass",
        "_beta", "_alpha", "_clipped_warned", "_windows", "_window_start", "_buffer_end",
        "_welford", "_noise", "_cv", "_state", "_prev_state", "_last_u", "_fisher_scale",
        "_chain_rms",
    )  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        """The kernel's run state, with its generators' states, for checkpointing.

        Restored by :meth:`load_state_dict` after ``setup`` with the same arguments, the
        run continues exactly as it would have.
        """
        state = {k: getattr(self, k) for k in self._RUNTIME_STATE if hasattr(self, k)}
        state["_noise"] = list(self._noise)
        state["generator"] = self._generator.get_state()
        gens = self._chain_generators or []
        state["chain_generators"] = [g.get_state() for g in gens]
        indices = getattr(self.potential, "indices", None)
        if indices is not None:
            state["indices"] = indices.state_dict()
            state["indices_generator"] = (
                None if indices.generator is self._generator else indices.generator.get_state()
            )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (call after ``setup`` with the same arguments)."""
        maxlen = self._noise.maxlen
        for key in self._RUNTIME_STATE:
            if key in state:
                setattr(self, key, state[key])
        self._noise = deque(state["_noise"], maxlen=maxlen)
        self._generator.set_state(state["generator"])
        for g, g_state in zip(self._chain_generators or [], state["chain_generators"], strict=True):
            g.set_state(g_state)
        indices = getattr(self.potential, "indices", None)
        if indices is not None and "indices" in state:
            indices.load_state_dict(state["indices"])
            if state["indices_generator"] is not None:
                indices.generator.set_state(state["indices_generator"])
        self._update_log()

    def diagnostics(self) -> dict[str, Any]:
        if self.num_chains is not None:
            return {
                "divergences": [list(d) for d in self._divergences],
                "num_nonfinite_steps": self._num_nonfinite.tolist(),
                "step_size": self._schedule(self._t),
            }
        return {
            "divergences": list(self._divergences[0]),
            "num_nonfinite_steps": int(self._num_nonfinite[0]),
            "step_size": self._schedule(self._t),
        }

    def cleanup(self) -> None:
        # As Pyro's HMC: the next chain draws its own initial point unless MCMC sets one.
        self._initial_params = None
        self._prev_state = None

    # ------------------------------------------------------------------ internals
    def _init_state(self, params: dict[str, Tensor]):
        return self._sampler.init(params)

    def _sampler_kwargs(self, step_size: float) -> dict[str, Any]:
        return {}

    def _step_size(self) -> float:
        return self._schedule(self._t)

    @property
    def inverse_mass_matrix(self) -> dict[str, Tensor] | None:
        """The adapted diagonal preconditioner per site (``None`` before adaptation)."""
        return self._inv_mass

    @property
    def _optimising(self) -> bool:
        return self._calls < self._buffer_end

    def _step_inv_mass(self) -> dict[str, Tensor] | None:
        r"""The preconditioner of this step.

        Vectorised chains in the initial buffer (an optimiser run at :math:`T = 0`) start
        all over the prior's box, where the curvature differs by orders of magnitude from
        chain to chain, and the shared :math:`D` (measured on chain 0) can be far too
        large for a chain in a stiff region. Each chain then also takes
        :math:`D_c = \min(D, \bar g_c^{-1/2})`, with :math:`\bar g_c` the running mean of
        its own squared gradients (RMSprop), so every chain's steps stay bounded. A single
        chain of a model without a data plate (no empirical Fisher) gets the same bound.
        """
        if not self._optimising or self._chain_rms is None:
            return self._inv_mass
        out = {}
        for k, rms in self._chain_rms.items():
            d = 1.0 if self._inv_mass is None else self._inv_mass[k]
            out[k] = torch.minimum(torch.as_tensor(d, dtype=rms.dtype), rms.rsqrt())
        return out

    def _update_chain_rms(self, grads: dict[str, Tensor]) -> None:
        if not self._optimising:
            self._chain_rms = None
            return
        tiny = torch.finfo(next(iter(grads.values())).dtype).tiny
        if self._chain_rms is None:
            self._chain_rms = {k: g.square().clamp(min=tiny) for k, g in grads.items()}
        else:
            self._chain_rms = {
                k: (0.9 * v + 0.1 * grads[k].square()).clamp(min=tiny)
                for k, v in self._chain_rms.items()
            }

    def _one_step(self, warm: bool) -> None:
        if self.num_chains is not None:
            self._one_batched_step(warm)
            return
        idx = self.potential.next_indices()
        phi = self._state.params
        u, grads = self.potential.potential_and_grad(phi, idx)
        grads = self._control_variate(grads, idx)
        if not _finite(u, grads):
            self._on_nonfinite([0], phi, idx, warm)
            # Undo the step that led here and restart the momenta from rest.
            self._state = self._reset_momenta(self._prev_state)
            return
        self._last_u = u
        if not self._fisher_preconditions():
            self._update_chain_rms(grads)
        self._prev_state = self._state
        self._state = self._sampler_step(grads)
        self._t += 1
        if warm and self._warmup_steps >= 20:
            self._adapt(idx)

    def _noise_source(self):
        if self._chain_generators:
            return self._chain_generators
        if self.antithetic and self.num_chains is not None:
            return AntitheticPairs(self._generator)
        return self._generator

    def _sampler_step(self, grads):
        step_size = self._step_size()
        return self._sampler.step(
            self._state,
            grads,
            step_size,
            temperature=0.0 if self._optimising else self.temperature,
            num_data=self.potential.num_data,
            inv_mass=self._step_inv_mass(),
            generator=self._noise_source(),
            **self._sampler_kwargs(step_size),
        )

    def _one_batched_step(self, warm: bool) -> None:
        """One step of all chains: one vmapped gradient; non-finite chains are undone."""
        if self.antithetic:
            # A pair shares its minibatches (and receives opposite injected noise).
            idx = self.potential.next_indices(self.num_chains // 2)
            if idx is not None and idx.dim() == 2:
                idx = idx.repeat_interleave(2, dim=0)
        else:
            idx = self.potential.next_indices(self.num_chains, self._chain_generators)
        phi = self._state.params
        u, grads = self.potential.batched_potential_and_grad(phi, idx)
        grads = self._control_variate(grads, idx)
        bad = ~_finite(u, grads)
        if bad.any():
            self._on_nonfinite(torch.nonzero(bad).flatten().tolist(), phi, idx, warm)
            grads = {
                k: torch.where(_expand_mask(bad, g), torch.zeros_like(g), g)
                for k, g in grads.items()
            }
        self._last_u = u.mean()
        self._update_chain_rms(grads)
        prev = self._state
        self._state = self._sampler_step(grads)
        if bad.any():
            # Those chains return to where they were, momenta at rest.
            self._state = _select_chains(bad, self._reset_momenta(prev), self._state)
        self._t += 1
        if warm and self._warmup_steps >= 20:
            self._adapt(idx)

    def _control_variate(self, grads: dict[str, Tensor], idx) -> dict[str, Tensor]:
        """Add the batch mean of the centre's per-example gradients (per chain when
        ``idx`` is ``(C, B)``) and subtract their data mean; unchanged without a centre."""
        if self._cv is None:
            return grads
        table, mean = self._cv
        out = {}
        for k, g in grads.items():
            rows = torch.index_select(table[k], 0, idx.reshape(-1))
            rows = rows.reshape(*idx.shape, *table[k].shape[1:]).mean(idx.dim() - 1)
            out[k] = g.add_(rows).sub_(mean[k])
        return out

    def _on_nonfinite(self, chains: list[int], phi, idx, warm: bool) -> None:
        """Count the non-finite steps of ``chains`` (their divergences when sampling) and
        raise, naming the step and the sites, once one has more than max_divergences."""
        for c in chains:
            self._num_nonfinite[c] += 1
            if not warm:
                index = self._calls - self._warmup_steps
                if not self._divergences[c] or self._divergences[c][-1] != index:
                    self._divergences[c].append(index)
        worst = max(chains, key=lambda c: int(self._num_nonfinite[c]))
        count = int(self._num_nonfinite[worst])
        if count <= self.max_divergences:
            return
        label = ""
        if self.num_chains is not None:
            phi = {k: v[worst] for k, v in phi.items()}
            idx = None if idx is None else idx[worst] if idx.dim() == 2 else idx
            label = f"chain {worst}: "
        sites = self.potential.nonfinite_sites(phi, idx)
        stage = "warm-up" if warm else "sampling"
        raise NonFiniteError(
            f"{label}non-finite potential or gradient at step {self._t} ({stage}), sites "
            f"{sites}; {count} non-finite steps in all (max_divergences="
            f"{self.max_divergences}). Lower step_size (now {self._schedule(self._t):.3g}) "
            "or check the model's log-density there"
        )

    def _reset_momenta(self, state):
        if hasattr(state, "momenta"):
            return state._replace(
                momenta={k: torch.zeros_like(v) for k, v in state.momenta.items()}
            )
        return state

    def _adapt(self, idx) -> None:
        t = self._calls  # warm-up step index of this call
        noise = self._estimates_noise() and t % 5 == 0
        fisher = self._fisher_preconditions() and t < self._window_start and t % 10 == 0
        if noise or fisher:
            # Vectorised chains share D and beta: measure them on the first chain.
            params = self._first_chain_params()
            idx0 = self._estimation_indices(idx)
            grads = self.potential.per_example_grads(params, idx0)
            if fisher:
                self._fisher_scale = self._from_first_chain(_inverse_fisher(grads))
                self._set_inv_mass(self._fisher_scale)
            if noise:
                self._noise.append(self._from_first_chain(self._gradient_noise(idx0, grads)))
            if self._noise and (fisher or len(self._noise) % 5 == 0 or len(self._noise) == 2):
                self._update_beta()
        if self._curvature_preconditions() and t < self._window_start and t % 10 == 0:
            # No data plate, so no empirical Fisher: the Hessian's diagonal instead; not a
            # floor for the windows (as the Fisher scale is), only a stability bound.
            curvature = self._inverse_curvature(self._first_chain_params())
            self._set_inv_mass(self._from_first_chain(curvature))
        if t < self._window_start or not self._windows:
            return
        # Vectorised chains: each chain's own variance (a tensor per chain), averaged
        # below; pooling them would count the spread between modes as posterior width.
        self._welford.update(self._state.params)
        if t != self._windows[0]:
            return
        self._windows.pop(0)
        self._window_start = t + 1
        window_mean, window_var = self._welford.mean, self._welford.variance()
        if self.num_chains is not None:
            window_mean = self._chain_mean(window_mean)
            window_var = self._chain_mean(window_var)
        if self._cv_enabled:
            self._set_cv_centre(window_mean)
        if self.adapt_mass_matrix:
            tau = self.temperature / self.potential.num_data
            new = {k: v / tau for k, v in window_var.items()}
            if self._fisher_scale is not None:
                # A slowly mixing chain (SGLD) sees too little of the posterior in a short
                # window, and a smaller D mixes slower still: keep D >= 1/4 of the data's
                # own scale, the initial buffer's min(1, F^-1/2).
                new = {
                    k: torch.maximum(v, self._fisher_scale[k] / _MAX_MASS_GROWTH)
                    for k, v in new.items()
                }
            if self._cv is not None:
                # An unstable or drifting chain inflates its variance, and a larger D
                # makes it more unstable. Near the mode the empirical Fisher F of the
                # table is the per-datum curvature, so D = 1/F whitens: allow 4x that.
                table = self._cv[0]
                new = {
                    k: torch.minimum(v, _MAX_FISHER_RATIO / table[k].square().mean(0))
                    for k, v in new.items()
                }
            if self._inv_mass is not None:
                # Without it, grow D at most 4x per window, for the same reason.
                new = {
                    k: torch.minimum(v, _MAX_MASS_GROWTH * self._inv_mass[k])
                    for k, v in new.items()
                }
            self._set_inv_mass(new)
        self._welford = WelfordVariance()
        if self._noise:
            self._update_beta()

    def _first_chain_params(self) -> dict[str, Tensor]:
        """The current parameters of the (only, or first vectorised) chain."""
        params = self._state.params
        if self.num_chains is None:
            return params
        return {k: v[0] for k, v in params.items()}

    def _chain_mean(self, per_chain: dict[str, Tensor]) -> dict[str, Tensor]:
        """Mean over all chains, those of other processes too in a distributed run."""
        if self.chain_group is None:
            return {k: v.mean(0) for k, v in per_chain.items()}
        return self.chain_group.chain_mean(per_chain)

    def _from_first_chain(self, values: dict[str, Tensor]) -> dict[str, Tensor]:
        """Estimates made on chain 0: in a distributed run, global chain 0's (rank 0's)."""
        if self.chain_group is None or self.num_chains is None:
            return values
        return self.chain_group.broadcast(values)

    def _estimation_indices(self, idx):
        """Data for the Fisher and gradient-noise estimates: a fresh iid sample of
        ``max(B, 256)`` indices (all data if fewer), not the step's own batch of ``B``.
        Per-example gradient variances are heavy-tailed (outlying covariates enter to
        the fourth power), and one batch of 32 can overestimate beta several-fold, which
        starves a coordinate of noise and narrows its marginal (seen on Pima: 0.64x sd)."""
        if self.potential.subsample_size is None:
            return idx[0] if idx is not None and idx.dim() == 2 else idx
        n = self.potential.plate_size
        size = min(n, max(self.potential.subsample_size, _ESTIMATION_BATCH))
        if size == n:
            return torch.arange(n)
        return torch.randint(n, (size,), generator=self._generator)

    def _gradient_noise(self, idx, grads=None) -> dict[str, Tensor]:
        """Batch variance of the estimator's per-example terms, in raw coordinates (so
        independent of D)."""
        if grads is None:
            grads = self.potential.per_example_grads(self._state.params, idx)
        if self._cv is not None:
            grads = {k: g - self._cv[0][k][idx] for k, g in grads.items()}
        return {k: g.var(0) for k, g in grads.items()}

    def _fisher_preconditions(self) -> bool:
        """Before the first variance window, precondition with the empirical Fisher."""
        return (
            self.adapt_mass_matrix
            and bool(self._windows)
            and isinstance(self.potential, PyroPotential)
            and self.potential.plate_name is not None
        )

    def _curvature_preconditions(self) -> bool:
        """Models without a data plate: bound the initial buffer's steps by the
        potential's diagonal curvature (plate models have the empirical Fisher)."""
        return (
            self.adapt_mass_matrix
            and bool(self._windows)
            and isinstance(self.potential, PyroPotential)
            and self.potential.plate_name is None
        )

    def _inverse_curvature(self, params: dict[str, Tensor]) -> dict[str, Tensor]:
        r""":math:`D = \min(1, \tfrac12 / (\epsilon |h|))` from the Hessian's diagonal
        :math:`h`, by Hutchinson's estimator :math:`\mathbb E[v \odot \nabla^2 U\, v]` over
        4 Rademacher probes :math:`v`: it keeps ``step_size * D * h <= 1/2`` (stable)
        where the curvature is large, and leaves the other coordinates alone (a smaller
        :math:`D` there only slows the chains, e.g. between the modes of a double well).
        """
        total = {k: torch.zeros_like(p) for k, p in params.items()}
        for _ in range(_CURVATURE_PROBES):
            v = {
                k: torch.randint(0, 2, p.shape, generator=self._generator).to(p) * 2 - 1
                for k, p in params.items()
            }
            hv = hvp(lambda p: self.potential.potential(p, None), params, v, mode="reverse")
            total = {k: total[k] + v[k] * hv[k] for k in total}
        step_size = self._schedule(self._t)
        out = {}
        for k, d in total.items():
            h = (d / _CURVATURE_PROBES).abs()
            out[k] = torch.clamp(0.5 / (step_size * h), max=1.0)
        return out

    def _set_inv_mass(self, new: dict[str, Tensor]) -> None:
        self._state = self._rescale_momenta(self._state, self._inv_mass, new)
        self._inv_mass = new

    def _set_cv_centre(self, centre: dict[str, Tensor]) -> None:
        """Tabulate every datum's log-likelihood gradient at ``centre`` (one data pass).

        With :math:`G_i = \\nabla \\log p(y_i \\mid \\hat\\theta)` the estimator is
        :math:`\\nabla\\tilde U_B(\\theta) - \\nabla\\tilde U_B(\\hat\\theta)
        + \\nabla U(\\hat\\theta) = \\nabla\\tilde U_B(\\theta) + \\frac1B\\sum_{i\\in B} G_i
        - \\bar G`: the prior terms cancel.
        """
        table = self.potential.all_per_example_grads(centre)
        self._cv = (table, {k: g.mean(0) for k, g in table.items()})
        self._noise.clear()  # the noise left is a different (much smaller) quantity

    def _update_beta(self) -> None:
        """beta = D Var[grad U~] / tau from the recent per-example gradient variances."""
        b = self.potential.subsample_size
        tau = self.temperature / self.potential.num_data
        self._beta = {}
        for k in self._noise[-1]:
            var = sum(v[k] for v in self._noise) / len(self._noise)
            d = 1.0 if self._inv_mass is None else self._inv_mass[k]
            self._beta[k] = d * var / b / tau  # iid batches: Var[grad U~] = Var_i / B
        self._on_new_beta()

    def _estimates_noise(self) -> bool:
        return False

    def _on_new_beta(self) -> None:
        pass

    @staticmethod
    def _rescale_momenta(state, old, new):
        """Keep each momentum at its new stationary scale, sqrt(D_old / D_new)."""
        if not hasattr(state, "momenta"):
            return state
        momenta = {
            k: m * ((1.0 if old is None else old[k]) / new[k]).sqrt()
            for k, m in state.momenta.items()
        }
        return state._replace(momenta=momenta)

    def _update_log(self) -> None:
        self._log = {
            "step size": f"{self._schedule(self._t):.2e}",
            "U": f"{float(self._last_u):.4g}",
            "nonfinite": str(int(self._num_nonfinite.sum())),
        }


class SGLDKernel(SGMCMCKernel):
    r"""Stochastic gradient Langevin dynamics as a Pyro MCMC kernel.

    Update rule: :mod:`pyro_sgmcmc.samplers.sgld`. At ``temperature=0`` it is SGD.

    All arguments are those of :class:`SGMCMCKernel`.

    Examples:
        >>> import pyro, pyro.distributions as dist, torch
        >>> from pyro.infer import MCMC
        >>> from pyro_sgmcmc import SGLDKernel
        >>> def model(y):
        ...     mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        ...     with pyro.plate("data", len(y)) as idx:
        ...         pyro.sample("obs", dist.Normal(mu, 1.0), obs=y[idx])
        >>> y = 3.0 + torch.randn(1000)
        >>> mcmc = MCMC(SGLDKernel(model, subsample_size=50, step_size=0.1), num_samples=500,
        ...             warmup_steps=500, disable_progbar=True)
        >>> mcmc.run(y)
        >>> abs(mcmc.get_samples()["mu"].mean() - y.mean()) < 0.1
        tensor(True)
    """

    _sampler = sgld
    default_step_size = 0.05


class _MomentumKernel(SGMCMCKernel):
    def __init__(
        self,
        model: Callable | None = None,
        potential_fn: Callable | None = None,
        *,
        alpha: float = 2.0,
        beta: float | str = "auto",
        sigma: float = 1.0,
        **kwargs,
    ) -> None:
        super().__init__(model, potential_fn, **kwargs)
        if alpha < 0 or sigma <= 0:
            raise ValueError(f"need alpha >= 0 and sigma > 0, got alpha={alpha}, sigma={sigma}")
        if not (beta == "auto" or (isinstance(beta, (int, float)) and beta >= 0)):
            raise ValueError(f"beta must be 'auto' or a float >= 0, got {beta!r}")
        self.alpha, self.beta, self.sigma = float(alpha), beta, float(sigma)

    def setup(self, warmup_steps: int, *args, **kwargs) -> None:
        super().setup(warmup_steps, *args, **kwargs)
        self._alpha = self.alpha
        self._clipped_warned = False
        if self.beta != "auto":
            self._beta = float(self.beta)

    def _estimates_noise(self) -> bool:
        return (
            self.beta == "auto"
            and self.temperature > 0
            and self.batching == "iid"
            and isinstance(self.potential, PyroPotential)
            and self.potential.subsample_size is not None
            and self.potential.subsample_size < self.potential.plate_size
        )

    def _on_new_beta(self) -> None:
        # Noise can only be absorbed while beta <= 2 alpha: raise the friction to match.
        if isinstance(self._beta, dict):
            worst = max(float(b.max()) for b in self._beta.values())
            self._alpha = max(self.alpha, 0.5 * worst)

    @property
    def friction(self) -> float:
        """The friction in use: ``alpha``, raised to half the largest ``beta`` if needed."""
        return self._alpha

    def _sampler_kwargs(self, step_size: float) -> dict[str, Any]:
        alpha = self.alpha if self._optimising else self._alpha
        return {"alpha": alpha, "beta": self._beta, "sigma": self.sigma}


class SGHMCKernel(_MomentumKernel):
    r"""Stochastic gradient Hamiltonian Monte Carlo as a Pyro MCMC kernel.

    Update rule: :mod:`pyro_sgmcmc.samplers.sghmc`. At ``temperature=0`` it is SGD with
    momentum, learning rate :math:`\epsilon/\sigma^2` and momentum
    :math:`1 - \epsilon\alpha/\sigma^2`.

    Args:
        alpha: friction :math:`\alpha`.
        beta: gradient-noise estimate: ``"auto"`` (per-example gradients during
            warm-up, with ``adapt_mass_matrix``) or a float.
        sigma: momenta scale :math:`\sigma`.
        **kwargs: those of :class:`SGMCMCKernel` (``model``, ``subsample_size``,
            ``step_size``, ``temperature``, ``thinning``, ...).

    Examples:
        >>> import pyro, pyro.distributions as dist, torch
        >>> from pyro.infer import MCMC
        >>> from pyro_sgmcmc import SGHMCKernel
        >>> def model(y):
        ...     mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        ...     with pyro.plate("data", len(y)) as idx:
        ...         pyro.sample("obs", dist.Normal(mu, 1.0), obs=y[idx])
        >>> y = 3.0 + torch.randn(1000)
        >>> kernel = SGHMCKernel(model, subsample_size=50)
        >>> mcmc = MCMC(kernel, num_samples=500, warmup_steps=500, disable_progbar=True)
        >>> mcmc.run(y)
        >>> abs(mcmc.get_samples()["mu"].mean() - y.mean()) < 0.1
        tensor(True)
    """

    _sampler = sghmc

    def _sampler_kwargs(self, step_size: float) -> dict[str, Any]:
        kwargs = super()._sampler_kwargs(step_size)
        sghmc.momentum_decay(step_size, kwargs["alpha"], self.sigma)
        # The noise scale only changes with alpha, beta and D: compute it once per change.
        key = (kwargs["alpha"], id(self._beta), id(self._inv_mass))
        if key != getattr(self, "_noise_std_key", None):
            self._noise_std = sghmc.momentum_noise_std(
                self.temperature,
                self.potential.num_data,
                kwargs["alpha"],
                self._beta,
                self._inv_mass,
                list(self._state.params),
            )
            self._noise_std_key = key
        kwargs["noise_std"] = self._noise_std
        return kwargs

    def _step_size(self) -> float:
        """The schedule's step size, shrunk so that the momentum decay
        ``step_size * alpha / sigma^2`` stays <= 1 when the friction had to rise to absorb
        minibatch noise (beta <= 2 alpha); under-compensated noise would heat the chain."""
        step_size = self._schedule(self._t)
        limit = self.sigma**2 / self._alpha
        if self._alpha > self.alpha and step_size > limit and not self._optimising:
            if self._calls >= self._warmup_steps and not self._clipped_warned:
                warnings.warn(
                    f"step_size {step_size:.3g} is reduced to {limit:.3g} during sampling: "
                    f"the minibatch gradient noise needs friction {self._alpha:.3g}, and "
                    "step_size * friction / sigma^2 must stay <= 1. Raise subsample_size, "
                    "or keep control variates on, for larger steps",
                    stacklevel=3,
                )
                self._clipped_warned = True
            return limit
        return step_size


class BAOAKernel(_MomentumKernel):
    r"""BAOA-split underdamped Langevin dynamics as a Pyro MCMC kernel.

    Update rule: :mod:`pyro_sgmcmc.samplers.baoa` (exact momentum refresh; second-order
    configurational accuracy). Arguments as :class:`SGHMCKernel`.
    """

    _sampler = baoa


class SGNHTKernel(_MomentumKernel):
    r"""Stochastic gradient Nosé-Hoover thermostat as a Pyro MCMC kernel.

    Update rule: :mod:`pyro_sgmcmc.samplers.sgnht`. The thermostat adapts the friction
    to the unknown gradient noise, so ``beta`` defaults to 0 here.

    Args:
        alpha: the constant diffusion :math:`\alpha` and the thermostat's start.
        thermostat_rate: :math:`\kappa` (``None``: the step size).
        **kwargs: as :class:`SGHMCKernel`.
    """

    _sampler = sgnht

    def __init__(
        self,
        model: Callable | None = None,
        potential_fn: Callable | None = None,
        *,
        alpha: float = 2.0,
        thermostat_rate: float | None = None,
        beta: float | str = 0.0,
        **kwargs,
    ) -> None:
        super().__init__(model, potential_fn, alpha=alpha, beta=beta, **kwargs)
        self.thermostat_rate = thermostat_rate

    def _init_state(self, params):
        # Vectorised chains: one thermostat per chain.
        batch_shape = () if self.num_chains is None else (self.num_chains,)
        return sgnht.init(params, alpha=self.alpha, batch_shape=batch_shape)

    def _sampler_kwargs(self, step_size: float) -> dict[str, Any]:
        return {**super()._sampler_kwargs(step_size), "thermostat_rate": self.thermostat_rate}
