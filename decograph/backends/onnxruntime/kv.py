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

import mmap
import os
from pathlib import Path
from typing import Any

import numpy as np

from decograph.errors import InputError, ModelError

__all__ = ["BLOCK_BASE", "KV", "NEG", "cache_zeros", "StepSession", "causal_mask", "io_names", "open_session",
           "pick_device", "session_options"]

NEG = np.float32(np.finfo(np.float32).min)     # an additive mask's "never"
BLOCK_BASE = 2                      # ORT's dynamic_block_base for intra-op loops (``session_options``)



def io_names(n_layers: int) -> tuple[list[str], list[str]]:
    """The step graph's input and output names (optimum's for the first ones)."""
    past = [f"past_key_values.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    return ["input_ids", "position_ids", "attention_mask", *past, "logits_keep", "cache_lengths"], ["logits", *present]


def session_options(threads: int | None = None, spinning: bool | None = None) -> Any:
    """CPU EP options: all graph optimizations, sequential execution; ``threads`` intra-op
    threads (0: ORT's choice, one per physical core) and idle-thread ``spinning`` (ORT's
    default; off is much faster on a machine busy with other work). ``None`` reads
    ``DECOGRAPH_ORT_THREADS`` / ``DECOGRAPH_ORT_SPINNING`` (0 or 1), else the defaults.
    Parallel loops hand out work in shrinking blocks (ORT's ``dynamic_block_base``,
    ``BLOCK_BASE``; ``DECOGRAPH_ORT_BLOCK_BASE``, 0: ORT's static split): a thread that starts
    late or loses its core for a moment no longer holds up the rest. Default model's int4
    export, 2 cores, 12 prompts: alone in a process, greedy +1-4% tokens/s and ``eagle_anpd``
    -1 to +6% (three alternating runs); in one process beside onnxruntime-genai, greedy +3%,
    ``eagle_anpd`` equal. It moves work between threads, never the arithmetic of an output
    element: the tokens stay the same (tested bit for bit)."""
    import onnxruntime as ort

    if threads is None:
        threads = int(os.environ.get("DECOGRAPH_ORT_THREADS") or 0)
    if spinning is None:
        spinning = os.environ.get("DECOGRAPH_ORT_SPINNING", "1").strip() not in ("0", "false", "off", "no")
    raw = os.environ.get("DECOGRAPH_ORT_BLOCK_BASE", "").strip()
    if raw and not raw.isdigit():
        raise InputError(f"DECOGRAPH_ORT_BLOCK_BASE must be a whole number >= 0, got {raw!r}")
    block_base = int(raw) if raw else BLOCK_BASE
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if threads:
        opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if block_base:
        opts.add_session_config_entry("session.intra_op.dynamic_block_base", str(block_base))
    return opts


def cache_zeros(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """A zero cache buffer. A large one is its own anonymous memory map: fresh zero pages that
    cost nothing until written (``np.zeros`` may take them from the heap and clear every byte,
    which makes a roomy cache as dear as a full one)."""
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if n < 1 << 20:
        return np.zeros(shape, dtype)
    return np.frombuffer(mmap.mmap(-1, n), dtype).reshape(shape)


_TRIANGLES: dict[int, np.ndarray] = {}


def causal_mask(t: int, past: int) -> np.ndarray:
    """The additive mask [1, 1, t, past + t] of t causal query tokens after ``past`` cached ones."""
    mask = np.zeros((1, 1, t, past + t), dtype=np.float32)
    if t > 1:
        tri = _TRIANGLES.get(t)
        if tri is None:
            tri = _TRIANGLES[t] = np.triu(np.full((t, t), NEG, np.float32), 1)
        mask[0, 0, :, past:] = tri
    return mask


class KV:
    """One batch's cache: per layer K and V buffers bound to the graph's past and present.

    On the CPU EP the buffers are numpy arrays that the bound ``OrtValue`` s share. On a device
    (``StepSession.device`` "cuda", or ``shared=False``) they are ``OrtValue`` s in that device's
    memory, written in place by the graph; the host sees copies (``host``, ``views``), made only
    for the rare edits (growth, row selection, slot compaction)."""

    def __init__(self, owner: StepSession, batch: int, capacity: int, shared: bool | None = None) -> None:
        self.owner, self.batch, self.length = owner, batch, 0
        self.shared = owner.device == "cpu" if shared is None else shared
        if self.shared and owner.device != "cpu":
            raise ModelError(f"a KV cache on {owner.device!r} cannot share host memory")
        self.io = owner.session.io_binding()
        self.bufs: list[np.ndarray] = []            # host arrays (shared ones only)
        self.vals: list[Any] = []                   # the bound OrtValues
        self._cap = 0
        self._full: list[np.ndarray] = []           # shared: the allocations (rows past ``batch`` spare)
        self._logits: dict[tuple[int, ...], tuple[np.ndarray, Any]] = {}
        self._hidden: dict[tuple[int, int], tuple[np.ndarray, Any]] = {}      # a ``hidden`` graph's output
        self._bind([cache_zeros((batch, owner.kv_heads, capacity, owner.head_dim), owner.kv_dtype)
                    for _ in range(2 * owner.num_layers)])

    @property
    def capacity(self) -> int:
        return self._cap

    @property
    def rows_capacity(self) -> int:
        """Rows the allocation holds (``batch`` of them bound; the rest spare for ``add_rows``)."""
        return self._full[0].shape[0] if self._full else self.batch

    def _bind(self, bufs: list[np.ndarray], rows: int | None = None) -> None:
        from onnxruntime import OrtValue

        self.batch, self._cap = bufs[0].shape[0] if rows is None else rows, bufs[0].shape[2]
        if self.shared:
            self._full = bufs
            self.bufs = [b[:self.batch] for b in bufs]          # leading rows: still C-contiguous
            self.vals = [OrtValue.ortvalue_from_numpy(b) for b in self.bufs]
        else:
            self.bufs, self.vals = [], [OrtValue.ortvalue_from_numpy(np.ascontiguousarray(b), self.owner.device, 0)
                                        for b in bufs]
        ins, outs = self.owner.past_names, self.owner.present_names
        for i, v in enumerate(self.vals):
            self.io.bind_ortvalue_input(ins[i], v)
            self.io.bind_ortvalue_output(outs[i], v)

    def host(self) -> list[np.ndarray]:
        """The whole buffers on the host: the shared arrays themselves, else copies."""
        return self.bufs if self.shared else [v.numpy() for v in self.vals]

    def reserve(self, need: int) -> None:
        """At least ``need`` slots of capacity (grown by doubling, the valid slots copied)."""
        if need <= self.capacity:
            return
        cap = max(need, 2 * self.capacity, 64)
        new = []
        for buf in self.host():
            b = cache_zeros(buf.shape[:2] + (cap,) + buf.shape[3:], buf.dtype)
            b[:, :, : self.length] = buf[:, :, : self.length]
            new.append(b)
        self._bind(new)

    def add_rows(self, rows: list[tuple[list[np.ndarray], int] | None], length: int) -> bool:
        """Rows appended after the bound ones, in the allocation's spare rows (nothing else is
        copied): each ``(host buffers of a one-row cache, n)`` gives its first n slots, None an
        empty row; ``length`` slots valid. False (nothing changed) when the spare rows or the
        slots do not suffice, or the buffers are not host memory."""
        need = max([r[1] for r in rows if r is not None] + [length]) + 1
        n = self.batch + len(rows)
        if not self.shared or n > self.rows_capacity or need > self._cap:
            return False
        for j, full in enumerate(self._full):
            for i, r in enumerate(rows):
                if r is not None:
                    full[self.batch + i, :, :r[1]] = r[0][j][0, :, :r[1]]
        self._bind(self._full, n)
        self.length = length
        return True

    def replace(self, bufs: list[np.ndarray], length: int, rows: int | None = None) -> None:
        """New contents (rows selected, slots gathered): ``length`` slots valid, same capacity;
        ``rows``: the leading rows bound (the rest of ``bufs`` spare for ``add_rows``; only a
        shared cache has spare rows), default all."""
        cap = max(self.capacity, length + 1, max((b.shape[2] for b in bufs), default=0))
        new = []
        for b in bufs:
            if b.shape[2] == cap and b.flags.c_contiguous:
                new.append(b)
            else:
                full = cache_zeros(b.shape[:2] + (cap,) + b.shape[3:], b.dtype)
                full[:, :, : b.shape[2]] = b
                new.append(full)
        self._bind(new, rows)
        self.length = length

    def select(self, rows: np.ndarray, length: int | None = None) -> None:
        """Keep batch ``rows`` only (in that order), ``length`` slots valid (default: as now)."""
        length = self.length if length is None else length
        if self.shared:                     # compacted in place: the allocation and its spare rows stay
            rows = np.asarray(rows, np.int64)
            if all(r >= i for i, r in enumerate(rows.tolist())):
                # each row's source lies at or after its place: copied one by one, front to back, only
                # where it moves (no source is overwritten before it is read)
                for i, r in enumerate(rows.tolist()):
                    if r != i:
                        for full in self._full:
                            full[i, :, :length] = full[r, :, :length]
            else:
                for full in self._full:
                    full[:len(rows), :, :length] = full[rows, :, :length]
            self._bind(self._full, len(rows))
            self.length = length
            return
        self.replace([buf[rows] for buf in self.host()], length)

    def views(self) -> list[np.ndarray]:
        return [b[:, :, : self.length] for b in self.host()]


_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def pick_device(device: str = "auto") -> str:
    """``cpu``, ``cuda`` (ONNX Runtime's CUDA EP: onnxruntime-gpu and a GPU), or ``auto``: cuda
    where this onnxruntime has the CUDA EP, else cpu."""
    import onnxruntime as ort

    have = ort.get_available_providers()
    if device == "auto":
        return "cuda" if _PROVIDERS["cuda"] in have else "cpu"
    if device not in _PROVIDERS:
        raise ModelError(f"ONNX Runtime device must be auto, cpu or cuda, got {device!r}")
    if _PROVIDERS[device] not in have:
        raise ModelError(f"ONNX Runtime device {device!r} needs {_PROVIDERS[device]}, which this onnxruntime "
                         f"{ort.__version__} does not have (it has {', '.join(have)}; the CUDA EP comes with "
                         f"onnxruntime-gpu)")
    return device


def open_session(path: Path, options: Any, device: str = "cpu") -> Any:
    """An ONNX Runtime session over ``path`` on ``device`` (``cpu`` or ``cuda``, with the CPU EP
    for what the CUDA EP lacks); a missing file, a graph ORT refuses, or a CUDA EP that does
    not start is a ``ModelError`` naming the file."""
    import onnxruntime as ort

    if not path.is_file():
        raise ModelError(f"{path}: no such ONNX model file")
    providers = [_PROVIDERS[device]] + (["CPUExecutionProvider"] if device != "cpu" else [])
    try:
        session = ort.InferenceSession(str(path), options, providers=providers)
    except Exception as e:                  # ORT raises its own Fail/InvalidGraph types
        raise ModelError(f"{path}: ONNX Runtime cannot load it: {str(e).splitlines()[0]}") from None
    if session.get_providers()[0] != providers[0]:
        raise ModelError(f"{path}: ONNX Runtime could not start {providers[0]} (it runs on "
                         f"{', '.join(session.get_providers())}); check the CUDA and cuDNN libraries")
    return session


QUANT_META = "decograph.weights"     # a quantized step graph's metadata key: "int4" or "int8"


class StepSession:
    """An ONNX Runtime session over a step graph, its shapes read from the graph; on the CPU EP,
    or on the CUDA EP (``device="cuda"``: the KV cache in GPU memory, I/O binding, the step's
    small inputs and the logits copied by ORT; the graph float16, which GroupQueryAttention's
    CUDA kernel needs: ``export_step(..., dtype="float16")``)."""

    def __init__(self, path: str | Path, threads: int | None = None, spinning: bool | None = None,
                 device: str = "cpu") -> None:
        p = Path(path)
        self.device = pick_device(device)
        self.session = open_session(p, session_options(threads, spinning), self.device)
        names = [i.name for i in self.session.get_inputs()]
        self.num_layers = (len(names) - 5) // 2
        ins, outs = io_names(self.num_layers)
        if names != ins:
            raise ModelError(f"{p}: inputs {names[:4]}... are not a decograph step graph of this version (see "
                             f"kv.io_names; graphs exported by an older decograph must be exported again)")
        self.past_names, self.present_names = ins[3:-2], outs[1:]
        past = self.session.get_inputs()[3]
        self.kv_heads, self.head_dim = int(past.shape[1]), int(past.shape[3])
        self.kv_dtype = {"tensor(float)": np.float32, "tensor(float16)": np.float16}.get(past.type)
        if self.kv_dtype is None:
            raise ModelError(f"{p}: its KV cache is {past.type}; decograph's step graphs use float or float16")
        self.vocab_size = int(self.session.get_outputs()[0].shape[2])
        outputs = self.session.get_outputs()
        # a graph built for draft heads returns the final hidden states too (``graph.hidden_output``)
        self.hidden_size = int(outputs[-1].shape[2]) if outputs[-1].name == "hidden" else 0
        # int4/int8 weights with int8 activations (``export.quantize_step``): exact for dense causal
        # chains only (see ``graph``), so the engine verifies one draft chain a step
        self.quantized = QUANT_META in self.session.get_modelmeta().custom_metadata_map
        self.path = p
        self._min_query: int | None = None

    @property
    def min_query(self) -> int:
        """The query tokens a row's step computes at least: 2 on a graph that gives a one-token
        step a padding query row (``graph.step_frame``'s exact graphs: its K/V land in the slot
        after the step's), else 1. Probed once with a one-token step on an empty cache."""
        if self._min_query is None:
            kv = self.new_kv(1, 4)
            self.run(kv, np.zeros((1, 1), np.int64), np.zeros((1, 1), np.int64), causal_mask(1, 0), 1)
            self._min_query = 2 if any(np.any(np.asarray(b)[:, :, 1] != 0) for b in kv.host()) else 1
        return self._min_query

    def new_kv(self, batch: int, capacity: int = 0, shared: bool | None = None) -> KV:
        return KV(self, batch, capacity, shared)

    def run(self, kv: KV, ids: np.ndarray, pos: np.ndarray, mask: np.ndarray, keep: int = 0,
            lengths: np.ndarray | None = None, hidden: bool = False) -> Any:
        """One step: ``ids``/``pos`` int64 [B, T], ``mask`` float32 [B, 1, T, length + T]
        (additive); returns the logits of the last ``keep`` tokens (0: all), [B, keep, V]. The
        array is reused by the next step of the same shape: read it (or copy) before. With
        ``hidden`` (a graph that has the output: ``hidden_size``), returns ``(logits, hidden)``,
        the final hidden states of every query token, float32 [B, T, H], reused likewise.

        ``lengths`` (int [B], each <= ``kv.length``): rows whose caches hold fewer slots; row b's
        T new slots go to ``lengths[b]`` onwards and it attends to its first ``lengths[b] + T``
        slots only (its mask row read over those), as in a decode of that row alone. Default:
        every row ``kv.length``."""
        b, t = ids.shape
        if b != kv.batch or mask.shape != (b, 1, t, kv.length + t):
            raise ModelError(f"step of {tuple(ids.shape)} tokens with a mask of {mask.shape} over a cache of "
                             f"{kv.batch} rows x {kv.length} slots")
        if lengths is None:
            past = np.full(b, kv.length, np.int64)
        else:
            past = np.asarray(lengths, np.int64)
            if past.shape != (b,) or past.min() < 0 or past.max() > kv.length:
                raise ModelError(f"lengths {past.tolist()}: expected {b} row lengths in [0, {kv.length}]")
        kv.reserve(kv.length + t + 1)
        io = kv.io
        io.bind_cpu_input("input_ids", ids)
        io.bind_cpu_input("position_ids", pos)
        io.bind_cpu_input("attention_mask", mask)
        io.bind_cpu_input("logits_keep", np.array([keep], dtype=np.int64))
        io.bind_cpu_input("cache_lengths", past)
        shape = (b, keep if 0 < keep <= t else t, self.vocab_size)
        out = kv._logits.get(shape)
        if out is None:
            from onnxruntime import OrtValue

            arr = np.empty(shape, np.float32)
            out = kv._logits[shape] = (arr, OrtValue.ortvalue_from_numpy(arr))
        io.bind_ortvalue_output("logits", out[1])
        if hidden and not self.hidden_size:
            raise ModelError(f"{self.path}: this step graph has no 'hidden' output (draft heads need one: a "
                             f"program with draft.head exports its graph with it)")
        states = None
        if self.hidden_size:        # bound even when not asked: an old binding of another shape would stay
            states = kv._hidden.get((b, t))
            if states is None:
                from onnxruntime import OrtValue

                arr = np.empty((b, t, self.hidden_size), np.float32)
                states = kv._hidden[(b, t)] = (arr, OrtValue.ortvalue_from_numpy(arr))
            io.bind_ortvalue_output("hidden", states[1])
        self.session.run_with_iobinding(io)
        kv.length += t
        return (out[0], states[0]) if hidden and states is not None else out[0]
