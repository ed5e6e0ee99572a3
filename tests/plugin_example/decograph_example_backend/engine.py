"""The example backend's side of the step protocol (``decograph.runtime.protocol``) in numpy.

Each active row owns a ``RowCache`` (dense from slot 0; ``length`` equals the row's
``cached``). A forward packs every row's queries without padding: its pending tokens, then its
draft tree's nodes. A pending token sees the cache and the pending tokens before it; a node
sees the cache, every pending token, its ancestors and itself (the tree's parent pointers),
at the root's position plus its depth. Commit keeps the pending tokens' slots and, with
``keep_nodes``, moves the accepted path's slots down to follow them; every other slot the
step wrote is beyond the new length, so rolling back costs nothing. A fork copies the
parent's cache for each branch row; join restores the level below.

The plan's lowering choices (``mask``/``layout``: a tree in one sequence, a row copy per
chain, packed fork branches) all run as this one tree-masked forward: they give the same
tokens, and a numpy forward has no cheaper form of them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from decograph.runtime.protocol import Batch, Engine, StepOutput, StepPlan
from decograph.runtime.rows import DraftTree, Row

from decograph_example_backend.llama import LlamaWeights, RowCache, Segment, run

__all__ = ["NumpyEngine", "NumpyBatch", "NumpyOutput", "visibility"]


def visibility(length: int, pending: int, tree: DraftTree) -> np.ndarray:
    """``[p + n, length + p + n]`` bool for one row with ``length`` cached slots, ``pending``
    (p) pending tokens and the ``n`` nodes of ``tree`` as queries: pending tokens causal, a node
    after every pending token, its ancestors and itself (``parent[i] < i``)."""
    p, t = pending, pending + len(tree)
    see = np.zeros((t, length + t), bool)
    see[:, :length] = True
    see[:p, length:length + p] = np.tri(p, dtype=bool)
    see[p:, length:length + p] = True
    for i, par in enumerate(tree.parent):
        if par >= 0:
            see[p + i, length + p:] = see[p + par, length + p:]
        see[p + i, length + p + i] = True
    return see


class NumpyOutput(StepOutput):
    """Per active row its logits ``[1 + nodes, V]``: at its last pending token (the root),
    then after each node."""

    def __init__(self, logits: list[np.ndarray]) -> None:
        self.rows = logits

    def argmax(self, b: int) -> list[int]:
        return self.rows[b].argmax(-1).tolist()

    def logits(self, b: int) -> np.ndarray:
        return self.rows[b]


@dataclass
class _Level:
    """What a fork set aside: the level's rows, active rows and their caches, the branch rows
    of each active row, and the batch's forward count at the fork."""

    rows: list[Row]
    active: list[Row]
    caches: list[RowCache]
    branches: list[list[Row]]
    forwards: int


