"""The front door: what a new user meets first (bad input, the command's help and output,
progress reporting). Every bad input fails before the first step, with a message that
names what to change."""

from __future__ import annotations

import io
import re

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_sgmcmc import MCMC, ModelError, PyroPotential, SGHMCKernel
from pyro_sgmcmc.chains import Progress
from pyro_sgmcmc.cli import build_parser
from pyro_sgmcmc.experiments import PAPER

N, D = 200, 3


@pytest.fixture
def logistic():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(N, D, generator=g)
    y = torch.bernoulli(torch.sigmoid(X @ torch.tensor([1.0, -1.0, 0.5])), generator=g)
    return X, y


def logistic_model(X, y):
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([X.shape[1]]).to_event(1))
    with pyro.plate("data", X.shape[0]) as idx:
        pyro.sample("obs", dist.Bernoulli(logits=X[idx] @ w), obs=y[idx])


def poisson_model(X, y):
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([X.shape[1]]).to_event(1))
    with pyro.plate("data", X.shape[0]) as idx:
        pyro.sample("obs", dist.Poisson(rate=(X[idx] @ w).exp()), obs=y[idx])


def normal_model(X, y):
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([X.shape[1]]).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    with pyro.plate("data", y.shape[0]) as idx:
        pyro.sample("obs", dist.Normal(X[idx] @ w, sigma), obs=y[idx])


# ======================================================================================
# Observed values outside the support, NaN/inf in data or covariates
# ======================================================================================


@pytest.mark.parametrize("subsample_size", [None, 16])
def test_out_of_support_observations_raise_at_setup(logistic, subsample_size):
    X, y = logistic
    first = int(y.argmax())  # the first 1, recoded as 2
    with pytest.raises(ModelError) as err:
        PyroPotential(logistic_model, (X, 2 * y), subsample_size=subsample_size)
    text = str(err.value)
    assert "'obs'" in text and "Bernoulli" in text and "0 or 1" in text
    assert f"data row {first}" in text and "2.0" in text and "recode" in text


def test_out_of_support_counts_and_other_likelihoods(logistic):
    X, _ = logistic
    y = torch.poisson(torch.ones(N))
    y[5] = -1.0
    with pytest.raises(ModelError, match=r"'obs'.*Poisson.*integers >= 0.*-1.0 at data row 5"):
        PyroPotential(poisson_model, (X, y))
    y[5] = 1.5
    with pytest.raises(ModelError, match=r"1.5 at data row 5"):
        PyroPotential(poisson_model, (X, y))


def test_out_of_support_is_caught_by_the_kernel_before_the_first_step(logistic):
    X, y = logistic
    steps = []
    mcmc = MCMC(
        SGHMCKernel(logistic_model, subsample_size=20),
        num_samples=5,
        warmup_steps=5,
        disable_progbar=True,
        hook_fn=lambda *a: steps.append(1),
    )
    with pytest.raises(ModelError, match="outside the support of Bernoulli"):
        mcmc.run(X, 2 * y)
    assert not steps


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_observations_name_site_and_row(logistic, bad):
    X, y = logistic
    y = y.clone()
    y[7] = bad
    with pytest.raises(ModelError) as err:
        PyroPotential(logistic_model, (X, y), subsample_size=10)
    text = str(err.value)
    assert "'obs'" in text and "not finite" in text and "data row 7" in text
    assert "drop or impute" in text


def test_non_finite_covariates_name_argument_and_index(logistic):
    X, y = logistic
    for bad in (float("nan"), float("inf")):
        Xb = X.clone()
        Xb[11, 2] = bad
        with pytest.raises(ModelError, match=r"argument 'X'.*at index \(11, 2\).*torch.isfinite"):
            PyroPotential(logistic_model, (Xb, y), subsample_size=10)


def test_normal_likelihood_nan_in_response_or_covariate(logistic):
    X, _ = logistic
    y = torch.randn(N)
    y[3] = float("nan")
    with pytest.raises(ModelError, match=r"'obs'.*data row 3"):
        PyroPotential(normal_model, (X, y))
    with pytest.raises(ModelError, match=r"'y'.*data row 3|'obs'.*data row 3"):
        PyroPotential(normal_model, (X,), {"y": y})


