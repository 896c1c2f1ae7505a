"""The Bayesian-LLM experiment: the last-word task, the vectorised ensemble, the
uncertainty split, AUROC, and ``--quick`` end to end (a tiny random Llama)."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from pyro_sgmcmc.cli import main as cli_main  # noqa: E402
from pyro_sgmcmc.datasets import UDHR_LANGUAGES, load_udhr  # noqa: E402
from pyro_sgmcmc.experiments import bayes_llm as bl  # noqa: E402
from pyro_sgmcmc.experiments import bayes_llm_methods as blm  # noqa: E402
from pyro_sgmcmc.hf import (  # noqa: E402
    ByteTokenizer,
    CachedHead,
    freeze_except,
    load_causal_lm,
    trainable_parameters,
    trunk_hidden,
)


def _tiny():
    model, tok = load_causal_lm("tiny", seed=0)
    freeze_except(model, ["model.layers.1.self_attn"])
    return model, tok


def _members(model, k=4, scale=0.3):
    g = torch.Generator().manual_seed(3)
    return {
        n: v.detach() + scale * torch.randn((k, *v.shape), generator=g)
        for n, v in trainable_parameters(model).items()
    }


# ---------------------------------------------------------------------------- the task
def test_every_udhr_statement_has_a_last_word_task():
    tok = ByteTokenizer()
    udhr = load_udhr()
    for code in UDHR_LANGUAGES:
        sts = blm.last_word_statements(udhr.texts[code], udhr.keys, tok)
        assert len(sts) == 45 and [s.key for s in sts] == udhr.keys
        for st, text in zip(sts, udhr.texts[code], strict=True):
            context, word = blm.split_last_word(text)
            assert text.startswith(context) and word and word[0].isalpha()
            assert tok.decode(st.context) == context
            assert st.target == tok.encode(" " + word)[0] == ord(" ")
    eng = load_udhr(["eng", "smo"])
    assert blm.split_last_word(eng.texts["eng"][eng.keys.index((1, 0))])[1] == "brotherhood"


def test_book_windows_are_shifted_by_one_and_seeded():
    ids = torch.arange(1000)
    x, y = blm.book_windows(ids, 10, 16, torch.Generator().manual_seed(1))
    x2, _ = blm.book_windows(ids, 10, 16, torch.Generator().manual_seed(1))
    assert x.shape == y.shape == (10, 16) and torch.equal(y, x + 1) and torch.equal(x, x2)
    assert bool((x[1:, 0] > x[:-1, 0]).all())  # sorted, distinct offsets
    with pytest.raises(ValueError, match="fewer than"):
        blm.book_windows(torch.arange(20), 10, 16, torch.Generator())


# ---------------------------------------------------------------------------- ensemble
def test_vectorised_ensemble_equals_separate_forwards():
    model, tok = _tiny()
    members = _members(model)
    sts = blm.last_word_statements(
        ["All are equal before the law.", "Everyone has the right to life."], [(0, 0), (0, 1)], tok
    )
    batched = blm.member_log_probs(model, sts, members, chunk=3)  # chunks of 3 and 1
    assert batched.shape == (4, 2, len(tok))
    for i in range(4):
        one = {n: v[i] for n, v in members.items()}
        for j, st in enumerate(sts):
            for n, v in one.items():
                model.get_parameter(n).data.copy_(v)
            with torch.no_grad():
                full = model(torch.tensor([st.context])).logits[0, -1].log_softmax(-1)
            torch.testing.assert_close(batched[i, j], full, rtol=1e-5, atol=1e-5)


def test_parallel_sghmc_gradients_equal_separate_ones():
    model, _ = _tiny()
    x = torch.randint(256, (6, 12), generator=torch.Generator().manual_seed(0))
    y = torch.randint(256, (6, 4), generator=torch.Generator().manual_seed(1))
    cache = trunk_hidden(model, x, 1)
    theta0 = {n: v.detach().clone() for n, v in trainable_parameters(model).items()}
    pot = blm.token_potential(CachedHead(model, cache), 4, theta0, prior_sd=0.1, num_data=24)
    members = _members(model, k=3)
    idx = torch.tensor([[0, 1], [2, 3], [4, 5]])
    inputs, targets = blm.window_batch(cache, y, idx)
    vg = torch.func.vmap(torch.func.grad(pot))(members, inputs, targets)
    for i in range(3):
        one = {n: v[i] for n, v in members.items()}
        g = torch.func.grad(pot)(one, *blm.window_batch(cache, y, idx[i]))
        for n in g:
            torch.testing.assert_close(vg[n][i], g[n], rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------- metrics
def test_tu_is_au_plus_eu_per_token_and_identical_members_have_no_eu():
    g = torch.Generator().manual_seed(0)
    lp = (3 * torch.randn(5, 7, 50, generator=g)).log_softmax(-1)
    s = blm.statement_uncertainty(lp, torch.randint(50, (7,), generator=g))
    torch.testing.assert_close(s.total, s.aleatoric + s.epistemic)
    p_mean = lp.exp().mean(0)
    torch.testing.assert_close(s.total, -(p_mean * p_mean.log()).sum(-1), rtol=1e-5, atol=1e-5)
    assert bool((s.epistemic > 0).all())
    same = blm.statement_uncertainty(lp[:1].expand(4, 7, 50), torch.zeros(7, dtype=torch.long))
    assert float(same.epistemic.abs().max()) == 0.0
    torch.testing.assert_close(same.loss, -lp[0, :, 0])


def test_auroc_by_hand():
    assert blm.auroc(torch.tensor([0.0, 1.0]), torch.tensor([2.0, 3.0])) == 1.0
    assert blm.auroc(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0])) == 0.0
    assert blm.auroc(torch.ones(3), torch.ones(4)) == 0.5


# ---------------------------------------------------------------------------- end to end
def test_quick_end_to_end_and_partial_rerun(tmp_path):
    out = tmp_path / "full"
    assert cli_main(["bayes-llm", "--quick", "--out", str(out)]) == 0
    doc = json.loads((out / "bayes_llm.json").read_text())
    rows = doc["rows"]
    langs = ["eng", *bl.QUICK["languages"]]
    for method in bl.METHODS:
        for lang in langs:
            mine = [r for r in rows if r["method"] == method and r["language"] == lang]
            assert mine, (method, lang)
            for r in mine:
                # English: the union of the paragraphs aligned with each language
                n = bl.QUICK["max_statements"]
                assert r["statements"] == n if lang != "eng" else n <= r["statements"] <= 2 * n
                assert abs(r["tu"] - r["au"] - r["eu"]) < 1e-5
                assert (r["auroc_tu"] is None) == (lang == "eng")
    assert len([r for r in rows if r["method"] == "AdamW" and r["language"] == "eng"]) == 2
    ens = [r for r in rows if r["method"] == "parallel SGHMC" and r["language"] == "smo"][0]
    assert ens["members"] == bl.QUICK["members"] and ens["eu"] > 0
    for name in ("bayes_llm.csv", "bayes_llm_table.txt", "bayes_llm_uncertainty.png"):
        assert (out / name).stat().st_size > 0
    # A partial rerun (one method, one language) repeats the same numbers.
    part = tmp_path / "part"
    cli_main(["bayes-llm", "--quick", "--out", str(part), "--methods", "parallel SGHMC",
              "--languages", "smo"])  # fmt: skip
    again = json.loads((part / "bayes_llm.json").read_text())["rows"]
    got = [r for r in again if r["language"] == "smo"][0]
    for key in ("loss", "tu", "eu", "auroc_tu", "auroc_eu"):
        assert got[key] == pytest.approx(ens[key], abs=1e-6)


def test_combined_table_over_seeds(tmp_path):
    """Two seeds' runs combine into one table (mean ± sd over the seeds); runs with other
    settings, or the same seed twice, are refused."""
    dirs = []
    for seed in (0, 1):
        d = tmp_path / f"seed{seed}"
        args = ["bayes-llm", "--quick", "--seed", str(seed), "--out", str(d)]
        assert cli_main([*args, "--methods", "base", "parallel SGHMC", "--languages", "smo"]) == 0
        dirs.append(str(d))
    records = bl.combine_runs(dirs)
    ens = [r for r in records if r.method == "parallel SGHMC" and r.language == "smo"]
    assert sorted(r.seed for r in ens) == [0, 1]
    out = tmp_path / "combined"
    assert cli_main(["bayes-llm", "--combine", *dirs, "--out", str(out)]) == 0
    table = (out / "bayes_llm_combined_table.txt").read_text()
    line = next(row for row in table.splitlines() if row.startswith("parallel SGHMC EU"))
    mean = sum(r.auroc_eu for r in ens) / 2
    assert f"{mean:.3f} ±" in line
    with pytest.raises(ValueError, match="twice"):
        bl.combine_runs([dirs[0], dirs[0]])
    other = tmp_path / "other"
    cli_main(["bayes-llm", "--quick", "--seed", "2", "--members", "2", "--out", str(other),
              "--methods", "base", "--languages", "smo"])  # fmt: skip
    with pytest.raises(ValueError, match="members"):
        bl.combine_runs([dirs[0], str(other)])
