"""A zoo of real models on real data (statsmodels' datasets), each sampled with every
kernel's defaults, serial and as vectorised chains, against Pyro's NUTS.

Run: ``python benchmarks/model_zoo.py [--models a,b] [--kernels SGLD,SGHMC] [--quick]``;
``--refresh`` recomputes the NUTS references (cached in
``benchmarks/model_zoo_references.json``; NUTS 1000 + 4000 with a dense mass matrix).
Prints (and with ``--out FILE`` writes) a Markdown table: the largest mean error in
NUTS posterior sds, the range of sd ratios, min bulk ESS per second, wall time, and
the run's own warm-up verdict. ``tests/test_model_zoo.py`` (slow) runs the same cases.

The data: statsmodels' bundled datasets (BSD licence; the sources and their terms are
in each dataset's ``statsmodels.datasets.<name>`` docstring).
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import torch

REFERENCES = Path(__file__).with_name("model_zoo_references.json")
KERNELS = ("SGLD", "SGHMC", "SGNHT", "BAOA")


@dataclass
class Case:
    name: str
    what: str
    model: object
    args: tuple
    subsample_size: int | None


def _standardise(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean(0)) / x.std(0)


def _frame(name: str):
    import statsmodels.api as sm

    return getattr(sm.datasets, name).load_pandas().data


def _tensor(values) -> torch.Tensor:
    return torch.tensor(np.asarray(values, dtype=np.float64), dtype=torch.float32)


def glm_design(frame, covariates, standardise=True) -> torch.Tensor:
    x = _tensor(frame[covariates].values)
    if standardise:
        x = _standardise(x)
    return torch.cat([torch.ones(len(x), 1), x], 1)


# ---------------------------------------------------------------------- the models
def poisson_glm(X, y):
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([X.shape[1]]).to_event(1))
    with pyro.plate("data", X.shape[0]) as idx:
        pyro.sample("obs", dist.Poisson((X[idx] @ w).exp()), obs=y[idx])


def negbin_glm(X, y):
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([X.shape[1]]).to_event(1))
    phi = pyro.sample("phi", dist.HalfNormal(5.0))
    with pyro.plate("data", X.shape[0]) as idx:
        mu = (X[idx] @ w).exp()
        pyro.sample("obs", dist.GammaPoisson(phi, phi / mu), obs=y[idx])


def logistic(X, y):
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([X.shape[1]]).to_event(1))
    with pyro.plate("data", X.shape[0]) as idx:
        pyro.sample("obs", dist.Bernoulli(logits=X[idx] @ w), obs=y[idx])


def robust_regression(x, y):
    """Student-t (4 dof) regression on raw, unstandardised income."""
    a = pyro.sample("a", dist.Normal(0.0, 1000.0))
    b = pyro.sample("b", dist.Normal(0.0, 10.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(500.0))
    with pyro.plate("data", x.shape[0]) as idx:
        pyro.sample("obs", dist.StudentT(4.0, a + b * x[idx], sigma), obs=y[idx])


def normal_regression(X, y):
    w = pyro.sample("w", dist.Normal(0.0, 10.0).expand([X.shape[1]]).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(5.0))
    with pyro.plate("data", X.shape[0]) as idx:
        pyro.sample("obs", dist.Normal(X[idx] @ w, sigma), obs=y[idx])


def hierarchical(X, firm, y, num_firms):
    """Random intercepts per firm (grunfeld: 11 firms x 20 years)."""
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfNormal(2.0))
    with pyro.plate("firms", num_firms):
        a = pyro.sample("a", dist.Normal(mu, tau))
    b = pyro.sample("b", dist.Normal(0.0, 5.0).expand([X.shape[1]]).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(2.0))
    with pyro.plate("data", X.shape[0]) as idx:
        pyro.sample("obs", dist.Normal(a[firm[idx]] + X[idx] @ b, sigma), obs=y[idx])


def categorical_simplex(y, k):
    p = pyro.sample("p", dist.Dirichlet(torch.ones(k)))
    with pyro.plate("data", y.shape[0]) as idx:
        pyro.sample("obs", dist.Categorical(p), obs=y[idx])


def cases() -> dict[str, Case]:
    out = {}
    d = _frame("randhie")
    X = glm_design(d, [c for c in d.columns if c != "mdvis"])
    y = _tensor(d["mdvis"].values)
    out["randhie_poisson"] = Case(
        "randhie_poisson", "Poisson GLM, N=20190, d=10 (doctor visits)", poisson_glm,
        (X, y), 100,
    )  # fmt: skip
    out["randhie_negbin"] = Case(
        "randhie_negbin", "negative binomial GLM + dispersion, N=20190, d=11", negbin_glm,
        (X, y), 100,
    )  # fmt: skip
    d = _frame("fair")
    X = glm_design(d, [c for c in d.columns if c != "affairs"])
    y = _tensor((d["affairs"].values > 0).astype(float))
    out["fair_logistic"] = Case(
        "fair_logistic", "logistic regression, N=6366, d=9 (affairs > 0)", logistic, (X, y), 32
    )
    d = _frame("engel")
    out["engel_robust"] = Case(
        "engel_robust", "Student-t regression, raw income (up to 5000), N=235", robust_regression,
        (_tensor(d["income"].values), _tensor(d["foodexp"].values)), 32,
    )  # fmt: skip
    d = _frame("statecrime")
    X = glm_design(d, ["poverty", "single", "urban"])
    out["statecrime_sigma"] = Case(
        "statecrime_sigma", "normal regression with learned sigma, N=51, d=4",
        normal_regression, (X, _standardise(_tensor(d["violent"].values))), 32,
    )  # fmt: skip
    d = _frame("macrodata")
    cols = ["realgdp", "realcons", "realgovt", "realdpi", "cpi", "m1", "pop"]
    X = glm_design(d, cols)
    out["macro_collinear"] = Case(
        "macro_collinear", "7 collinear macro series (corr > 0.95), N=203, d=8 + sigma",
        normal_regression, (X, _standardise(_tensor(d["realinv"].values))), 32,
    )  # fmt: skip
    d = _frame("grunfeld")
    firms = {f: i for i, f in enumerate(sorted(set(d["firm"])))}
    firm = torch.tensor([firms[f] for f in d["firm"]])
    X = _standardise(_tensor(d[["value", "capital"]].values))
    y = _standardise(_tensor(d["invest"].values))
    out["grunfeld_hier"] = Case(
        "grunfeld_hier", "hierarchical random intercepts, 11 firms, N=220",
        hierarchical, (X, firm, y, len(firms)), 32,
    )  # fmt: skip
    d = _frame("anes96")
    y = torch.tensor(d["PID"].values.astype(int))
    out["anes_simplex"] = Case(
        "anes_simplex", "Dirichlet-categorical (party ID, 7 classes), N=944", categorical_simplex,
        (y, 7), 32,
    )  # fmt: skip
    return out


# ---------------------------------------------------------------------- runs
def flat_draws(samples: dict, sites=None) -> np.ndarray:
    sites = sorted(samples) if sites is None else sites
    n = next(iter(samples.values())).shape[0]
    return np.concatenate([samples[s].reshape(n, -1).double().numpy() for s in sites], 1)


def nuts_reference(case: Case, seed: int = 0) -> dict:
    from pyro.infer import MCMC, NUTS

    pyro.set_rng_seed(seed)
    t = time.perf_counter()
    kernel = NUTS(case.model, full_mass=True, jit_compile=True, ignore_jit_warnings=True)
    mcmc = MCMC(kernel, num_samples=4000, warmup_steps=1000, disable_progbar=True)
    mcmc.run(*case.args)
    samples = mcmc.get_samples()
    draws = flat_draws(samples)
    return {
        "sites": sorted(samples),
        "mean": draws.mean(0).tolist(),
        "sd": draws.std(0).tolist(),
        "seconds": time.perf_counter() - t,
    }


def load_references(names, refresh=False) -> dict:
    refs = json.loads(REFERENCES.read_text()) if REFERENCES.exists() else {}
    all_cases = cases()
    for name in names:
        if refresh or name not in refs:
            print(f"NUTS reference for {name} ...", flush=True)
            refs[name] = nuts_reference(all_cases[name])
            REFERENCES.write_text(json.dumps(refs, indent=1))
    return refs


def make_kernel(name: str, case: Case):
    import pyro_sgmcmc

    cls = getattr(pyro_sgmcmc, f"{name}Kernel")
    return cls(case.model, subsample_size=case.subsample_size)


def min_ess(draws: np.ndarray) -> float:
    """Min bulk ESS over coordinates; ``draws`` is (chains, draws, d)."""
    import arviz as az

    return float(min(az.ess(draws[..., i], method="bulk") for i in range(draws.shape[-1])))


def run_case(case: Case, kernel: str, ref: dict, vectorised: bool, quick=False, seed=0) -> dict:
    from pyro.infer import MCMC

    import pyro_sgmcmc

    pyro.set_rng_seed(seed)
    warmup = 500 if quick else 1000
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if vectorised:
            mcmc = pyro_sgmcmc.MCMC(
                make_kernel(kernel, case), num_chains=64, warmup_steps=warmup,
                num_samples=100 if quick else 200, disable_progbar=True,
            )  # fmt: skip
        else:
            mcmc = MCMC(
                make_kernel(kernel, case), warmup_steps=warmup,
                num_samples=1000 if quick else 4000, disable_progbar=True,
            )  # fmt: skip
        try:
            mcmc.run(*case.args)
        except Exception as e:  # noqa: BLE001 - a failed run is a row of the table
            return {"model": case.name, "kernel": kernel, "vectorised": vectorised,
                    "error": f"{type(e).__name__}: {str(e)[:200]}"}  # fmt: skip
    seconds = time.perf_counter() - t
    samples = mcmc.get_samples(group_by_chain=True)
    c, n = next(iter(samples.values())).shape[:2]
    flat = flat_draws({k: v.reshape(c * n, *v.shape[2:]) for k, v in samples.items()}, ref["sites"])
    mean_ref, sd_ref = np.array(ref["mean"]), np.array(ref["sd"])
    err = np.abs(flat.mean(0) - mean_ref) / sd_ref
    ratio = flat.std(0) / sd_ref
    ess = min_ess(flat.reshape(c, n, -1))
    problems = mcmc.kernel.warmup_report["problems"]
    return {
        "model": case.name,
        "kernel": kernel,
        "vectorised": vectorised,
        "max_mean_err": float(err.max()),
        "sd_ratio_min": float(ratio.min()),
        "sd_ratio_max": float(ratio.max()),
        "min_ess": ess,
        "ess_per_s": ess / seconds,
        "seconds": seconds,
        "flagged": bool(problems),
        "problems": problems,
    }


def verdict(row: dict) -> str:
    """The zoo's goal: within 0.1 NUTS sd in mean and 15% in sd, or flagged by the run:
    ``"yes"``; ``"MC"`` where only the mean misses 0.1, by less than 2.5 Monte Carlo
    errors (the largest of d coordinates' errors: more draws would meet it); else
    ``"NO"``."""
    if "error" in row:
        return "NO"
    sd_ok = 0.85 <= row["sd_ratio_min"] and row["sd_ratio_max"] <= 1.15
    if row["flagged"] or (sd_ok and row["max_mean_err"] <= 0.1):
        return "yes"
    if sd_ok and row["max_mean_err"] <= 0.1 + 2.5 * row["min_ess"] ** -0.5:
        return "MC"
    return "NO"


def table(rows: list[dict], refs: dict) -> str:
    lines = [
        "| model | kernel | chains | max mean err (NUTS sd) | MC error (1/sqrt(min ESS)) "
        "| sd ratio | min ESS/s | time (s) | NUTS time (s) | warm-up verdict | goal |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        chains = "64 vectorised" if r["vectorised"] else "1"
        nuts = f"{refs[r['model']]['seconds']:.0f}"
        if "error" in r:
            lines.append(
                f"| {r['model']} | {r['kernel']} | {chains} | error: {r['error']} | | | | | {nuts} "
                "| | no |"
            )
            continue
        flag = "flagged" if r["flagged"] else "ok"
        lines.append(
            f"| {r['model']} | {r['kernel']} | {chains} | {r['max_mean_err']:.3f} | "
            f"{r['min_ess'] ** -0.5:.3f} | {r['sd_ratio_min']:.2f}-{r['sd_ratio_max']:.2f} | "
            f"{r['ess_per_s']:.1f} | "
            f"{r['seconds']:.1f} | {nuts} | {flag} | {verdict(r)} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=None, help="comma-separated (default: all)")
    parser.add_argument("--kernels", default=",".join(KERNELS))
    parser.add_argument("--modes", default="serial,vectorised")
    parser.add_argument("--quick", action="store_true", help="500 warm-up steps, fewer draws")
    parser.add_argument("--refresh", action="store_true", help="recompute NUTS references")
    parser.add_argument("--out", default=None, help="write the Markdown table here")
    parser.add_argument("--json", default=None, help="write the rows as JSON here")
    parser.add_argument("--render", default=None, help="only re-print the table of a JSON")
    args = parser.parse_args(argv)
    if args.render:
        rows = json.loads(Path(args.render).read_text())
        print(table(rows, json.loads(REFERENCES.read_text())))
        return
    torch.set_num_threads(1)
    all_cases = cases()
    names = args.models.split(",") if args.models else list(all_cases)
    refs = load_references(names, args.refresh)
    rows = []
    for name in names:
        for mode in args.modes.split(","):
            for kernel in args.kernels.split(","):
                case, vectorised = all_cases[name], mode == "vectorised"
                row = run_case(case, kernel, refs[name], vectorised, args.quick)
                rows.append(row)
                print(table([row], refs).splitlines()[-1], flush=True)
    text = table(rows, refs)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