def test_masked_missing_observations_are_allowed():
    y = torch.randn(50)
    y[4] = float("nan")

    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        keep = torch.isfinite(y)
        with pyro.plate("data", len(y)) as idx:
            with pyro.poutine.mask(mask=keep[idx]):
                pyro.sample("obs", dist.Normal(mu, 1.0), obs=y[idx].nan_to_num())

    PyroPotential(model, (y,), subsample_size=10)


def test_valid_data_passes_the_checks(logistic):
    X, y = logistic
    pot = PyroPotential(logistic_model, (X, y), subsample_size=10)
    assert pot.model_subsample_size is None and pot.subsample_size == 10


# ======================================================================================
# Counts that torch would trip over deep inside
# ======================================================================================


@pytest.mark.parametrize(
    "kwargs",
    [{"num_chains": 0}, {"num_chains": -1}, {"num_samples": 0}, {"num_samples": -3},
     {"warmup_steps": -1}, {"num_chains": 2.5}],
)  # fmt: skip
def test_mcmc_rejects_bad_counts_at_construction(kwargs):
    def model():
        pyro.sample("x", dist.Normal(0.0, 1.0))

    args = {"num_samples": 10, **kwargs}
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=rf"{name} must be an integer >= [01], got"):
        MCMC(SGHMCKernel(model), **args)


def test_mcmc_accepts_numpy_integer_counts():
    np = pytest.importorskip("numpy")

    def model():
        pyro.sample("x", dist.Normal(0.0, 1.0))

    mcmc = MCMC(SGHMCKernel(model), num_samples=np.int64(3), warmup_steps=np.int64(2),
                num_chains=2, disable_progbar=True)  # fmt: skip
    mcmc.run()
    assert mcmc.get_samples()["x"].shape == (6,)


# ======================================================================================
# dtypes
# ======================================================================================


@pytest.mark.parametrize("dtype", [torch.long, torch.int32, torch.bool, torch.uint8])
def test_integer_and_bool_bernoulli_data_are_converted(logistic, dtype):
    X, y = logistic
    ref = PyroPotential(logistic_model, (X, y), subsample_size=10)
    pot = PyroPotential(logistic_model, (X, y.to(dtype)), subsample_size=10)
    phi = {"w": torch.tensor([0.3, -0.2, 0.1])}
    idx = torch.arange(10)
    assert torch.allclose(pot.potential(phi, idx), ref.potential(phi, idx))
    assert torch.allclose(pot.potential(phi), ref.potential(phi))
    u, grads = pot.potential_and_grad(phi, idx)
    assert torch.isfinite(u) and torch.isfinite(grads["w"]).all()


def test_integer_bernoulli_data_run_with_the_kernel(logistic):
    X, y = logistic
    mcmc = MCMC(SGHMCKernel(logistic_model, subsample_size=20), num_samples=20,
                warmup_steps=20, num_chains=2, disable_progbar=True)  # fmt: skip
    mcmc.run(X, y.long())
    assert torch.isfinite(mcmc.get_samples()["w"]).all()


def test_integer_data_of_a_count_likelihood_are_left_alone(logistic):
    X, _ = logistic
    y = torch.poisson(torch.ones(N)).long()
    pot = PyroPotential(poisson_model, (X, y))
    assert pot.model is poisson_model  # Poisson scores integer tensors as they are


def test_float64_data_with_float32_priors_name_dtypes_and_fix(logistic):
    X, y = logistic
    with pytest.raises(ModelError) as err:
        PyroPotential(logistic_model, (X.double(), y.double()), subsample_size=10)
    text = str(err.value)
    assert "'X' is float64" in text and "float32" in text
    assert "X = X.float()" in text and "torch.set_default_dtype(torch.float64)" in text
    assert "Trace Shapes" not in text


