"""Vectorised chains: ``pyro_sgmcmc.MCMC(chain_method="vectorized")``."""

from __future__ import annotations

import warnings

import arviz as az
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import NUTS

from pyro_sgmcmc import MCMC, ModelError, SGHMCKernel, SGLDKernel, SGNHTKernel
from pyro_sgmcmc.store import load_draws

N, DIM = 400, 2


@pytest.fixture(scope="module")
def linreg():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(N, DIM, generator=g)
    y = X @ torch.tensor([1.0, -0.5]) + torch.randn(N, generator=g)
    cov = torch.linalg.inv(X.T @ X + torch.eye(DIM))
    return X, y, cov @ X.T @ y, cov


def model(X, y):
    w = pyro.sample("w", dist.Normal(torch.zeros(X.shape[1]), 1.0).to_event(1))
    with pyro.plate("data", X.shape[0]) as idx:
        pyro.sample("obs", dist.Normal(X[idx] @ w, 1.0), obs=y[idx])


def test_last_draws_of_many_short_chains_sample_the_posterior(linreg):
    """Parallel SGHMC: the last draw of each of 2000 chains is a posterior draw."""
    X, y, mean, cov = linreg
    pyro.set_rng_seed(0)
    mcmc = MCMC(
        SGHMCKernel(model, subsample_size=20),
        num_samples=200,
        warmup_steps=300,
        num_chains=2000,
        keep="last",
        disable_progbar=True,
    )
    mcmc.run(X, y)
    w = mcmc.get_samples()["w"]
    assert w.shape == (2000, DIM)
    sd = cov.diag().sqrt()
    # 2000 independent draws: MC error of a mean 0.022 sd, of a variance ~3%.
    assert ((w.mean(0) - mean) / sd).abs().max() < 0.12
    torch.testing.assert_close(torch.cov(w.T), cov, rtol=0.15, atol=0.15 * cov.diag().min())


