"""Masked-diffusion LM adapters: what an unmask strategy needs from a model.

A masked diffusion LM (LLaDA, Dream, decograph's own ``decograph-mdm``) reads a sequence in
which some positions hold the mask token and returns logits for every position, under
bidirectional attention. The adapter gives the runtime one call:

    logits, kv = adapter.forward(ids, positions, key_valid, context=None, context_valid=None, return_kv=False)

``context`` (per-layer KV of positions outside the query) is what the block-wise approximate
caches pass in; only adapters with ``supports_kv`` take it. ``shift_logits`` (Dream's
convention): the logits at position i predict the token at i + 1.

    adapter = as_diffusion_adapter(model, tokenizer)          # a model object
    adapter = load_diffusion_model("path/to/dir")             # a local directory
"""
from __future__ import annotations

import inspect
import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch

from decograph.errors import ModelError, UnsupportedError
from decograph.models.block_diffusion import BLOCK_DIFFUSION_TYPE, BlockDiffusionLM, load_delta
from decograph.models.diffusion_gemma import DIFFUSION_GEMMA_TYPE, DiffusionGemmaAdapter, is_diffusion_gemma
from decograph.models.mdm import MDM_MODEL_TYPE, KV, MDMTransformer, load_mdm

__all__ = ["MaskedDiffusionAdapter", "MDMAdapter", "BlockDiffusionAdapter", "load_block_diffusion", "HFMaskedDiffusion", "as_diffusion_adapter",
           "is_diffusion_model", "is_diffusion_dir", "load_diffusion_model"]

_DIFFUSION_TYPES = {MDM_MODEL_TYPE, "llada", "dream", BLOCK_DIFFUSION_TYPE}


class MaskedDiffusionAdapter(ABC):
    """Base: a bidirectional model with a mask token."""

    supports_kv = False
    wants_layout = False          # forward also takes gen_start [B] and context_pos [B, C] (block-causal models)

    def __init__(self, model: Any, mask_token_id: int, eos_token_ids: tuple[int, ...], vocab_size: int,
                 max_positions: int, shift_logits: bool, tokenizer: Any, name: str) -> None:
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.mask_token_id, self.eos_token_ids = int(mask_token_id), tuple(int(e) for e in eos_token_ids)
        self.vocab_size, self.max_positions, self.shift_logits = int(vocab_size), int(max_positions), bool(shift_logits)
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise ModelError(f"{name}: mask token id {self.mask_token_id} is outside the vocabulary ({self.vocab_size})")

    @abstractmethod
    def forward(self, ids: torch.Tensor, positions: torch.Tensor, key_valid: torch.Tensor,
                context: KV | None = None, context_valid: torch.Tensor | None = None,
                return_kv: bool = False, logits_at: torch.Tensor | None = None) -> tuple[torch.Tensor, KV | None]:
        """Logits for every query position, or only at ``logits_at [B, K]`` (``[B, K, V]``)."""


class MDMAdapter(MaskedDiffusionAdapter):
    """decograph's own ``MDMTransformer``: takes and returns KV (both caches work)."""

    supports_kv = True

    def __init__(self, model: MDMTransformer, tokenizer: Any = None, shift_logits: bool = False) -> None:
        c = model.config
        super().__init__(model, c.mask_token_id, (c.eos_token_id,), c.vocab_size, c.max_len, shift_logits,
                         tokenizer, f"{MDM_MODEL_TYPE} ({c.n_layers} layers, d={c.d_model})")

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, key_valid: torch.Tensor,
                context: KV | None = None, context_valid: torch.Tensor | None = None,
                return_kv: bool = False, logits_at: torch.Tensor | None = None) -> tuple[torch.Tensor, KV | None]:
        return self.model(ids, positions, key_valid=key_valid, context=context, context_valid=context_valid,
                          return_kv=return_kv, logits_at=logits_at)