def test_float64_everywhere_works(logistic):
    X, y = logistic
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        pot = PyroPotential(logistic_model, (X.double(), y.double()), subsample_size=10)
        u, _ = pot.potential_and_grad(pot.initial_params(), torch.arange(10))
        assert u.dtype == torch.float64
    finally:
        torch.set_default_dtype(old)


# ======================================================================================
# Data plate size vs the data it indexes
# ======================================================================================


def test_plate_smaller_than_a_tensor_it_indexes(logistic):
    X, y = logistic
    with pytest.raises(ModelError) as err:  # plate sized by X (150), y has 200 rows
        PyroPotential(logistic_model, (X[:150], y), subsample_size=10)
    text = str(err.value)
    assert "plate 'data' has size 150" in text and "'y'" in text and "200" in text
    assert "only its first 150 are used" in text


def test_plate_larger_than_a_tensor_it_indexes(logistic):
    X, y = logistic
    with pytest.raises(ModelError, match=r"plate 'data' has size 200.*'X'.*150.*run past"):
        PyroPotential(normal_model, (X[:150], torch.randn(N)))


def test_fixed_plate_size_over_more_rows(logistic):
    X, y = logistic

    def model(X, y):
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([D]).to_event(1))
        with pyro.plate("data", 100) as idx:
            pyro.sample("obs", dist.Bernoulli(logits=X[idx] @ w), obs=y[idx])

    for subsample_size in (None, 10):
        with pytest.raises(ModelError, match=r"size 100 but argument 'X'.*200 entries"):
            PyroPotential(model, (X, y), subsample_size=subsample_size)


def test_plate_over_a_second_dim(logistic):
    X, y = logistic

    def model(Xt, y):  # covariates stored (D, N), indexed on dim 1
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([D]).to_event(1))
        with pyro.plate("data", y.shape[0]) as idx:
            pyro.sample("obs", dist.Bernoulli(logits=w @ Xt[:, idx]), obs=y[idx])

    PyroPotential(model, (X.T, y), subsample_size=10)
    with pytest.raises(ModelError, match=r"'Xt'.*150 entries along dim 1"):
        PyroPotential(model, (X.T[:, :150], y), subsample_size=10)


# ======================================================================================
# A model whose plate subsamples itself (the SVI style)
# ======================================================================================


def svi_style_model(X, y):
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([X.shape[1]]).to_event(1))
    with pyro.plate("data", X.shape[0], subsample_size=32) as idx:
        pyro.sample("obs", dist.Bernoulli(logits=X[idx] @ w), obs=y[idx])


def test_model_subsample_size_is_honoured(logistic):
    X, y = logistic
    ref = PyroPotential(logistic_model, (X, y), subsample_size=32)
    pot = PyroPotential(svi_style_model, (X, y))
    assert pot.subsample_size == 32 and pot.model_subsample_size == 32 and pot.num_data == N
    phi = {"w": torch.tensor([0.3, -0.2, 0.1])}
    idx = torch.arange(32)
    assert torch.allclose(pot.potential(phi, idx), ref.potential(phi, idx))
    # Full data and batches of other sizes, in chunks the plate accepts:
    assert torch.allclose(pot.potential(phi), ref.potential(phi))
    other = torch.arange(50, 120)
    assert torch.allclose(pot.potential(phi, other), ref.potential(phi, other))
    _, g = pot.potential_and_grad(phi, None)
    _, g_ref = ref.potential_and_grad(phi, None)
    assert torch.allclose(g["w"], g_ref["w"], atol=1e-6)
    table, table_ref = pot.all_per_example_grads(phi), ref.all_per_example_grads(phi)
    assert table["w"].shape == (N, D) and torch.allclose(table["w"], table_ref["w"], atol=1e-6)
    assert torch.allclose(
        pot.per_example_log_likelihood(phi, other), ref.per_example_log_likelihood(phi, other)
    )


