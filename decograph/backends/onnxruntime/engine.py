"""The ONNX Runtime backend's side of the step protocol (``decograph.runtime.protocol``),
with onnxruntime and numpy only: the in-process ``onnxruntime*`` backends and the exported
decoder run the runtime's interpreter on it.

Each active row has a cache row of its own, dense from slot 0 (``lengths[b]`` valid slots):
the step graph's ``cache_lengths`` input writes row ``b``'s new slots at ``lengths[b]`` and
attends over its own slots only, so rows of one batch never pad each other. A step feeds each
row its pending tokens then its draft tree's nodes, under an additive mask built from the
tree's parent pointers (a node sees the context, the pending tokens, its ancestors and
itself); positions are the root's plus depth. Commit keeps the pending slots and, with
``keep_nodes``, moves the accepted path's slots down to follow them (a chain's accepted
prefix is already in place); everything else is rolled back by the row's length alone. A
fork copies each row's cache row once per branch; join restores the forked rows' cache.

The lowering choices of ``forward`` (``mask``/``layout``) all run as one tree-masked forward
of the whole batch here: their tokens are the same, and this graph has no cheaper form.

Draft heads: on a graph built with the ``hidden`` output (``graph.hidden_output``) a plan with
``hidden`` returns each row's final hidden states (``StepOutput.hidden``), and a prompt's
forward keeps its last ``hidden_tail`` positions' (``Batch.prefill_hidden``) and its root's
(the first step's pending token, computed by that forward).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from decograph.backends.onnxruntime.kv import KV, NEG, StepSession, cache_zeros, causal_mask
from decograph.errors import UnsupportedError
from decograph.runtime.protocol import Batch, StepOutput, StepPlan
from decograph.runtime.rows import DraftTree, Row

__all__ = ["OrtBatch", "OrtOutput", "tree_masks", "MIN_ROWS"]

# Every step multiplies at least two query rows (a lone row's one-token step gets a filler row
# after its token, at the next position, whose K/V land past the row's length and are
# overwritten; a batch of rows, where the graph allows, none: ``GraphRunner.batch_filler``): ORT's
# CPU kernels compute a row of a product of 2 to 16 rows one way and a lone row another (its
# matrix-vector routines sum in another order; measured on this project's AMD EPYC with int4
# weights and int8 activations, where even the graph's own one-token padding row did not keep
# it), so with this every step of 1 to 16 tokens gives each row the same arithmetic.
MIN_ROWS = 2
_STEP_SLACK = 20        # slots past a row's budget: the widest step's drafts and padding rows
_GATHER_SLOTS = 2048     # a gathered host cache's least slots (see OrtBatch._gather)


def tree_masks(lengths: np.ndarray, pending: list[int], trees: list[DraftTree], w: int, width: int) -> np.ndarray:
    """Additive masks [B, 1, w, width + w]: row ``b``'s query ``i`` over its own slots (its
    ``lengths[b]`` cached ones, then the step's at ``lengths[b] + j``): pending tokens causal,
    tree nodes after all pending tokens and their ancestors, filler queries causal."""
    cols = np.arange(width + w)
    out = np.empty((len(trees), 1, w, width + w), np.float32)
    for b, tree in enumerate(trees):
        base, p = int(lengths[b]), pending[b]
        see = cols[None, :] < (base + 1 + np.arange(w))[:, None]
        n = len(tree)
        if n and any(par != i - 1 for i, par in enumerate(tree.parent)):
            see[p:p + n] = cols[None, :] < base + p
            for i, par in enumerate(tree.parent):
                see[p + i, base + p + i] = True
                if par >= 0:
                    see[p + i] |= see[p + par] & (cols >= base + p)
        out[b, 0] = np.where(see, np.float32(0.0), NEG)
    return out


class OrtOutput(StepOutput):
    """A step's logits [B, w, V] (the session's reused buffer: read before the next step);
    a row whose root was computed by its prompt's forward (``roots[b]``) reads it there.
    ``states``: the step's final hidden states [B, w, H] when the plan asked, and
    ``root_states[b]`` a prompt-computed root's."""

    def __init__(self, logits: np.ndarray | None, fed: list[int], sizes: list[int],
                 roots: list[np.ndarray | None], states: np.ndarray | None = None,
                 root_states: list[np.ndarray | None] | None = None) -> None:
        self.raw, self.fed, self.sizes, self.roots = logits, fed, sizes, roots
        self.best = logits.argmax(-1) if logits is not None else None
        self.states, self.root_states = states, root_states

    def argmax(self, b: int) -> list[int]:
        n, root = self.sizes[b], self.roots[b]
        if root is None:
            return self.best[b, self.fed[b] - 1:self.fed[b] + n].tolist()
        return [int(root.argmax())] + (self.best[b, :n].tolist() if n else [])

    def logits(self, b: int) -> np.ndarray:
        n, root = self.sizes[b], self.roots[b]
        if root is None:
            return np.array(self.raw[b, self.fed[b] - 1:self.fed[b] + n], np.float32)
        return np.concatenate([root[None], self.raw[b, :n]]) if n else np.array(root[None], np.float32)

    def hidden(self, b: int) -> np.ndarray:
        """Row ``b``'s final hidden states, float32 [pending + nodes, H] (a copy)."""
        n, fed = self.sizes[b], self.fed[b]
        missing = UnsupportedError("this forward was not asked for hidden states (StepPlan.hidden)")
        if self.roots[b] is None:
            if self.states is None:
                raise missing
            return np.array(self.states[b, :fed + n], np.float32)
        mine = self.root_states[b] if self.root_states is not None else None
        if mine is None or n and self.states is None:
            raise missing
        return np.concatenate([mine[None], self.states[b, :n]]) if n else mine[None].copy()