class HFMaskedDiffusion(MaskedDiffusionAdapter):
    """Any Hugging Face model returning ``.logits`` for every position of a bidirectional
    forward (LLaDA, Dream with ``shift_logits``, a ``*ForMaskedLM``). No KV interface: the
    block-wise caches are refused with a named error; every step recomputes."""

    def __init__(self, model: Any, tokenizer: Any = None, mask_token_id: int | None = None,
                 shift_logits: bool | None = None) -> None:
        cfg = getattr(model, "config", None)
        name = type(model).__name__
        mask = mask_token_id
        for src in (cfg, tokenizer):
            if mask is None and src is not None and getattr(src, "mask_token_id", None) is not None:
                mask = src.mask_token_id
        if mask is None:
            raise ModelError(f"{name} has no mask token (config.mask_token_id and the tokenizer's mask_token are "
                             f"unset): an unmask strategy needs one; pass mask_token_id=")
        eos = getattr(cfg, "eos_token_id", None)
        if eos is None and tokenizer is not None:
            eos = tokenizer.eos_token_id
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        vocab = getattr(cfg, "vocab_size", None) or model.get_output_embeddings().weight.shape[0]
        limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "max_sequence_length", None) or 0
        shift = shift_logits if shift_logits is not None else getattr(cfg, "model_type", "") == "dream"
        super().__init__(model, mask, eos_ids, vocab, limit, shift, tokenizer, name)
        params = inspect.signature(model.forward).parameters
        self._takes_positions = "position_ids" in params

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, key_valid: torch.Tensor,
                context: KV | None = None, context_valid: torch.Tensor | None = None,
                return_kv: bool = False, logits_at: torch.Tensor | None = None) -> tuple[torch.Tensor, KV | None]:
        if context is not None or return_kv:
            raise UnsupportedError(f"{self.name} has no KV interface for the block-wise caches")
        if not self._takes_positions and not bool(key_valid.all()):
            logits = self._rows_alone(ids, key_valid)
        else:
            kw: dict[str, Any] = {"input_ids": ids, "attention_mask": key_valid.long()}
            if self._takes_positions:
                kw["position_ids"] = positions
            logits = self.model(**kw).logits
        if logits_at is not None:
            logits = logits.gather(1, logits_at[..., None].expand(-1, -1, logits.shape[-1]))
        return logits, None


    def _rows_alone(self, ids: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
        """A model that places tokens by their index (LLaDA's forward takes no positions) would
        read a left-padded row shifted: each row runs alone over its valid span instead."""
        out = None
        for b in range(ids.shape[0]):
            at = key_valid[b].nonzero().squeeze(-1)
            lo, hi = (int(at[0]), int(at[-1]) + 1) if len(at) else (0, 0)
            lg = self.model(input_ids=ids[b:b + 1, lo:hi]).logits if hi > lo else None
            if out is None and lg is not None:
                out = lg.new_zeros((ids.shape[0], ids.shape[1], lg.shape[-1]))
            if lg is not None:
                out[b, lo:hi] = lg[0]
        assert out is not None, "no valid token in the batch"
        return out


class BlockDiffusionAdapter(MaskedDiffusionAdapter):
    """A ``BlockDiffusionLM`` (a causal LM adapted to block diffusion): block-causal, so it needs
    where each row's answer starts and the positions of the cached context; takes and returns KV."""

    supports_kv = True
    wants_layout = True

    def __init__(self, lm: BlockDiffusionLM, tokenizer: Any = None, name: str = "") -> None:
        c = lm.base.config
        eos = lm.base.generation_config.eos_token_id if getattr(lm.base, "generation_config", None) else c.eos_token_id
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
        super().__init__(lm, lm.config.mask_token_id, eos_ids, lm.vocab_size, c.max_position_embeddings, True,
                         tokenizer, name or f"block diffusion over {lm.config.base} (blocks of {lm.config.block})")
        self.block = lm.config.block

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, key_valid: torch.Tensor,
                context: KV | None = None, context_valid: torch.Tensor | None = None,
                return_kv: bool = False, logits_at: torch.Tensor | None = None,
                gen_start: torch.Tensor | None = None,
                context_pos: torch.Tensor | None = None) -> tuple[torch.Tensor, KV | None]:
        if gen_start is None or (context is not None and context_pos is None):
            raise UnsupportedError(f"{self.name}: the forward needs the canvas layout (gen_start, context_pos)")
        noisy, attend = self.model.layout(ids, positions, key_valid, gen_start, context_pos if context is not None
                                          else None, context_valid)
        return self.model(ids, positions, noisy, attend, context=context, return_kv=return_kv, logits_at=logits_at)


def is_diffusion_model(model: Any) -> bool:
    """Whether ``model`` is (or wraps) a diffusion LM (masked, or DiffusionGemma's uniform
    noise) rather than a causal LM."""
    if isinstance(model, (MaskedDiffusionAdapter, MDMTransformer, DiffusionGemmaAdapter)):
        return True
    cfg = getattr(model, "config", None)
    return (getattr(cfg, "model_type", None) in _DIFFUSION_TYPES | {DIFFUSION_GEMMA_TYPE}
            or type(model).__name__.endswith("ForMaskedLM"))


