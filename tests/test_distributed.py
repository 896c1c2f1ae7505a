"""torch.distributed runs: 2 local processes on gloo, launched with torchrun."""

from __future__ import annotations

import subprocess
import sys

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.distributed as dist_

from pyro_sgmcmc import MCMC, SGHMCKernel
from pyro_sgmcmc.distributed import chain_blocks
from pyro_sgmcmc.store import load_draws

pytestmark = pytest.mark.skipif(not dist_.is_available(), reason="no torch.distributed")

CHAINS, WARMUP, SAMPLES = 5, 60, 20

_SCRIPT = """
import sys
import pyro, pyro.distributions as dist, torch
import torch.distributed
from pyro_sgmcmc import MCMC, SGHMCKernel

out, stream = sys.argv[1], sys.argv[2]
torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
X = torch.randn(300, 2, generator=g)
y = X @ torch.tensor([1.0, -0.5]) + torch.randn(300, generator=g)

def model(X, y):
    w = pyro.sample("w", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    s = pyro.sample("s", dist.HalfNormal(2.0))
    with pyro.plate("data", 300) as idx:
        pyro.sample("obs", dist.Normal(X[idx] @ w, s), obs=y[idx])

init = {"w": torch.randn(CHAINS, 2, generator=torch.Generator().manual_seed(1)),
        "s": torch.zeros(CHAINS)}
mcmc = MCMC(SGHMCKernel(model, subsample_size=20, rng_seed=7), num_samples=SAMPLES,
            warmup_steps=WARMUP, num_chains=CHAINS, chain_method="distributed",
            chain_rng="per_chain", initial_params=init, disable_progbar=True,
            stream_to=None if stream == "-" else stream)
mcmc.run(X, y)
rank = torch.distributed.get_rank()
samples = mcmc.get_samples(group_by_chain=True)
torch.save({"samples": {k: v.clone() for k, v in samples.items()}, "chains": list(mcmc.chains),
            "divergences": len(mcmc.diagnostics()["divergences"])},
           f"{out}.rank{rank}")
torch.distributed.destroy_process_group()
"""


def model(X, y):
    w = pyro.sample("w", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    s = pyro.sample("s", dist.HalfNormal(2.0))
    with pyro.plate("data", 300) as idx:
        pyro.sample("obs", dist.Normal(X[idx] @ w, s), obs=y[idx])


def _torchrun(tmp_path, stream: str) -> subprocess.CompletedProcess:
    script = tmp_path / "run.py"
    script.write_text(
        _SCRIPT.replace("CHAINS", str(CHAINS))
        .replace("WARMUP", str(WARMUP))
        .replace("SAMPLES", str(SAMPLES))
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    return subprocess.run(
        [*cmd, str(script), str(tmp_path / "out"), stream],
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )


@pytest.fixture(scope="module")
def reference():
    """The same chains in one process (pooled adaptation over all of them)."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(300, 2, generator=g)
    y = X @ torch.tensor([1.0, -0.5]) + torch.randn(300, generator=g)
    init = {
        "w": torch.randn(CHAINS, 2, generator=torch.Generator().manual_seed(1)),
        "s": torch.zeros(CHAINS),
    }
    mcmc = MCMC(
        SGHMCKernel(model, subsample_size=20, rng_seed=7),
        num_samples=SAMPLES,
        warmup_steps=WARMUP,
        num_chains=CHAINS,
        chain_rng="per_chain",
        initial_params=init,
        disable_progbar=True,
    )
    mcmc.run(X, y)
    return mcmc.get_samples(group_by_chain=True)


@pytest.mark.parametrize("stream", [False, True])
def test_two_gloo_processes_return_all_chains_as_one_run(tmp_path, reference, stream):
    """Rank 0 gathers all 5 chains (3 + 2); they equal the same chains run in one
    process, adaptation included (pooled over both processes); rank 1 keeps its 2."""
    draws = tmp_path / "draws"
    result = _torchrun(tmp_path, str(draws) if stream else "-")
    assert result.returncode == 0, result.stderr[-3000:]
    main = torch.load(tmp_path / "out.rank0")
    other = torch.load(tmp_path / "out.rank1")
    assert main["chains"] == list(range(CHAINS)) and other["chains"] == [3, 4]
    assert (main["divergences"], other["divergences"]) == (CHAINS, 2)
    for site in ("w", "s"):
        got = main["samples"][site]
        assert got.shape[:2] == (CHAINS, SAMPLES)
        torch.testing.assert_close(got, reference[site], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(
            other["samples"][site], reference[site][3:], rtol=1e-4, atol=1e-5
        )
    if stream:
        assert sorted(p.name for p in draws.iterdir()) == ["rank-00000", "rank-00001"]
        torch.testing.assert_close(load_draws(draws)["w"], reference["w"], rtol=1e-4, atol=1e-5)


def test_chain_blocks():
    assert chain_blocks(5, 2) == [(0, 3), (3, 2)]
    assert sum(c for _, c in chain_blocks(1001, 7)) == 1001
    with pytest.raises(ValueError, match="at least one chain"):
        chain_blocks(2, 3)


def test_distributed_outside_torchrun_says_how_to_launch(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    mcmc = MCMC(
        SGHMCKernel(model),
        num_samples=2,
        warmup_steps=2,
        num_chains=2,
        chain_method="distributed",
        disable_progbar=True,
    )
    with pytest.raises(RuntimeError, match="torchrun"):
        mcmc.run(torch.zeros(300, 2), torch.zeros(300))