def test_pyro_api_on_vectorised_chains(linreg, capsys):
    X, y, _, _ = linreg
    pyro.set_rng_seed(1)
    mcmc = MCMC(
        SGHMCKernel(model, subsample_size=20),
        num_samples=50,
        warmup_steps=100,
        num_chains=4,
        disable_progbar=True,
    )
    mcmc.run(X, y)
    grouped = mcmc.get_samples(group_by_chain=True)["w"]
    assert grouped.shape == (4, 50, DIM)
    assert not torch.equal(grouped[0], grouped[1])  # each chain its own noise and batches
    assert mcmc.get_samples()["w"].shape == (200, DIM)
    mcmc.summary()
    assert "r_hat" in capsys.readouterr().out
    assert mcmc.diagnostics()["divergences"] == {f"chain {i}": [] for i in range(4)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        idata = az.from_pyro(mcmc)
    assert idata.posterior["w"].shape == (4, 50, DIM)


def test_deep_ensemble_at_temperature_zero_reaches_the_map(linreg):
    X, y, mean, _ = linreg
    mcmc = MCMC(
        SGLDKernel(model, temperature=0.0, step_size=0.5),
        num_samples=1,
        warmup_steps=300,
        num_chains=8,
        disable_progbar=True,
    )
    mcmc.run(X, y)
    w = mcmc.get_samples()["w"]
    # Full batch SGD from 8 random starts: every member at the MAP (= posterior mean).
    torch.testing.assert_close(w, mean.expand(8, DIM), atol=1e-4, rtol=1e-4)


def test_sequential_and_parallel_methods_delegate_to_pyro(linreg):
    X, y, _, _ = linreg
    pyro.set_rng_seed(2)
    mcmc = MCMC(
        SGHMCKernel(model, subsample_size=20),
        num_samples=30,
        warmup_steps=30,
        num_chains=2,
        chain_method="sequential",
        disable_progbar=True,
    )
    mcmc.run(X, y)
    w = mcmc.get_samples(group_by_chain=True)["w"]
    assert w.shape == (2, 30, DIM) and not torch.equal(w[0], w[1])


def test_vectorised_errors(linreg):
    X, y, _, _ = linreg
    with pytest.raises(ValueError, match="needs an SGMCMC kernel"):
        MCMC(NUTS(model), num_samples=5, num_chains=2)
    with pytest.raises(ValueError, match="chain_method"):
        MCMC(SGHMCKernel(model), num_samples=5, chain_method="threads")
    with pytest.raises(ModelError, match="batching='iid'"):
        MCMC(
            SGHMCKernel(model, subsample_size=20, batching="epoch"),
            num_samples=5,
            warmup_steps=5,
            num_chains=2,
            disable_progbar=True,
        ).run(X, y)
    with pytest.raises(ValueError, match="leading dimension of num_chains=3"):
        MCMC(
            SGHMCKernel(model),
            num_samples=5,
            warmup_steps=5,
            num_chains=3,
            initial_params={"w": torch.zeros(2, DIM)},
            disable_progbar=True,
        ).run(X, y)


@pytest.mark.parametrize(
    "kernel_class, subsample_size",
    [(SGHMCKernel, None), (SGHMCKernel, 20), (SGNHTKernel, 20)],
)
def test_vectorised_chains_equal_the_same_chains_run_one_by_one(
    linreg, kernel_class, subsample_size
):
    """chain_rng='per_chain': chain c of the batch is the run of that chain alone with
    rng_seed + c, from the same initial point (no warm-up adaptation, which pools).
    SGNHT: each chain has its own thermostat."""
    X, y, _, _ = linreg
    chains, seed = 3, 1234
    init = {"w": torch.randn(chains, DIM, generator=torch.Generator().manual_seed(0))}

    def kernel(rng_seed):
        return kernel_class(model, subsample_size=subsample_size, step_size=0.05, rng_seed=rng_seed)

    vec = MCMC(
        kernel(seed),
        num_samples=40,
        warmup_steps=10,
        num_chains=chains,
        initial_params=init,
        chain_rng="per_chain",
        disable_progbar=True,
    )
    vec.run(X, y)
    together = vec.get_samples(group_by_chain=True)["w"]
    for c in range(chains):
        alone = MCMC(
            kernel(seed + c),
            num_samples=40,
            warmup_steps=10,
            num_chains=1,
            chain_method="sequential",
            initial_params={"w": init["w"][c]},
            disable_progbar=True,
        )
        alone.run(X, y)
        torch.testing.assert_close(together[c], alone.get_samples()["w"], rtol=1e-4, atol=1e-5)


_CHECKPOINT_SCRIPT = """
import os, signal, sys
import pyro, pyro.distributions as dist, torch
from pyro_sgmcmc import MCMC, SGHMCKernel

checkpoint, die_at, out, stream = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
g = torch.Generator().manual_seed(0)
X = torch.randn(300, 2, generator=g)
y = X @ torch.tensor([1.0, -0.5]) + torch.randn(300, generator=g)

def model(X, y):
    w = pyro.sample("w", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    with pyro.plate("data", 300) as idx:
        pyro.sample("obs", dist.Normal(X[idx] @ w, 1.0), obs=y[idx])

def hook(kernel, params, stage, i):
    if stage == "Sample" and i == die_at:
        os.kill(os.getpid(), signal.SIGKILL)  # no clean-up, as a killed job

pyro.set_rng_seed(0)
mcmc = MCMC(SGHMCKernel(model, subsample_size=20), num_samples=60, warmup_steps=100,
            num_chains=3, checkpoint=None if checkpoint == "-" else checkpoint,
            checkpoint_every=7, hook_fn=hook, disable_progbar=True,
            stream_to=None if stream == "-" else stream, stream_every=4)
mcmc.run(X, y)
torch.save(mcmc.get_samples(group_by_chain=True)["w"].clone(), out)
"""


@pytest.mark.parametrize("streamed", [False, True])
def test_resume_after_kill_reproduces_the_uninterrupted_run(tmp_path, streamed):
    """Killed mid-sampling, the run resumes from its checkpoint to exactly the draws of
    an uninterrupted run; streamed to disk, the files end up with exactly those draws."""
    import subprocess
    import sys

    script = tmp_path / "run.py"
    script.write_text(_CHECKPOINT_SCRIPT)

    def run(checkpoint, die_at, out):
        stream = str(tmp_path / f"draws-{checkpoint != '-'}") if streamed else "-"
        return subprocess.run(
            [sys.executable, str(script), checkpoint, str(die_at), str(out), stream],
            capture_output=True,
            text=True,
            timeout=300,
        )

    reference = run("-", -1, tmp_path / "reference.pt")
    assert reference.returncode == 0, reference.stderr
    checkpoint = tmp_path / "run.ckpt"
    killed = run(str(checkpoint), 33, tmp_path / "never.pt")
    assert killed.returncode != 0 and checkpoint.exists()  # killed mid-sampling
    assert not (tmp_path / "never.pt").exists()
    resumed = run(str(checkpoint), -1, tmp_path / "resumed.pt")
    assert resumed.returncode == 0, resumed.stderr
    expected = torch.load(tmp_path / "reference.pt")
    assert torch.equal(torch.load(tmp_path / "resumed.pt"), expected)
    assert expected.shape == (3, 60, 2)
    if streamed:
        assert torch.equal(load_draws(tmp_path / "draws-True")["w"], expected)


def test_checkpoint_from_other_settings_is_refused(tmp_path, linreg):
    X, y, _, _ = linreg
    path = tmp_path / "c.ckpt"
    MCMC(
        SGHMCKernel(model, subsample_size=20),
        num_samples=10,
        warmup_steps=10,
        num_chains=2,
        checkpoint=path,
        checkpoint_every=5,
        disable_progbar=True,
    ).run(X, y)
    with pytest.raises(ValueError, match="was written by a run with"):
        MCMC(
            SGHMCKernel(model, subsample_size=20),
            num_samples=20,
            warmup_steps=10,
            num_chains=2,
            checkpoint=path,
            disable_progbar=True,
        ).run(X, y)


def test_streamed_draws_equal_the_draws_held_in_memory(tmp_path, linreg):
    """stream_to writes the same draws (constrained) to .npy files, readable mid-run."""
    X, y, _, _ = linreg
    seen = []

    def hook(kernel, params, stage, i):
        if stage == "Sample" and i == 25:  # 26 draws kept, 20 of them flushed
            seen.append(load_draws(tmp_path)["w"].shape)

    runs = {}
    for stream in (None, tmp_path):
        pyro.set_rng_seed(3)
        mcmc = MCMC(
            SGHMCKernel(model, subsample_size=20, rng_seed=5),
            num_samples=40,
            warmup_steps=30,
            num_chains=4,
            stream_to=stream,
            stream_every=10,
            hook_fn=hook if stream else None,
            disable_progbar=True,
        )
        mcmc.run(X, y)
        runs[stream is None] = mcmc.get_samples(group_by_chain=True)["w"]
    assert torch.equal(runs[True], runs[False])
    assert seen == [(4, 20, DIM)]
    assert np.load(tmp_path / "w.npy").shape == (4, 40, DIM)


def test_antithetic_pairs_are_valid_chains_with_a_more_accurate_mean(linreg):
    """chain_coupling='antithetic': each chain still samples the posterior (covariance
    of the last draws), the two chains of a pair mirror each other about the mode, and
    the mean over chains is far more accurate than independent chains give."""
    X, y, mean, cov = linreg
    errors = {}
    for coupling in ("independent", "antithetic"):
        pyro.set_rng_seed(0)
        mcmc = MCMC(
            SGHMCKernel(model, subsample_size=20),
            num_samples=50,
            warmup_steps=150,
            num_chains=600,
            keep="last",
            chain_coupling=coupling,
            disable_progbar=True,
        )
        mcmc.run(X, y)
        w = mcmc.get_samples()["w"]
        errors[coupling] = ((w.mean(0) - mean) / cov.diag().sqrt()).abs().max()
        torch.testing.assert_close(torch.cov(w.T), cov, rtol=0.2, atol=0.2 * cov.diag().min())
    pair_corr = torch.corrcoef(torch.stack([w[0::2, 0], w[1::2, 0]]))[0, 1]
    assert pair_corr < -0.9
    assert errors["independent"] < 0.15 and errors["antithetic"] < errors["independent"] / 3
    with pytest.raises(ValueError, match="even"):
        MCMC(SGHMCKernel(model), num_samples=2, num_chains=3, chain_coupling="antithetic")


def test_chains_started_in_stiff_regions_do_not_diverge():
    """Chains start all over the prior's box; with unstandardised data (sd 3) a chain at
    a small scale sees gradients 1e3 times chain 0's. Each chain's own RMS bound on
    its steps in the initial buffer keeps all of them finite (this run used to raise
    NonFiniteError at step 21), and the last draws match the posterior's mean and sd."""

    def scale_model(y):
        s = pyro.sample("s", dist.HalfCauchy(1.0))
        m = pyro.sample("m", dist.Normal(0.0, 5.0))
        with pyro.plate("data", len(y)) as idx:
            pyro.sample("obs", dist.Normal(m, s), obs=y[idx])

    y = 2.0 + 3.0 * torch.randn(500, generator=torch.Generator().manual_seed(0))
    pyro.set_rng_seed(0)
    mcmc = MCMC(
        SGHMCKernel(scale_model, subsample_size=50),
        num_samples=100,
        warmup_steps=300,
        num_chains=1000,
        keep="last",
        disable_progbar=True,
    )
    mcmc.run(y)
    draws = mcmc.get_samples()
    sd_m = y.std() / len(y) ** 0.5  # the posterior of m: ybar +- s / sqrt(N)
    assert abs(draws["m"].mean() - y.mean()) < 0.15 * sd_m + 3 * sd_m / 1000**0.5
    assert abs(draws["m"].std() / sd_m - 1) < 0.15
    assert abs(draws["s"].mean() / y.std() - 1) < 0.02
