r"""The warm-up adapter: configured once by a kernel, stepped each warm-up iteration;
the kernel only reads its results (as Pyro's ``WarmupAdapter`` serves HMC).

Warm-up of :math:`W \ge 20` steps at :math:`T > 0`, in Stan's layout:

1. **Mode** (the first 15%): Adam steps on minibatch gradients (learning rate
   cosine-decayed from 0.1 to 0.001 in unconstrained units; scale-free, so neither
   stiff nor flat coordinates misbehave), then a full-data polish of the first chain
   (damped Newton, or L-BFGS for more than 200 parameters; skipped when a data pass is
   too large to afford). The curvature there (the Hessian, or for large models the
   larger of the empirical Fisher's and the Hessian's estimated diagonals) gives the
   first preconditioner :math:`D_0 = H^{-1}`, dense or diagonal, and the
   control-variate centre.
2. **Windows** (doubling, up to 90%): the sampler runs at temperature :math:`T`;
   after each window :math:`D` becomes the pooled within-chain covariance of the
   draws times :math:`N/T`, shrunk towards :math:`D_0` with weight
   :math:`n_\mathrm{eff} / (n_\mathrm{eff} + 20)`, :math:`n_\mathrm{eff} = C\,n\,
   \min(1, \epsilon)` (:math:`C` chains, :math:`n` steps, step size :math:`\epsilon`
   relative to unit curvature: a slowly mixing chain's short window is trusted
   less), and the control variates are re-centred at the window's mean.
3. **Terminal buffer** (the last 10%): everything frozen.

The gradient noise is measured every 5 steps of phases 2-3 from per-example
gradients (a fresh iid sample of at least 256 data) and turned into :math:`\beta` by
:func:`~pyro_sgmcmc.kernels.gradients.minibatch_beta`. At the end, the second half of
warm-up is checked (:func:`check_warmup`).
"""

from __future__ import annotations

from collections import deque
from typing import Any

import torch
from torch import Tensor

from pyro_sgmcmc.kernels.mode import MAX_DENSE, AdamState, adam_init, lbfgs, newton
from pyro_sgmcmc.kernels.moments import ChainMoments, split_rhat
from pyro_sgmcmc.kernels.whitening import Whitening
from pyro_sgmcmc.samplers.adaptation import adaptation_windows

#: Data per estimate of the gradient noise and the empirical Fisher during warm-up.
ESTIMATION_BATCH = 256
#: Noise estimates (one every 5 steps) that beta averages: the last 200 steps.
NOISE_WINDOW = 40
#: Split R-hat above which warm-up is reported as not converged.
RHAT_LIMIT = 1.1
#: Step-size cut (requested / used) above which the gradient noise is reported.
STEP_CUT_LIMIT = 4.0


