"""The headline speed benchmarks on a CUDA GPU, in under 5 minutes.

Runs ``benchmarks/speed.py``'s sections on ``cuda`` with GPU-sized settings and prints
the same ratio tables (per-step cost against a hand-written loop, 1000 chains against
one, Pima with 5000 chains end to end, per-step cost against N, an 8-member ensemble
vmapped against sequential), then the fused step's draws against the eager step's on
the GPU. Every timed region ends with ``torch.cuda.synchronize()``.

Run: ``python benchmarks/gpu.py [--out results.json]`` (exits with a message without a
GPU).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pyro
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import speed  # noqa: E402

from pyro_sgmcmc import SGHMCKernel  # noqa: E402
from pyro_sgmcmc.datasets import load_pima, logistic_regression_model  # noqa: E402

GPU_CONFIG = {
    "a_steps": 2000,
    "b_steps": 300,
    "b_chains": 1000,
    "c_chains": 5000,
    "c_settings": [(200, 50), (300, 100)],
    "d_sizes": [10**3, 10**4, 10**5, 10**6],
    "d_steps": 1000,
    "e_width": 900,
    "e_steps": 20,
}


def same_draws(device) -> dict:
    """The fused step (inductor) against the eager step on ``device``: max |difference|."""
    data = load_pima()
    X, y = data.X.to(device), data.y.to(device)
    draws = []
    for jit in (False, True):
        pyro.set_rng_seed(0)
        kernel = SGHMCKernel(logistic_regression_model, subsample_size=32, jit_compile=jit)
        mcmc = pyro.infer.MCMC(kernel, num_samples=300, warmup_steps=200, disable_progbar=True)
        mcmc.run(X, y)
        draws.append(mcmc.get_samples()["w"])
    diff = float((draws[0] - draws[1]).abs().max())
    print(f"\nfused (inductor) vs eager draws on {device}: max |difference| {diff:.2e}")
    return {"max_abs_difference": diff}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to run")
        return
    start = time.perf_counter()
    speed.config = lambda quick: dict(GPU_CONFIG)  # the GPU's settings for every section
    argv = ["--device", "cuda"]
    results = speed.main(argv)
    results["same_draws"] = same_draws(torch.device("cuda"))
    results["total_seconds"] = time.perf_counter() - start
    print(f"total {results['total_seconds']:.0f} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2, default=str)


if __name__ == "__main__":
    main()
