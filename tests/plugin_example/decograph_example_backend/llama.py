"""A Hugging Face Llama-family causal LM's forward in numpy, over dense per-row KV caches.

The weights are read once from the torch model (``LlamaWeights.from_model``: its
``state_dict`` as float32 arrays); the forward itself is numpy only. It follows
``transformers``' ``LlamaForCausalLM`` op for op: token embedding; per layer RMSNorm, q/k/v
projections, default rotary embeddings (``rope_theta``), grouped-query attention
(``num_key_value_heads``) under a boolean visibility pattern, output projection, residual,
RMSNorm, SiLU-gated MLP, residual; a final RMSNorm and the LM head (tied or not).

Rows are packed without padding: the projections and the MLP run once over every row's query
tokens together (``Segment`` s of one ``[N, hidden]`` array), attention runs row by row over
that row's own cache (``RowCache``), into which the step's keys and values are written after
its ``length`` valid slots; the caller decides later which of them to keep.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from decograph.errors import UnsupportedError

__all__ = ["LlamaWeights", "RowCache", "Segment", "check_config", "run"]


def check_config(config: Any) -> float:
    """The rotary base of a Llama ``config`` this forward computes exactly; ``UnsupportedError``
    naming the setting otherwise (scaled rotary embeddings, another activation)."""
    rope = getattr(config, "rope_scaling", None)   # transformers 5: the whole ``rope_parameters``
    params = dict(rope or {})
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        raise UnsupportedError(f"backend 'numpy_example' computes default rotary embeddings only; the model has "
                               f"rope_scaling={rope!r}")
    partial = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None))
    if partial not in (None, 1.0):
        raise UnsupportedError(f"backend 'numpy_example': partial_rotary_factor={partial} is not supported")
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise UnsupportedError(f"backend 'numpy_example' runs a SiLU MLP; the model has hidden_act={act!r}")
    return float(params.get("rope_theta", getattr(config, "rope_theta", None) or 10000.0))


@dataclass(frozen=True)
class Layer:
    """One decoder layer; projection matrices transposed to ``[in, out]`` (``x @ w``)."""

    ln1: np.ndarray
    qkv: np.ndarray                 # q, k and v projections side by side
    qkv_bias: np.ndarray | None
    o: np.ndarray
    o_bias: np.ndarray | None
    ln2: np.ndarray
    gate_up: np.ndarray             # gate and up projections side by side
    gate_up_bias: np.ndarray | None
    down: np.ndarray
    down_bias: np.ndarray | None


@dataclass(frozen=True)
class LlamaWeights:
    """A Llama causal LM as float32 numpy arrays, with the shapes its forward needs."""

    embed: np.ndarray               # [V, hidden]
    layers: tuple[Layer, ...]
    norm: np.ndarray
    head: np.ndarray                # [hidden, V]: the LM head, or the embedding when tied
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    inv_freq: np.ndarray            # [head_dim / 2] rotary frequencies

    @classmethod
    def from_model(cls, model: Any) -> LlamaWeights:
        """Reads ``model`` (a ``LlamaForCausalLM``, any device or dtype) once; torch is used
        only here, to turn its tensors into arrays."""
        cfg = model.config
        theta = check_config(cfg)
        sd = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
        heads = int(cfg.num_attention_heads)
        kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)

        def cat(names: list[str], suffix: str) -> np.ndarray | None:
            parts = [sd.get(f"{n}.{suffix}") for n in names]
            if suffix == "bias" and all(p is None for p in parts):
                return None
            return np.ascontiguousarray(np.concatenate(parts, 0).T if suffix == "weight" else np.concatenate(parts))

        layers = []
        for i in range(int(cfg.num_hidden_layers)):
            p = f"model.layers.{i}"
            attn = [f"{p}.self_attn.{x}_proj" for x in "qkv"]
            mlp = [f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"]
            layers.append(Layer(
                sd[f"{p}.input_layernorm.weight"], cat(attn, "weight"), cat(attn, "bias"),
                cat([f"{p}.self_attn.o_proj"], "weight"), cat([f"{p}.self_attn.o_proj"], "bias"),
                sd[f"{p}.post_attention_layernorm.weight"], cat(mlp, "weight"), cat(mlp, "bias"),
                cat([f"{p}.mlp.down_proj"], "weight"), cat([f"{p}.mlp.down_proj"], "bias")))
        embed = sd["model.embed_tokens.weight"]
        head = sd.get("lm_head.weight", embed if getattr(cfg, "tie_word_embeddings", False) else None)
        if head is None:
            raise UnsupportedError("backend 'numpy_example': the model has no lm_head.weight and untied embeddings")
        inv_freq = 1.0 / (np.float32(theta) ** (np.arange(0, head_dim, 2).astype(np.float32) / head_dim))
        return cls(embed, tuple(layers), sd["model.norm.weight"], np.ascontiguousarray(head.T), heads, kv_heads,
                   head_dim, float(cfg.rms_norm_eps), inv_freq.astype(np.float32))

    def logits(self, hidden: np.ndarray) -> np.ndarray:
        """``[N, V]`` logits of final hidden states ``[N, hidden]`` (already normed)."""
        return hidden @ self.head


@dataclass
class RowCache:
    """One row's keys and values per layer, ``[kv_heads, capacity, head_dim]`` each, dense from
    slot 0: slots ``0..length-1`` hold the row's cached tokens at positions ``0..length-1``."""

    k: list[np.ndarray]
    v: list[np.ndarray]
    length: int = 0

    @classmethod
    def empty(cls, w: LlamaWeights, capacity: int = 64) -> RowCache:
        shape = (w.kv_heads, capacity, w.head_dim)
        return cls([np.zeros(shape, np.float32) for _ in w.layers], [np.zeros(shape, np.float32) for _ in w.layers])

    @property
    def slot_bytes(self) -> int:
        """Bytes of one slot over every layer, keys and values."""
        return sum(2 * a.shape[0] * a.shape[2] * a.itemsize for a in self.k)

    def reserve(self, slots: int) -> None:
        """Room for ``slots`` slots (capacity doubled as needed; valid slots kept)."""
        cap = self.k[0].shape[1]
        if slots <= cap:
            return
        while cap < slots:
            cap *= 2
        for bufs in (self.k, self.v):
            for i, a in enumerate(bufs):
                grown = np.zeros((a.shape[0], cap, a.shape[2]), a.dtype)
                grown[:, : a.shape[1]] = a
                bufs[i] = grown

    def copy(self) -> RowCache:
        """An independent copy (a fork branch's cache starts as its parent's)."""
        return RowCache([a.copy() for a in self.k], [a.copy() for a in self.v], self.length)

    def move(self, src: np.ndarray, dst: np.ndarray) -> None:
        """Slots ``src`` to slots ``dst`` in every layer (the right side is read first)."""
        for a in (*self.k, *self.v):
            a[:, dst] = a[:, src]