class WarmupAdapter:
    """Schedule and estimates of one warm-up.

    Args:
        warmup_steps: :math:`W`.
        adapt_mass: learn the preconditioner (and find the mode first).
        dense: a dense preconditioner (else diagonal).
        centre_cv: re-centre control variates after each window.
        estimate_noise: measure :math:`\\beta`.
        polish: polish the mode on the full data.
    """

    def __init__(
        self,
        warmup_steps: int,
        *,
        adapt_mass: bool,
        dense: bool,
        centre_cv: bool,
        estimate_noise: bool,
        polish: bool,
    ) -> None:
        active = warmup_steps >= 20
        self.warmup_steps = warmup_steps
        self.adapt_mass = adapt_mass and active
        self.dense = dense
        self.centre_cv = centre_cv and active
        self.estimate_noise = estimate_noise and active
        self.polish = polish
        self.mode_end = int(0.15 * warmup_steps) if self.adapt_mass else 0
        self.windows = adaptation_windows(warmup_steps) if active else []
        last_start = self.windows[-2] + 1 if len(self.windows) > 1 else self.mode_end
        #: The checked stretch: the last window and the terminal buffer, in two halves.
        self.check_start = last_start
        self.check_mid = (last_start + warmup_steps) // 2
        self.adam: AdamState | None = None
        self.window = ChainMoments(dense)
        self.halves = (ChainMoments(), ChainMoments())
        self.noise: deque[Tensor] = deque(maxlen=NOISE_WINDOW)
        self.base_cov: Tensor | None = None
        self.polish_report: dict[str, Any] = {}
        self.report: dict[str, Any] = {"problems": [], "notes": []}

    # ------------------------------------------------------------------ schedule
    def optimising(self, t: int) -> bool:
        """Whether warm-up step ``t`` is an Adam step towards the mode."""
        return t < self.mode_end

    def window_ends(self, t: int) -> bool:
        return bool(self.windows) and t == self.windows[0]

    # ------------------------------------------------------------------ the mode
    def start_mode(self, z: Tensor) -> None:
        self.adam = adam_init(z)

    def find_mode(self, fn, start: Tensor, num_data: int, temperature: float):
        """Polish ``start`` on the full-data per-datum potential ``fn`` (flat vector ->
        scalar). Newton stops at a decrement of :math:`10^{-3} T / N`: the mode within
        about 0.03 posterior sd."""
        if not self.polish:
            return start, None
        tol = 1e-3 * max(temperature, 1e-3) / num_data
        try:
            if start.numel() <= MAX_DENSE:
                result = newton(fn, start, tol=tol)
            else:
                result = lbfgs(fn, start, tol=1e-5)
        except (RuntimeError, ValueError) as e:  # e.g. no double backward for an op
            self.report["notes"].append(f"mode polish skipped ({type(e).__name__}: {e})")
            return start, None
        self.polish_report = {"grad_norm": result.grad_norm, "converged": result.converged}
        if not result.converged:
            self.report["notes"].append(
                f"the full-data mode search stopped before its tolerance (gradient norm "
                f"{result.grad_norm:.3g}); the sampling windows continue from there"
            )
        return result.z, result.hessian

    def curvature_whitening(
        self, like, mode: Tensor, hessian: Tensor | None, diag: Tensor | None
    ) -> Whitening:
        """:math:`D_0 = H^{-1}` at the mode: dense from the Hessian, else diagonal."""
        if hessian is not None and self.dense:
            w = Whitening.from_precision(like, mode, hessian)
        else:
            h = hessian.diagonal() if hessian is not None else diag
            w = Whitening.from_precision(like, mode, h)
        self.base_cov = w.scale @ w.scale.T if w.dense else w.scale.square()
        return w

    # ------------------------------------------------------------------ windows
    def observe(self, t: int, flat: Tensor) -> None:
        """Record the draws ``(C, d)`` of warm-up step ``t`` (sampling phase)."""
        self.window.update(flat)
        if t >= self.check_start:
            self.halves[0 if t < self.check_mid else 1].update(flat)

    def end_window(
        self, like, pooled_mean: Tensor, pooled_cov: Tensor, num_chains: int, step: float,
        num_data: int, temperature: float,
    ) -> Whitening | None:  # fmt: skip
        """Close a window: the new whitening (``None`` without mass adaptation)."""
        n = self.window.count
        self.windows.pop(0)
        self.window = ChainMoments(self.dense)
        if not self.adapt_mass:
            return None
        sample = pooled_cov * (num_data / temperature)
        if self.base_cov is not None and sample.dim() > self.base_cov.dim():
            # A dense window over a diagonal D0 (no Hessian at the mode): stay diagonal.
            sample = sample.diagonal()
        n_eff = num_chains * n * min(1.0, step)
        weight = n_eff / (n_eff + 20.0)
        cov = sample if self.base_cov is None else weight * sample + (1 - weight) * self.base_cov
        return Whitening.from_covariance(like, pooled_mean, cov)

    # ------------------------------------------------------------------ noise
    def add_noise(self, var: Tensor) -> None:
        self.noise.append(var)

    def mean_noise(self) -> Tensor:
        """The mean of the recent noise covariances (theta coordinates)."""
        return sum(self.noise) / len(self.noise)

    # ------------------------------------------------------------------ checks
    def check(self, step_cut: float, nonfinite: int, step_size: float) -> dict[str, Any]:
        """The end-of-warm-up report (:func:`check_warmup`)."""
        report = check_warmup(self.halves, step_cut, nonfinite, self.polish_report, step_size)
        report["problems"] = self.report["problems"] + report["problems"]
        report["notes"] = self.report["notes"] + report["notes"]
        self.report = report
        return report

    def state_dict(self) -> dict[str, Any]:
        state = dict(vars(self))
        state["window"] = self.window.state_dict()
        state["halves"] = [h.state_dict() for h in self.halves]
        state["noise"] = list(self.noise)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        window, halves, noise = state.pop("window"), state.pop("halves"), state.pop("noise")
        vars(self).update(state)
        self.window = ChainMoments(self.dense)
        self.window.load_state_dict(window)
        self.halves = (ChainMoments(), ChainMoments())
        for h, s in zip(self.halves, halves, strict=True):
            h.load_state_dict(s)
        self.noise = deque(noise, maxlen=NOISE_WINDOW)


