"""How a kernel drives its :class:`~pyro_sgmcmc.kernels.warmup.WarmupAdapter`: finishing
the mode search, measuring the gradient noise, closing windows and the final check.
The estimates themselves are the pure functions of
:mod:`~pyro_sgmcmc.kernels.estimates`."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from pyro_sgmcmc.kernels.estimates import (
    curvature_diagonal,
    far_chains,
    laplace_draws,
    noise_covariance,
    noise_in_z,
    replace_rows,
)
from pyro_sgmcmc.kernels.gradients import MAX_CV_TABLE, ControlVariateGradient, minibatch_beta
from pyro_sgmcmc.kernels.mode import MAX_DENSE
from pyro_sgmcmc.kernels.warmup import ESTIMATION_BATCH, WarmupAdapter
from pyro_sgmcmc.minibatch import generator_device
from pyro_sgmcmc.potential import PyroPotential
from pyro_sgmcmc.tree import unflatten

#: Chains whose positions the gradient-noise estimate averages over (vectorised runs).
NOISE_CHAINS = 8


class WarmupError(RuntimeError):
    """Warm-up missed its own conditions and the kernel was built with ``strict=True``."""


class WarmupMixin:
    """Warm-up control of :class:`~pyro_sgmcmc.kernels.base.SGMCMCKernel`."""

    def _make_adapter(self, warmup_steps: int, cv: bool) -> WarmupAdapter | None:
        if self.temperature == 0 or warmup_steps < 20:
            return None
        pyro_model = isinstance(self.potential, PyroPotential)
        dense = self.full_mass is True or (
            self.full_mass == "auto" and self._num_params <= MAX_DENSE
        )
        return WarmupAdapter(
            warmup_steps,
            adapt_mass=self.adapt_mass_matrix and pyro_model,
            dense=dense,
            centre_cv=cv,
            estimate_noise=self._estimates_noise(),
            polish=pyro_model and self._full_pass_affordable(),
        )

    def _full_pass_affordable(self) -> bool:
        pot = self.potential
        if pot.plate_name is None or pot.subsample_size is None:
            return True
        return pot.plate_size * self._num_params <= MAX_CV_TABLE

    def _broadcast(self, values: dict[str, Tensor]) -> dict[str, Tensor]:
        """Estimates made on chain 0: in a distributed run, global chain 0's (rank 0's)."""
        if self.chain_group is None:
            return values
        return self.chain_group.broadcast(values)

    def _pooled(self, local_sum: Tensor) -> Tensor:
        """A sum over this process's chains -> the mean over all chains of the run."""
        if self.chain_group is None:
            return local_sum / (self.num_chains or 1)
        return self.chain_group.chain_mean({"x": local_sum[None]})["x"]

    def _finish_mode(self) -> None:
        """Polish chain 0's Adam end point, whiten by the curvature there, and centre the
        control variates at the mode."""
        like = self._like
        flat = self.whitening.to_flat(self._state.params["z"])
        start = self._first_chain(flat)

        def fn(v: Tensor) -> Tensor:
            return self.potential.potential(unflatten(v, like), None)

        mode, hessian = self.adapter.find_mode(fn, start, self.potential.num_data, self.temperature)
        shared = {"mode": mode}
        if hessian is not None:
            shared["hessian"] = hessian
        else:
            shared["diag"] = curvature_diagonal(
                self.potential, like, mode, self._estimation_indices(),
                self._estimation_indices(True), self._generator,
            )  # fmt: skip
        shared = self._broadcast(shared)
        mode = shared["mode"]
        self.whitening = self.adapter.curvature_whitening(
            like, mode, shared.get("hessian"), shared.get("diag")
        )
        if self.num_chains is None:
            flat = mode
        else:
            flat = self._rescue_far_chains(flat.clone(), mode)
        if isinstance(self.estimator, ControlVariateGradient):
            self.estimator.set_centre(unflatten(mode, like))
        self._state = self._init_state(self.whitening.to_z(unflatten(flat, like)))
        self._prev_state = self._state
        self._measure_noise(self._state.params["z"])

    def _rescue_far_chains(self, flat: Tensor, mode: Tensor) -> Tensor:
        """Vectorised chains that ended the mode search far above the mode in energy
        (:func:`~pyro_sgmcmc.kernels.estimates.far_chains`) start from draws of the
        Laplace approximation instead."""
        if self.chain_group is None or self.chain_group.offset == 0:
            flat[0] = mode  # global chain 0 was polished
        pot = self.potential
        idx = self._estimation_indices()
        if idx is not None and self.chain_group is not None:
            idx = self._broadcast({"i": idx})["i"]
        far = far_chains(pot, self._like, flat, mode, idx, self.temperature)
        if far.any():
            gens = self._chain_generators or [self._generator]
            draws = torch.cat([
                laplace_draws(self.whitening, (1, flat.shape[1]), self.temperature,
                              pot.num_data, gens[c % len(gens)])
                for c in range(flat.shape[0])
            ])  # fmt: skip
            flat = replace_rows(far, draws, flat)
            self.adapter.report["notes"].append(
                f"{int(far.sum())} of {self.num_chains} chains ended the mode search far "
                "above the mode and restarted from the Laplace approximation"
            )
        return flat

    def _noise_like(self) -> Tensor:
        """Zeros shaped like a noise estimate (a process with none of the noise chains)."""
        d, ref = self._num_params, self.whitening.shift
        return ref.new_zeros((d, d) if self.whitening.dense else (d,))

    def _estimation_indices(self, sample: bool = False, generator=None):
        """Data for curvature and gradient-noise estimates: a fresh iid sample of
        ``max(B, 256)`` indices (all data if fewer), not the step's own batch of ``B``
        (per-example gradient variances are heavy-tailed: one batch of 32 can
        overestimate beta several-fold). ``None`` means all data."""
        pot = self.potential
        if pot.plate_name is None:
            return None
        n = pot.plate_size
        b = pot.subsample_size or n
        size = min(n, max(b, ESTIMATION_BATCH))
        device = pot.indices.device if pot.indices is not None else None
        if size == n:
            return torch.arange(n, device=device) if sample else None
        gen = generator or self._generator
        idx = torch.randint(n, (size,), generator=gen, device=generator_device(gen))
        return idx.to(device) if device is not None else idx

    def _measure_noise(self, z: Tensor) -> None:
        """Add one estimate of the per-example gradient noise (chain 0, in theta) and
        refresh beta; a dense whitening turns into the noise's eigenbasis
        (:mod:`~pyro_sgmcmc.kernels.estimates`)."""
        if not self.adapter.estimate_noise:
            return
        # The noise depends on where a chain is (control variates: on its distance from
        # the centre); vectorised runs average it over the first 8 chains of the run,
        # each with data drawn from its own generator where chains have one (so that a
        # distributed run measures exactly what the same chains in one process do).
        if self.num_chains is None:
            chains = [(z, self._generator)]
        else:
            offset = 0 if self.chain_group is None else self.chain_group.offset
            local = range(max(0, min(self.num_chains, NOISE_CHAINS - offset)))
            gens = self._chain_generators or [self._generator] * self.num_chains
            chains = [(z[c], gens[c]) for c in local]
        cov = 0.0
        for zc, gen in chains:
            theta = self.whitening.to_params(zc)
            idx = self._estimation_indices(True, gen)
            cov = cov + noise_covariance(self.estimator, self.whitening, theta, idx)
        total = min(NOISE_CHAINS, self._chains_in_run())
        if self.chain_group is None:
            cov = cov / total
        else:
            local_sum = cov if torch.is_tensor(cov) else self._noise_like()
            cov = self._pooled(local_sum) * self.chain_group.num_chains / total
        self.adapter.add_noise(cov)
        var, q = noise_in_z(self.whitening, self.adapter.mean_noise())
        if q is not None:
            self._rotate(q)
        pot = self.potential
        self._beta = {"z": minibatch_beta(var, pot.subsample_size, pot.num_data, self.temperature)}
        self._on_new_beta()

    def _rotate(self, q: Tensor) -> None:
        """Turn z (and the momenta) by ``q``: the sampler's state in the new basis."""
        self.whitening = self.whitening.rotated(q)
        fields = {}
        for name, value in zip(self._state._fields, self._state, strict=True):
            turned = {k: v @ q for k, v in value.items()} if isinstance(value, dict) else None
            fields[name] = value if turned is None else turned
        self._state = type(self._state)(**fields)
        self._prev_state = self._state

    def _adapt(self, idx) -> None:
        adapter, t = self.adapter, self._calls
        z = self._state.params["z"]
        flat = self.whitening.to_flat(z)
        adapter.observe(t, flat if self.num_chains is not None else flat[None])
        if t % 5 == 0:
            self._measure_noise(z)
        if not adapter.window_ends(t):
            return
        window = adapter.window
        mean = self._pooled(window.mean.sum(0))
        n = max(window.count - 1, 1)
        if adapter.dense:
            cov = self._pooled(0.5 * (window.cross + window.cross.T)) / n
        else:
            cov = self._pooled(window.m2.sum(0)) / n
        if isinstance(self.estimator, ControlVariateGradient):
            self.estimator.set_centre(unflatten(mean, self._like))
            self.adapter.noise.clear()
        new = adapter.end_window(
            self._like, mean, cov, self._chains_in_run(), self._schedule(self._t),
            self.potential.num_data, self.temperature,
        )  # fmt: skip
        if new is not None:
            params = self.whitening.to_params(z)
            self.whitening = new
            z = new.to_z(params)
            self._state = self._state._replace(params={"z": z})
            self._prev_state = self._state
        self._noise_std_key = None
        self._measure_noise(z)

    def _chains_in_run(self) -> int:
        if self.num_chains is None:
            return 1
        return self.num_chains if self.chain_group is None else self.chain_group.num_chains

    def _end_warmup(self) -> None:
        if self.adapter is None:
            return
        self._step_cut = 1.0
        step = self._step_size()  # records the cut in force from now on (SGHMC's limit)
        report = self.adapter.check(self._step_cut, self._warm_nonfinite, step)
        self.warmup_report = report
        for problem in report["problems"]:
            if self.strict:
                raise WarmupError(problem)
            warnings.warn(problem, stacklevel=4)
