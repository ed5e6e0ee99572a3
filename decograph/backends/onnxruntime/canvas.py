"""decograph's masked-diffusion graph (``mdm.build_mdm``) on ONNX Runtime behind the runtime's
canvas protocol, torch-free: the in-process ``onnxruntime`` backend and the exported decoder of
an unmask strategy run this code.

``MDMSession`` is the graph's forward on numpy arrays (the block-wise caches' interface:
queries at explicit positions, the kept context KV, logits only at chosen query indices, the
queries' K/V out); ``OrtCanvasEngine`` starts ``OrtCanvas`` batches over it, the confidence
(max softmax probability, the mask token excluded) computed in numpy on the block's logits.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from decograph.backends.canvas import BlockCanvas, BlockQuery
from decograph.backends.onnxruntime.kv import NEG, open_session, session_options
from decograph.errors import ModelError, UnsupportedError
from decograph.runtime.protocol import Engine
from decograph.runtime.unmask import CanvasRow

__all__ = ["MDMSession", "OrtCanvasEngine", "OrtCanvas", "mdm_io_names", "confidence"]

NpKV = list[tuple[np.ndarray, np.ndarray]]


def mdm_io_names(n_layers: int) -> tuple[list[str], list[str]]:
    """The masked-diffusion graph's input and output names."""
    ctx = [f"context.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    return ["ids", "positions", "bias", *ctx, "logits_at"], ["logits", *present]


def confidence(logits: np.ndarray, mask_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Max softmax probability and argmax over the last axis, the mask token excluded."""
    lg = np.array(logits, dtype=np.float32, copy=True)
    lg[..., mask_id] = -np.inf
    tok = lg.argmax(-1)
    top = np.take_along_axis(lg, tok[..., None], -1)
    conf = 1.0 / np.exp(lg - top).sum(-1, dtype=np.float32)
    return conf.astype(np.float32), tok.astype(np.int64)


class MDMSession:
    """An ONNX Runtime session over a masked-diffusion graph. ORT's idle threads do not spin by
    default (``spinning``; ``DECOGRAPH_ORT_SPINNING`` overrides): between forwards the runtime's
    unmask and commit run on the host, which spinning threads would slow down (2.3x slower on
    2 cores, measured)."""

    def __init__(self, path: str | Path, *, max_positions: int, threads: int | None = None,
                 spinning: bool | None = None) -> None:
        p = Path(path)
        if spinning is None and not os.environ.get("DECOGRAPH_ORT_SPINNING", "").strip():
            spinning = False
        self.session = open_session(p, session_options(threads, spinning))
        self.path = p
        names = [i.name for i in self.session.get_inputs()]
        self.num_layers = self._check_names(names)
        ctx = self.session.get_inputs()[names.index("context.0.key")].shape
        self.heads, self.head_dim = int(ctx[1]), int(ctx[3])
        self.vocab_size = int(self.session.get_outputs()[0].shape[2])
        self.path, self.max_positions = p, int(max_positions)

    wants_layout = False

    def _check_names(self, names: list[str]) -> int:
        n = (len(names) - 4) // 2
        if names != mdm_io_names(n)[0]:
            raise ModelError(f"{self.path}: inputs {names[:3]}... are not a decograph masked-diffusion graph "
                             f"(mdm.build_mdm)")
        return n

    def forward(self, ids: np.ndarray, positions: np.ndarray, key_valid: np.ndarray | None = None,
                context: NpKV | None = None, context_valid: np.ndarray | None = None, return_kv: bool = False,
                logits_at: np.ndarray | None = None) -> tuple[np.ndarray, NpKV | None]:
        self.check(ids, positions)
        b, t = ids.shape
        c = context[0][0].shape[2] if context is not None else 0
        valid = np.ones((b, c + t), bool)
        if context is not None and context_valid is not None:
            valid[:, :c] = context_valid
        if key_valid is not None:
            valid[:, c:] = key_valid
        bias = np.ascontiguousarray(np.broadcast_to(np.where(valid, np.float32(0.0), NEG)[:, None, None, :],
                                                    (b, 1, t, c + t)))
        return self.run_feeds(ids, positions, bias, context, return_kv, logits_at)

    def check(self, ids: np.ndarray, positions: np.ndarray) -> None:
        if ids.shape != positions.shape or ids.ndim != 2:
            raise ModelError(f"{self.path.name} forward: ids {tuple(ids.shape)} and positions "
                             f"{tuple(positions.shape)} must be equal [B, T]")
        if positions.size and int(positions.max()) >= self.max_positions:
            raise ModelError(f"{self.path.name} forward: position {int(positions.max())} is past the model's max_len "
                             f"{self.max_positions}")

    def run_feeds(self, ids: np.ndarray, positions: np.ndarray, bias: np.ndarray, context: NpKV | None,
                  return_kv: bool, logits_at: np.ndarray | None,
                  extra: dict[str, np.ndarray] | None = None) -> tuple[np.ndarray, NpKV | None]:
        """The session over its feeds (``bias [B, 1, T, C + T]`` additive; ``extra``: a graph's
        own further inputs)."""
        b, t = ids.shape
        at = logits_at if logits_at is not None else np.broadcast_to(np.arange(t), (b, t))
        feeds: dict[str, np.ndarray] = {"ids": np.ascontiguousarray(ids, dtype=np.int64),
                                        "positions": np.ascontiguousarray(positions, dtype=np.int64), "bias": bias,
                                        "logits_at": np.ascontiguousarray(at, dtype=np.int64), **(extra or {})}
        empty = np.zeros((b, self.heads, 0, self.head_dim), np.float32) if context is None else None
        for i in range(self.num_layers):
            k, v = context[i] if context is not None else (empty, empty)
            feeds[f"context.{i}.key"], feeds[f"context.{i}.value"] = k, v
        out = self.session.run(None, feeds)
        if not return_kv:
            return out[0], None
        return out[0], [(out[1 + 2 * i], out[2 + 2 * i]) for i in range(self.num_layers)]


class OrtCanvas(BlockCanvas):
    def __init__(self, engine: OrtCanvasEngine, rows: list[CanvasRow], mask_id: int, kv: str) -> None:
        super().__init__(rows, mask_id, kv, engine.pad_id, engine.shift_logits)
        self.model = engine.model
        self._kv: NpKV | None = None
        self.block_causal = int(getattr(self.model, "block", 0) or 0) if self.model.wants_layout else 0

    def run(self, q: BlockQuery) -> tuple[np.ndarray, np.ndarray, Any]:
        ctx = None
        if q.context_rows is not None:
            assert self._kv is not None
            ctx = self._kv if q.every else [(k[q.context_rows], v[q.context_rows]) for k, v in self._kv]
        layout = {"gen_start": q.gen_start, "context_pos": q.context_pos} if self.model.wants_layout else {}
        lg, kv = self.model.forward(q.ids, q.pos, q.valid, ctx, q.context_valid, q.keep_kv, q.logits_at, **layout)
        conf, tok = confidence(lg, self.mask_id)
        return conf, tok, kv

    def keep(self, rows: np.ndarray, kv: Any) -> None:
        if self._kv is None:
            n = len(self.rows)
            self._kv = [(np.zeros((n,) + k.shape[1:], k.dtype), np.zeros((n,) + v.shape[1:], v.dtype)) for k, v in kv]
        for (ck, cv), (k, v) in zip(self._kv, kv):
            ck[rows], cv[rows] = k, v

    def zeros_kv(self, like: Any, total: int) -> Any:
        n = len(self.rows)
        return [(np.zeros((n, k.shape[1], total, k.shape[3]), k.dtype),
                 np.zeros((n, v.shape[1], total, v.shape[3]), v.dtype)) for k, v in like]


class OrtCanvasEngine(Engine):
    """Canvases over an ``MDMSession`` (both block-wise caches run)."""

    canvas = True
    supports_kv = True

    def __init__(self, model: MDMSession, *, mask_token_id: int, shift_logits: bool = False, pad_id: int = 0,
                 tokenizer: Any = None) -> None:
        if not 0 <= int(mask_token_id) < model.vocab_size:
            raise ModelError(f"{model.path}: mask token id {mask_token_id} is outside the vocabulary "
                             f"({model.vocab_size})")
        self.model, self.shift_logits, self.pad_id, self.tokenizer = model, bool(shift_logits), pad_id, tokenizer
        self.mask_token_id, self.max_positions = int(mask_token_id), model.max_positions
        self.name = f"{model.path.name} on ONNX Runtime"

    def start(self, rows: list[Any]) -> Any:
        raise UnsupportedError(f"{self.name} is a masked-diffusion model: it runs unmask strategies only")

    def start_canvas(self, rows: list[CanvasRow], mask_id: int, kv: str) -> OrtCanvas:
        return OrtCanvas(self, rows, mask_id, kv)
