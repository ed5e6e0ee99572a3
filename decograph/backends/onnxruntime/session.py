"""``ORTCausalLM``: an exported step graph (``export.export_step``) run by ONNX Runtime, behind
the same adapter interface as a torch model, so the runtime drives every strategy with it.

The cache is the graph's own ``present`` outputs (numpy, one array per layer and K/V),
fed back as ``past`` at the next step; rollback, row selection and compaction index those
arrays. CUDA EP with I/O binding when onnxruntime-gpu sees a GPU is not built yet: the CPU EP
runs everywhere.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from decograph.backends.onnxruntime.export import io_names
from decograph.errors import ModelError
from decograph.frontends.adapters import CausalLMAdapter

__all__ = ["ORTCausalLM"]

_NEG = np.float32(np.finfo(np.float32).min)


class ORTCausalLM(CausalLMAdapter):
    def __init__(self, path: str | Path, *, vocab_size: int | None = None, eos_token_ids: tuple[int, ...] = (),
                 max_positions: int | None = None, tokenizer: Any = None, threads: int = 0) -> None:
        import onnxruntime as ort

        p = Path(path)
        if not p.is_file():
            raise ModelError(f"{p}: no such ONNX model file")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"])
        except Exception as e:                  # ORT raises its own Fail/InvalidGraph types
            raise ModelError(f"{p}: ONNX Runtime cannot load it: {str(e).splitlines()[0]}") from None
        names = [i.name for i in self.session.get_inputs()]
        self.num_layers = (len(names) - 3) // 2
        if names != io_names(self.num_layers)[0]:
            raise ModelError(f"{p}: inputs {names[:4]}... are not a decograph step graph (see export.io_names)")
        past = self.session.get_inputs()[3].shape
        self.kv_heads, self.head_dim = int(past[1]), int(past[3])
        out = self.session.get_outputs()[0].shape
        self.vocab_size = vocab_size or int(out[2])
        self.eos_token_ids, self.max_positions, self.tokenizer = tuple(eos_token_ids), max_positions, tokenizer
        self.path = p
        # the forward-cost curve (time of k query tokens over one) is measured per graph and machine
        st = p.stat()
        self.weight_bytes = st.st_size + sum(f.stat().st_size for f in p.parent.glob(p.name + ".data"))
        self.cost_key = ["onnxruntime", ort.__version__, p.parent.name, p.name, st.st_size, int(st.st_mtime), threads]

    def new_cache(self, batch_size: int) -> list[np.ndarray]:
        empty = np.zeros((batch_size, self.kv_heads, 0, self.head_dim), dtype=np.float32)
        return [empty] * (2 * self.num_layers)

    def forward(self, cache, input_ids, position_ids, attend):
        past = self.cache_len(cache)
        t = input_ids.shape[1]
        if attend.shape != (input_ids.shape[0], t, past + t):
            raise ModelError(f"attend has shape {tuple(attend.shape)}, expected {(input_ids.shape[0], t, past + t)}")
        mask = np.where(attend.numpy(), np.float32(0.0), _NEG)[:, None].astype(np.float32)
        feed = {"input_ids": input_ids.numpy().astype(np.int64), "position_ids": position_ids.numpy().astype(np.int64),
                "attention_mask": mask}
        ins = io_names(self.num_layers)[0][3:]
        feed.update(zip(ins, cache))
        out = self.session.run(None, feed)
        cache[:] = out[1:]
        return torch.from_numpy(out[0])

    def cache_len(self, cache) -> int:
        return int(cache[0].shape[2])

    def truncate(self, cache, length: int) -> None:
        cache[:] = [np.ascontiguousarray(c[:, :, :length]) for c in cache]

    def select_rows(self, cache, rows: torch.Tensor) -> None:
        idx = rows.numpy()
        cache[:] = [c[idx] for c in cache]

    def gather_slots(self, cache, slots: torch.Tensor) -> None:
        idx = slots.numpy()[:, None, :, None]
        cache[:] = [np.take_along_axis(c, idx, axis=2) for c in cache]

    def slot_tensors(self, cache):
        return [(torch.from_numpy(cache[2 * i]), torch.from_numpy(cache[2 * i + 1])) for i in range(self.num_layers)]
