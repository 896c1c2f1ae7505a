"""The step loop of the SGMCMC kernels: minibatches, the whitened gradient, the
sampler step, the Adam steps of warm-up's mode search, and non-finite steps."""

from __future__ import annotations

import torch
from torch import Tensor

from pyro_sgmcmc.kernels.chain_batch import expand_mask, finite, reset_momenta, select_chains
from pyro_sgmcmc.kernels.fused import FLUSH_EVERY, FusedStep
from pyro_sgmcmc.kernels.mode import adam_lr, adam_step
from pyro_sgmcmc.potential import NonFiniteError
from pyro_sgmcmc.samplers._common import AntitheticPairs


class SteppingMixin:
    """One sampler step (or Adam step) of all chains; part of
    :class:`~pyro_sgmcmc.kernels.base.SGMCMCKernel`."""

    def _next_indices(self):
        if self.num_chains is None:
            return self.potential.next_indices()
        if self.antithetic:
            # A pair shares its minibatches (and receives opposite injected noise).
            idx = self.potential.next_indices(self.num_chains // 2)
            if idx is not None and idx.dim() == 2:
                idx = idx.repeat_interleave(2, dim=0)
            return idx
        return self.potential.next_indices(self.num_chains, self._chain_generators)

    def _gradient(self, z: Tensor, idx):
        """(potential, gradient in z, per-chain finiteness) at ``z``."""
        theta = self.whitening.to_params(z)
        u, grads = self.estimator(theta, idx)
        gz = self.whitening.grad_to_z(grads)
        ok = finite(u, gz)
        return u, gz, ok

    def _one_step(self, warm: bool) -> None:
        if warm and self._optimising:
            self._mode_step()
            return
        if not warm and self.jit_compile is True and self._fused_step() is not None:
            self._run_fused()
            return
        idx = self._next_indices()
        z = self._state.params["z"]
        u, gz, ok = self._gradient(z, idx)
        bad = ~ok
        if warm:  # only warm-up acts on a streak of non-finite steps
            self._bad_streak = torch.where(bad.reshape(-1), self._bad_streak + 1, 0)
        if bad.any():
            self._on_nonfinite(bad, z, idx, warm)
            if self.num_chains is None:
                # Undo the step that led here and restart the momenta from rest.
                self._state = reset_momenta(self._prev_state)
                return
            gz = torch.where(expand_mask(bad, gz), torch.zeros_like(gz), gz)
        self._last_u = u.mean()
        prev, step = self._state, self._step_size()
        self._state = self._sampler.step(
            self._state,
            {"z": gz},
            step,
            temperature=self.temperature,
            num_data=self.potential.num_data,
            generator=self._noise_source(),
            **self._sampler_kwargs(step),
        )
        if self.num_chains is None:
            self._prev_state = prev
        elif bad.any():
            # Those chains return to where they were, momenta at rest; in warm-up a chain
            # stuck there (3 non-finite steps in a row) restarts at a healthy chain's point.
            self._state = select_chains(bad, reset_momenta(prev), self._state)
            if warm:
                self._restart_stuck_chains()
        self._t += 1
        if warm and self.adapter is not None:
            self._adapt(idx)

    # ------------------------------------------------------------------ fused steps
    def _fused_step(self) -> FusedStep | None:
        """The compiled sampling step for the current step size and sampler arguments
        (built on first use, rebuilt when they change; ``None`` when it cannot be fused
        or the arguments change too often)."""
        if self._fused_off:
            return None
        step = self._step_size()
        kwargs = self._sampler_kwargs(step)
        key = (step, id(self.whitening), id(getattr(self.estimator, "table", None)),
               _kwargs_key(kwargs))  # fmt: skip
        fused = self._fused
        if fused is not None and fused.key == key:
            return fused
        if self._fused_builds >= 3:
            self._fused_off, self._fused, self.fused_backend = True, None, None
            self.warmup_report["notes"].append(
                "jit_compile=True: the step size or sampler arguments change every step "
                "(a schedule?), so the sampling step runs eagerly, not as one graph"
            )
            return None
        self._flush_fused()
        backend = "inductor" if self.compile_backend == "inductor" else "torchscript"
        fused = FusedStep(self, step, kwargs, backend)
        fused.key = key
        self._fused_builds += 1
        if not fused.build():
            self._fused_off, self._fused, self.fused_backend = True, None, None
            return None
        self._fused = fused
        self.fused_backend = fused.backend
        self.compile_seconds += fused.compile_seconds
        return fused

    def _run_fused(self) -> None:
        u, ok, params = self._fused()
        self._last_u = u
        self._params_cache = (self._state, params)
        self._pending.append((ok, self._calls))
        self._t += 1
        if len(self._pending) >= FLUSH_EVERY:
            self._flush_fused()

    def _flush_fused(self) -> None:
        """Read the fused steps' finiteness flags (one host read for many steps): count
        the non-finite steps as divergences; past ``max_divergences`` raise."""
        pending, self._pending = getattr(self, "_pending", []), []
        if not pending:
            return
        oks = torch.stack([ok.reshape(-1) for ok, _ in pending]).cpu()
        for row, chain in torch.nonzero(~oks).tolist():
            calls = pending[row][1]
            self._num_nonfinite[chain] += 1
            index = calls - self._warmup_steps
            if not self._divergences[chain] or self._divergences[chain][-1] != index:
                self._divergences[chain].append(index)
            if self.num_chains is None:
                self._t -= 1  # as the eager step, an undone step does not advance the schedule
            count = int(self._num_nonfinite[chain])
            if count > self.max_divergences:
                label = "" if self.num_chains is None else f"chain {chain}: "
                raise NonFiniteError(
                    f"{label}non-finite potential or gradient at sampling draw {index} "
                    f"(fused step); {count} non-finite steps in all (max_divergences="
                    f"{self.max_divergences}). Lower step_size (now {self._step_size():.3g}) "
                    "or run with jit_compile=False to have the sites named"
                )

    def _noise_source(self):
        if self._chain_generators:
            return self._chain_generators
        if self.antithetic and self.num_chains is not None:
            return AntitheticPairs(self._generator)
        return self._generator

    def _mode_step(self) -> None:
        """One Adam step of every chain towards its mode (z = theta here)."""
        t = self._calls
        idx = self._next_indices()
        z = self._state.params["z"]
        u, gz, ok = self._gradient(z, idx)
        lr = adam_lr(t, self.adapter.mode_end)
        scale = self._lr_scale.to(z.dtype)
        if self.num_chains is None:
            scale = scale[0]
        else:
            scale = expand_mask(scale, z)
        gz = torch.where(expand_mask(ok, gz), gz, torch.zeros_like(gz))
        z_new, adam = adam_step(z, gz, self.adapter.adam, lr * scale)
        self._lr_scale = torch.where(ok.reshape(-1), self._lr_scale, 0.5 * self._lr_scale)
        if not ok.all():
            self._warm_nonfinite += int((~ok).sum())
        self.adapter.adam = adam
        self._state = self._state._replace(
            params={"z": torch.where(expand_mask(ok, z_new), z_new, z)}
        )
        self._last_u = u.mean()
        self._t += 1
        if t == self.adapter.mode_end - 1:
            self._finish_mode()

    def _first_chain(self, flat: Tensor) -> Tensor:
        return flat if self.num_chains is None else flat[0]

    def _restart_stuck_chains(self) -> None:
        """Vectorised warm-up: chains with 3 non-finite steps in a row start again, at rest,
        from the points of randomly chosen healthy chains."""
        stuck = self._bad_streak >= 3
        if not stuck.any() or stuck.all():
            return
        healthy = torch.nonzero(~stuck).flatten()
        gen = self._generator
        draw = torch.randint(len(healthy), (self.num_chains,), generator=gen, device=gen.device)
        pick = healthy[draw.to(healthy.device)]
        source = reset_momenta(self._state)
        moved = type(source)(**{
            f: ({k: v[pick] for k, v in x.items()} if isinstance(x, dict) else x[pick])
            for f, x in zip(source._fields, source, strict=True)
        })  # fmt: skip
        self._state = select_chains(stuck, moved, self._state)
        self._num_nonfinite[stuck] = 0
        self._bad_streak[stuck] = 0

    def _on_nonfinite(self, bad: Tensor, z: Tensor, idx, warm: bool) -> None:
        """Count the non-finite steps (divergences when sampling); in warm-up, three in a
        row halve a single chain's step size (vectorised chains restart instead, see
        :meth:`_restart_stuck_chains`); past max_divergences raise, naming step and sites."""
        chains = torch.nonzero(bad.reshape(-1)).flatten().tolist()
        for c in chains:
            self._num_nonfinite[c] += 1
            if not warm:
                index = self._calls - self._warmup_steps
                if not self._divergences[c] or self._divergences[c][-1] != index:
                    self._divergences[c].append(index)
        if warm:
            self._warm_nonfinite += len(chains)
            if self.num_chains is None and int(self._bad_streak[0]) >= 3:
                self._step_scale *= 0.5
                self._bad_streak.zero_()
                self._noise_std_key = None
        worst = max(chains, key=lambda c: int(self._num_nonfinite[c]))
        count = int(self._num_nonfinite[worst])
        if count <= self.max_divergences:
            return
        label = ""
        theta = self.whitening.to_params(z)
        if self.num_chains is not None:
            theta = {k: v[worst] for k, v in theta.items()}
            idx = None if idx is None else idx[worst] if idx.dim() == 2 else idx
            label = f"chain {worst}: "
        sites = self.potential.nonfinite_sites(theta, idx)
        stage = "warm-up" if warm else "sampling"
        raise NonFiniteError(
            f"{label}non-finite potential or gradient at step {self._t} ({stage}), sites "
            f"{sites}; {count} non-finite steps in all (max_divergences="
            f"{self.max_divergences}). Lower step_size (now {self._step_size():.3g}) "
            "or check the model's log-density there"
        )


def _kwargs_key(kwargs: dict) -> tuple:
    """The sampler arguments as a hashable key: values of numbers, identities of tensors
    (a new tensor means new values: the kernels compute them once per change)."""
    out = []
    for name, value in sorted(kwargs.items()):
        if isinstance(value, dict):
            out.append((name, tuple((k, _leaf_key(v)) for k, v in sorted(value.items()))))
        else:
            out.append((name, _leaf_key(value)))
    return tuple(out)


def _leaf_key(value):
    return ("tensor", id(value)) if isinstance(value, torch.Tensor) else value