def is_diffusion_dir(path: str | Path) -> bool:
    """Whether the model directory's ``config.json`` names a masked-diffusion model."""
    p = Path(path) / "config.json"
    try:
        cfg = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    archs = cfg.get("architectures") or []
    return (cfg.get("model_type") in _DIFFUSION_TYPES | {DIFFUSION_GEMMA_TYPE}
            or any(str(a).endswith("ForMaskedLM") for a in archs))


def as_diffusion_adapter(model: Any, tokenizer: Any = None, *, mask_token_id: int | None = None,
                         shift_logits: bool | None = None) -> MaskedDiffusionAdapter | DiffusionGemmaAdapter:
    if isinstance(model, (MaskedDiffusionAdapter, DiffusionGemmaAdapter)):
        return model
    if is_diffusion_gemma(model):
        return DiffusionGemmaAdapter(model, tokenizer)
    if isinstance(model, MDMTransformer):
        return MDMAdapter(model, tokenizer, bool(shift_logits))
    if isinstance(model, torch.nn.Module):
        return HFMaskedDiffusion(model, tokenizer, mask_token_id, shift_logits)
    raise ModelError(f"{type(model).__name__} is not a masked-diffusion model (need an MDMTransformer, a Hugging "
                     f"Face model returning .logits, or a MaskedDiffusionAdapter)")


def load_diffusion_model(path: str | Path, *, trust_remote_code: bool = False, mask_token_id: int | None = None,
                         shift_logits: bool | None = None) -> MaskedDiffusionAdapter | DiffusionGemmaAdapter:
    """A masked-diffusion model from a local directory: decograph's own (``decograph-mdm``) or
    a Hugging Face one (LLaDA and Dream need ``trust_remote_code``). The mask token is checked
    before any weights are read."""
    d = Path(path)
    if not (d / "config.json").is_file():
        raise ModelError(f"{d}: no config.json (not a model directory)")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(d), trust_remote_code=trust_remote_code) \
        if any((d / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")) else None
    cfg = json.loads((d / "config.json").read_text(encoding="utf-8"))
    if cfg.get("model_type") == BLOCK_DIFFUSION_TYPE:
        return load_block_diffusion(d)
    if cfg.get("model_type") == MDM_MODEL_TYPE:
        return MDMAdapter(load_mdm(d), tok, bool(shift_logits))
    if cfg.get("model_type") == DIFFUSION_GEMMA_TYPE:
        from transformers import DiffusionGemmaForBlockDiffusion

        return DiffusionGemmaAdapter(DiffusionGemmaForBlockDiffusion.from_pretrained(str(d)).eval(), tok)
    if mask_token_id is None and cfg.get("mask_token_id") is None and getattr(tok, "mask_token_id", None) is None:
        raise ModelError(f"{d / 'config.json'}: no mask token (field 'mask_token_id' unset and the tokenizer has no "
                         f"mask_token): an unmask strategy needs one")
    from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

    if cfg.get("auto_map") and not trust_remote_code:
        raise ModelError(f"{d / 'config.json'}: the model's code ships in its directory (field 'auto_map', as LLaDA's "
                         f"and Dream's): load it with trust_remote_code=True (`decograph run --trust-remote-code`) if you trust that code")
    conf = AutoConfig.from_pretrained(str(d), trust_remote_code=trust_remote_code)
    loader = AutoModelForMaskedLM if any(str(a).endswith("ForMaskedLM") for a in cfg.get("architectures") or []) else AutoModel
    model = loader.from_pretrained(str(d), config=conf, trust_remote_code=trust_remote_code).eval()
    return HFMaskedDiffusion(model, tok, mask_token_id, shift_logits)


def load_block_diffusion(path: str | Path) -> BlockDiffusionAdapter:
    """A block-diffusion delta directory over its base model (a packaged name in its config)."""
    from decograph.models.packaged import packaged_model_path
    from decograph.models.gguf_package import load_model_dir

    d = Path(path)
    base_name = json.loads((d / "config.json").read_text(encoding="utf-8")).get("base", "")
    base_dir = packaged_model_path(base_name, progress=False)
    if base_dir is None:
        raise ModelError(f"{d / 'config.json'}: field 'base' is {base_name!r}, not a packaged model")
    base, tok = load_model_dir(base_dir, base_name, False)
    return BlockDiffusionAdapter(load_delta(d, base), tok, f"{d.name} (block diffusion over {base_name})")
