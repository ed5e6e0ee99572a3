"""The torch backend's draft-head runner: ``decograph.heads.spec.NumpyHead``'s math in torch.

Same interface (``config``, ``vocab_ids``, ``step``, ``logits``; numpy arrays in and out, K
stored after rotary), same operations in the same order, in float32 (equal to ``NumpyHead``
within float32 rounding). Why not the numpy runner itself: in a process whose model runs on
torch, numpy's BLAS keeps a thread pool of its own, whose workers busy-wait after each call
on the cores torch's threads need next (and the other way round); here the head's small
products run on torch's threads, between the model's forwards.

``quant="int8"`` (what ``decograph.api.heads.model_head`` binds on this backend): the head's
products and its logits run on int8 weights (per output channel) with dynamically quantized
int8 activations (torch's quantized ``linear_dynamic``: fbgemm/oneDNN on x86, QNNPACK on ARM).
A head call is memory-bound on its ~36 MB of float32 weights (layer and vocabulary rows), and
the model's forward evicts them from the caches between calls; a quarter of the bytes made a
call 3-5x cheaper on this project's CPU (cold caches: the layer 0.43-0.51 ms against 1.4-2.1,
the logits over 8192 tokens 0.31-0.37 ms against 1.6-2.4, 1 to 8 rows). Only drafts change:
verification keeps the output exactly the model's greedy decoding. Where torch has no
quantized engine the runner stays float32.
"""
from __future__ import annotations

import functools
import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from decograph.heads.spec import HeadWeights

__all__ = ["TorchHead", "bind_torch_head", "int8_available"]


def _pack_int8(w: torch.Tensor, bias: torch.Tensor | None = None) -> Any:
    """``w`` [out, in] as int8 per output channel, packed for ``linear_dynamic``."""
    scale = (w.abs().amax(1).clamp_min(1e-12) / 127.0).double()
    with warnings.catch_warnings():         # quantized tensors are deprecated for new code, still the fast path
        warnings.simplefilter("ignore")
        q = torch.quantize_per_channel(w.float().contiguous(), scale, torch.zeros(len(w), dtype=torch.long), 0,
                                       torch.qint8)
        return torch.ops.quantized.linear_prepack(q, bias)


@functools.lru_cache(maxsize=1)
def int8_available() -> bool:
    """Whether this torch runs int8 dynamic linear products (a quantized engine is present; checked once)."""
    try:
        w = torch.ones(2, 4)
        out = torch.ops.quantized.linear_dynamic(torch.ones(1, 4), _pack_int8(w))
        return bool(torch.allclose(out, torch.full((1, 2), 4.0), atol=0.1))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


