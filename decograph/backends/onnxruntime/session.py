"""``ORTCausalLM``: an exported step graph (``export.export_step``) run by ONNX Runtime, behind
the same adapter interface as a torch model, so the runtime drives every strategy with it.

The cache is a ``kv.KV``: per layer K/V buffers that the graph's past inputs and present
outputs are bound to (I/O binding), so a step appends its slots in place; truncation sets the
valid length, row selection and slot compaction copy into new buffers. Attention is causal in
slot order: ``forward`` refuses a pattern that lets a token see a later slot (no strategy the
runtime runs needs one). ``device="cuda"`` runs a float16 graph on ONNX Runtime's CUDA EP with
the cache in GPU memory (``kv.StepSession``); the host's edits of the cache (row selection,
compaction) then go through host copies.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from decograph.backends.onnxruntime.kv import KV, NEG, StepSession
from decograph.errors import ModelError, UnsupportedError
from decograph.models.adapters import CausalLMAdapter

__all__ = ["ORTCausalLM"]




class ORTCausalLM(CausalLMAdapter):
    def __init__(self, path: str | Path, *, vocab_size: int | None = None, eos_token_ids: tuple[int, ...] = (),
                 max_positions: int | None = None, tokenizer: Any = None, threads: int = 0,
                 device: str = "cpu") -> None:
        import onnxruntime as ort

        self.step = StepSession(path, threads, device=device)
        self.device = self.step.device
        self.session = self.step.session
        self.num_layers, self.kv_heads, self.head_dim = self.step.num_layers, self.step.kv_heads, self.step.head_dim
        self.vocab_size = vocab_size or self.step.vocab_size
        self.eos_token_ids, self.max_positions, self.tokenizer = tuple(eos_token_ids), max_positions, tokenizer
        self.source: Any = None         # the torch model's adapter it was exported from (a backend's: its other graphs)
        p = self.path = Path(path)
        # the forward-cost curve (time of k query tokens over one) is measured per graph and machine
        st = p.stat()
        self.weight_bytes = st.st_size + sum(f.stat().st_size for f in p.parent.glob(p.name + ".data"))
        self.cost_key = ["onnxruntime", ort.__version__, p.parent.name, p.name, st.st_size, int(st.st_mtime), threads,
                         self.device]

    def new_cache(self, batch_size: int) -> KV:
        return self.step.new_kv(batch_size)

    def forward(self, cache: KV, input_ids, position_ids, attend):
        past = cache.length
        b, t = input_ids.shape
        if attend.shape != (b, t, past + t):
            raise ModelError(f"attend has shape {tuple(attend.shape)}, expected {(b, t, past + t)}")
        a = attend.numpy()
        if t > 1 and np.triu(a[:, :, past:], 1).any():
            raise UnsupportedError("the ONNX step graph attends causally in slot order: a query cannot see a later "
                                   "slot of its step")
        mask = np.where(a, np.float32(0.0), NEG)[:, None]
        logits = self.step.run(cache, input_ids.numpy().astype(np.int64), position_ids.numpy().astype(np.int64), mask)
        return torch.from_numpy(logits.copy())

    def cache_len(self, cache: KV) -> int:
        return cache.length

    def truncate(self, cache: KV, length: int) -> None:
        cache.length = min(cache.length, length)

    def select_rows(self, cache: KV, rows: torch.Tensor) -> None:
        cache.select(rows.numpy())

    def gather_slots(self, cache: KV, slots: torch.Tensor) -> None:
        idx = slots.numpy()[:, None, :, None]
        cache.replace([np.take_along_axis(v, idx, axis=2) for v in cache.views()], slots.shape[1])

    def slot_tensors(self, cache: KV):
        views = cache.views()
        return [(torch.from_numpy(views[2 * i]), torch.from_numpy(views[2 * i + 1])) for i in range(self.num_layers)]
