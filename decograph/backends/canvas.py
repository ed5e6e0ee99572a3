"""A masked-diffusion batch (``runtime.protocol.CanvasBatch``) shared by the backends: the
canvases and Fast-dLLM's block-wise approximate KV caches, kept in host arrays (numpy); the
model's forward, the confidence and the KV storage are the backend's (``BlockCanvas``'s three
abstract methods). torch-free, so the exported decoder runs it too.

The canvas of row ``b`` is ``ids[b]``: its prompt right-aligned to ``width``, then its
``max_new_tokens`` generation positions, then its suffix; ``valid`` marks real tokens and
``pos`` their positions. ``commit(kv=...)``:

- ``recompute``: every step is a forward over the whole canvas;
- ``block_approx`` (prefix cache): the first step of a block runs the whole canvas and keeps
  every position's KV; the block's later steps run the block and everything after it,
  attending to the kept KV of the positions before the block;
- ``block_approx_dual`` (dual cache): the later steps run only the block, attending to the
  kept KV of the positions before and after it.

The kept KV is refreshed when the block completes (the next block's first step).

A *block-causal* model (``block_causal``: its block, counted from the answer's start; the
block-diffusion LM of ``adapt-diffusion``, whose blocks never read a later block and whose
completed blocks are clean, causal positions) needs no approximation there: the kept KV of
the prompt and of its completed blocks is exact, and positions after the block are never
read. Its first step of a block therefore runs only the columns from the end of the exactly
kept prefix to the block's end, against the kept KV before them, and keeps their KV in place
(``keep_columns``) instead of recomputing the whole canvas. (A strategy block that does not
start on one of the model's blocks leaves the completed start of the model's block noisy:
approximate, as with any model.)
"""
from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np

from decograph.runtime.protocol import CanvasBatch, CanvasStep
from decograph.runtime.unmask import CanvasRow

__all__ = ["BlockCanvas", "BlockQuery"]


@dataclass
class BlockQuery:
    """One forward of a block step: query ``ids`` [B, T] at ``pos`` (``valid``: real keys),
    attending also to the kept KV of canvas rows ``context_rows`` (all rows, in order, when
    ``every``) where ``context_valid``; logits wanted at ``logits_at`` [B, K]; ``keep_kv``:
    return the queries' KV."""

    ids: np.ndarray
    pos: np.ndarray
    valid: np.ndarray
    logits_at: np.ndarray
    context_rows: np.ndarray | None = None
    every: bool = False
    context_valid: np.ndarray | None = None
    keep_kv: bool = False
    gen_start: np.ndarray | None = None          # each query row's answer start (a position)
    context_pos: np.ndarray | None = None        # the context's positions [B, C] (with context_rows)


