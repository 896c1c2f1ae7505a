"""Benchmark: SGHMC (batch 32) through ``pyro.infer.MCMC`` on the Pima benchmark.

Everything is measured side by side in one process, on one torch thread:

1. **Quality** with the documented defaults: every coefficient's mean error in units
   of the reference NUTS sd, and sd ratio, for several seeds (target: |error| <= 0.1,
   sd within 15%, in at most 25k steps at batch 32).
2. **Per-step cost** against a hand-written PyTorch SGHMC loop (hand-written log
   posterior, autograd, the same update): ours through ``MCMC`` without and with
   ``jit_compile`` and thinning (target: at most 1.5x).
3. **Minimum bulk ESS per second** against Pyro's NUTS (target: at least 0.25x).

Run: ``python benchmarks/pima_sghmc.py [--quick] [--out results.json]``.
"""

from __future__ import annotations

import argparse
import json
import time

import pyro
import torch
import torch.nn.functional as F
from pyro.infer import MCMC, NUTS

from pyro_sgmcmc import SGHMCKernel
from pyro_sgmcmc.datasets import load_pima, logistic_regression_model
from pyro_sgmcmc.diagnostics.ess import min_bulk_ess


def run_nuts(data, warmup: int, samples: int, seed: int):
    pyro.set_rng_seed(seed)
    mcmc = MCMC(
        NUTS(logistic_regression_model),
        num_samples=samples,
        warmup_steps=warmup,
        disable_progbar=True,
    )
    start = time.perf_counter()
    mcmc.run(data.X, data.y)
    return mcmc.get_samples()["w"], time.perf_counter() - start


def run_sghmc(data, warmup: int, steps: int, seed: int, thinning: int = 1, jit: bool = False):
    """Draws, total seconds, and seconds per sampling step (warm-up excluded)."""
    pyro.set_rng_seed(seed)
    kernel = SGHMCKernel(
        logistic_regression_model, subsample_size=32, thinning=thinning, jit_compile=jit
    )
    first_draw = []

    def hook(kernel, params, stage, i):
        if stage.startswith("Sample") and i == 0:
            first_draw.append(time.perf_counter())

    mcmc = MCMC(
        kernel,
        num_samples=steps // thinning,
        warmup_steps=warmup,
        disable_progbar=True,
        hook_fn=hook,
    )
    start = time.perf_counter()
    mcmc.run(data.X, data.y)
    end = time.perf_counter()
    per_step = (end - first_draw[0]) / ((steps // thinning - 1) * thinning)
    return mcmc.get_samples()["w"], end - start, per_step


def hand_written_sghmc(data, steps: int, step_size=0.1, alpha=2.0, seed=0) -> float:
    """A plain PyTorch SGHMC loop; returns seconds per step."""
    X, y = data.X, data.y
    n, batch = len(y), 32
    gen = torch.Generator().manual_seed(seed)
    w, m = torch.zeros(X.shape[1]), torch.zeros(X.shape[1])
    noise = (2 * alpha / n) ** 0.5
    decay = 1 - step_size * alpha

    def log_posterior(w, idx):
        log_prior = -0.5 * (w * w).sum()
        log_lik = -F.binary_cross_entropy_with_logits(X[idx] @ w, y[idx], reduction="sum")
        return log_prior + n / batch * log_lik

    start = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(n, (batch,), generator=gen)
        leaf = w.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(-log_posterior(leaf, idx) / n, leaf)
        m = decay * m - grad + noise * torch.randn(w.shape, generator=gen)
        w = w + step_size * m
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_pima()
    if args.quick:
        ref_warmup, ref_samples, sg_warmup, sg_steps, cost_steps = 500, 3000, 1000, 9000, 2000
    else:
        ref_warmup, ref_samples, sg_warmup, sg_steps, cost_steps = 1000, 20000, 2000, 23000, 10000
    results: dict = {}

    # 1. Reference: a long NUTS run; and NUTS at a usual length for ESS/s.
    ref, ref_seconds = run_nuts(data, ref_warmup, ref_samples, seed=100)
    ref_mean, ref_sd = ref.mean(0), ref.std(0)
    nuts_ess = min_bulk_ess(ref)
    results["nuts"] = {
        "seconds": ref_seconds,
        "draws": ref_samples,
        "min_bulk_ess": nuts_ess,
        "ess_per_second": nuts_ess / ref_seconds,
    }
    print(
        f"Pyro NUTS reference: {ref_warmup} + {ref_samples} draws in {ref_seconds:.1f} s, "
        f"min bulk ESS {nuts_ess:.0f} ({nuts_ess / ref_seconds:.1f} ESS/s)"
    )

    # 2. Quality with the defaults, several seeds (jit on: same draws as eager).
    quality = []
    for seed in range(args.seeds):
        draws, seconds, _ = run_sghmc(data, sg_warmup, sg_steps, seed, thinning=1, jit=True)
        err = ((draws.mean(0) - ref_mean) / ref_sd).abs()
        ratio = draws.std(0) / ref_sd
        ess = min_bulk_ess(draws)
        quality.append(
            {
                "seed": seed,
                "steps": sg_warmup + sg_steps,
                "max_abs_mean_error_sd": float(err.max()),
                "sd_ratio_min": float(ratio.min()),
                "sd_ratio_max": float(ratio.max()),
                "min_bulk_ess": ess,
                "seconds": seconds,
                "ess_per_second": ess / seconds,
            }
        )
        q = quality[-1]
        print(
            f"SGHMC seed {seed}: {q['steps']} steps, max |mean err| "
            f"{q['max_abs_mean_error_sd']:.3f} NUTS sd, sd ratio {q['sd_ratio_min']:.3f}-"
            f"{q['sd_ratio_max']:.3f}, min bulk ESS {ess:.0f}, {ess / seconds:.1f} ESS/s "
            f"({ess / seconds / results['nuts']['ess_per_second']:.2f}x NUTS)"
        )
    results["quality"] = quality

    # 3. Per-step cost, all in this process.
    hand = hand_written_sghmc(data, cost_steps)
    cost = {"hand_written_us": hand * 1e6}
    for label, thinning, jit in [
        ("mcmc", 1, False),
        ("mcmc_jit", 1, True),
        ("mcmc_jit_thin10", 10, True),
    ]:
        # With warm-up, so that the default control variates are on while timing.
        _, _, per_step = run_sghmc(data, 500, cost_steps, seed=0, thinning=thinning, jit=jit)
        cost[f"{label}_us"] = per_step * 1e6
        cost[f"{label}_ratio"] = per_step / hand
    results["cost_per_step"] = cost
    print(
        f"per step: hand-written {cost['hand_written_us']:.0f} us; through MCMC "
        f"{cost['mcmc_us']:.0f} us ({cost['mcmc_ratio']:.2f}x), jit {cost['mcmc_jit_us']:.0f} "
        f"us ({cost['mcmc_jit_ratio']:.2f}x), jit + thinning 10 "
        f"{cost['mcmc_jit_thin10_us']:.0f} us ({cost['mcmc_jit_thin10_ratio']:.2f}x)"
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