class NumpyBatch(Batch):
    """The rows of one run and one ``RowCache`` per active row (``caches[b]`` for ``active[b]``)."""

    def __init__(self, weights: LlamaWeights, rows: list[Row]) -> None:
        self.w, self.rows = weights, rows
        self.active = [r for r in rows if not r.done]
        self.caches = [RowCache.empty(weights) for _ in self.active]
        self.forwards = 0                   # forwards this batch ran (prefill included)
        self._fed: list[int] = []           # per active row: pending tokens of the last forward
        self._stack: list[_Level] = []

    @property
    def forked(self) -> bool:
        return bool(self._stack)

    def prefill(self) -> None:
        """Every active row's tokens but its last (the first root) into its cache, all rows in
        one forward; a one-token row has nothing to prefill and takes no part."""
        rows = [(r, c) for r, c in zip(self.active, self.caches) if len(r.tokens) > 1]
        if not rows:
            return
        ids, segs = [], []
        for r, cache in rows:
            n = len(r.tokens) - 1
            segs.append(Segment(len(ids), len(ids) + n, cache, np.tri(n, dtype=bool)))
            ids += r.tokens[:-1]
        run(self.w, np.array(ids), np.concatenate([np.arange(s.stop - s.start) for s in segs]), segs)
        for (r, cache), s in zip(rows, segs):
            cache.length = r.cached = s.stop - s.start
            r.prefill_forwards = r.forwards = 1
            r.query_tokens += s.stop - s.start
        self.forwards += 1

    def forward(self, plan: StepPlan) -> NumpyOutput:
        """One forward of every active row's pending tokens and ``plan.trees[b]``; the step's
        keys and values are written after each cache's valid slots (``commit`` keeps some)."""
        ids: list[int] = []
        pos: list[int] = []
        segs, fed = [], []
        for row, cache, tree in zip(self.active, self.caches, plan.trees):
            pending = row.pending
            assert cache.length == row.cached and pending, "the runtime's row.cached is the cache's length"
            p, root = len(pending), cache.length + len(pending) - 1
            segs.append(Segment(len(ids), len(ids) + p + len(tree), cache, visibility(cache.length, p, tree)))
            ids += pending + tree.tokens
            pos += list(range(cache.length, root + 1)) + [root + d for d in tree.depth]
            fed.append(p)
            row.forwards += 1
            row.query_tokens += p + len(tree)
        hidden = run(self.w, np.array(ids), np.array(pos), segs)
        # Logits only where a rule reads them: at the root, then after each node.
        take = np.concatenate([np.arange(s.start + p - 1, s.stop) for s, p in zip(segs, fed)])
        logits = self.w.logits(hidden[take])
        bounds = np.cumsum([s.stop - s.start - p + 1 for s, p in zip(segs, fed)])[:-1]
        self._fed = fed
        self.forwards += 1
        return NumpyOutput(np.split(logits, bounds))

    def commit(self, out: StepOutput, paths: list[list[int]], keep_nodes: bool) -> None:
        """Row ``b`` keeps its pending tokens' slots and, with ``keep_nodes``, ``paths[b]``'s
        nodes in path order (moved down to follow the pending ones); the rest is dropped."""
        for b, (row, cache, path) in enumerate(zip(self.active, self.caches, paths)):
            base = cache.length + self._fed[b]
            if keep_nodes and path:
                if path != list(range(len(path))):     # not the first chain's prefix: move its slots
                    cache.move(base + np.asarray(path), base + np.arange(len(path)))
                    row.kv_bytes_copied += len(path) * cache.slot_bytes
                base += len(path)
            cache.length = base

    def settle(self, copy: bool = False) -> None:
        """Drops finished rows and their caches (each row's cache is dense: ``copy`` has
        nothing left to compact)."""
        keep = [i for i, r in enumerate(self.active) if not r.done]
        self.active = [self.active[i] for i in keep]
        self.caches = [self.caches[i] for i in keep]

    def fork(self, branches: list[list[Row]]) -> None:
        """Active row ``b`` becomes the rows ``branches[b]``; each unfinished one starts from a
        copy of its cache (branch rows arrive with ``cached`` = their parent's)."""
        self._stack.append(_Level(self.rows, self.active, self.caches, branches, self.forwards))
        caches = []
        for cache, mine in zip(self.caches, branches):
            for r in mine:
                if not r.done:
                    caches.append(cache.copy())
                    r.kv_bytes_copied += cache.length * cache.slot_bytes
        self.rows = [r for mine in branches for r in mine]
        self.active = [r for r in self.rows if not r.done]
        self.caches = caches

    def join(self) -> list[list[Row]]:
        """Back to the level below: its rows and caches as the fork left them; each forked row's
        statistics take its branches' cost. Returns each active row's branch rows."""
        level = self._stack.pop()
        self.rows, self.active, self.caches = level.rows, level.active, level.caches
        for row, branches in zip(self.active, level.branches):
            if branches:
                row.forwards += self.forwards - level.forwards
            row.query_tokens += sum(b.query_tokens for b in branches)
        return level.branches


class NumpyEngine(Engine):
    """Starts ``NumpyBatch`` es over one model's numpy weights."""

    def __init__(self, weights: LlamaWeights, tokenizer: Any = None, cost_curve: Any = None) -> None:
        self.weights, self.tokenizer, self.cost_curve = weights, tokenizer, cost_curve

    def start(self, rows: list[Row]) -> NumpyBatch:
        return NumpyBatch(self.weights, rows)
