"""A lean forward for Llama-architecture models (SmolLM2 among them), over the slot cache.

The same torch ops as transformers' Llama in the same order (linear, RMSNorm in fp32, the
model's own rotary embedding, SDPA), called functionally: no module dispatch, no mask
preprocessing, no cache bookkeeping — that overhead is ~15% of a one-token forward of a 135M
model on a CPU. Weights are the model's own tensors (no copies).

Attention paths, each the one transformers itself takes for the same situation:
- no holes and a single query (plain decoding): no mask, grouped-query SDPA;
- an empty cache and a causal block (prefill of equal-length rows): ``is_causal``;
- anything else (drafts, trees, padding, rolled-back slots): an additive mask.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["LlamaFastPath", "supports_fast_path"]


def supports_fast_path(model: Any) -> bool:
    """True for transformers Llama causal LMs with SDPA or eager attention and a SiLU MLP."""
    cfg = getattr(model, "config", None)
    return (
        type(model).__name__ == "LlamaForCausalLM"
        and getattr(cfg, "model_type", "") == "llama"
        and getattr(cfg, "hidden_act", "") == "silu"
        and getattr(cfg, "_attn_implementation", "sdpa") in ("sdpa", "eager")
        and not getattr(cfg, "pretraining_tp", 1) > 1
    )


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.to(torch.float32)
    var = x.pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(var + eps)
    return weight * x.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LlamaFastPath:
    """Functional forward of a ``LlamaForCausalLM`` writing into ``_SlotLayer`` caches."""

    def __init__(self, model: Any) -> None:
        inner = model.model
        cfg = model.config
        self.embed = inner.embed_tokens.weight
        self.rotary = inner.rotary_emb
        self.norm_w, self.norm_eps = inner.norm.weight, inner.norm.variance_epsilon
        self.lm_head = model.lm_head
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.layers = []
        for layer in inner.layers[: cfg.num_hidden_layers]:
            at, mlp = layer.self_attn, layer.mlp
            self.layers.append((
                layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon,
                at.q_proj, at.k_proj, at.v_proj, at.o_proj, at.scaling,
                layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon,
                mlp.gate_proj, mlp.up_proj, mlp.down_proj,
            ))

    def forward(self, cache: Any, ids: torch.Tensor, pos: torch.Tensor, attend: torch.Tensor) -> torch.Tensor:
        b, t = ids.shape
        past = cache.layers[0].length
        mask, causal = self._mask(attend, past, self.embed.dtype)
        h = F.embedding(ids, self.embed)
        cos, sin = self.rotary(h, position_ids=pos)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        gqa = self.heads != self.kv_heads
        for slot, (w1, e1, q_p, k_p, v_p, o_p, scale, w2, e2, g_p, u_p, d_p) in zip(cache.layers, self.layers):
            x = _rms(h, w1, e1)
            q = F.linear(x, q_p.weight, q_p.bias).view(b, t, -1, self.head_dim).transpose(1, 2)
            k = F.linear(x, k_p.weight, k_p.bias).view(b, t, -1, self.head_dim).transpose(1, 2)
            v = F.linear(x, v_p.weight, v_p.bias).view(b, t, -1, self.head_dim).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            keys, values = slot.update(k, v)
            a = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale,
                                               is_causal=causal, enable_gqa=gqa)
            a = a.transpose(1, 2).reshape(b, t, -1)
            h = h + F.linear(a, o_p.weight, o_p.bias)
            x = _rms(h, w2, e2)
            x = F.linear(F.silu(F.linear(x, g_p.weight, g_p.bias)) * F.linear(x, u_p.weight, u_p.bias), d_p.weight, d_p.bias)
            h = h + x
        h = _rms(h, self.norm_w, self.norm_eps)
        return self.lm_head(h).float()

    @staticmethod
    def _mask(attend: torch.Tensor, past: int, dtype: torch.dtype) -> tuple[torch.Tensor | None, bool]:
        t = attend.shape[1]
        if bool(attend.all()):
            return None, False                       # every query sees every slot
        if past == 0 and t > 1 and bool((attend == torch.ones(t, t, dtype=torch.bool).tril()).all()):
            return None, True
        mask = torch.zeros(attend.shape, dtype=dtype)
        mask.masked_fill_(~attend, torch.finfo(dtype).min)
        return mask[:, None], False
