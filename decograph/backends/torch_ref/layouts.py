"""How one ``forward`` op runs: the three layouts its attributes select.

Every draft candidate chain of a row goes into one merged ``DraftTree`` (a trie with
``dedup``, else a forest whose chains each hang off the root), which verification walks.
Where each node was computed depends on the layout:

- ``mask=causal`` with several chains: one causal forward per chain index (the unfused
  lowering; the pending tokens are recomputed by each);
- ``mask=tree, layout=sequence``: one forward, every node packed after the row's pending
  tokens under a tree mask (ancestors only), sharing the prefix's KV in place;
- ``mask=tree, layout=batch``: one forward whose batch holds a copy of the row per chain (the
  prefix's KV is copied), collapsed back to the accepted chain's copy at commit.

Over a forked state (fork branches: several rows per physical cache row) the same attributes
pick how branches run: ``mask=causal`` runs one forward per branch (round ``j`` holds the
``j``-th branch of every physical row); ``mask=packed`` (or ``tree``) packs every branch's
segment into its physical row under a segment mask, the prefix's KV shared in place;
``layout=batch`` first copies the prefix into a physical row per branch.

``Forwarded.at[b]`` gives, for row ``b``, the flat logits row (into ``logits.view(-1, V)``) of
the root and then of each node; ``slots`` the physical cache slot of each pending token and
node, valid after ``collapse``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from decograph.backends.torch_ref.batch import BatchState, DraftTree, StepLayout
from decograph.passes.cost import CostCurve

__all__ = ["Forwarded", "run_forward"]


@dataclass
class Forwarded:
    """The result of one ``forward`` op over the active rows."""

    rows: list[Any]
    trees: list[DraftTree]                 # per row: the merged tree verification walks
    logits: torch.Tensor                   # [N, T, V]; rows of ``at`` index its flattened view
    at: list[list[int]]                    # per row: flat logits row of the root, then each node
    pend_slots: list[list[int]]            # per row: cache slots of the pending tokens
    node_slots: list[list[int]]            # per row: cache slot of each node (after collapse)
    drafts: list[Any]
    nodes: list[list[list[list[int]]]]     # per draft, per row, per chain: node ids
    chain_of: list[list[int]] = field(default_factory=list)   # batch layout: per row, per node
    batch_rows: list[list[int]] | None = None                 # batch layout: copies per row
    _argmax: list[int] | None = None

    @property
    def flat(self) -> torch.Tensor:
        return self.logits.reshape(-1, self.logits.shape[-1])

    def argmax_of(self, b: int) -> list[int]:
        """The argmax at the root and after each node of row ``b``."""
        if self._argmax is None:
            self._argmax = self.flat.argmax(dim=-1).tolist()
        return [self._argmax[i] for i in self.at[b]]

    def rows_of(self, b: int) -> torch.Tensor:
        return self.flat[torch.tensor(self.at[b])]


def _merged(state: BatchState, drafts: list[Any], dedup: bool) -> tuple[list[DraftTree], list[Any]]:
    trees = [DraftTree(dedup=dedup) for _ in state.active]
    nodes = [[[trees[b].add_chain(c) for c in d.chains[b]] for b in range(len(trees))] for d in drafts]
    return trees, nodes


def _chains(drafts: list[Any], b: int) -> list[list[int]]:
    return [c for d in drafts for c in d.chains[b]]


def run_forward(op: Any, state: BatchState, drafts: list[Any], curve: CostCurve, pad: int) -> Forwarded:
    """Run ``op`` (a ``forward``) on the active rows in the layout its attributes select."""
    trees, nodes = _merged(state, drafts, bool(op.dedup))
    if state.forked:
        if op.mask == "causal" and state.packed:
            return _rounds(state, drafts, trees, nodes, curve, pad)
        if op.layout == "batch":
            state.unpack()
        return _packed(state, drafts, trees, nodes, curve, pad, list(range(len(trees))))
    multi = any(len(_chains(drafts, b)) > 1 for b in range(len(trees)))
    if op.mask == "tree" and op.layout == "batch" and multi:
        return _batch(state, drafts, trees, nodes, curve, pad)
    if op.mask == "causal" and multi:
        return _separate(state, drafts, trees, nodes, curve, pad)
    return _packed(state, drafts, trees, nodes, curve, pad, list(range(len(trees))))


def _packed(state: BatchState, drafts: list[Any], trees: list[DraftTree], nodes: Any,
            curve: CostCurve, pad: int, index: list[int], out: Forwarded | None = None) -> Forwarded:
    """One forward over active rows ``index``, each row's segment at its place in its
    physical row; fills (or creates) the ``Forwarded`` of all rows."""
    rows = [state.active[b] for b in index]
    sub = [trees[b] for b in index]
    phys = [state.phys[b] for b in index]
    layout = StepLayout.fit(rows, sub, curve.best_width, phys, state.n_phys)
    base = state.valid.shape[1]
    logits = state.forward(layout, pad, index)
    flat = logits.reshape(-1, logits.shape[-1])
    if out is None:
        n = len(trees)
        out = Forwarded(list(state.active), trees, flat[None], [[] for _ in range(n)], [[] for _ in range(n)],
                        [[] for _ in range(n)], drafts, nodes)
        shift = 0
    else:
        shift = out.logits.shape[1]
        out.logits = torch.cat([out.logits, flat[None]], dim=1)
        out._argmax = None
    for j, b in enumerate(index):
        p, n = layout.pending[j], len(trees[b])
        out.at[b] = [shift + layout.flat(j, p - 1)] + [shift + layout.flat(j, p + i) for i in range(n)]
        o = layout.offset[j]
        out.pend_slots[b] = list(range(base + o, base + o + p))
        out.node_slots[b] = [base + o + p + i for i in range(n)]
    return out


def _rounds(state: BatchState, drafts: list[Any], trees: list[DraftTree], nodes: Any,
            curve: CostCurve, pad: int) -> Forwarded:
    """The unfused lowering of a forked forward: one forward per branch rank, round ``j``
    holding the ``j``-th active row of each physical row."""
    rank: dict[int, int] = {}
    rounds: list[list[int]] = []
    for b, p in enumerate(state.phys):
        j = rank[p] = rank.get(p, -1) + 1
        if j == len(rounds):
            rounds.append([])
        rounds[j].append(b)
    out = None
    for index in rounds:
        out = _packed(state, drafts, trees, nodes, curve, pad, index, out)
    assert out is not None
    return out


def _chain_ids(nodes: Any, b: int) -> list[list[int]]:
    """Row ``b``'s merged-tree node ids of each chain, in ``_chains`` order."""
    return [ids for per_draft in nodes for ids in per_draft[b]]


