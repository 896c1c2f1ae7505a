"""The ``pyro-sgmcmc`` command, its experiments, and the JIT option."""

from __future__ import annotations

import csv
import json

import pyro
import pytest
import torch
from pyro.infer import MCMC

from pyro_sgmcmc import SGHMCKernel
from pyro_sgmcmc.cli import RunResult, format_comparison, main
from pyro_sgmcmc.datasets import load_pima, logistic_regression_model
from pyro_sgmcmc.diagnostics.ksd import potential_score
from pyro_sgmcmc.experiments import (
    double_well_model,
    double_well_score,
    exact_double_well_draws,
    thin_to,
)
from pyro_sgmcmc.potential import PyroPotential

PIMA_ROWS = [
    "Pyro NUTS (reference; 64 evenly spaced of its 100 draws)",
    "exact iid draws (expected KSD)",
    "SGLD (batch 32)",
    "SGHMC (full batch)",
    "SGHMC (batch 32)",
    "SGNHT (batch 32)",
    "BAOA (batch 32)",
    "parallel SGHMC (batch 32, 64 chains, last draw)",
    "parallel SGHMC (batch 32, 64 chains, antithetic pairs, last draw)",
    "Laplace (GGN, dense; MAP: SVI batch 32 + Newton)",
    "Laplace (EF, dense; MAP: SVI batch 32 + Newton)",
    "Laplace (GGN, diagonal; MAP: SVI batch 32 + Newton)",
    "VI (dense, STL, batch 32)",
    "VI (diagonal, STL, batch 32)",
    "EKF (dense, one pass, batch 32, 3 iterations)",
]
PIMA_COLUMNS = [
    "method",
    "draws",
    "ksd_rbf",
    "ksd_imq",
    "seconds",
    "min_ess_per_s",
    "max_mean_error",
]


