"""The headline speed benchmarks on a CUDA GPU, in under 5 minutes.

Runs ``benchmarks/speed.py``'s sections on ``cuda`` with GPU-sized settings and prints
the same ratio tables (per-step cost against a hand-written loop, 1000 chains against
one, Pima with 5000 chains end to end, per-step cost against N, an 8-member ensemble
vmapped against sequential, a 10k-step run end to end), then the fused step's draws
against the eager step's on the GPU. Every timed region ends with ``torch.cuda.synchronize()``.

Run: ``python benchmarks/gpu.py [--out results.json]`` (exits with a message without a
GPU); ``--device cpu --smoke`` runs every code path in tiny settings, as a check of the
script itself.
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
    "c_settings": [(200, 50)],
    "d_sizes": [10**3, 10**5, 10**6],  # each size compiles its own graph: kept to three
    "d_steps": 1000,
    "e_width": 900,
    "e_steps": 20,
    "f_steps": (1000, 9000),
}
SMOKE_CONFIG = {
    "a_steps": 100,
    "b_steps": 20,
    "b_chains": 50,
    "c_chains": 100,
    "c_settings": [(50, 10)],
    "d_sizes": [10**3, 10**4],
    "d_steps": 100,
    "e_width": 64,
    "e_steps": 2,
    "f_steps": (50, 100),
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
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny settings (script check)")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: nothing to run")
        return
    start = time.perf_counter()
    settings = SMOKE_CONFIG if args.smoke else GPU_CONFIG
    speed.config = lambda quick: dict(settings)  # these settings for every section
    results = speed.main(["--device", args.device])
    results["same_draws"] = same_draws(torch.device(args.device))
    results["total_seconds"] = time.perf_counter() - start
    print(f"total {results['total_seconds']:.0f} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2, default=str)


if __name__ == "__main__":
    main()
