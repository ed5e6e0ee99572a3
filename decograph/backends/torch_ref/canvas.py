"""The torch backend's masked-diffusion engine: a ``MaskedDiffusionAdapter``'s forward (decograph's
own model, LLaDA, Dream, any ``*ForMaskedLM``) behind the runtime's canvas protocol. The
confidence is computed where the logits are (the ``unmask.confidence`` kernel slot: Triton's
kernel, or torch's); only the block's confidences and tokens reach the host.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from decograph.backends.canvas import BlockCanvas, BlockQuery
from decograph.backends.torch_ref.kernels import unmask_confidence
from decograph.runtime.protocol import Engine
from decograph.runtime.unmask import CanvasRow

__all__ = ["TorchCanvasEngine", "TorchCanvas"]


class TorchCanvas(BlockCanvas):
    def __init__(self, engine: TorchCanvasEngine, rows: list[CanvasRow], mask_id: int, kv: str) -> None:
        a = engine.adapter
        super().__init__(rows, mask_id, kv, engine.pad_id, a.shift_logits)
        self.adapter, self.confidence = a, engine.confidence
        self._kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.block_causal = int(getattr(a, "block", 0) or 0) if getattr(a, "wants_layout", False) else 0

    def run(self, q: BlockQuery) -> tuple[np.ndarray, np.ndarray, Any]:
        ctx = None
        if q.context_rows is not None:
            assert self._kv is not None
            rows = torch.from_numpy(q.context_rows)
            ctx = self._kv if q.every else [(k[rows], v[rows]) for k, v in self._kv]   # no copy when all rows run
        cvalid = None if q.context_valid is None else torch.from_numpy(q.context_valid)
        extra = {}
        if getattr(self.adapter, "wants_layout", False):          # block-causal models: where answers start
            extra["gen_start"] = torch.from_numpy(q.gen_start)
            extra["context_pos"] = None if q.context_pos is None else torch.from_numpy(q.context_pos)
        with torch.inference_mode():
            lg, kv = self.adapter.forward(torch.from_numpy(q.ids), torch.from_numpy(q.pos), torch.from_numpy(q.valid),
                                          context=ctx, context_valid=cvalid, return_kv=q.keep_kv,
                                          logits_at=torch.from_numpy(q.logits_at), **extra)
            b, k = lg.shape[:2]
            conf, tok = self.confidence(lg.reshape(b * k, -1), self.mask_id)
        return (conf.float().reshape(b, k).cpu().numpy(), tok.reshape(b, k).cpu().numpy(), kv)

    def keep(self, rows: np.ndarray, kv: Any) -> None:
        if self._kv is None:
            n = len(self.rows)
            self._kv = [(k.new_zeros((n,) + k.shape[1:]), v.new_zeros((n,) + v.shape[1:])) for k, v in kv]
        at = torch.from_numpy(rows)
        for (ck, cv), (k, v) in zip(self._kv, kv):
            ck[at], cv[at] = k, v

    def zeros_kv(self, like: Any, total: int) -> Any:
        n = len(self.rows)
        return [(k.new_zeros((n, k.shape[1], total, k.shape[3])), v.new_zeros((n, v.shape[1], total, v.shape[3])))
                for k, v in like]


class TorchCanvasEngine(Engine):
    """Canvases over a masked-diffusion adapter, with a backend's optional ``unmask.confidence``."""

    canvas = True

    def __init__(self, adapter: Any, kernels: dict[str, Any] | None = None, pad_id: int = 0) -> None:
        self.adapter, self.pad_id = adapter, pad_id
        self.confidence = (kernels or {}).get("unmask.confidence") or unmask_confidence
        self.tokenizer = adapter.tokenizer
        self.mask_token_id, self.max_positions = adapter.mask_token_id, adapter.max_positions
        self.supports_kv, self.name = adapter.supports_kv, adapter.name

    def start(self, rows: list[Any]) -> Any:
        from decograph.errors import UnsupportedError

        raise UnsupportedError(f"{self.name} is a masked-diffusion model: it runs unmask strategies only")

    def start_canvas(self, rows: list[CanvasRow], mask_id: int, kv: str) -> TorchCanvas:
        return TorchCanvas(self, rows, mask_id, kv)