@dataclass
class _Level:
    rows: list[Row]
    active: list[Row]
    kv: KV
    lengths: np.ndarray
    branches: list[list[Row]]
    forwards: int


@dataclass
class OrtBatch(Batch):
    step: StepSession
    rows: list[Row]
    active: list[Row] = field(default_factory=list)
    kv: KV | None = None
    lengths: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    forwards: int = 0
    roots: list[np.ndarray | None] = field(default_factory=list)   # per row: its root's logits, when cached
    _stack: list[_Level] = field(default_factory=list)
    _fed: list[int] = field(default_factory=list)
    filler: bool = True                 # a batch's one-token steps get the filler row too
    spare_rows: int = 0                 # rows a gathered cache's allocation holds at least (admissions)
    # draft heads (a graph with the ``hidden`` output): per row (by id) its prompt forward's last
    # ``hidden_tail`` positions' final hidden states, and its prompt-computed root's
    _tails: dict[int, np.ndarray] = field(default_factory=dict)
    _root_states: dict[int, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.active = [r for r in self.rows if not r.done]
        self.kv = self.step.new_kv(len(self.active), 64)
        self.lengths = np.zeros(len(self.active), np.int64)
        self.roots = [None] * len(self.active)

    @property
    def forked(self) -> bool:
        return bool(self._stack)

    def prefill(self) -> None:
        """Each row's whole prompt in a forward of its own (bit-identical to the row decoded
        alone, and to one-token greedy decoding's prompt forward), gathered into the batch's
        cache. The last prompt token (the first root) is then cached with its logits kept: the
        first step feeds only the row's draft nodes after it."""
        if not any(len(r.tokens) > 1 for r in self.active):
            return
        if len(self.active) == 1:
            r = self.active[0]
            self.kv.reserve(self._budget([len(r.tokens)], [r]))
            self.roots[0] = self._prompt(r, self.kv)
            self.lengths = np.array([self.kv.length], np.int64)
            self.forwards += 1
            return
        caches = [self.step.new_kv(1, len(r.tokens) + 2) if len(r.tokens) > 1 else None for r in self.active]
        self.roots = [self._prompt(r, kv) if kv is not None else None for r, kv in zip(self.active, caches)]
        self.forwards += 1
        self.lengths = np.array([kv.length if kv is not None else 0 for kv in caches], np.int64)
        self._gather([], caches)

    def _budget(self, lengths: np.ndarray | list[int] | None = None, rows: list[Row] | None = None) -> int:
        """The slots the rows (default: the batch's, with their cached ``lengths``) can reach:
        each row's cached slots, its remaining tokens and the widest step after them (at most
        1024 past the longest row: longer budgets grow as they go). Sized so once, a batch's
        cache is not doubled and copied whole mid-decode."""
        lengths = self.lengths if lengths is None else lengths
        rows = self.active if rows is None else rows
        length = int(max(lengths, default=0))
        need = max((int(n) + r.remaining + _STEP_SLACK for n, r in zip(lengths, rows)), default=0)
        return max(length + 64, min(need, length + 1024))

    def _prompt(self, r: Row, kv: KV) -> np.ndarray:
        """Row ``r``'s prompt forward into ``kv`` (a cache of its own); its root's logits. On a
        graph with hidden states, the root's and the last ``hidden_tail`` positions' are kept."""
        n = len(r.tokens)
        states = bool(self.step.hidden_size)
        got = self.step.run(kv, np.array([r.tokens], np.int64), np.arange(n, dtype=np.int64)[None],
                            causal_mask(n, 0), 1, hidden=states)
        r.cached, r.prefill_forwards, r.forwards = n - 1, 1, 1
        if not states:
            return np.array(got[0, -1], np.float32)
        logits, hidden = got
        self._root_states[id(r)] = hidden[0, n - 1].copy()
        if self.hidden_tail > 0:
            self._tails[id(r)] = hidden[0, max(0, n - 1 - self.hidden_tail):n - 1].copy()
        return np.array(logits[0, -1], np.float32)

    def prefill_hidden(self, row: Row) -> np.ndarray:
        """``row``'s final hidden states of its last min(``hidden_tail``, cached) prefilled
        positions (float32 [k, H]; none for a one-token prompt), as its prompt forward gave them."""
        if not self.step.hidden_size:
            raise UnsupportedError(f"{self.step.path}: this step graph was exported without hidden states; draft "
                                   f"heads need one exported for a program with draft.head")
        got = self._tails.get(id(row))
        return got if got is not None else np.zeros((0, self.step.hidden_size), np.float32)

    def _gather(self, old: list[np.ndarray], caches: list[KV | None]) -> None:
        """The batch's cache: ``old``'s rows (host buffers of the rows already in the batch,
        or none) then one row per cache in ``caches`` (None: an empty row), ``self.lengths``
        slots valid per row. On the host, a new allocation holds ``spare_rows`` rows and at
        least ``_GATHER_SLOTS`` slots (growing by half at least), so that later admissions land
        in it (``KV.add_rows``) instead of copying the whole cache again: its pages are zeros
        that no one touches until a row writes them, so the room costs address space only."""
        length, cap = int(self.lengths.max(initial=0)), self._budget()
        if old and cap <= self.kv.capacity and \
                self.kv.add_rows([(kv.host(), kv.length) if kv is not None else None for kv in caches], length):
            return                  # into rows that finished ones left (``KV.select``): the old rows stay put
        rows, n_old = len(caches), 0
        if old:
            n_old = old[0].shape[0]
            rows += n_old
            cap = max(cap, old[0].shape[2])
            if cap > old[0].shape[2]:
                cap = max(cap, old[0].shape[2] * 3 // 2)
        if self.kv.shared:
            cap, rows = max(cap, _GATHER_SLOTS), max(rows, self.spare_rows)
        bufs = []
        for j in range(2 * self.step.num_layers):
            full = cache_zeros((rows, self.step.kv_heads, cap, self.step.head_dim), self.step.kv_dtype)
            if old:
                m = min(length, old[j].shape[2])
                full[:n_old, :, :m] = old[j][:, :, :m]
            for i, kv in enumerate(caches):
                if kv is not None:
                    full[n_old + i, :, :kv.length] = kv.host()[j][0, :, :kv.length]
            bufs.append(full)
        self.kv.replace(bufs, length, n_old + len(caches))

    def admit(self, rows: list[Row]) -> None:
        """New rows join between two steps: each prompt's forward runs alone (as ``prefill``),
        then its cache row is appended to the batch's."""
        self.rows += rows
        new = [r for r in rows if not r.done]
        if not new:
            return
        assert not self._stack, "rows admitted into a forked batch"
        caches = [self.step.new_kv(1, len(r.tokens) + 2) if len(r.tokens) > 1 else None for r in new]
        roots = [self._prompt(r, kv) if kv is not None else None for r, kv in zip(new, caches)]
        self.forwards += 1
        old = self.kv.host() if self.active else []
        if self.active and not self.kv.shared:
            old = [np.array(b) for b in old]
        self.active += new
        self.roots += roots
        self.lengths = np.concatenate([self.lengths, [kv.length if kv is not None else 0 for kv in caches]]
                                      ).astype(np.int64)
        self._gather(old, caches)

    def key_lengths(self) -> list[int]:
        """Each active row's cached slots (where its next step's keys start)."""
        return [int(n) for n in self.lengths]

    def forward(self, plan: StepPlan) -> OrtOutput:
        kv = self.kv
        assert kv is not None
        if plan.hidden and not self.step.hidden_size:
            raise UnsupportedError(f"{self.step.path}: this step graph was exported without hidden states; draft "
                                   f"heads need one exported for a program with draft.head")
        trees = plan.trees
        roots = list(self.roots)
        fed = [0 if roots[b] is not None else len(r.pending) for b, r in enumerate(self.active)]
        sizes = [len(t) for t in trees]
        w = max(p + n for p, n in zip(fed, sizes))
        self._fed = fed
        root_states = None
        if plan.hidden:
            root_states = [self._root_states.get(id(r)) if roots[b] is not None else None
                           for b, r in enumerate(self.active)]
        self._root_states.clear()
        if w == 0:                                  # every root computed already, nothing drafted
            self.roots = [None] * len(self.active)
            return OrtOutput(None, fed, sizes, roots, None, root_states)
        b_n = len(self.active)
        if b_n == 1 or self.filler:
            w = max(w, MIN_ROWS)                    # a filler query row: never a one-row product
        ids = np.empty((b_n, w), np.int64)
        pos = np.empty((b_n, w), np.int64)
        chain_only = True
        for b, (r, tree) in enumerate(zip(self.active, trees)):
            base, p, n = int(self.lengths[b]), fed[b], sizes[b]
            row = (r.pending if p else []) + tree.tokens
            ids[b, :p + n] = row
            ids[b, p + n:] = row[-1] if row else r.tokens[-1]
            pos[b] = base + np.arange(w)
            if n:
                pos[b, p:p + n] = base + p - 1 + np.asarray(tree.depth)
                chain_only = chain_only and all(par == i - 1 for i, par in enumerate(tree.parent))
        if b_n == 1 and chain_only:
            got = self.step.run(kv, ids, pos, causal_mask(w, kv.length), hidden=plan.hidden)
        else:
            got = self.step.run(kv, ids, pos, tree_masks(self.lengths, fed, trees, w, kv.length),
                                lengths=self.lengths, hidden=plan.hidden)
        logits, states = got if plan.hidden else (got, None)
        self.forwards += 1
        for r in self.active:
            r.forwards += 1
            r.query_tokens += w
        self.roots = [None] * len(self.active)
        return OrtOutput(logits, fed, sizes, roots, states, root_states)

    def commit(self, out: StepOutput, paths: list[list[int]], keep_nodes: bool) -> None:
        assert self.kv is not None
        host = None
        for b, path in enumerate(paths):
            base = int(self.lengths[b]) + self._fed[b]
            if keep_nodes and path:
                if path != list(range(len(path))):       # a branch off the first chain: move its slots down
                    host = host if host is not None else self.kv.host()
                    src = base + np.asarray(path)
                    dst = base + np.arange(len(path))
                    for buf in host:
                        buf[b, :, dst] = buf[b, :, src]
                    self.active[b].kv_bytes_copied += len(path) * sum(buf[0, :, 0].nbytes for buf in host)
                base += len(path)
            self.lengths[b] = base
        if host is not None and not self.kv.shared:
            self.kv.replace(host, self.kv.length)
        self.kv.length = int(self.lengths.max()) if len(self.lengths) else 0

    def settle(self, copy: bool = False) -> None:
        keep = [i for i, r in enumerate(self.active) if not r.done]
        if len(keep) == len(self.active):
            return
        assert self.kv is not None
        for r in self.active:
            if r.done:
                self._tails.pop(id(r), None)
        # finished rows leave by swap-remove: each place they free among the first len(keep) rows
        # takes a live row from past them, so only those rows' caches move (a row's place in the
        # batch does not change its arithmetic), not every row after a finished one
        n = len(keep)
        movers = iter(i for i in keep if i >= n)
        keep = [i if not self.active[i].done else next(movers) for i in range(n)]
        self.active = [self.active[i] for i in keep]
        self.roots = [self.roots[i] for i in keep]
        idx = np.array(keep, np.int64)
        self.lengths = self.lengths[idx]
        if keep:
            self.kv.select(idx, int(self.lengths.max()))
        else:
            self.kv.length = 0

    def fork(self, branches: list[list[Row]]) -> None:
        assert self.kv is not None
        for b, root in enumerate(self.roots):      # a cached root is fed again, as the runtime expects
            if root is not None:
                self.lengths[b] -= 1
        self.roots = [None] * len(self.active)
        self._root_states.clear()
        self._stack.append(_Level(self.rows, self.active, self.kv, self.lengths, branches, self.forwards))
        self.rows = [r for bs in branches for r in bs]
        pick = [b for b, bs in enumerate(branches) for r in bs if not r.done]
        self.active = [r for r in self.rows if not r.done]
        self.lengths = self.lengths[np.array(pick, np.int64)] if pick else self.lengths[:0]
        self.roots = [None] * len(self.active)
        kv = self.step.new_kv(max(len(pick), 1), self.kv.capacity)
        if pick:
            host, n = self.kv.host(), int(self.lengths.max())
            if kv.shared:                   # the valid slots only: the rest stays untouched zeros
                for dst, src in zip(kv.host(), host):
                    dst[:, :, :n] = src[np.array(pick), :, :n]
                kv.length = n
            else:
                kv.replace([buf[np.array(pick)] for buf in host], n)
            for b, r in zip(pick, self.active):
                r.kv_bytes_copied += n * sum(buf[0, :, 0].nbytes for buf in host)
        self.kv = kv

    def join(self) -> list[list[Row]]:
        level = self._stack.pop()
        self.rows, self.active, self.kv, self.lengths = level.rows, level.active, level.kv, level.lengths
        self.roots = [None] * len(self.active)
        for row, branches in zip(self.active, level.branches):   # the row's cost includes its branches'
            if branches:
                row.forwards += self.forwards - level.forwards
            row.query_tokens += sum(b.query_tokens for b in branches)
        return level.branches