def _separate(state: BatchState, drafts: list[Any], trees: list[DraftTree], nodes: Any,
              curve: CostCurve, pad: int) -> Forwarded:
    """One causal forward per chain index: the pending tokens, then that chain."""
    rows = list(state.active)
    chains = [_chains(drafts, b) for b in range(len(rows))]
    at = [[-1] * (1 + len(t)) for t in trees]
    node_slots = [[-1] * len(t) for t in trees]
    pend: list[list[int]] = []
    outs, offset = [], 0
    for j in range(max(len(c) for c in chains)):
        sub = [DraftTree() for _ in rows]
        for b, c in enumerate(chains):
            if j < len(c):
                sub[b].add_chain(c[j])
        width = curve.best_width(max(len(r.pending) + len(t) for r, t in zip(rows, sub)))
        layout = StepLayout(rows, sub, width)
        base = state.valid.shape[1]
        logits = state.forward(layout, pad)
        outs.append(logits)
        for b, c in enumerate(chains):
            p = layout.pending[b]
            if j == 0:
                at[b][0] = offset + b * width + p - 1
                pend.append(list(range(base, base + p)))
            if j < len(c):
                for d, node in enumerate(_chain_ids(nodes, b)[j]):
                    if at[b][1 + node] < 0:
                        at[b][1 + node] = offset + b * width + p + d
                        node_slots[b][node] = base + p + d
        offset += len(rows) * width
    flat = torch.cat([o.reshape(-1, o.shape[-1]) for o in outs])[None]
    return Forwarded(rows, trees, flat, at, pend, node_slots, drafts, nodes)


def _batch(state: BatchState, drafts: list[Any], trees: list[DraftTree], nodes: Any,
           curve: CostCurve, pad: int) -> Forwarded:
    """One forward whose batch holds a copy of each row per chain (the prefix KV is copied)."""
    rows = list(state.active)
    chains = [_chains(drafts, b) for b in range(len(rows))]
    copies = [max(1, len(c)) for c in chains]
    index = [b for b, n in enumerate(copies) for _ in range(n)]
    state.copy_rows(index)
    sub_rows, sub_trees = [], []
    for b, c in enumerate(chains):
        for j in range(copies[b]):
            t = DraftTree()
            if j < len(c):
                t.add_chain(c[j])
            sub_rows.append(rows[b])
            sub_trees.append(t)
    width = curve.best_width(max(len(r.pending) + len(t) for r, t in zip(sub_rows, sub_trees)))
    layout = StepLayout(sub_rows, sub_trees, width)
    base = state.valid.shape[1]
    logits = state.forward(layout, pad)
    at, pend, node_slots, chain_of, batch_rows = [], [], [], [], []
    first = 0
    for b, c in enumerate(chains):
        p = layout.pending[first]
        a = [first * width + p - 1] + [-1] * len(trees[b])
        owner = [-1] * len(trees[b])
        slots = [-1] * len(trees[b])
        for j, ids in enumerate(_chain_ids(nodes, b)):
            for d, node in enumerate(ids):
                if a[1 + node] < 0:
                    a[1 + node], owner[node], slots[node] = (first + j) * width + p + d, j, base + p + d
        at.append(a)
        pend.append(list(range(base, base + p)))
        node_slots.append(slots)
        chain_of.append(owner)
        batch_rows.append(list(range(first, first + copies[b])))
        first += copies[b]
    return Forwarded(rows, trees, logits, at, pend, node_slots, drafts, nodes, chain_of, batch_rows)


def collapse(state: BatchState, fwd: Forwarded, paths: list[list[int]]) -> None:
    """Batch layout: keep, per row, the copy holding its accepted path (the others go).

    The copy of the chain that first reached the path's deepest node holds the whole path,
    and a node's slot (after the pending tokens, at its depth) is the same in every copy.
    """
    if fwd.batch_rows is None:
        return
    keep = []
    for b, path in enumerate(paths):
        chain = fwd.chain_of[b][path[-1]] if path else 0
        keep.append(fwd.batch_rows[b][max(chain, 0)])
    state.copy_rows(keep)