def test_model_subsample_size_with_a_different_kernel_size_says_what_to_change(logistic):
    X, y = logistic
    with pytest.raises(ModelError, match=r"subsample_size=16 differs.*subsample_size=32"):
        PyroPotential(svi_style_model, (X, y), subsample_size=16)
    PyroPotential(svi_style_model, (X, y), subsample_size=32)


def test_svi_style_model_samples_with_the_kernel(logistic):
    X, y = logistic
    pyro.set_rng_seed(0)
    mcmc = MCMC(SGHMCKernel(svi_style_model), num_samples=100, warmup_steps=100,
                num_chains=4, disable_progbar=True)  # fmt: skip
    mcmc.run(X, y)
    w = mcmc.get_samples()["w"]
    assert torch.isfinite(w).all() and w.shape == (400, D)
    assert (w.mean(0) - torch.tensor([1.0, -1.0, 0.5])).abs().max() < 0.8


# ======================================================================================
# Progress reporting
# ======================================================================================


def test_progress_counts_steps_including_thinning():
    p = Progress(10, 20, 5, 4, stream=io.StringIO())
    assert p.total == 10 + 20 * 5
    assert [p.steps(i) for i in (0, 10, 11, 30)] == [0, 10, 15, 110]


def test_progress_without_a_terminal_writes_a_few_plain_lines():
    def model():
        pyro.sample("x", dist.Normal(0.0, 1.0))

    # A run with its bar on a non-terminal stream: a handful of lines, no carriage returns.
    stream = io.StringIO()
    with Progress(100, 400, 5, 3, stream=stream) as p:
        for i in range(500):
            p.update(i, lambda: {"U": "1.234"})
    text = stream.getvalue()
    assert "\r" not in text and 3 <= len(text.splitlines()) <= 7
    assert "2100/2100" in text and "U=1.234" in text and "3 chains" in text
    assert "thinning 5" in text

    # Through MCMC (stderr is not a terminal under pytest's capture).
    import contextlib

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        MCMC(SGHMCKernel(model, thinning=3), num_samples=200, warmup_steps=100,
             num_chains=2).run()  # fmt: skip
    text = err.getvalue()
    assert "\r" not in text and len(text) < 1000, text
    assert "700/700" in text  # 100 warm-up + 200 draws x 3 steps
    assert len(text.splitlines()) <= 7


def test_progress_disabled_writes_nothing(capsys):
    def model():
        pyro.sample("x", dist.Normal(0.0, 1.0))

    MCMC(SGHMCKernel(model), num_samples=50, warmup_steps=50, disable_progbar=True).run()
    assert capsys.readouterr().err == ""


# ======================================================================================
# The command: the paper, defaults, --no-progress
# ======================================================================================


def _help(*argv) -> str:
    with pytest.raises(SystemExit):
        build_parser().parse_args([*argv, "--help"])
    return ""