def test_pima_main_job_writes_table_and_figure(capsys, tmp_path):
    code = main(
        [
            "pima",
            "--nuts-warmup",
            "50",
            "--nuts-samples",
            "100",
            "--warmup",
            "200",
            "--steps",
            "500",
            "--chains",
            "64",
            "--parallel-warmup",
            "100",
            "--parallel-steps",
            "20",
            "--draws",
            "80",
            "--gaussian-steps",
            "200",
            "--no-jit",
            "--no-progress",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    for name in load_pima().feature_names:
        assert name in out
    for row in PIMA_ROWS:
        assert row in out
    assert "wall-time ratio" in out and "ESS/s" in out and "KSD (RBF)" in out
    assert "64 evenly thinned draws" in out  # --draws 80, but only 64 parallel chains

    with open(tmp_path / "pima_table.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == PIMA_ROWS
    assert list(rows[0]) == PIMA_COLUMNS
    iid = rows.pop(1)  # a computed level, not a run
    assert iid["seconds"] == iid["min_ess_per_s"] == iid["max_mean_error"] == ""
    assert float(iid["ksd_imq"]) == float(iid["ksd_rbf"]) > 0
    for r in rows:
        assert int(r["draws"]) == 64  # the fewest any method kept (64 parallel chains)
        assert float(r["ksd_rbf"]) > 0 and float(r["ksd_imq"]) > 0
        assert float(r["seconds"]) > 0
    assert rows[0]["max_mean_error"] == ""  # the reference
    assert all(float(r["max_mean_error"]) >= 0 for r in rows[1:])
    serial = [r for r in rows if r["method"].startswith(("Pyro", "SG", "BAOA"))]
    assert all(r["min_ess_per_s"] == "" for r in rows if r not in serial)  # n/a: last draws
    assert all(float(r["min_ess_per_s"]) > 0 for r in serial)
    table = json.loads((tmp_path / "pima_table.json").read_text())
    assert table["settings"]["chains"] == 64 and len(table["rows"]) == len(PIMA_ROWS)
    png = (tmp_path / "pima_marginals.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_pima_methods_option_runs_the_chosen_groups_only(capsys, tmp_path):
    """--methods laplace,ekf: NUTS (the reference) and those rows; a Laplace posterior
    is close to NUTS's (the mode sits ~0.15 sd from the mean on Pima)."""
    args = ["pima", "--methods", "laplace,ekf", "--nuts-warmup", "200", "--nuts-samples"]
    args += ["1000", "--gaussian-steps", "300", "--draws", "1000", "--no-progress"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    with open(tmp_path / "pima_table.csv", newline="") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    reference = "Pyro NUTS (reference; all of its 1000 draws)"
    gaussians = [r for r in PIMA_ROWS if r.startswith(("Lap", "EKF"))]
    assert list(rows) == [reference, PIMA_ROWS[1], *gaussians]
    assert float(rows[gaussians[0]]["max_mean_error"]) < 0.35  # dense GGN Laplace
    assert not (tmp_path / "pima_trace.png").exists()  # no serial SGHMC run
    with pytest.raises(SystemExit):
        main(["pima", "--methods", "laplace,nope"])
    assert "unknown method groups ['nope']" in capsys.readouterr().err


def test_double_well_covers_both_modes_in_parallel_only(capsys, tmp_path):
    code = main(
        [
            "double-well",
            "--chains",
            "200",
            "--warmup",
            "600",
            "--steps",
            "200",
            "--no-progress",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "deep ensemble" in out and "parallel SGHMC" in out and "KSD (IMQ)" in out
    png = (tmp_path / "double_well.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    res = {r["method"]: r for r in json.loads((tmp_path / "double_well.json").read_text())["rows"]}
    assert set(res) == {"deep ensemble", "serial SGHMC", "parallel SGHMC", "exact"}
    # The ensemble collapses onto the modes x = (+-1, 0), members in both.
    ens = res["deep ensemble"]
    assert abs(ens["mean_abs_x1"] - 1.0) < 1e-3
    assert ens["within_sd_x1"] < 1e-3 and ens["within_sd_x2"] < 1e-3
    assert 0.3 < ens["right_fraction"] < 0.7
    # The serial chain starts in the right-hand well and stays there.
    assert res["serial SGHMC"]["right_fraction"] == 1.0
    # Parallel chains cover both wells, each with the exact within-well spread
    # (x1: about 0.17 at barrier 6; x2: 1).
    par = res["parallel SGHMC"]
    assert 0.3 < par["right_fraction"] < 0.7
    assert 0.12 < par["within_sd_x1"] < 0.23
    assert 0.8 < par["within_sd_x2"] < 1.2
    assert all(r["ksd_rbf"] > 0 and r["ksd_imq"] > 0 for r in res.values())


def test_double_well_model_targets_exp_minus_u():
    """The Pyro model's full-data score is the exact -grad U (the prior cancels)."""
    model = double_well_model(barrier=6.0)
    potential = PyroPotential(model, ())
    assert potential.num_data == 1 and potential.plate_name is None
    x = torch.tensor([[1.0, 0.0], [0.3, -1.2], [-1.4, 2.0]])
    score = potential_score(potential, {"x": x})["x"]
    torch.testing.assert_close(score, double_well_score(x, 6.0), rtol=1e-5, atol=1e-4)


def test_exact_double_well_draws():
    x = exact_double_well_draws(4000, barrier=6.0, seed=1)
    assert x.shape == (4000, 2)
    assert abs(float((x[:, 0] > 0).float().mean()) - 0.5) < 0.04
    assert abs(float(x[:, 0].abs().mean()) - 0.960) < 0.015  # E|x1| at barrier 6 (quadrature)
    assert abs(float(x[:, 1].std()) - 1.0) < 0.05


def test_thin_to_keeps_ends_and_count():
    x = torch.arange(101.0)[:, None]
    assert thin_to(x, 11).flatten().tolist() == [float(i) for i in range(0, 101, 10)]
    assert thin_to(x, 500) is x


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
