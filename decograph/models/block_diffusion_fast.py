"""The block-diffusion LM's projections, per layer, in two forms sharing one forward
(``BlockDiffusionLM.forward``):

- ``LoRAProjections`` (training, and any forward that needs gradients): each of a layer's seven
  projections is ``x @ W.T + (alpha / rank) * ((x @ A.T) @ B.T) * noisy``, as the adaptation
  trains it;
- ``PackedProjections`` (inference): the projections that share an input run as one product
  (q/k/v, gate/up), over weights packed once for MKL's packed GEMM where a forward has 2 to
  ``PACK_ROWS`` query rows (a cached block step: 16-17 rows; plain ``x @ W.T`` repacks every
  weight on every call there); the LoRA updates of a group as one ``x @ A.T`` product and one
  block-diagonal ``B`` product added onto the base product (``addmm``), ``B`` scaled by
  ``alpha / rank`` once (2.0 by default: exact). The noisy gate multiplies the rank-``r``
  activations, not the full outputs, and is skipped when every query is noisy or none is.

Same arithmetic up to float rounding (``tests/test_block_diffusion.py`` compares the logits).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from decograph.models.fast_llama import PACK_ROWS, should_pack

__all__ = ["LoRAProjections", "PackedProjections"]

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


class LoRAProjections:
    """Each projection on its own (autograd-friendly): the training form."""

    def __init__(self, lm: Any) -> None:
        self.lm = lm

    def _lin(self, i: int, name: str, x: torch.Tensor, gate: torch.Tensor | None, noisy: bool) -> torch.Tensor:
        layer, lora = self.lm.base.model.layers[i], self.lm.lora[i][name]
        lin = getattr(layer.self_attn if name in _ATTN else layer.mlp, name)
        y = F.linear(x, lin.weight, lin.bias)
        if not noisy:
            return y
        d = F.linear(F.linear(x, lora.a), lora.b) * self.lm.scale_lora
        return y + (d if gate is None else d * gate)

    def qkv(self, i: int, x: torch.Tensor, gate: torch.Tensor | None, noisy: bool) -> list[torch.Tensor]:
        return [self._lin(i, n, x, gate, noisy) for n in _ATTN[:3]]

    def o(self, i: int, x: torch.Tensor, gate: torch.Tensor | None, noisy: bool) -> torch.Tensor:
        return self._lin(i, "o_proj", x, gate, noisy)

    def gate_up(self, i: int, x: torch.Tensor, gate: torch.Tensor | None, noisy: bool) -> list[torch.Tensor]:
        return [self._lin(i, n, x, gate, noisy) for n in _MLP[:2]]

    def down(self, i: int, x: torch.Tensor, gate: torch.Tensor | None, noisy: bool) -> torch.Tensor:
        return self._lin(i, "down_proj", x, gate, noisy)

    def lm_head(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm.base.lm_head(h)


class _Group:
    """``x @ cat(W).T (+ b)`` on packed weights, plus the group's LoRA updates."""

    __slots__ = ("w", "bias", "packed", "a_t", "b_t", "sizes")

    def __init__(self, lins: list[Any], loras: list[Any], scale: float, pack: bool) -> None:
        ws = [lin.weight.detach().float() for lin in lins]
        self.w = torch.cat(ws) if len(ws) > 1 else ws[0].contiguous()     # one linear: its own weight, no copy
        self.sizes = [int(lin.weight.shape[0]) for lin in lins]
        biases = [lin.bias for lin in lins]
        self.bias = None if all(b is None for b in biases) else torch.cat([
            b.detach() if b is not None else torch.zeros(lin.weight.shape[0]) for b, lin in zip(biases, lins)])
        self.packed = torch.ops.mkl._mkl_reorder_linear_weight(self.w, PACK_ROWS) if pack else None
        self.a_t = torch.cat([lo.a.detach() for lo in loras]).t().contiguous().float() if loras else None
        self.b_t = (torch.block_diag(*[lo.b.detach() for lo in loras]) * scale).t().contiguous().float() \
            if loras else None

    def __call__(self, x: torch.Tensor, gate: torch.Tensor | None, noisy: bool) -> torch.Tensor:
        m = x.shape[0]
        if self.packed is not None and 1 < m <= PACK_ROWS:
            y = torch.ops.mkl._mkl_linear(x, self.packed, self.w, None, m)
        else:
            y = F.linear(x, self.w)
        if self.bias is not None:
            y = y + self.bias
        if not noisy or self.a_t is None:
            return y
        d = x @ self.a_t
        if gate is not None:
            d = d * gate
        return torch.addmm(y, d, self.b_t)


class PackedProjections:
    """The inference form: grouped, packed products (built once per set of weights)."""

    def __init__(self, lm: Any) -> None:
        pack = should_pack(lm.base, "mkl")
        s = lm.scale_lora
        self.layers = []
        for layer, lo in zip(lm.base.model.layers, lm.lora):
            at, mlp = layer.self_attn, layer.mlp
            self.layers.append((
                _Group([at.q_proj, at.k_proj, at.v_proj], [lo[n] for n in _ATTN[:3]], s, pack),
                _Group([at.o_proj], [lo["o_proj"]], s, pack),
                _Group([mlp.gate_proj, mlp.up_proj], [lo[n] for n in _MLP[:2]], s, pack),
                _Group([mlp.down_proj], [lo["down_proj"]], s, pack)))
        self.head = _Group([lm.base.lm_head], [], s, pack)

    @staticmethod
    def _flat(group: _Group, x: torch.Tensor, gate: torch.Tensor | None, noisy: bool) -> torch.Tensor:
        g = None if gate is None else gate.reshape(-1, 1)
        return group(x.reshape(-1, x.shape[-1]), g, noisy).view(*x.shape[:-1], -1)

    def qkv(self, i: int, x: torch.Tensor, gate: torch.Tensor | None, noisy: bool) -> list[torch.Tensor]:
        g = self.layers[i][0]
        return list(self._flat(g, x, gate, noisy).split(g.sizes, -1))

    def o(self, i: int, x: torch.Tensor, gate: torch.Tensor | None, noisy: bool) -> torch.Tensor:
        return self._flat(self.layers[i][1], x, gate, noisy)

    def gate_up(self, i: int, x: torch.Tensor, gate: torch.Tensor | None, noisy: bool) -> list[torch.Tensor]:
        g = self.layers[i][2]
        return list(self._flat(g, x, gate, noisy).split(g.sizes, -1))

    def down(self, i: int, x: torch.Tensor, gate: torch.Tensor | None, noisy: bool) -> torch.Tensor:
        return self._flat(self.layers[i][3], x, gate, noisy)

    def lm_head(self, h: torch.Tensor) -> torch.Tensor:
        return self._flat(self.head, h, None, False)