def test_help_names_the_paper_and_shows_defaults(capsys):
    parser = build_parser()
    for argv in ([], ["pima"], ["double-well"]):
        with pytest.raises(SystemExit):
            parser.parse_args([*argv, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "Scalable Bayesian learning with posteriors" in text and "ICLR 2025" in text
        if argv:
            assert "--no-progress" in text
            # every option with a value shows its default
            options = re.findall(r"--[a-z-]+ [A-Z_]+", text)
            assert options
            assert text.count("default") >= len({o.split()[0] for o in options}) - 1
    assert "ICLR 2025" in PAPER


def test_pima_help_defaults(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["pima", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for fragment in ("(default: 0)", "(default: 32)", "(default: 20000)", "(default: 8000)"):
        assert fragment in text


def test_tensors_indexed_by_other_integer_tensors_are_not_plate_data():
    """A per-group table indexed by the data's group ids is not per-datum data."""
    g = torch.Generator().manual_seed(1)
    groups = torch.randint(0, 4, (N,), generator=g)
    offsets = torch.tensor([0.0, 1.0, -1.0, 0.5])  # one per group, not per datum
    y = torch.randn(N, generator=g) + offsets[groups]

    def model(groups, offsets, y):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(y)) as idx:
            pyro.sample("obs", dist.Normal(mu + offsets[groups[idx]], 1.0), obs=y[idx])

    pot = PyroPotential(model, (groups, offsets, y), subsample_size=10)
    assert pot.plate_size == N


def test_integer_out_of_support_is_a_support_error_not_a_dtype_error(logistic):
    X, y = logistic
    with pytest.raises(ModelError, match=r"outside the support of Bernoulli \(0 or 1\)"):
        PyroPotential(logistic_model, (X, 2 * y.long()), subsample_size=10)


def test_categorical_and_binomial_labels_out_of_range(logistic):
    X, _ = logistic

    def categorical(X, y):
        W = pyro.sample("W", dist.Normal(0.0, 1.0).expand([D, 4]).to_event(2))
        with pyro.plate("data", X.shape[0]) as idx:
            pyro.sample("obs", dist.Categorical(logits=X[idx] @ W), obs=y[idx])

    labels = torch.randint(0, 4, (N,))
    PyroPotential(categorical, (X, labels), subsample_size=10)
    labels[9] = 4
    with pytest.raises(ModelError, match=r"Categorical \(integers in \[0, 3\]\).*data row 9"):
        PyroPotential(categorical, (X, labels), subsample_size=10)

    def binomial(X, y):
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([D]).to_event(1))
        with pyro.plate("data", X.shape[0]) as idx:
            pyro.sample("obs", dist.Binomial(10, logits=X[idx] @ w), obs=y[idx])

    counts = torch.randint(0, 11, (N,)).float()
    PyroPotential(binomial, (X, counts))
    counts[12] = 11.0
    with pytest.raises(ModelError, match=r"Binomial \(integers in \[0, 10\]\).*data row 12"):
        PyroPotential(binomial, (X, counts))


def test_positive_likelihood_with_a_zero(logistic):
    def model(y):
        rate = pyro.sample("rate", dist.Gamma(2.0, 2.0))
        with pyro.plate("data", len(y)) as idx:
            pyro.sample("obs", dist.Exponential(rate), obs=y[idx])

    y = torch.rand(N) + 0.1
    y[20] = -0.5
    with pytest.raises(ModelError, match=r"Exponential.*-0.5 at data row 20"):
        PyroPotential(model, (y,), subsample_size=10)


def test_matrix_observations_in_an_outer_plate():
    """y is (N, K), the data plate at dim -2: the bad row and column are both named."""
    y = torch.bernoulli(torch.full((N, 4), 0.5))
    y[15, 2] = 3.0

    def model(y):
        p = pyro.sample("p", dist.Beta(1.0, 1.0).expand([4]).to_event(1))
        with pyro.plate("data", y.shape[0], dim=-2) as idx:
            with pyro.plate("items", 4, dim=-1):
                pyro.sample("obs", dist.Bernoulli(probs=p), obs=y[idx])

    with pytest.raises(ModelError, match=r"3.0 at data row 15 \(entry \(15, 2\)"):
        PyroPotential(model, (y,), subsample_size=10)


def test_unindexed_data_of_another_size_than_the_plate(logistic):
    X, y = logistic

    def model(X, y):
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([D]).to_event(1))
        with pyro.plate("data", X.shape[0]):
            pyro.sample("obs", dist.Bernoulli(logits=X @ w), obs=y)

    with pytest.raises(ModelError, match=r"'obs' has 200 rows.*150.*obs=y\[idx\]"):
        PyroPotential(model, (X[:150], y))


def test_data_passed_in_a_dict_is_named_by_its_key(logistic):
    X, y = logistic

    def model(data):
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([D]).to_event(1))
        with pyro.plate("data", data["X"].shape[0]) as idx:
            pyro.sample("obs", dist.Bernoulli(logits=data["X"][idx] @ w), obs=data["y"][idx])

    with pytest.raises(ModelError, match=r"argument \"data\['y'\]\"|argument 'data\['y'\]'"):
        PyroPotential(model, ({"X": X[:150], "y": y},), subsample_size=10)
