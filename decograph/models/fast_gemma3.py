"""A lean forward for Gemma 3 causal LMs (``Gemma3ForCausalLM``), over the slot cache.

transformers' Gemma 3 computation with the same ops in the same order, called functionally
(no module dispatch, no mask construction, no cache bookkeeping), so its logits are
bit-identical to the model's own forward given the same masks: the scaled embedding, Gemma's
RMSNorm (``x * rsqrt(mean(x^2) + eps) * (1 + w)`` in float32), per-head Q/K norms before the
rotary embedding of each layer's type (local or global base), SDPA as transformers'
``sdpa_attention_forward`` calls it under an additive mask (a single query's heads packed per
KV head; several queries with the KV heads repeated), the post-attention and the two
feed-forward norms, ``gelu_tanh(gate) * up``, and the optional final soft-cap. The
projections stay separate ``F.linear`` calls with the model's own weights: fusing them would
change the rounding, and this path promises the model's bits.

The caller hands the masks transformers would take (``decograph.models.sliding.model_mask``:
a dict of additive masks by layer type, the sliding window applied by position, or one
tensor for every layer), so windows, trees and rolled-back slots are the caller's business,
exactly as for the model itself.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["Gemma3FastPath", "supports_gemma3_fast_path"]


def supports_gemma3_fast_path(model: Any) -> bool:
    """True for transformers' ``Gemma3ForCausalLM`` with SDPA attention, a tanh-GELU MLP, no
    attention soft-cap and causal attention."""
    cfg = getattr(model, "config", None)
    return (
        type(model).__name__ == "Gemma3ForCausalLM"
        and getattr(cfg, "_attn_implementation", "sdpa") == "sdpa"
        and getattr(cfg, "hidden_activation", "") == "gelu_pytorch_tanh"
        and getattr(cfg, "attn_logit_softcapping", None) is None
        and not getattr(cfg, "use_bidirectional_attention", False)
        and set(getattr(cfg, "layer_types", ())) <= {"sliding_attention", "full_attention"}
    )


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``Gemma3RMSNorm.forward``."""
    out = x.float()
    out = out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + eps)
    out = out * (1.0 + weight.float())
    return out.type_as(x)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    b, h, s, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


class Gemma3FastPath:
    """Functional forward of a ``Gemma3ForCausalLM`` writing into the slot cache's layers."""

    def __init__(self, model: Any) -> None:
        inner = model.model
        cfg = model.config
        self.embed = inner.embed_tokens.weight
        self.embed_scale = inner.embed_tokens.embed_scale
        self.rotary = inner.rotary_emb
        self.norm_w, self.eps = inner.norm.weight, inner.norm.eps
        self.lm_head = model.lm_head.weight
        self.softcap = getattr(cfg, "final_logit_softcapping", None)
        self.head_dim = cfg.head_dim
        self.n_rep = cfg.num_attention_heads // cfg.num_key_value_heads
        self.types = list(cfg.layer_types[: cfg.num_hidden_layers])
        self.layers = list(inner.layers[: cfg.num_hidden_layers])

    def forward(self, cache: Any, ids: torch.Tensor, pos: torch.Tensor,
                masks: torch.Tensor | dict[str, torch.Tensor], logits_to_keep: int = 0, hidden: bool = False) -> Any:
        """Logits (float32) [B, T, V] of ``ids`` at positions ``pos`` after the cache's slots;
        ``masks``: the additive [B, 1, T, S] mask(s) the model's forward would take;
        ``logits_to_keep`` > 0: of the last that many positions only. With ``hidden``,
        ``(logits, h)``: ``h`` the final hidden states [B, T, H] (after the final norm)."""
        b, t = ids.shape
        h = F.embedding(ids, self.embed) * self.embed_scale.to(self.embed.dtype)
        rope = {kind: self.rotary(h, pos, kind) for kind in set(self.types)}
        for slot, kind, layer in zip(cache.layers, self.types, self.layers):
            mask = masks[kind] if isinstance(masks, dict) else masks
            cos, sin = rope[kind]
            res = h
            h = self._attention(slot, layer.self_attn, _rms(h, layer.input_layernorm.weight, self.eps),
                                cos, sin, mask, b, t)
            h = res + _rms(h, layer.post_attention_layernorm.weight, self.eps)
            res = h
            mlp = layer.mlp
            x = _rms(h, layer.pre_feedforward_layernorm.weight, self.eps)
            x = F.linear(F.gelu(F.linear(x, mlp.gate_proj.weight), approximate="tanh") * F.linear(x, mlp.up_proj.weight),
                         mlp.down_proj.weight)
            h = res + _rms(x, layer.post_feedforward_layernorm.weight, self.eps)
        final = None
        if hidden:
            h = final = _rms(h, self.norm_w, self.eps)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        if final is None:
            h = _rms(h, self.norm_w, self.eps)
        logits = F.linear(h, self.lm_head)
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return (logits.float(), final) if hidden else logits.float()

    def _attention(self, slot: Any, at: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   mask: torch.Tensor, b: int, t: int) -> torch.Tensor:
        """``Gemma3Attention.forward`` with ``sdpa_attention_forward`` under an additive mask."""
        shape = (b, t, -1, self.head_dim)
        q = F.linear(x, at.q_proj.weight).view(shape).transpose(1, 2)
        k = F.linear(x, at.k_proj.weight).view(shape).transpose(1, 2)
        v = F.linear(x, at.v_proj.weight).view(shape).transpose(1, 2)
        q, k = _rms(q, at.q_norm.weight, self.eps), _rms(k, at.k_norm.weight, self.eps)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = (q * cos) + (_rotate_half(q) * sin)
        k = (k * cos) + (_rotate_half(k) * sin)
        keys, values = slot.update(k, v)
        if self.n_rep > 1:
            if t == 1:                      # one query: its heads packed per KV head (transformers' pack_gqa)
                q = q.reshape(b, q.shape[1] // self.n_rep, self.n_rep, self.head_dim)
                if mask.shape[1] != 1:
                    mask = mask.reshape(b, mask.shape[1] // self.n_rep, self.n_rep, mask.shape[-1])
            else:
                keys, values = _repeat_kv(keys, self.n_rep), _repeat_kv(values, self.n_rep)
        a = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, dropout_p=0.0, scale=at.scaling,
                                           is_causal=False)
        a = a.reshape(a.shape[0], -1, t, values.shape[-1]).transpose(1, 2).contiguous()
        return F.linear(a.reshape(b, t, -1).contiguous(), at.o_proj.weight)
