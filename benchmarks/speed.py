"""Benchmark: the cost of a sampling step, fused and compiled (``jit_compile=True``).

Everything is measured side by side in one process, on one torch thread, on the
device given (``--device cuda`` for a GPU; ``benchmarks/gpu.py`` runs it there). Times
are ``wall (cpu)`` pairs where both are taken: this process's CPU time is close to the
wall time on an idle machine, so the two differ when other processes load it (the load
average is printed with the tables). Compilation is timed apart from the steps.

a. **Serial per-step cost** (Pima, SGHMC, batch 32, after warm-up, control variates
   on): a hand-written PyTorch SGHMC loop against ``pyro.infer.MCMC`` with
   ``jit_compile=False``, ``"auto"``, ``True`` (fused, TorchScript) and ``True`` (fused,
   inductor), thinning 1 and 10. Goal: at most 1.2x the hand-written loop.
b. **Vectorised chains**: one chain against 1000 vectorised chains, per sampling step,
   through ``pyro_sgmcmc.MCMC`` (eager and fused). Goal: 1000 chains at most 5x one.
c. **Pima, 5000 vectorised chains end to end** (warm-up included), fused: seconds,
   compilation seconds, and the KSD of the last draws against the KSD expected of as
   many exact iid draws (``E[KSD^2] = E_p[k_p(x, x)] / n``). Goal: <= 1.5 s with a KSD
   no worse than exact iid draws (NumPyro's NUTS: 3.7 s warm, the issue's figure).
d. **Per-step cost against N** (synthetic logistic regression, d = 8, N = 1e3 ... 1e6),
   fused. Goal: within 1.2x from 1e3 to 1e6.
e. **Ensemble**: 8 members of a 1M-parameter MLP (``ModulePotential``), SGHMC steps on
   batches of 128, one ``torch.func.vmap`` over the members against 8 sequential
   members (eager, and compiled with ``samplers.compiled.compiled_step``). Goal: vmapped
   at most 0.5x the sequential time.
f. **End to end**: a 25k-step serial run (1000 warm-up + 24000 sampling steps),
   compilation included, ``"auto"`` against the fused step. Goal: not slower.

Run: ``python benchmarks/speed.py [--quick] [--device cuda] [--out results.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import warnings

import numpy as np
import pyro
import torch
import torch.nn.functional as F
from pyro.infer import MCMC

from pyro_sgmcmc import MCMC as VectorMCMC
from pyro_sgmcmc import ModulePotential, PyroPotential, SGHMCKernel
from pyro_sgmcmc.datasets import load_pima, logistic_regression_model
from pyro_sgmcmc.diagnostics.ksd import ksd, potential_score
from pyro_sgmcmc.nn import categorical_log_likelihood
from pyro_sgmcmc.samplers import sghmc
from pyro_sgmcmc.samplers.compiled import compiled_step

BATCH = 32


def now() -> np.ndarray:
    return np.array([time.perf_counter(), time.process_time()])


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def wc(x, spec: str = ".1f") -> str:
    return f"{x[0]:{spec}} ({x[1]:{spec}})"


# ----------------------------------------------------------------------------- a


def hand_written(X, y, steps: int, step_size=0.1, alpha=2.0, seed=0) -> np.ndarray:
    """A plain PyTorch SGHMC loop; ``[wall, cpu]`` seconds per step."""
    n = len(y)
    gen = torch.Generator(device=X.device).manual_seed(seed)
    w, m = X.new_zeros(X.shape[1]), X.new_zeros(X.shape[1])
    noise = (2 * alpha / n) ** 0.5
    decay = 1 - step_size * alpha

    def log_posterior(w, idx):
        log_lik = -F.binary_cross_entropy_with_logits(X[idx] @ w, y[idx], reduction="sum")
        return -0.5 * (w * w).sum() + n / BATCH * log_lik

    for rep in range(2):  # the first round warms the allocator and autograd
        sync(X.device)
        start = now()
        for _ in range(steps if rep else 50):
            idx = torch.randint(n, (BATCH,), generator=gen, device=X.device)
            leaf = w.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(-log_posterior(leaf, idx) / n, leaf)
            m = decay * m - grad + noise * torch.randn(w.shape, generator=gen, device=X.device)
            w = w + step_size * m
        sync(X.device)
    return (now() - start) / steps


def through_mcmc(X, y, steps: int, jit, backend="inductor", thinning=1, warmup=300):
    """Per sampling step ``[wall, cpu]`` (compilation excluded) and the compile seconds."""
    pyro.set_rng_seed(0)
    kernel = SGHMCKernel(
        logistic_regression_model, subsample_size=BATCH, thinning=thinning,
        jit_compile=jit, compile_backend=backend,
    )  # fmt: skip
    stamps = []

    def hook(kernel, params, stage, i):
        if stage.startswith("Sample") and i in (0, steps // thinning - 1):
            sync(X.device)
            stamps.append(now())

    mcmc = MCMC(kernel, num_samples=steps // thinning, warmup_steps=warmup,
                disable_progbar=True, hook_fn=hook)  # fmt: skip
    mcmc.run(X, y)
    per_step = (stamps[1] - stamps[0]) / ((steps // thinning - 1) * thinning)
    return per_step, kernel.compile_seconds, kernel.fused_backend


def serial(X, y, cfg, results) -> None:
    steps = cfg["a_steps"]
    hand = hand_written(X, y, steps)
    rows = {"hand-written loop": (hand, 0.0, None)}
    for label, jit, backend, thin in [
        ("MCMC, jit_compile=False", False, "inductor", 1),
        ("MCMC, jit_compile='auto'", "auto", "inductor", 1),
        ("MCMC, jit_compile=True, torchscript", True, "torchscript", 1),
        ("MCMC, jit_compile=True, inductor", True, "inductor", 1),
        ("MCMC, jit_compile=True, inductor, thinning 10", True, "inductor", 10),
    ]:
        rows[label] = through_mcmc(X, y, steps, jit, backend, thin)
    print(f"\na. serial Pima SGHMC, batch 32, {steps} sampling steps: us per step")
    print(f"{'':48s} {'wall (cpu) us':>18s} {'ratio':>7s} {'compile s':>9s}")
    out = {}
    for label, (t, comp, backend) in rows.items():
        ratio = t / hand
        print(f"{label:48s} {wc(t * 1e6):>18s} {ratio[0]:7.2f} {comp:9.1f}")
        out[label] = {"us": (t * 1e6).tolist(), "ratio": ratio.tolist(), "compile_s": comp,
                      "backend": backend}  # fmt: skip
    results["a_serial"] = out


# ----------------------------------------------------------------------------- b, c


def vectorised(X, y, chains, warmup, samples, jit, keep="last", seed=0):
    pyro.set_rng_seed(seed)
    stamps = []

    def hook(kernel, params, stage, i):
        if stage.startswith("Sample") and i in (0, samples - 1):
            sync(X.device)
            stamps.append(now())

    kernel = SGHMCKernel(logistic_regression_model, subsample_size=BATCH, jit_compile=jit)
    mcmc = VectorMCMC(kernel, num_samples=samples, warmup_steps=warmup, num_chains=chains,
                      keep=keep, disable_progbar=True, hook_fn=hook)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sync(X.device)
        start = now()
        mcmc.run(X, y)
        sync(X.device)
        total = now() - start
    per_step = (stamps[1] - stamps[0]) / max(samples - 1, 1)
    draws = mcmc.get_samples(group_by_chain=True)["w"][:, -1]
    return per_step, total, kernel.compile_seconds, draws


def chains_table(X, y, cfg, results) -> None:
    steps = cfg["b_steps"]
    out = {}
    print(f"\nb. vectorised Pima SGHMC, {steps} sampling steps: us per step")
    for jit in (False, True):
        one, *_ = vectorised(X, y, 1, 100, steps, jit)
        many, *_ = vectorised(X, y, cfg["b_chains"], 100, steps, jit)
        ratio = many / one
        label = f"jit_compile={jit}"
        print(f"{label:20s} 1 chain {wc(one * 1e6)}  {cfg['b_chains']} chains "
              f"{wc(many * 1e6)}  ratio {ratio[0]:.1f}")  # fmt: skip
        out[label] = {"one_us": (one * 1e6).tolist(), "many_us": (many * 1e6).tolist(),
                      "ratio": ratio.tolist()}  # fmt: skip
    results["b_chains"] = {"chains": cfg["b_chains"], **out}


def pima_5000(X, y, cfg, results) -> None:
    potential = PyroPotential(logistic_regression_model, (X, y))  # full data
    out = []
    print(f"\nc. Pima, {cfg['c_chains']} vectorised chains end to end, jit_compile=True")
    for warmup, samples in cfg["c_settings"]:
        _, total, comp, draws = vectorised(X, y, cfg["c_chains"], warmup, samples, True)
        draws = draws.to(X.device)
        score = potential_score(potential, {"w": draws})["w"]
        value = float(ksd(draws, score, kernel="rbf", bandwidth=1.0))
        floor = float(((score.double().square().sum(1) + draws.shape[1]).mean()
                       / len(draws)).sqrt())  # fmt: skip
        print(f"warm-up {warmup:4d} + {samples:4d} steps: {wc(total, '.2f')} s "
              f"(compile {comp:.1f} s, run without it {total[0] - comp:.2f} s); "
              f"KSD {value:.3f}, exact iid {floor:.3f} ({value / floor:.2f}x)")  # fmt: skip
        out.append({"warmup": warmup, "samples": samples, "seconds": total.tolist(),
                    "compile_s": comp, "ksd": value, "iid_ksd": floor})  # fmt: skip
    results["c_pima_chains"] = {"chains": cfg["c_chains"], "runs": out,
                                "numpyro_nuts_warm_s": 3.7}  # fmt: skip


# ----------------------------------------------------------------------------- d


def scaling(cfg, results, device) -> None:
    gen = torch.Generator().manual_seed(0)
    n_max = max(cfg["d_sizes"])
    X = torch.randn(n_max, 8, generator=gen)
    w = torch.randn(8, generator=gen)
    y = torch.bernoulli(torch.sigmoid(X @ w), generator=gen)
    X, y = X.to(device), y.to(device)
    out = {}
    print("\nd. per sampling step against N (synthetic, d = 8, batch 32), jit_compile=True")
    for n in cfg["d_sizes"]:
        t, comp, _ = through_mcmc(X[:n], y[:n], cfg["d_steps"], True, warmup=100)
        out[n] = {"us": (t * 1e6).tolist(), "compile_s": comp}
        print(f"N = {n:>8d}: {wc(t * 1e6)} us (compile {comp:.1f} s)")
    first, last = out[min(out)]["us"][0], out[max(out)]["us"][0]
    print(f"ratio N = {max(out):.0e} / {min(out):.0e}: {last / first:.2f}")
    results["d_scaling"] = out


# ----------------------------------------------------------------------------- e


def ensemble(cfg, results, device) -> None:
    torch.manual_seed(0)
    width, members, batch = cfg["e_width"], 8, 128
    net = torch.nn.Sequential(torch.nn.Linear(256, width), torch.nn.ReLU(),
                              torch.nn.Linear(width, width), torch.nn.ReLU(),
                              torch.nn.Linear(width, 10)).to(device)  # fmt: skip
    pot = ModulePotential(net, categorical_log_likelihood, prior=1.0, num_data=50_000,
                          check_finite=False)  # fmt: skip
    size = sum(p.numel() for p in net.parameters())
    x = torch.randn(batch, 256, device=device)
    yb = torch.randint(10, (batch,), device=device)
    steps = cfg["e_steps"]
    gen = torch.Generator(device=device).manual_seed(0)
    one = pot.params()
    grad = torch.func.grad(pot.potential)
    batched = torch.func.vmap(grad, in_dims=(0, None))

    def run_sequential():
        states = [sghmc.init(one) for _ in range(members)]
        for _ in range(steps):
            for k in range(members):
                g = grad(states[k].params, (x, yb))
                states[k] = sghmc.step(states[k], g, 1e-3, num_data=50_000, generator=gen)

    def run_vmapped():
        state = sghmc.init({k: v.expand(members, *v.shape).clone() for k, v in one.items()})
        for _ in range(steps):
            g = batched(state.params, (x, yb))
            state = sghmc.step(state, g, 1e-3, num_data=50_000, generator=gen)

    compiled = compiled_step(pot, sghmc, 1e-3, ensemble=True, num_data=50_000)

    def run_compiled():
        state = sghmc.init({k: v.expand(members, *v.shape).clone() for k, v in one.items()})
        for _ in range(steps):
            state, _ = compiled(state, (x, yb), gen)

    times = {}
    runs = (("8 sequential", run_sequential), ("vmapped", run_vmapped),
            ("vmapped, compiled", run_compiled))  # fmt: skip
    for label, fn in runs:
        fn()  # warm
        sync(device)
        start = now()
        fn()
        sync(device)
        times[label] = (now() - start) / steps
    print(f"\ne. ensemble of 8 x {size / 1e6:.2f}M-parameter MLPs, batch {batch}, "
          f"{steps} SGHMC steps: ms per step, wall (cpu), ratio to 8 sequential")  # fmt: skip
    for label, t in times.items():
        ratio = t / times["8 sequential"]
        print(f"{label:20s} {wc(t * 1e3):>18s} {ratio[0]:6.2f} ({ratio[1]:.2f} cpu)")
    results["e_ensemble"] = {"params_per_member": size,
                             **{k: (v * 1e3).tolist() for k, v in times.items()}}  # fmt: skip


def end_to_end(X, y, cfg, results) -> None:
    """A whole serial run (warm-up and sampling), compilation included."""
    warmup, samples = cfg["f_steps"]
    out = {}
    print(f"\nf. serial Pima SGHMC end to end, {warmup} + {samples} steps, compile included")
    for label, jit, backend in [("jit_compile='auto'", "auto", "inductor"),
                                ("jit_compile=True, torchscript", True, "torchscript"),
                                ("jit_compile=True, inductor", True, "inductor")]:  # fmt: skip
        pyro.set_rng_seed(0)
        kernel = SGHMCKernel(logistic_regression_model, subsample_size=BATCH,
                             jit_compile=jit, compile_backend=backend)  # fmt: skip
        mcmc = MCMC(kernel, num_samples=samples, warmup_steps=warmup, disable_progbar=True)
        sync(X.device)
        start = now()
        mcmc.run(X, y)
        sync(X.device)
        total = now() - start
        out[label] = {"seconds": total.tolist(), "compile_s": kernel.compile_seconds}
        print(f"{label:32s} {wc(total, '.1f')} s (compile {kernel.compile_seconds:.1f} s)")
    results["f_end_to_end"] = out


def config(quick: bool) -> dict:
    if quick:
        return {"a_steps": 1500, "b_steps": 300, "b_chains": 1000, "c_chains": 5000,
                "c_settings": [(200, 50)], "d_sizes": [10**3, 10**6], "d_steps": 1000,
                "e_width": 900, "e_steps": 3, "f_steps": (500, 5000)}  # fmt: skip
    return {"a_steps": 5000, "b_steps": 500, "b_chains": 1000, "c_chains": 5000,
            "c_settings": [(100, 50), (200, 50), (300, 100)],
            "d_sizes": [10**3, 10**4, 10**5, 10**6], "d_steps": 2000,
            "e_width": 900, "e_steps": 10, "f_steps": (1000, 24000)}  # fmt: skip


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", default="abcdef", help="sections to run, e.g. 'ab'")
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    device = torch.device(args.device)
    cfg = config(args.quick)
    results = {
        "machine": f"{platform.machine()} {platform.processor()} {os.cpu_count()} cores, "
        f"torch {torch.__version__}, "
        + (torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_before": os.getloadavg(),
    }
    print(f"{results['machine']}; {results['date']}; load average {results['load_before']}")
    data = load_pima()
    X, y = data.X.to(device), data.y.to(device)
    if "a" in args.only:
        serial(X, y, cfg, results)
    if "b" in args.only:
        chains_table(X, y, cfg, results)
    if "c" in args.only:
        pima_5000(X, y, cfg, results)
    if "d" in args.only:
        scaling(cfg, results, device)
    if "e" in args.only:
        ensemble(cfg, results, device)
    if "f" in args.only:
        end_to_end(X, y, cfg, results)
    results["load_after"] = os.getloadavg()
    print(f"load average after: {results['load_after']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2, default=str)
    return results


if __name__ == "__main__":
    main()