class BlockCanvas(CanvasBatch):
    """Canvases and block caches; a backend supplies ``run`` (the forward plus confidence),
    ``keep`` (store the fresh KV of some rows) and ``context`` (the kept KV of some rows)."""

    def __init__(self, rows: list[CanvasRow], mask_id: int, kv: str, pad_id: int, shift_logits: bool) -> None:
        self.rows, self.mask_id, self.kv, self.shift = rows, mask_id, kv, int(shift_logits)
        n = len(rows[0].gen) if rows else 0
        width = max((len(r.prompt) for r in rows), default=0)
        tail = max((len(r.suffix) for r in rows), default=0)
        self.width = width
        self.ids = np.full((len(rows), width + n + tail), pad_id, dtype=np.int64)
        self.valid = np.zeros((len(rows), width + n + tail), dtype=bool)
        for b, r in enumerate(rows):
            self.ids[b, width - len(r.prompt):width] = r.prompt
            self.valid[b, width - len(r.prompt):width + n + len(r.suffix)] = True
            self.ids[b, width:width + n] = mask_id
            if r.suffix:                                    # infilling: the text after the masked span
                self.ids[b, width + n:width + n + len(r.suffix)] = r.suffix
        self.pos = np.maximum(np.cumsum(self.valid, 1) - 1, 0).astype(np.int64)
        self.gen_start = np.array([len(r.prompt) for r in rows], dtype=np.int64)
        self._kept_block: dict[int, int] = {}                # row -> the block start its kept KV is for
        self.block_causal = 0                                # a block-causal model's block (set by the backend)
        self._kv: Any = None                                 # the kept KV (the backend's arrays), per layer
        self._plans: dict[tuple[Any, ...], tuple[Any, ...]] = {}

    # -- the backend's part ----------------------------------------------------------------

    @abstractmethod
    def run(self, q: BlockQuery) -> tuple[np.ndarray, np.ndarray, Any]:
        """The model over ``q``: the confidence and argmax [B, K] of the logits at
        ``q.logits_at``, and the queries' KV when ``q.keep_kv`` (else None)."""

    @abstractmethod
    def keep(self, rows: np.ndarray, kv: Any) -> None:
        """Keep ``kv`` (as ``run`` returned it) as the context of canvas rows ``rows``."""

    def zeros_kv(self, like: Any, total: int) -> Any:
        """Zero KV for every row over ``total`` columns, per layer shaped and typed as ``like``
        (as ``run`` returned it): what ``keep_columns`` fills (block-causal models)."""
        raise NotImplementedError(f"{type(self).__name__} keeps whole rows only")

    def keep_columns(self, rows: np.ndarray, kv: Any, starts: np.ndarray, stops: np.ndarray) -> None:
        """Keep query column ``j`` of row ``rows[i]``'s ``kv`` as the context of canvas column
        ``starts[i] + j``, for ``starts[i] + j < stops[i]`` (a block-causal model's narrow
        refresh; the other columns are left as they are). Numpy and torch index alike."""
        if self._kv is None:
            self._kv = self.zeros_kv(kv, self.ids.shape[1])
        for j, (r, a, z) in enumerate(zip(rows.tolist(), starts.tolist(), stops.tolist())):
            for (ck, cv), (k, v) in zip(self._kv, kv):
                ck[r, :, a:z], cv[r, :, a:z] = k[j, :, :z - a], v[j, :, :z - a]

    # -- the protocol ----------------------------------------------------------------------

    def write(self, row: CanvasRow, positions: list[int], tokens: list[int]) -> None:
        if positions:
            self.ids[row.index, [self.width + g for g in positions]] = tokens

    def forward(self, blocks: list[tuple[int, int]]) -> CanvasStep:
        active = self.active
        conf: dict[int, np.ndarray] = {}
        tok: dict[int, np.ndarray] = {}
        queried: dict[int, int] = {}
        fresh = [(r, blk) for r, blk in zip(active, blocks)
                 if self.kv == "recompute" or self._kept_block.get(r.index) != blk[0]]
        cached = [(r, blk) for r, blk in zip(active, blocks) if self.kv != "recompute"
                  and self._kept_block.get(r.index) == blk[0]]
        if fresh and self.block_causal and self.kv != "recompute":
            self._fresh_incremental(fresh, conf, tok, queried)
        elif fresh:
            idx = np.array([r.index for r, _ in fresh])
            w = max(e - s for _, (s, e) in fresh)
            at = np.stack([np.minimum(np.arange(s, s + w), e - 1) + self.width - self.shift for _, (s, e) in fresh])
            c, t, kv = self.run(BlockQuery(self.ids[idx], self.pos[idx], self.valid[idx], at,
                                           keep_kv=self.kv != "recompute", gen_start=self.gen_start[idx]))
            if kv is not None:
                self.keep(idx, kv)
            for j, (r, (s, e)) in enumerate(fresh):
                conf[r.index], tok[r.index] = c[j, :e - s], t[j, :e - s]
                queried[r.index] = int(self.valid[r.index].sum())
                self._kept_block[r.index] = s
        if cached:
            self._cached(cached, conf, tok, queried)
        return CanvasStep([conf[r.index] for r in active], [tok[r.index] for r in active],
                          [queried[r.index] for r in active])

    def _fresh_incremental(self, rows: list[tuple[CanvasRow, tuple[int, int]]], conf: dict[int, np.ndarray],
                           tok: dict[int, np.ndarray], queried: dict[int, int]) -> None:
        """A block-causal model's first step of a block: the columns from each row's exactly kept
        prefix to the end of the model's block holding the strategy block's end, against that
        prefix's kept KV; their KV kept in place."""
        total = self.ids.shape[1]
        idx = np.array([r.index for r, _ in rows])
        b = self.block_causal    # kept exactly: the model's blocks complete at the row's last refresh (0: none)
        starts = np.array([self.width + s - s % b if s is not None else 0
                           for s in (self._kept_block.get(r.index) for r, _ in rows)])
        stops = np.array([min(self.width - (-e // b) * b, total) for _, (_s, e) in rows])   # to a model block's end
        w = int((stops - starts).max())
        cols = starts[:, None] + np.arange(w)[None, :]
        inside = cols < stops[:, None]
        cols = np.minimum(cols, total - 1)
        qvalid = inside & np.take_along_axis(self.valid[idx], cols, 1)
        n = max(e - s for _, (s, e) in rows)
        at = np.stack([np.minimum(np.arange(s, s + n), e - 1) + self.width - self.shift - starts[j]
                       for j, (_, (s, e)) in enumerate(rows)])
        q = BlockQuery(np.take_along_axis(self.ids[idx], cols, 1), np.take_along_axis(self.pos[idx], cols, 1), qvalid,
                       at, keep_kv=True, gen_start=self.gen_start[idx])
        if int(starts.max()) > 0:                          # the exactly kept prefix as the context
            q.context_rows, q.context_pos = idx, self.pos[idx]
            q.every = len(rows) == self.ids.shape[0] and idx.tolist() == list(range(len(rows)))
            q.context_valid = self.valid[idx] & (np.arange(total)[None, :] < starts[:, None])
        c, t, kv = self.run(q)
        self.keep_columns(idx, kv, starts, stops)
        for j, (r, (s, e)) in enumerate(rows):
            conf[r.index], tok[r.index] = c[j, :e - s], t[j, :e - s]
            queried[r.index] = int(qvalid[j].sum())
            self._kept_block[r.index] = s

    def _cached(self, rows: list[tuple[CanvasRow, tuple[int, int]]], conf: dict[int, np.ndarray],
                tok: dict[int, np.ndarray], queried: dict[int, int]) -> None:
        key = tuple((r.index, blk) for r, blk in rows)
        plan = self._plans.get(key)
        if plan is None:                   # the same for every step of these rows' blocks: built once
            plan = self._plans[key] = self._cached_plan(rows)
        idx, cols, pos, qvalid, cvalid, at, every, gen_start, cpos = plan
        c, t, _ = self.run(BlockQuery(np.take_along_axis(self.ids[idx], cols, 1), pos, qvalid, at, context_rows=idx,
                                      every=every, context_valid=cvalid, gen_start=gen_start, context_pos=cpos))
        for j, (r, (s, e)) in enumerate(rows):
            conf[r.index], tok[r.index] = c[j, :e - s], t[j, :e - s]
            queried[r.index] = int(qvalid[j].sum())

    def _cached_plan(self, rows: list[tuple[CanvasRow, tuple[int, int]]]) -> tuple[Any, ...]:
        """What a cached step of ``rows`` at their blocks reads: the rows, the query columns,
        their positions and validity, the context's validity (the query's own columns
        excluded), the block's logit columns, whether every row runs (the kept KV is then
        used as is), and the rows' answer starts and context positions (block-causal models)."""
        total = self.ids.shape[1]
        dual = self.kv == "block_approx_dual"
        starts = np.array([self.width + s - self.shift for _, (s, _e) in rows])
        ends = np.array([self.width + e if dual else total for _, (_s, e) in rows])
        w = int((ends - starts).max())
        cols = starts[:, None] + np.arange(w)[None, :]
        inside = cols < ends[:, None]
        cols = np.minimum(cols, total - 1)
        idx = np.array([r.index for r, _ in rows])
        pos = np.take_along_axis(self.pos[idx], cols, 1)
        qvalid = inside & np.take_along_axis(self.valid[idx], cols, 1)
        span = np.arange(total)[None, :]
        in_query = (span >= starts[:, None]) & (span < ends[:, None])
        cvalid = self.valid[idx] & ~in_query
        every = len(rows) == self.ids.shape[0] and idx.tolist() == list(range(len(rows)))
        at = np.stack([np.minimum(np.arange(w), e - s - 1) for _, (s, e) in rows])
        return idx, cols, pos, qvalid, cvalid, at, every, self.gen_start[idx], self.pos[idx]