def rhat_limit(steps: int, step_size: float) -> float:
    r"""The split-:math:`\hat R` above which the check complains, for halves of
    ``steps`` steps: 1.1, or more where the halves are short next to the chains'
    autocorrelation time :math:`\tau \approx 2/\epsilon` steps (unit whitened
    curvature; SGLD's is about this, SGHMC's less). Stationary chains then give
    :math:`\hat R \approx (1 - \tau/n)^{-1/2}` (each half's variance is estimated from
    too few independent draws), e.g. 1.3 for 50-step halves at step 0.1, which is not a
    failure; allow 1.05x that.

    Examples:
        >>> rhat_limit(500, 0.1), round(rhat_limit(50, 0.1), 3)
        (1.1, 1.356)
    """
    ratio = min(2.0 / max(step_size, 1e-6) / max(steps, 1), 0.9)
    return max(RHAT_LIMIT, 1.05 * (1.0 - ratio) ** -0.5)


def check_warmup(
    halves: tuple[ChainMoments, ChainMoments],
    step_cut: float,
    nonfinite: int,
    polish: dict[str, Any],
    step_size: float = 0.1,
) -> dict[str, Any]:
    r"""Whether warm-up reached its own conditions; ``problems`` mean the draws may be
    wrong, ``notes`` that they are right but costlier than they should be.

    * the chains' two halves of the last window and terminal buffer disagree (split
      :math:`\hat R` above :func:`rhat_limit`, 1.1 for long enough halves): a chain
      still drifting, or chains in different modes;
    * the gradient noise forced the step size down by more than 4x;
    * warm-up steps were non-finite.
    """
    problems, notes = [], []
    if halves[0].count >= 4 and halves[1].count >= 4:
        rhat = split_rhat(*halves)
        worst = float(rhat.max())
        first, second = halves
        limit = rhat_limit(min(first.count, second.count), step_size)
        sd = torch.cat([first.variance(), second.variance()]).mean(0).sqrt()
        shift = float(((second.mean - first.mean).abs() / sd.clamp(min=1e-30)).max())
        # One or two chains' halves disagree by chance when they mix slowly (SGLD):
        # there, also ask for a shift of more than 2 posterior sd.
        many = first.mean.shape[0] >= 4
        if not worst < limit and (many or shift > 2.0):
            problems.append(
                f"warm-up did not converge: the chains' last warm-up steps disagree (split "
                f"R-hat {worst:.3g} > {limit:.3g}; halves up to {shift:.3g} sd "
                "apart): a chain still drifting, or chains in different modes. Use more "
                "warm-up steps, a larger step_size, or check the model"
            )
    if step_cut > STEP_CUT_LIMIT:
        problems.append(
            f"the minibatch gradient noise forced the step size down {step_cut:.3g}x "
            "(more friction than the step allows): mixing will be slow. Raise "
            "subsample_size or keep control variates on"
        )
    elif step_cut > 1.0:
        notes.append(f"step size reduced {step_cut:.3g}x to absorb the minibatch noise")
    if nonfinite:
        notes.append(f"{nonfinite} warm-up steps were non-finite and undone")
    if polish and not polish.get("converged", True):
        notes.append(f"mode polish gradient norm {polish['grad_norm']:.3g}")
    return {"problems": problems, "notes": notes}
