"""The torch backend's draft-head runner: ``decograph.heads.spec.NumpyHead``'s math in torch.

Same interface (``config``, ``vocab_ids``, ``step``, ``logits``; numpy arrays in and out, K
stored after rotary), same operations in the same order, in float32 (equal to ``NumpyHead``
within float32 rounding). Why not the numpy runner itself: in a process whose model runs on
torch, numpy's BLAS keeps a thread pool of its own, whose workers busy-wait after each call
on the cores torch's threads need next (and the other way round); here the head's small
products run on torch's threads, between the model's forwards.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from decograph.heads.spec import HeadWeights

__all__ = ["TorchHead", "bind_torch_head"]


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


class TorchHead:
    """A head (``HeadWeights``) bound to the target's input embedding and LM head (torch
    tensors [V, H]); the numbers of ``NumpyHead`` up to float32 rounding."""

    def __init__(self, head: HeadWeights, embed: torch.Tensor, lm_head: torch.Tensor) -> None:
        c = head.config
        head.check_binding(tuple(embed.shape), tuple(lm_head.shape))
        self.head, self.config = head, c
        self.vocab_ids = head.vocab_ids.astype(np.int64)
        w = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in head.weights.items()}
        self.w = w
        self.qkv = torch.cat([w["q.weight"], w["k.weight"], w["v.weight"]])
        self.sizes = [c.heads * c.head_dim, c.kv_heads * c.head_dim, c.kv_heads * c.head_dim]
        self.embed = embed.detach()                  # rows taken to float32 as they are looked up
        self.lm_rows = lm_head.detach()[torch.from_numpy(self.vocab_ids)].float().contiguous()
        d = c.head_dim
        self.inv = 1.0 / (c.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))

    def _rope(self, x: torch.Tensor, positions: np.ndarray) -> torch.Tensor:
        ang = positions.astype(np.float64)[:, None] * self.inv[None, :]
        cos = torch.from_numpy(np.cos(np.concatenate([ang, ang], -1)).astype(np.float32))[:, None, :]
        sin = torch.from_numpy(np.sin(np.concatenate([ang, ang], -1)).astype(np.float32))[:, None, :]
        half = x.shape[-1] // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin

    @torch.no_grad()
    def step(self, feats: np.ndarray, tokens: np.ndarray, positions: np.ndarray, past_k: np.ndarray,
             past_v: np.ndarray, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """As ``NumpyHead.step``."""
        c, w = self.config, self.w
        q_n, P = len(tokens), len(past_k)
        emb = self.embed[torch.from_numpy(np.asarray(tokens, dtype=np.int64))].float() * c.embed_scale
        x = F.linear(torch.cat([torch.from_numpy(np.asarray(feats, dtype=np.float32)), emb], -1),
                     w["fc.weight"], w["fc.bias"])
        q, k, v = F.linear(_rms(x, w["ln1.weight"], c.eps), self.qkv).split(self.sizes, -1)
        q = self._rope(q.reshape(q_n, c.heads, c.head_dim), positions)
        k = self._rope(k.reshape(q_n, c.kv_heads, c.head_dim), positions)
        v = v.reshape(q_n, c.kv_heads, c.head_dim)
        keys = torch.cat([torch.from_numpy(np.asarray(past_k, dtype=np.float32)), k])
        vals = torch.cat([torch.from_numpy(np.asarray(past_v, dtype=np.float32)), v])
        if mask is None:
            allowed = torch.cat([torch.ones(q_n, P, dtype=torch.bool), torch.ones(q_n, q_n, dtype=torch.bool).tril()], 1)
        else:
            allowed = torch.from_numpy(np.asarray(mask, dtype=bool))
        rep = c.heads // c.kv_heads
        kk = keys.repeat_interleave(rep, dim=1).permute(1, 2, 0)           # [heads, d, P+q]
        vv = vals.repeat_interleave(rep, dim=1).permute(1, 0, 2)           # [heads, P+q, d]
        s = (q.permute(1, 0, 2) @ kk) / np.float32(np.sqrt(c.head_dim))
        s = torch.where(allowed[None], s, torch.tensor(-1e30, dtype=torch.float32))
        att = (torch.softmax(s, -1) @ vv).permute(1, 0, 2).reshape(q_n, c.heads * c.head_dim)
        x = x + F.linear(att, w["o.weight"])
        h = _rms(x, w["ln2.weight"], c.eps)
        g, u = F.linear(h, w["gate.weight"]), F.linear(h, w["up.weight"])
        x = x + F.linear(F.silu(g) * u, w["down.weight"])
        return _rms(x, w["norm.weight"], c.eps).numpy(), k.numpy(), v.numpy()

    @torch.no_grad()
    def logits(self, feats: np.ndarray) -> np.ndarray:
        """[q, V'] over ``vocab_ids``."""
        return F.linear(torch.from_numpy(np.asarray(feats, dtype=np.float32)), self.lm_rows).numpy()


def bind_torch_head(head: HeadWeights, model: Any) -> TorchHead:
    """``head`` bound to a Hugging Face causal LM's input embedding and LM head."""
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    return TorchHead(head, emb, emb if out is None else out.weight)