@dataclass
class Segment:
    """One row's queries: ``start:stop`` of the packed batch, its cache, and ``see``
    ``[stop - start, cache.length + stop - start]``: which cached slots, then which of the
    step's own queries, each query attends to."""

    start: int
    stop: int
    cache: RowCache
    see: np.ndarray


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return weight * (x / np.sqrt(np.mean(x * x, -1, keepdims=True) + np.float32(eps)))


def rope(x: np.ndarray, pos: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    """Rotary embedding of ``x [N, heads, D]`` at positions ``pos [N]`` (``rotate_half`` form)."""
    freqs = pos.astype(np.float32)[:, None] * inv_freq[None, :]
    emb = np.concatenate([freqs, freqs], -1)[:, None, :]
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], -1)
    return x * np.cos(emb) + rotated * np.sin(emb)


def attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, see: np.ndarray) -> np.ndarray:
    """``q [H, T, D]`` over ``k``/``v`` ``[Hkv, S, D]`` where ``see [T, S]``; query head ``h``
    uses key/value head ``h // (H / Hkv)`` (grouped-query attention). Returns ``[T, H * D]``."""
    h, t, d = q.shape
    hkv = k.shape[0]
    qg = q.reshape(hkv, (h // hkv) * t, d)
    scores = (qg @ k.transpose(0, 2, 1)).reshape(hkv, h // hkv, t, -1) * np.float32(d ** -0.5)
    scores = np.where(see, scores, np.float32(-np.inf))
    scores = np.exp(scores - scores.max(-1, keepdims=True))
    probs = (scores / scores.sum(-1, keepdims=True)).reshape(hkv, (h // hkv) * t, -1)
    return (probs @ v).reshape(h, t, d).transpose(1, 0, 2).reshape(t, h * d)


def _linear(x: np.ndarray, w: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    return x @ w if b is None else x @ w + b


def run(w: LlamaWeights, ids: np.ndarray, pos: np.ndarray, segments: list[Segment]) -> np.ndarray:
    """Final hidden states ``[N, hidden]`` of the packed queries ``ids``/``pos`` ``[N]``.

    Assumes the segments tile ``0..N`` and each segment's ``see`` gives every query itself.
    Writes each segment's keys and values to its cache's slots ``length..length + T - 1``
    (growing it); ``length`` is left unchanged.
    """
    for s in segments:
        s.cache.reserve(s.cache.length + s.stop - s.start)
    n, dq, dkv = len(ids), w.heads * w.head_dim, w.kv_heads * w.head_dim
    x = w.embed[ids]
    for li, layer in enumerate(w.layers):
        qkv = _linear(rms_norm(x, layer.ln1, w.eps), layer.qkv, layer.qkv_bias)
        q = rope(qkv[:, :dq].reshape(n, w.heads, w.head_dim), pos, w.inv_freq)
        k = rope(qkv[:, dq:dq + dkv].reshape(n, w.kv_heads, w.head_dim), pos, w.inv_freq)
        v = qkv[:, dq + dkv:].reshape(n, w.kv_heads, w.head_dim)
        out = np.empty((n, dq), np.float32)
        for s in segments:
            lo, hi = s.cache.length, s.cache.length + s.stop - s.start
            ck, cv = s.cache.k[li], s.cache.v[li]
            ck[:, lo:hi] = k[s.start:s.stop].transpose(1, 0, 2)
            cv[:, lo:hi] = v[s.start:s.stop].transpose(1, 0, 2)
            out[s.start:s.stop] = attend(q[s.start:s.stop].transpose(1, 0, 2), ck[:, :hi], cv[:, :hi], s.see)
        x = x + _linear(out, layer.o, layer.o_bias)
        gate, up = np.split(_linear(rms_norm(x, layer.ln2, w.eps), layer.gate_up, layer.gate_up_bias), 2, -1)
        x = x + _linear(gate * (0.5 + 0.5 * np.tanh(0.5 * gate)) * up, layer.down, layer.down_bias)
    return rms_norm(x, w.norm, w.eps)
