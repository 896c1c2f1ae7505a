r"""Diagonal GGN Laplace at scale: a ~1M-parameter MLP over 10^5 examples, one data pass.

What it measures (each number from a fresh subprocess, ``torch.set_num_threads``
threads, float32, CPU):

1. **Time**: :func:`pyro_sgmcmc.laplace.module.module_laplace` (``structure="diag"``,
   i.e. :func:`pyro_sgmcmc.curvature.module_diag_ggn`) against laplace-torch's
   ``Laplace(model, "classification", subset_of_weights="all",
   hessian_structure="diag", backend=BackPackGGN).fit(loader)`` on the same network,
   data and loader, alternating in one process; the ratio is what to read (the
   absolute times move with the machine's load). The two diagonals are compared.
2. **Peak memory**: ``resource.getrusage`` max RSS of the process, and its increment
   over the baseline (model + data + loader built, before the curvature pass), at two
   batch sizes and two widths, to show the increment is O(parameters) + one batch's
   activations, not O(examples) or O(batch x parameters).
3. laplace-torch's default backend (``CurvlinopsGGN``, whose diagonal goes through full
   per-example Jacobians, batch x classes x parameters floats), on a small batch and a
   data subset only: at batch 256 its Jacobians alone would take ~11 GB.

laplace-torch is optional (never a dependency of this project): run this script with
an interpreter where ``import laplace`` works, e.g. a virtual environment with
``--system-site-packages``. If it is missing or fails, the reason is printed.

The network is untrained (PyTorch's default initialisation, fixed seed) and the data
synthetic (``randn`` inputs, uniform labels): the cost of a curvature pass does not
depend on the weights' values or the labels.

Usage::

    python benchmarks/laplace_scale.py            # 784-1024-256-10 (1.07M), N = 100000
    python benchmarks/laplace_scale.py --quick    # a small version, seconds
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

D_IN, CLASSES = 784, 10


def build(hidden: list[int], n: int, batch_size: int, seed: int = 0):
    """The MLP, and a loader over ``n`` synthetic examples (fixed seed)."""
    torch.manual_seed(seed)
    widths = [D_IN, *hidden]
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:], strict=True):
        layers += [nn.Linear(a, b), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(widths[-1], CLASSES)).eval()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, D_IN, generator=g)
    y = torch.randint(CLASSES, (n,), generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)
    return model, loader


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def max_rss_mb() -> float:
    """The process's peak resident memory (``getrusage``; KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux ``clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def ours(model: nn.Module, loader: DataLoader) -> Any:
    """The diagonal Laplace posterior (a ``DiagonalGaussian``)."""
    from pyro_sgmcmc.laplace.module import module_laplace

    return module_laplace(model, loader, "categorical", structure="diag", prior_precision=1.0)


def ours_curvature(q: Any) -> torch.Tensor:
    from pyro_sgmcmc.curvature import flatten

    return flatten(q.precision) - 1.0  # the GGN diagonal (the prior added 1)


def laplace_torch(model: nn.Module, loader: DataLoader, backend: str) -> Any:
    """laplace-torch's fitted ``DiagLaplace`` (its GGN diagonal is ``.H``)."""
    from laplace import Laplace
    from laplace.curvature import BackPackGGN, CurvlinopsGGN

    cls = {"backpack": BackPackGGN, "curvlinops": CurvlinopsGGN}[backend]
    la = Laplace(
        model,
        "classification",
        subset_of_weights="all",
        hessian_structure="diag",
        backend=cls,
        prior_precision=1.0,
    )
    la.fit(loader)
    return la


def laplace_torch_status() -> str | None:
    """``None`` if laplace-torch imports and runs here, else why not."""
    try:
        import laplace  # noqa: F401
        from laplace.curvature import BackPackGGN  # noqa: F401
    except Exception as e:  # noqa: BLE001 - report whatever it is
        return f"import laplace failed: {type(e).__name__}: {e}"
    try:
        model, loader = build([8], 16, 8)
        laplace_torch(model, loader, "backpack")
    except Exception as e:  # noqa: BLE001
        return f"laplace-torch failed on torch {torch.__version__}: {type(e).__name__}: {e}"
    return None


