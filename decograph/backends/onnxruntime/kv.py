"""Running a step graph (``graph.build_step``) with its KV cache in preallocated buffers, with
onnxruntime and numpy only (no torch: ``decograph.exported`` uses it too).

Each layer's K and V live in one numpy buffer ``[B, Hkv, capacity, D]``; the graph's ``past``
input and ``present`` output are bound to that same buffer (I/O binding), so
``GroupQueryAttention`` appends the step's K/V in place and nothing is copied per step. The
valid length is ``KV.length``; dropping rejected slots is setting it lower (the next step
overwrites them). A step of T tokens gets ``length + T + 1`` slots: an exact graph's padding
row (see ``graph``) writes one slot past a one-token step, outside the valid length.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from decograph.errors import ModelError

__all__ = ["KV", "StepSession", "causal_mask", "io_names", "session_options"]

_NEG = np.float32(np.finfo(np.float32).min)


def io_names(n_layers: int) -> tuple[list[str], list[str]]:
    """The step graph's input and output names (optimum's for the first ones)."""
    past = [f"past_key_values.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    return ["input_ids", "position_ids", "attention_mask", *past, "logits_keep"], ["logits", *present]


def session_options(threads: int | None = None, spinning: bool | None = None) -> Any:
    """CPU EP options: all graph optimizations, sequential execution; ``threads`` intra-op
    threads (0: ORT's choice, one per physical core) and idle-thread ``spinning`` (ORT's
    default; off is much faster on a machine busy with other work). ``None`` reads
    ``DECOGRAPH_ORT_THREADS`` / ``DECOGRAPH_ORT_SPINNING`` (0 or 1), else the defaults."""
    import onnxruntime as ort

    if threads is None:
        threads = int(os.environ.get("DECOGRAPH_ORT_THREADS") or 0)
    if spinning is None:
        spinning = os.environ.get("DECOGRAPH_ORT_SPINNING", "1").strip() not in ("0", "false", "off", "no")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if threads:
        opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return opts


def causal_mask(t: int, past: int) -> np.ndarray:
    """The additive mask [1, 1, t, past + t] of t causal query tokens after ``past`` cached ones."""
    mask = np.zeros((1, 1, t, past + t), dtype=np.float32)
    if t > 1:
        mask[0, 0, :, past:][np.triu_indices(t, 1)] = _NEG
    return mask


class KV:
    """One batch's cache: per layer K and V buffers bound to the graph's past and present."""

    def __init__(self, owner: StepSession, batch: int, capacity: int) -> None:
        self.owner, self.batch, self.length = owner, batch, 0
        self.io = owner.session.io_binding()
        self.bufs: list[np.ndarray] = []
        self._logits: dict[tuple[int, ...], tuple[np.ndarray, Any]] = {}
        self._bind([np.zeros((batch, owner.kv_heads, capacity, owner.head_dim), np.float32)
                    for _ in range(2 * owner.num_layers)])

    @property
    def capacity(self) -> int:
        return self.bufs[0].shape[2]

    def _bind(self, bufs: list[np.ndarray]) -> None:
        from onnxruntime import OrtValue

        self.bufs, self.batch = bufs, bufs[0].shape[0]
        ins, outs = self.owner.past_names, self.owner.present_names
        for i, buf in enumerate(bufs):
            v = OrtValue.ortvalue_from_numpy(buf)
            self.io.bind_ortvalue_input(ins[i], v)
            self.io.bind_ortvalue_output(outs[i], v)

    def reserve(self, need: int) -> None:
        """At least ``need`` slots of capacity (grown by doubling, the valid slots copied)."""
        if need <= self.capacity:
            return
        cap = max(need, 2 * self.capacity, 64)
        new = []
        for buf in self.bufs:
            b = np.zeros(buf.shape[:2] + (cap,) + buf.shape[3:], np.float32)
            b[:, :, : self.length] = buf[:, :, : self.length]
            new.append(b)
        self._bind(new)

    def replace(self, bufs: list[np.ndarray], length: int) -> None:
        """New contents (rows selected, slots gathered): ``length`` slots valid, same capacity."""
        cap = max(self.capacity, length + 1)
        new = []
        for b in bufs:
            if b.shape[2] == cap and b.flags.c_contiguous:
                new.append(b)
            else:
                full = np.zeros(b.shape[:2] + (cap,) + b.shape[3:], np.float32)
                full[:, :, : b.shape[2]] = b
                new.append(full)
        self._bind(new)
        self.length = length

    def views(self) -> list[np.ndarray]:
        return [b[:, :, : self.length] for b in self.bufs]


class StepSession:
    """An ONNX Runtime session over a step graph, its shapes read from the graph."""

    def __init__(self, path: str | Path, threads: int | None = None, spinning: bool | None = None) -> None:
        import onnxruntime as ort

        p = Path(path)
        if not p.is_file():
            raise ModelError(f"{p}: no such ONNX model file")
        try:
            self.session = ort.InferenceSession(str(p), session_options(threads, spinning),
                                                providers=["CPUExecutionProvider"])
        except Exception as e:                  # ORT raises its own Fail/InvalidGraph types
            raise ModelError(f"{p}: ONNX Runtime cannot load it: {str(e).splitlines()[0]}") from None
        names = [i.name for i in self.session.get_inputs()]
        self.num_layers = (len(names) - 4) // 2
        ins, outs = io_names(self.num_layers)
        if names != ins:
            raise ModelError(f"{p}: inputs {names[:4]}... are not a decograph step graph (see kv.io_names; graphs "
                             f"exported before the fused graph must be exported again)")
        self.past_names, self.present_names = ins[3:-1], outs[1:]
        past = self.session.get_inputs()[3].shape
        self.kv_heads, self.head_dim = int(past[1]), int(past[3])
        self.vocab_size = int(self.session.get_outputs()[0].shape[2])
        self.path = p

    def new_kv(self, batch: int, capacity: int = 0) -> KV:
        return KV(self, batch, capacity)

    def run(self, kv: KV, ids: np.ndarray, pos: np.ndarray, mask: np.ndarray, keep: int = 0) -> np.ndarray:
        """One step: ``ids``/``pos`` int64 [B, T], ``mask`` float32 [B, 1, T, length + T]
        (additive); returns the logits of the last ``keep`` tokens (0: all), [B, keep, V]. The
        array is reused by the next step of the same shape: read it (or copy) before."""
        b, t = ids.shape
        if b != kv.batch or mask.shape != (b, 1, t, kv.length + t):
            raise ModelError(f"step of {tuple(ids.shape)} tokens with a mask of {mask.shape} over a cache of "
                             f"{kv.batch} rows x {kv.length} slots")
        kv.reserve(kv.length + t + 1)
        io = kv.io
        io.bind_cpu_input("input_ids", ids)
        io.bind_cpu_input("position_ids", pos)
        io.bind_cpu_input("attention_mask", mask)
        io.bind_cpu_input("logits_keep", np.array([keep], dtype=np.int64))
        shape = (b, keep if 0 < keep <= t else t, self.vocab_size)
        out = kv._logits.get(shape)
        if out is None:
            from onnxruntime import OrtValue

            arr = np.empty(shape, np.float32)
            out = kv._logits[shape] = (arr, OrtValue.ortvalue_from_numpy(arr))
        io.bind_ortvalue_output("logits", out[1])
        self.session.run_with_iobinding(io)
        kv.length += t
        return out[0]
