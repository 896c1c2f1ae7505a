"""The ``pyro-sgmcmc`` command and the JIT option."""

from __future__ import annotations

import pyro
import pytest
import torch
from pyro.infer import MCMC

from pyro_sgmcmc import SGHMCKernel
from pyro_sgmcmc.cli import RunResult, format_comparison, main
from pyro_sgmcmc.datasets import load_pima, logistic_regression_model


def test_pima_main_job_prints_both_posteriors(capsys):
    code = main(
        [
            "pima",
            "--nuts-warmup",
            "50",
            "--nuts-samples",
            "100",
            "--warmup",
            "300",
            "--steps",
            "1000",
            "--no-progress",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    for name in load_pima().feature_names:
        assert name in out
    assert "Pyro NUTS" in out and "SGHMC (batch 32)" in out
    assert "wall-time ratio" in out and "ESS/s" in out


def test_format_comparison_figures():
    ref = RunResult("ref", torch.tensor([[0.0, 10.0], [2.0, 14.0]]), 2.0, 10)
    other = RunResult("other", torch.tensor([[1.0, 12.0], [3.0, 16.0]]), 1.0, 100)
    text = format_comparison(["a", "b"], ref, other)
    # Means differ by 1 (a: ref sd 1.414) and 2 (b: ref sd 2.828): 0.707 ref sd each.
    assert "+0.707" in text
    assert "wall-time ratio other / ref: 0.50" in text


def test_cli_rejects_unknown_command():
    with pytest.raises(SystemExit):
        main(["nope"])


def test_jit_compile_gives_the_same_draws():
    data = load_pima()
    draws = []
    for jit in (False, True):
        pyro.set_rng_seed(0)
        kernel = SGHMCKernel(logistic_regression_model, subsample_size=32, jit_compile=jit)
        mcmc = MCMC(kernel, num_samples=100, warmup_steps=200, disable_progbar=True)
        mcmc.run(data.X, data.y)
        draws.append(mcmc.get_samples()["w"])
    torch.testing.assert_close(draws[0], draws[1], rtol=1e-4, atol=1e-5)
