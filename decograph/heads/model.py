"""The draft head as a torch module: the math of ``decograph.heads.spec.NumpyHead`` in a form
that trains.

``DraftHead`` holds the head's weights under the names of ``spec.WEIGHT_SHAPES`` (its
``state_dict`` keys are exactly those), and the target's embedding and vocabulary-subset LM-head
rows as frozen, non-persistent buffers. It runs in two forms:

- ``forward(feats, next_tokens, depth)``: whole chunks at once (training). Row ``j`` of depth 1
  sees ``(f_j, t_{j+1})`` and the rows before it (causal), and predicts ``f_{j+1}``. Depth
  ``d > 1`` is the training-time-test unroll: row ``j`` is fed depth ``d-1``'s prediction made
  at row ``j-1`` (the head's own feature, as when drafting deeper) and attends what a draft
  chain rooted at ``r = j-d+1`` attends: depth 1's keys up to ``r`` (the committed context),
  then the chain's own keys, one per depth, at ``r+1 .. j``.
- ``step(feats, tokens, positions, past_k, past_v, mask)``: ``NumpyHead.step`` on tensors.

Both equal ``NumpyHead`` to float32 rounding (``tests/test_train_draft.py``).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from decograph.errors import ModelError
from decograph.heads.spec import HeadConfig, HeadWeights

__all__ = ["DraftHead", "chain_mask", "head_config_for", "init_from_target", "to_head_weights"]


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * weight`` (spec's ``_rms``)."""

    def __init__(self, n: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [len(positions), head_dim] (float32, angles in float64 as ``spec.rope``)."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    ang = positions.to(torch.float64)[:, None] * inv[None, :]
    ang = torch.cat([ang, ang], -1)
    return ang.cos().to(torch.float32), ang.sin().to(torch.float32)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


def chain_mask(length: int, depth: int) -> torch.Tensor:
    """The boolean attention mask [T, depth*T] of unroll depth ``depth``'s queries over the keys
    of depths 1..depth (concatenated in that order): row ``j`` sees depth 1 at positions
    ``<= j-depth+1`` and depth ``e`` (2..depth) at position ``j-depth+e`` only. Every row sees
    at least its own key."""
    j = torch.arange(length)[:, None]
    p = torch.arange(length)[None, :]
    blocks = [p <= j - depth + 1] + [p == j - depth + e for e in range(2, depth + 1)]
    return torch.cat(blocks, 1)


class DraftHead(nn.Module):
    """One EAGLE-style decoder layer over the target's final hidden states (see the module doc).

    ``embed`` [V, H], the LM-head rows of ``vocab_ids`` (``lm_rows`` [V', H]), ``vocab_ids``
    and the map ``sub_index`` (token id -> its column, -100 outside the subset) are frozen
    buffers, not part of ``state_dict``: the head file stores only its own weights."""

    def __init__(self, config: HeadConfig, embed: torch.Tensor, lm_head: torch.Tensor, vocab_ids: Any) -> None:
        super().__init__()
        c = config
        if c.heads % c.kv_heads:
            raise ModelError(f"draft head: heads ({c.heads}) must be a multiple of kv_heads ({c.kv_heads})")
        self.config = c
        H, q, kv, inter = c.hidden, c.heads * c.head_dim, c.kv_heads * c.head_dim, c.intermediate
        self.fc = nn.Linear(2 * H, H, bias=True)
        self.ln1 = RMSNorm(H, c.eps)
        self.q = nn.Linear(H, q, bias=False)
        self.k = nn.Linear(H, kv, bias=False)
        self.v = nn.Linear(H, kv, bias=False)
        self.o = nn.Linear(q, H, bias=False)
        self.ln2 = RMSNorm(H, c.eps)
        self.gate = nn.Linear(H, inter, bias=False)
        self.up = nn.Linear(H, inter, bias=False)
        self.down = nn.Linear(inter, H, bias=False)
        self.norm = RMSNorm(H, c.eps)
        ids = torch.as_tensor(np.asarray(vocab_ids, dtype=np.int64))
        if ids.ndim != 1 or len(ids) == 0 or int(ids.max()) >= lm_head.shape[0] or int(ids.min()) < 0:
            raise ModelError(f"draft head: vocab_ids must be token ids below {lm_head.shape[0]}")
        sub_index = torch.full((lm_head.shape[0],), -100, dtype=torch.long)
        sub_index[ids] = torch.arange(len(ids))
        self.register_buffer("embed", embed.detach().to(torch.float32), persistent=False)
        self.register_buffer("lm_rows", lm_head.detach()[ids].to(torch.float32), persistent=False)
        self.register_buffer("vocab_ids", ids, persistent=False)
        self.register_buffer("sub_index", sub_index, persistent=False)

    # -- pieces shared by both forms
    def _input(self, feats: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        emb = self.embed[tokens] * self.config.embed_scale
        return self.fc(torch.cat([feats, emb], -1))

    def _qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """q [.., heads, T, d], k and v [.., kv_heads, T, d] (q and k rotated)."""
        c, lead = self.config, x.shape[:-1]
        h = self.ln1(x)
        q = self.q(h).view(*lead, c.heads, c.head_dim).transpose(-2, -3)
        k = self.k(h).view(*lead, c.kv_heads, c.head_dim).transpose(-2, -3)
        v = self.v(h).view(*lead, c.kv_heads, c.head_dim).transpose(-2, -3)
        return _rotate(q, cos, sin), _rotate(k, cos, sin), v

    def _finish(self, x: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
        """The layer's rest after attention ``att`` [.., heads, T, d]: o, MLP, final norm."""
        att = att.transpose(-2, -3).reshape(*x.shape[:-1], -1)
        x = x + self.o(att)
        h = self.ln2(x)
        x = x + self.down(F.silu(self.gate(h)) * self.up(h))
        return self.norm(x)

    def forward(self, feats: torch.Tensor, next_tokens: torch.Tensor, depth: int = 1) -> list[torch.Tensor]:
        """``feats`` [B, T, H] (f_0..f_{T-1}), ``next_tokens`` [B, T] (row j: t_{j+1}), positions
        0..T-1. Returns one [B, T, H] per depth; depth ``d``'s row ``j`` predicts ``f_{j+1}``
        (rows ``j < d-1`` have no chain behind them: ignore them)."""
        c, T = self.config, feats.shape[1]
        cos, sin = rope_tables(torch.arange(T, device=feats.device), c.head_dim, c.rope_theta)
        keys: list[torch.Tensor] = []
        vals: list[torch.Tensor] = []
        outs: list[torch.Tensor] = []
        inp = feats
        for d in range(1, depth + 1):
            x = self._input(inp, next_tokens)
            q, k, v = self._qkv(x, cos, sin)
            keys.append(k)
            vals.append(v)
            if d == 1:
                att = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            else:
                att = F.scaled_dot_product_attention(q, torch.cat(keys, -2), torch.cat(vals, -2),
                                                     attn_mask=chain_mask(T, d).to(q.device), enable_gqa=True)
            out = self._finish(x, att)
            outs.append(out)
            inp = torch.cat([torch.zeros_like(out[:, :1]), out[:, :-1]], 1)     # row j: the guess made at j-1
        return outs

    def step(self, feats: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor, past_k: torch.Tensor,
             past_v: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``NumpyHead.step`` on tensors: ``feats`` [q, H], ``tokens`` [q], ``positions`` [q],
        ``past_k``/``past_v`` [P, kv_heads, head_dim], ``mask`` [q, P+q] bool (None: all the
        past, causal among the queries). Returns (features [q, H], k, v [q, kv_heads, d])."""
        c = self.config
        n, P = feats.shape[0], past_k.shape[0]
        cos, sin = rope_tables(positions, c.head_dim, c.rope_theta)
        x = self._input(feats, tokens)
        q, k, v = self._qkv(x, cos, sin)                                     # [heads, q, d], [kvh, q, d]
        keys = torch.cat([past_k.transpose(0, 1), k], 1)
        vals = torch.cat([past_v.transpose(0, 1), v], 1)
        if mask is None:
            mask = torch.cat([torch.ones(n, P, dtype=torch.bool), torch.ones(n, n, dtype=torch.bool).tril()], 1)
        att = F.scaled_dot_product_attention(q[None], keys[None], vals[None], attn_mask=mask[None, None],
                                             enable_gqa=True)[0]
        return self._finish(x, att), k.transpose(0, 1), v.transpose(0, 1)

    def logits(self, feats: torch.Tensor) -> torch.Tensor:
        """[.., V'] over the vocabulary subset (column j: token ``vocab_ids[j]``)."""
        return feats @ self.lm_rows.T

    @classmethod
    def from_head_weights(cls, head: HeadWeights, embed: Any, lm_head: Any) -> DraftHead:
        """The module of a stored head over the target's embedding and LM head [V, H]."""
        embed, lm_head = torch.as_tensor(np.asarray(embed)), torch.as_tensor(np.asarray(lm_head))
        module = cls(head.config, embed, lm_head, head.vocab_ids)
        module.load_state_dict({k: torch.as_tensor(np.asarray(v, dtype=np.float32)) for k, v in head.weights.items()})
        return module


def to_head_weights(module: DraftHead, vocab_ids: np.ndarray, config: HeadConfig | None = None) -> HeadWeights:
    """The module's weights as a ``HeadWeights`` (float32 numpy; ``config`` replaces the
    module's, e.g. with training facts in ``meta``)."""
    weights = {k: v.detach().to(torch.float32).cpu().numpy().copy() for k, v in module.state_dict().items()}
    head = HeadWeights(config or module.config, weights, np.asarray(vocab_ids, dtype=np.int64))
    head.check()
    return head


def _rope_theta(cfg: Any) -> float:
    params = getattr(cfg, "rope_parameters", None)
    if isinstance(params, dict):
        if "rope_theta" in params:
            return float(params["rope_theta"])
        full = params.get("full_attention")         # Gemma 3: per layer type
        if isinstance(full, dict) and "rope_theta" in full:
            return float(full["rope_theta"])
    return float(getattr(cfg, "rope_theta", None) or 10000.0)


def head_config_for(model: Any, fingerprint: str, model_name: str, intermediate: int | None = None) -> HeadConfig:
    """A head shaped after the target's attention (heads, kv heads, head_dim, rotary base, norm
    eps, embedding scale); the MLP as wide as the target's unless ``intermediate`` is given."""
    cfg = model.config.get_text_config(decoder=True)
    H = int(cfg.hidden_size)
    heads = int(cfg.num_attention_heads)
    kv = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "head_dim", None) or H // heads)
    scale = getattr(model.get_input_embeddings(), "embed_scale", 1.0)
    return HeadConfig(hidden=H, heads=heads, kv_heads=kv, head_dim=head_dim,
                      intermediate=int(intermediate or cfg.intermediate_size), rope_theta=_rope_theta(cfg),
                      eps=float(getattr(cfg, "rms_norm_eps", 1e-6)), embed_scale=float(scale), model=fingerprint,
                      model_name=model_name)


_LAST_LAYER = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
               "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
               "ln1": "input_layernorm", "ln2": "post_attention_layernorm"}


def init_from_target(module: DraftHead, model: Any, last_layer: bool = True) -> list[str]:
    """Initialise from the target where it fits: the output norm from the target's final norm
    (the head's features live where the target's do), and with ``last_layer`` the attention,
    MLP and norms from the target's last decoder layer where their names and shapes are
    Llama's, and ``fc`` as the identity on the feature half (the embedding half small). Norms
    with Gemma's ``1 + w`` form are converted. Returns the weight names set."""
    decoder = model.get_decoder()
    offset = 1.0 if "Gemma" in type(decoder.norm).__name__ else 0.0
    done = []
    with torch.no_grad():
        if tuple(decoder.norm.weight.shape) == tuple(module.norm.weight.shape):
            module.norm.weight.copy_(decoder.norm.weight.float() + offset)
            done.append("norm.weight")
        if not last_layer:
            return done
        layer = decoder.layers[-1]
        found = {n: p for n, p in layer.named_parameters()}
        for name, src in _LAST_LAYER.items():
            p = found.get(f"{src}.weight")
            dst = getattr(module, name).weight
            if p is None or tuple(p.shape) != tuple(dst.shape) or any(k.endswith("q_norm.weight") for k in found):
                continue
            dst.copy_(p.float() + (offset if name.startswith("ln") else 0.0))
            done.append(f"{name}.weight")
        if done[1:]:
            H = module.config.hidden
            module.fc.weight[:, H:].mul_(0.1)
            module.fc.weight[:, :H].copy_(torch.eye(H) + 0.1 * module.fc.weight[:, :H])
            module.fc.bias.zero_()
            done += ["fc.weight", "fc.bias"]
    return done
