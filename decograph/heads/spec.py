"""A trained draft head (EAGLE-style): its configuration, weight file and reference math.

The head is one decoder layer fed, at each position ``i`` of the target's sequence, the
target's final hidden state ``f_i`` (after the final norm: the LM head's input, which
predicts token ``i+1``) and the embedding of the token ``t_{i+1}`` that followed. It predicts
the next final hidden state ``f_{i+1}``, which the target's own LM head, restricted to a
frequency-ranked subset of the vocabulary (``vocab_ids``), turns into a guess of ``t_{i+2}``.
Drafting deeper feeds the head its own prediction as the next position's feature (EAGLE).

    x  = fc(concat(f_i, embed_scale * E[t_{i+1}]))          fc: [H, 2H] + bias [H]
    x += o(attention(rms(x; ln1)))                          GQA, rotary at position i
    x += down(silu(gate(rms(x; ln2))) * up(rms(x; ln2)))
    f̂_{i+1} = rms(x; norm)
    logits  = f̂_{i+1} @ lm_head[vocab_ids].T

``rms(x; w) = x / sqrt(mean(x^2) + eps) * w``. Attention is causal over the head's own earlier
positions (the committed pairs) plus, while drafting a tree, each node's ancestors.
``E`` and ``lm_head`` are the target's (not stored in the head's file): ``bind`` takes them.

Everything here is numpy: the reference every implementation (the torch training module, the
ONNX graph) is tested against, and the runner of the torch-free runtime (``NumpyHead``).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from decograph.errors import ModelError

__all__ = ["HeadConfig", "HeadWeights", "NumpyHead", "WEIGHT_SHAPES", "load_head", "save_head", "rope"]

FORMAT = 1


@dataclass(frozen=True)
class HeadConfig:
    hidden: int                     # the target's hidden size H
    heads: int                      # attention heads of the head's layer
    kv_heads: int
    head_dim: int
    intermediate: int               # the SwiGLU MLP's width
    rope_theta: float = 10000.0
    eps: float = 1e-5
    embed_scale: float = 1.0        # the target's input-embedding scale (Gemma: sqrt(H))
    model: str = ""                 # the target's fingerprint (``decograph.heads.store.model_fingerprint``)
    model_name: str = ""            # a readable name of the target, for messages
    meta: dict[str, Any] = field(default_factory=dict)   # training facts: steps, data, loss, acceptance


def WEIGHT_SHAPES(c: HeadConfig) -> dict[str, tuple[int, ...]]:
    """Every stored weight's shape (``vocab_ids`` aside: int64 [V'])."""
    H, q, kv, I = c.hidden, c.heads * c.head_dim, c.kv_heads * c.head_dim, c.intermediate
    return {"fc.weight": (H, 2 * H), "fc.bias": (H,), "ln1.weight": (H,), "q.weight": (q, H), "k.weight": (kv, H),
            "v.weight": (kv, H), "o.weight": (H, q), "ln2.weight": (H,), "gate.weight": (I, H), "up.weight": (I, H),
            "down.weight": (H, I), "norm.weight": (H,)}


def rope(x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
    """Llama's rotary embedding (rotate-half) of ``x`` [q, heads, d] at ``positions`` [q]."""
    d = x.shape[-1]
    inv = 1.0 / (theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    ang = positions.astype(np.float64)[:, None] * inv[None, :]              # [q, d/2]
    cos = np.cos(np.concatenate([ang, ang], -1)).astype(np.float32)[:, None, :]
    sin = np.sin(np.concatenate([ang, ang], -1)).astype(np.float32)[:, None, :]
    half = d // 2
    rot = np.concatenate([-x[..., half:], x[..., :half]], -1)
    return x * cos + rot * sin


def _rms(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return (x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w).astype(np.float32)


@dataclass
class HeadWeights:
    """A head's config, its weights (float32) and its vocabulary subset."""

    config: HeadConfig
    weights: dict[str, np.ndarray]
    vocab_ids: np.ndarray           # int64 [V']: target token ids the head drafts, most frequent first

    def check(self, origin: str = "the head") -> None:
        for name, shape in WEIGHT_SHAPES(self.config).items():
            got = self.weights.get(name)
            if got is None:
                raise ModelError(f"{origin}: weight {name!r} is missing")
            if tuple(got.shape) != shape:
                raise ModelError(f"{origin}: weight {name!r} has shape {tuple(got.shape)}, the config wants {shape}")
        if self.vocab_ids.ndim != 1 or len(self.vocab_ids) == 0:
            raise ModelError(f"{origin}: vocab_ids must be a non-empty 1-D array of token ids")

    def check_binding(self, embed_shape: tuple[int, ...], lm_head_shape: tuple[int, ...]) -> None:
        """Refuse a model whose embedding [V, H] / LM head [V, H] this head cannot run over."""
        c = self.config
        if embed_shape[1] != c.hidden or lm_head_shape[1] != c.hidden:
            raise ModelError(f"the draft head is for hidden size {c.hidden}, the model's is {embed_shape[1]} "
                             f"({c.model_name or 'another model'}'s head)")
        if int(self.vocab_ids.max()) >= lm_head_shape[0]:
            raise ModelError(f"the draft head's vocabulary reaches token {int(self.vocab_ids.max())}, the model "
                             f"has {lm_head_shape[0]} ({c.model_name or 'another model'}'s head)")

    def bind(self, embed: np.ndarray, lm_head: np.ndarray) -> "NumpyHead":
        """The runner over the target's input embedding [V, H] and LM head [V, H] (numpy)."""
        return NumpyHead(self, embed, lm_head)


class NumpyHead:
    """The head's reference runner (numpy, float32): ``step`` runs query positions against a
    past of keys/values, ``logits`` the vocabulary subset. K is stored after rotary."""

    def __init__(self, head: HeadWeights, embed: np.ndarray, lm_head: np.ndarray) -> None:
        c = head.config
        head.check_binding(tuple(embed.shape), tuple(lm_head.shape))
        self.head, self.config = head, c
        self.w = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in head.weights.items()}
        self.embed = embed
        self.vocab_ids = head.vocab_ids.astype(np.int64)
        self.lm_rows = np.ascontiguousarray(lm_head[self.vocab_ids], dtype=np.float32)      # [V', H]
        self.kv_shape = (c.kv_heads, c.head_dim)

    def step(self, feats: np.ndarray, tokens: np.ndarray, positions: np.ndarray, past_k: np.ndarray,
             past_v: np.ndarray, mask: np.ndarray | None = None,
             logits_rows: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``feats`` [q, H] (f_i), ``tokens`` [q] (t_{i+1}), ``positions`` [q] (i); ``past_k`` /
        ``past_v`` [P, kv_heads, head_dim]; ``mask`` [q, P + q] bool (True: may attend; None:
        every past position and causal among the queries). Returns the predicted features
        [q, H] and the queries' own k, v [q, kv_heads, head_dim]. ``logits_rows``: a hint that
        ``logits`` will be asked for the last this many rows only (0: any); a runner that
        computes logits on demand, as this one, ignores it."""
        c, w = self.config, self.w
        q_n, P = feats.shape[0], past_k.shape[0]
        emb = self.embed[tokens].astype(np.float32) * np.float32(c.embed_scale)
        x = np.concatenate([feats.astype(np.float32), emb], -1) @ w["fc.weight"].T + w["fc.bias"]
        h = _rms(x, w["ln1.weight"], c.eps)
        q = (h @ w["q.weight"].T).reshape(q_n, c.heads, c.head_dim)
        k = (h @ w["k.weight"].T).reshape(q_n, c.kv_heads, c.head_dim)
        v = (h @ w["v.weight"].T).reshape(q_n, c.kv_heads, c.head_dim)
        q, k = rope(q, positions, c.rope_theta), rope(k, positions, c.rope_theta)
        keys, vals = np.concatenate([past_k, k], 0), np.concatenate([past_v, v], 0)     # [P+q, kvh, d]
        if mask is None:
            mask = np.concatenate([np.ones((q_n, P), bool), np.tril(np.ones((q_n, q_n), bool))], 1)
        rep = c.heads // c.kv_heads
        kk = np.repeat(keys, rep, axis=1).transpose(1, 2, 0)        # [heads, d, P+q]
        vv = np.repeat(vals, rep, axis=1).transpose(1, 0, 2)        # [heads, P+q, d]
        s = (q.transpose(1, 0, 2) @ kk) / np.float32(np.sqrt(c.head_dim))          # [heads, q, P+q]
        s = np.where(mask[None], s, np.float32(-1e30))
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        att = (s @ vv).transpose(1, 0, 2).reshape(q_n, c.heads * c.head_dim)
        x = x + att @ w["o.weight"].T
        h = _rms(x, w["ln2.weight"], c.eps)
        g, u = h @ w["gate.weight"].T, h @ w["up.weight"].T
        x = x + ((g / (1.0 + np.exp(-g))) * u) @ w["down.weight"].T
        return _rms(x, w["norm.weight"], c.eps), k.astype(np.float32), v.astype(np.float32)

    def logits(self, feats: np.ndarray) -> np.ndarray:
        """[q, V'] over ``vocab_ids`` (column j is token ``vocab_ids[j]``)."""
        return feats.astype(np.float32) @ self.lm_rows.T


def save_head(head: HeadWeights, path: str | Path) -> Path:
    """Write ``head`` as an ``.npz`` (float16 weights) atomically; returns the path."""
    head.check()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {k: np.asarray(v, dtype=np.float16) for k, v in head.weights.items()}
    arrays["vocab_ids"] = head.vocab_ids.astype(np.int64)
    arrays["__config__"] = np.frombuffer(json.dumps({"format": FORMAT, **asdict(head.config)}).encode(), np.uint8)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)
    return path


def load_head(path: str | Path) -> HeadWeights:
    """Read a head written by ``save_head`` (errors name the file and what is wrong)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: not a decograph draft head ({exc})") from None
    if "__config__" not in arrays or "vocab_ids" not in arrays:
        raise ModelError(f"{path}: not a decograph draft head (no config or vocab_ids)")
    try:
        raw = json.loads(arrays.pop("__config__").tobytes().decode())
    except ValueError as exc:
        raise ModelError(f"{path}: the head's config is not JSON ({exc})") from None
    if raw.pop("format", None) != FORMAT:
        raise ModelError(f"{path}: draft head format {raw.get('format')!r}, this decograph reads {FORMAT}")
    try:
        config = HeadConfig(**raw)
    except TypeError as exc:
        raise ModelError(f"{path}: bad head config ({exc})") from None
    vocab = arrays.pop("vocab_ids").astype(np.int64)
    head = HeadWeights(config, {k: v.astype(np.float32) for k, v in arrays.items()}, vocab)
    head.check(str(path))
    return head