# ---------------------------------------------------------------------- child tasks
def child(task: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(task["threads"])
    if task["kind"] == "time":
        model, loader = build(task["hidden"], task["n"], task["batch_size"])
        other = copy.deepcopy(model)  # BackPACK extends (hooks) the module it is given
        res: dict[str, Any] = {"P": num_params(model), "ours": [], "lt": []}
        d_ours = d_lt = None
        for _ in range(task["repeats"]):
            t = time.perf_counter()
            q = ours(model, loader)
            res["ours"].append(time.perf_counter() - t)
            d_ours = ours_curvature(q)
            if task["laplace_torch"]:
                t = time.perf_counter()
                la = laplace_torch(other, loader, "backpack")
                res["lt"].append(time.perf_counter() - t)
                d_lt = la.H.detach()
        if d_lt is not None:
            scale = d_lt.abs().max()
            res["max_abs_diff_rel"] = float((d_ours - d_lt).abs().max() / scale)
            big = d_lt > 1e-3 * scale
            res["max_rel_diff_big"] = float(((d_ours - d_lt).abs() / d_lt)[big].max())
        return res
    # memory: one method, one pass, in this fresh process
    # A warm-up on a tiny network: lazy imports and one-off initialisation are not the
    # pass's memory.
    tiny, tiny_loader = build([8], 16, 8)
    if task["method"] == "ours":
        ours(tiny, tiny_loader)
    else:
        laplace_torch(tiny, tiny_loader, task["method"])
    del tiny, tiny_loader
    model, loader = build(task["hidden"], task["n"], task["batch_size"])
    # Baseline: the current RSS with model, data and loader alive; the peak mark is reset
    # to it where the kernel allows (else the process's lifetime peak so far).
    exact = reset_peak()
    base = _status_mb("VmRSS") if exact else max_rss_mb()
    t = time.perf_counter()
    if task["method"] == "ours":
        ours(model, loader)
    else:
        laplace_torch(model, loader, task["method"])
    elapsed = time.perf_counter() - t
    peak = _status_mb("VmHWM") if exact else max_rss_mb()
    return {
        "P": num_params(model),
        "base_mb": base,
        "peak_mb": peak,
        "lifetime_peak_mb": max_rss_mb(),
        "time": elapsed,
        "exact": exact,
    }


#: glibc with a fixed mmap threshold: freed large buffers go back to the OS at once, so
#: the peak RSS is the working set rather than what the allocator keeps around.
FIXED_MMAP = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def run_child(
    task: dict[str, Any], python: str, env: dict[str, str] | None = None
) -> dict[str, Any]:
    out = subprocess.run(
        [python, os.path.abspath(__file__), "--child", json.dumps(task)],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **(env or {})},
    )
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["(no stderr)"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------- report
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a small version (seconds)")
    ap.add_argument("--n", type=int, help="examples (default 100000; quick 2048)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, help="alternating timed runs (default 3; quick 1)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-laplace-torch", action="store_true")
    ap.add_argument("--skip-timing", action="store_true", help="only the memory table")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    quick = args.quick
    n = args.n or (2048 if quick else 100_000)
    hidden = [256, 64] if quick else [1024, 256]
    wide = [512, 128] if quick else [2048, 512]
    repeats = args.repeats or (1 if quick else 3)
    n_mem = min(n, 2048 if quick else 8192)
    n_big = n if n > n_mem else 4 * n_mem  # the N-independence row
    bs = args.batch_size
    python = sys.executable
    status = "disabled (--no-laplace-torch)" if args.no_laplace_torch else laplace_torch_status()
    have_lt = status is None
    print(f"torch {torch.__version__}, {args.threads} thread(s), float32, CPU; python {python}")
    print(f"laplace-torch: {'available' if have_lt else status}")

    common = {"threads": args.threads}
    arch = "-".join(map(str, [D_IN, *hidden, CLASSES]))
    if not args.skip_timing:
        timing = run_child(
            {
                **common,
                "kind": "time",
                "hidden": hidden,
                "n": n,
                "batch_size": bs,
                "repeats": repeats,
                "laplace_torch": have_lt,
            },
            python,
        )
        if "error" in timing:
            raise SystemExit(f"timing run failed: {timing['error']}")
        p = timing["P"]
        t_ours = min(timing["ours"])
        print(f"\n## One pass, diagonal GGN: {arch} MLP ({p:,} parameters), N = {n:,}, batch {bs}")
        print(f"{'method':<44} {'time (s)':>9} {'examples/s':>11} {'ratio':>7}")
        name = "pyro_sgmcmc module_laplace(structure=diag)"
        print(f"{name:<44} {t_ours:9.2f} {n / t_ours:11.0f} {1.0:7.2f}")
        if timing["lt"]:
            t_lt = min(timing["lt"])
            name = "laplace-torch Laplace(diag, BackPackGGN)"
            print(f"{name:<44} {t_lt:9.2f} {n / t_lt:11.0f} {t_lt / t_ours:7.2f}")
            print(
                f"diagonals agree: max |ours - laplace-torch| / max|H| = "
                f"{timing['max_abs_diff_rel']:.2e}; max relative difference on entries above "
                f"1e-3 max|H|: {timing['max_rel_diff_big']:.2e}"
            )
        print(
            f"(min of {repeats} alternating run(s) in one process; all runs: ours {timing['ours']}"
            + (f", laplace-torch {timing['lt']})" if timing["lt"] else ")")
        )

    print("\n## Peak memory of one pass (fresh process per row and allocator setting)")
    print(
        f"{'method':<22} {'MLP':<16} {'params':>10} {'N':>7} {'batch':>6} {'base MB':>8} "
        f"{'peak MB':>8} {'incr MB':>8} {'B/param':>8} {'incr MB*':>9} {'B/param*':>9}"
    )
    small, big = max(bs // 2, 1), bs * 2
    rows = [
        ("ours", hidden, small, n_mem),
        ("ours", hidden, big, n_mem),
        ("ours", wide, small, n_mem),
        ("ours", wide, big, n_mem),
        ("ours", hidden, small, n_big),
    ]
    if have_lt:
        rows += [("backpack", hidden, small, n_mem), ("backpack", hidden, big, n_mem)]
        rows += [("curvlinops", hidden, 16, 64 if quick else 256)]
    labels = {
        "ours": "pyro_sgmcmc",
        "backpack": "laplace-torch BackPack",
        "curvlinops": "laplace-torch default",
    }
    inc: dict[tuple, float] = {}
    sizes: dict[tuple, int] = {}
    exact = True
    for method, hid, b, n_row in rows:
        task = {**common, "kind": "memory", "method": method, "hidden": hid, "n": n_row}
        mlp = "-".join(map(str, [D_IN, *hid, CLASSES]))
        res = run_child({**task, "batch_size": b}, python)
        fixed = run_child({**task, "batch_size": b}, python, FIXED_MMAP)
        bad = res if "error" in res else fixed if "error" in fixed else None
        if bad is not None:
            print(
                f"{labels[method]:<22} {mlp:<16} {'':>10} {n_row:>7} {b:>6}  failed: {bad['error']}"
            )
            continue
        exact = exact and res["exact"] and fixed["exact"]
        key = (method, tuple(hid), b, n_row)
        sizes[key] = res["P"]
        inc[key] = res["peak_mb"] - res["base_mb"]
        inc[key + ("fixed",)] = fixed["peak_mb"] - fixed["base_mb"]
        extra = f"   {n_row / res['time']:.1f} ex/s" if method == "curvlinops" else ""
        per = 2**20 / res["P"]
        print(
            f"{labels[method]:<22} {mlp:<16} {res['P']:>10,} {n_row:>7} {b:>6} "
            f"{res['base_mb']:8.0f} {res['peak_mb']:8.0f} {inc[key]:8.1f} "
            f"{inc[key] * per:8.1f} {inc[key + ('fixed',)]:9.1f} "
            f"{inc[key + ('fixed',)] * per:9.1f}{extra}"
        )
    h, w = tuple(hidden), tuple(wide)
    for tag, name in (((), "glibc default"), (("fixed",), "fixed mmap threshold")):
        try:
            p_h, p_w = sizes["ours", h, small, n_mem], sizes["ours", w, small, n_mem]
            per_param = (
                inc[("ours", w, small, n_mem, *tag)] - inc[("ours", h, small, n_mem, *tag)]
            ) / (p_w - p_h)
            per_example = (
                inc[("ours", h, big, n_mem, *tag)] - inc[("ours", h, small, n_mem, *tag)]
            ) / (big - small)
            per_data = inc[("ours", h, small, n_big, *tag)] - inc[("ours", h, small, n_mem, *tag)]
        except KeyError:
            continue
        print(
            f"pyro_sgmcmc increment ({name}): {per_param * 2**20:.1f} bytes per extra "
            f"parameter (batch {small}); {per_example * 1024:.0f} KiB per extra example in "
            f"the batch ({arch}); {per_data:+.1f} MB from N = {n_mem:,} to {n_big:,}"
        )
    how = (
        "the current RSS, with the peak mark reset there (Linux clear_refs)"
        if exact
        else "the process's peak RSS so far (getrusage)"
    )
    print(
        f"incr = peak RSS during the pass minus {how}, once model, data and loader exist "
        "(after a warm-up on a tiny network: imports done); B/param = incr / params (4 is "
        "one float32 copy). * = the same run with MALLOC_MMAP_THRESHOLD_=65536, so that "
        "freed large buffers return to the OS: closer to the working set; the plain "
        "columns include what glibc keeps after freeing."
    )


if __name__ == "__main__":
    main()