class TorchHead:
    """A head (``HeadWeights``) bound to the target's input embedding and LM head (torch
    tensors [V, H]); the numbers of ``NumpyHead`` up to float32 rounding."""

    def __init__(self, head: HeadWeights, embed: torch.Tensor, lm_head: torch.Tensor, quant: str = "none") -> None:
        if quant not in ("none", "int8"):
            raise ValueError(f"a torch draft head runs float32 (none) or int8, got {quant!r}")
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
        self.quant = quant if quant == "none" or int8_available() else "none"
        self.packed: dict[str, Any] = {}
        if self.quant == "int8":
            self.packed = {"fc": _pack_int8(w["fc.weight"], w["fc.bias"]), "qkv": _pack_int8(self.qkv),
                           "o": _pack_int8(w["o.weight"]), "down": _pack_int8(w["down.weight"]),
                           "gate_up": _pack_int8(torch.cat([w["gate.weight"], w["up.weight"]])),
                           "lm": _pack_int8(self.lm_rows)}

    def _linear(self, name: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        packed = self.packed.get(name)
        if packed is not None:
            return torch.ops.quantized.linear_dynamic(x.contiguous(), packed)
        return F.linear(x, weight, bias)

    def _mlp(self, h: torch.Tensor) -> torch.Tensor:
        w = self.w
        if "gate_up" in self.packed:
            g, u = torch.ops.quantized.linear_dynamic(h.contiguous(), self.packed["gate_up"]).chunk(2, -1)
        else:
            g, u = F.linear(h, w["gate.weight"]), F.linear(h, w["up.weight"])
        return self._linear("down", F.silu(g) * u, w["down.weight"])

    def _angles(self, positions: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        ang = np.asarray(positions).astype(np.float64)[:, None] * self.inv[None, :]
        ang = np.concatenate([ang, ang], -1)
        return (torch.from_numpy(np.cos(ang).astype(np.float32))[:, None, :],
                torch.from_numpy(np.sin(ang).astype(np.float32))[:, None, :])

    @staticmethod
    def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin

    @torch.no_grad()
    def step(self, feats: np.ndarray, tokens: np.ndarray, positions: np.ndarray, past_k: np.ndarray,
             past_v: np.ndarray, mask: np.ndarray | None = None,
             logits_rows: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """As ``NumpyHead.step`` (logits are computed on demand: ``logits_rows`` changes nothing)."""
        c, w = self.config, self.w
        q_n, P = len(tokens), len(past_k)
        emb = self.embed[torch.from_numpy(np.asarray(tokens, dtype=np.int64))].float() * c.embed_scale
        x = self._linear("fc", torch.cat([torch.from_numpy(np.asarray(feats, dtype=np.float32)), emb], -1),
                         w["fc.weight"], w["fc.bias"])
        q, k, v = self._linear("qkv", _rms(x, w["ln1.weight"], c.eps), self.qkv).split(self.sizes, -1)
        cos, sin = self._angles(positions)
        q = self._rope(q.reshape(q_n, c.heads, c.head_dim), cos, sin)
        k = self._rope(k.reshape(q_n, c.kv_heads, c.head_dim), cos, sin)
        v = v.reshape(q_n, c.kv_heads, c.head_dim)
        keys = torch.cat([torch.from_numpy(np.asarray(past_k, dtype=np.float32)), k])
        vals = torch.cat([torch.from_numpy(np.asarray(past_v, dtype=np.float32)), v])
        if mask is None:
            allowed = torch.cat([torch.ones(q_n, P, dtype=torch.bool), torch.ones(q_n, q_n, dtype=torch.bool).tril()], 1)
        else:
            allowed = torch.from_numpy(np.asarray(mask, dtype=bool))
        # grouped: query head h reads key-value head h // rep, [kv_heads, rep * q, d] against [kv_heads, d, P+q]
        rep, g = c.heads // c.kv_heads, c.kv_heads
        qg = q.reshape(q_n, g, rep, c.head_dim).permute(1, 2, 0, 3).reshape(g, rep * q_n, c.head_dim)
        s = (qg @ keys.permute(1, 2, 0)) / np.float32(np.sqrt(c.head_dim))
        s = torch.where(allowed.repeat(rep, 1)[None], s, torch.tensor(-1e30, dtype=torch.float32))
        att = (torch.softmax(s, -1) @ vals.permute(1, 0, 2)).reshape(g, rep, q_n, c.head_dim)
        att = att.permute(2, 0, 1, 3).reshape(q_n, c.heads * c.head_dim)
        x = x + self._linear("o", att, w["o.weight"])
        x = x + self._mlp(_rms(x, w["ln2.weight"], c.eps))
        return _rms(x, w["norm.weight"], c.eps).numpy(), k.numpy(), v.numpy()

    @torch.no_grad()
    def logits(self, feats: np.ndarray) -> np.ndarray:
        """[q, V'] over ``vocab_ids``."""
        return self._linear("lm", torch.from_numpy(np.asarray(feats, dtype=np.float32)), self.lm_rows).numpy()


def bind_torch_head(head: HeadWeights, model: Any, quant: str = "none") -> TorchHead:
    """``head`` bound to a Hugging Face causal LM's input embedding and LM head (``quant``: see
    the module docstring)."""
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    return TorchHead(head, emb, emb if out is None else out.weight, quant)
