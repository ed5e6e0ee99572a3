"""Tiny random-weight models for tests: real transformer code paths, millisecond forwards.

``tiny_llama`` builds the same ``LlamaForCausalLM`` class the default model uses (rotary
positions, grouped-query attention, RMSNorm), so adapter and runtime tests exercise the real
attention and cache code, only smaller. ``tiny_causal_lm`` does the same for other families
(``TINY_FAMILIES``: Qwen2, Gemma 3, Phi-3, Mistral, Gemma 2, and LFM2's hybrid convolution
cache), with small sliding windows where the family has them. Weights are random but a pure
function of the arguments: two calls with the same arguments give bit-identical models, and
the global torch RNG is left untouched.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from decograph.errors import ModelError

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM

__all__ = ["TINY_FAMILIES", "tiny_causal_lm", "tiny_llama", "tiny_model_dir", "word_tokenizer"]


def tiny_llama(
    vocab_size: int = 64,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    seed: int = 0,
    max_positions: int = 512,
    eos_token_id: int | None = None,
    init_std: float = 0.2,
    attn_implementation: str = "sdpa",
) -> LlamaForCausalLM:
    """A random ``LlamaForCausalLM`` in float32 and eval mode, deterministic for its arguments.

    Assumes ``hidden`` is divisible by ``heads`` and ``heads`` by ``kv_heads`` (``ModelError``
    otherwise). ``init_std`` is larger than Llama's 0.02 on purpose: logits then spread over a
    few units, so greedy argmaxes are rarely near-ties and batched vs unbatched float noise
    (~1e-6) does not flip them. ``eos_token_id=None`` leaves the generation config without an
    end-of-sequence token, so generation runs to its budget.
    """
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    if hidden % heads or heads % kv_heads:
        raise ModelError(f"tiny_llama needs heads | hidden and kv_heads | heads; got {hidden=}, {heads=}, {kv_heads=}")
    if eos_token_id is not None and not 0 <= eos_token_id < vocab_size:
        raise ModelError(f"eos_token_id {eos_token_id} is outside the vocabulary [0, {vocab_size})")
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        initializer_range=init_std,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=eos_token_id,
        pad_token_id=None,
        dtype="float32",
    )
    config._attn_implementation = attn_implementation
    # Seed a private RNG stream so building a model never perturbs the caller's torch RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(eos_token_id=eos_token_id)
    return model.eval()


# family -> (transformers config class, model class, config fields beyond the shared shape).
# Windows are small (8 tokens) so short prompts already cross them.
TINY_FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    # layer 0 full, layer 1 sliding: Qwen2 slides from max_window_layers on
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM",
              {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}),
    # Gemma 3's hybrid cache: sliding and global layers, local and global rotary bases
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               {"sliding_window": 8, "head_dim": 16, "query_pre_attn_scalar": 16, "tie_word_embeddings": True,
                "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"sliding_window": None}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 8}),
    # soft-capped attention and logits on top of alternating windows
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               {"sliding_window": 8, "head_dim": 16, "query_pre_attn_scalar": 16,
                "layer_types": ["sliding_attention", "full_attention"]}),
    # a hybrid with a recurrent (short-convolution) state: the slot cache cannot roll it back
    "lfm2": ("Lfm2Config", "Lfm2ForCausalLM", {"layer_types": ["conv", "full_attention"]}),
}


def tiny_causal_lm(family: str, vocab_size: int = 64, hidden: int = 32, layers: int | None = None,
                   heads: int = 4, kv_heads: int = 2, seed: int = 0, eos_token_id: int | None = None,
                   init_std: float = 0.2, **config: Any) -> Any:
    """A random causal LM of ``family`` (a key of ``TINY_FAMILIES``) in float32 and eval mode,
    deterministic for its arguments, like ``tiny_llama``. ``layers`` defaults to the family's
    layer-type list (else 2); ``config`` overrides the family's config fields. Raises
    ``ModelError`` for an unknown family."""
    import transformers

    if family not in TINY_FAMILIES:
        raise ModelError(f"unknown tiny model family {family!r}; choose from {', '.join(sorted(TINY_FAMILIES))}")
    config_cls, model_cls, extra = TINY_FAMILIES[family]
    fields = {**extra, **config}
    n = layers if layers is not None else len(fields.get("layer_types") or [0, 0])
    cfg = getattr(transformers, config_cls)(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=n,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
        initializer_range=init_std, bos_token_id=None, eos_token_id=eos_token_id, pad_token_id=None, **fields)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, model_cls)(cfg).to(torch.float32)
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(eos_token_id=eos_token_id)
    return model.eval()


def word_tokenizer(vocab_size: int = 64, eos_token_id: int | None = None) -> Any:
    """A real fast tokenizer whose vocabulary is the words ``t0 .. t{vocab_size-1}`` (id = number).

    Text is split on whitespace; an unknown word maps to ``t0``. Guarantees
    ``tok("t5 t9").input_ids == [5, 9]`` and ``tok.decode([5, 9]) == "t5 t9"``, so tests can
    write prompts as text and read outputs back exactly. ``eos_token_id`` names the word used
    as the end-of-sequence token.
    """
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    backend.pre_tokenizer = WhitespaceSplit()
    eos = None if eos_token_id is None else f"t{eos_token_id}"
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="t0", eos_token=eos)


def tiny_model_dir(tmp_path: str | Path, **kw: Any) -> Path:
    """Save ``tiny_llama(**kw)`` and a matching ``word_tokenizer`` under ``tmp_path``.

    Returns the directory (``tmp_path / "tiny-llama"``: safetensors weights, config,
    generation config, tokenizer), loadable offline with ``from_pretrained(dir,
    local_files_only=True)`` and so by ``HFCausalLM.from_pretrained``.
    """
    out = Path(tmp_path) / "tiny-llama"
    tiny_llama(**kw).save_pretrained(out)
    word_tokenizer(kw.get("vocab_size", 64), kw.get("eos_token_id")).save_pretrained(out)
    return out
