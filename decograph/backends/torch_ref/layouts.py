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

``drafts`` / ``nodes`` below are, per row, the token chains and their node ids (the plan's).
``pad`` is the padding token and whether the plan asks for the final hidden states too.
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
from decograph.runtime.protocol import StepPlan

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
    chain_of: list[list[int]] = field(default_factory=list)   # batch layout: per row, per node
    batch_rows: list[list[int]] | None = None                 # batch layout: copies per row
    _argmax: list[int] | None = None
    hidden: torch.Tensor | None = None     # plan.hidden: final hidden states, laid out as ``logits``
    pend_at: list[list[int]] = field(default_factory=list)    # per row: flat rows of its pending tokens

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

    def hidden_of(self, b: int) -> torch.Tensor:
        """Row ``b``'s final hidden states: its pending tokens', then each node's."""
        assert self.hidden is not None
        return self.hidden.reshape(-1, self.hidden.shape[-1])[torch.tensor(self.pend_at[b] + self.at[b][1:])]


def _run(state: BatchState, layout: StepLayout, pad: int, hidden: bool, index: list[int] | None = None
         ) -> tuple[torch.Tensor, torch.Tensor | None]:
    out = state.run_layout(layout, pad, index, hidden=hidden)
    return out if hidden else (out, None)


def run_forward(plan: StepPlan, state: BatchState, curve: CostCurve) -> Forwarded:
    """Run ``plan`` (the runtime's step: trees and the forward op's lowering) on the active
    rows in the layout its ``mask`` / ``layout`` select (with ``plan.hidden``, the final
    hidden states too)."""
    trees, pad = plan.trees, (plan.pad_id, plan.hidden)
    drafts, nodes = plan.chains, plan.chain_nodes      # per row: token chains, their node ids
    if state.forked:
        if plan.mask == "causal" and state.packed:
            return _rounds(state, drafts, trees, nodes, curve, pad)
        if plan.layout == "batch":
            state.unpack()
        return _packed(state, drafts, trees, nodes, curve, pad, list(range(len(trees))))
    multi = any(len(c) > 1 for c in plan.chains)
    if plan.mask == "tree" and plan.layout == "batch" and multi:
        return _batch(state, drafts, trees, nodes, curve, pad)
    if plan.mask == "causal" and multi:
        return _separate(state, drafts, trees, nodes, curve, pad)
    return _packed(state, drafts, trees, nodes, curve, pad, list(range(len(trees))))


def _packed(state: BatchState, drafts: list[Any], trees: list[DraftTree], nodes: Any,
            curve: CostCurve, pad: tuple[int, bool], index: list[int], out: Forwarded | None = None) -> Forwarded:
    """One forward over active rows ``index``, each row's segment at its place in its
    physical row; fills (or creates) the ``Forwarded`` of all rows."""
    rows = [state.active[b] for b in index]
    sub = [trees[b] for b in index]
    phys = [state.phys[b] for b in index]
    layout = StepLayout.fit(rows, sub, curve.best_width, phys, state.n_phys)
    base = state.valid.shape[1]
    logits, hid = _run(state, layout, *pad, index=index)
    flat = logits.reshape(-1, logits.shape[-1])
    hid = None if hid is None else hid.reshape(-1, hid.shape[-1])[None]
    if out is None:
        n = len(trees)
        out = Forwarded(list(state.active), trees, flat[None], [[] for _ in range(n)], [[] for _ in range(n)],
                        [[] for _ in range(n)], hidden=hid, pend_at=[[] for _ in range(n)])
        shift = 0
    else:
        shift = out.logits.shape[1]
        out.logits = torch.cat([out.logits, flat[None]], dim=1)
        out.hidden = None if hid is None or out.hidden is None else torch.cat([out.hidden, hid], dim=1)
        out._argmax = None
    for j, b in enumerate(index):
        p, n = layout.pending[j], len(trees[b])
        out.at[b] = [shift + layout.flat(j, p - 1)] + [shift + layout.flat(j, p + i) for i in range(n)]
        out.pend_at[b] = [shift + layout.flat(j, i) for i in range(p)]
        o = layout.offset[j]
        out.pend_slots[b] = list(range(base + o, base + o + p))
        out.node_slots[b] = [base + o + p + i for i in range(n)]
    return out


def _rounds(state: BatchState, drafts: list[Any], trees: list[DraftTree], nodes: Any,
            curve: CostCurve, pad: tuple[int, bool]) -> Forwarded:
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


def _separate(state: BatchState, drafts: list[Any], trees: list[DraftTree], nodes: Any,
              curve: CostCurve, pad: tuple[int, bool]) -> Forwarded:
    """One causal forward per chain index: the pending tokens, then that chain."""
    rows = list(state.active)
    chains = drafts
    at = [[-1] * (1 + len(t)) for t in trees]
    node_slots = [[-1] * len(t) for t in trees]
    pend: list[list[int]] = []
    pend_at: list[list[int]] = []
    outs, hids, offset = [], [], 0
    for j in range(max(len(c) for c in chains)):
        sub = [DraftTree() for _ in rows]
        for b, c in enumerate(chains):
            if j < len(c):
                sub[b].add_chain(c[j])
        width = curve.best_width(max(len(r.pending) + len(t) for r, t in zip(rows, sub)))
        layout = StepLayout(rows, sub, width)
        base = state.valid.shape[1]
        logits, hid = _run(state, layout, *pad)
        outs.append(logits)
        hids.append(hid)
        for b, c in enumerate(chains):
            p = layout.pending[b]
            if j == 0:
                at[b][0] = offset + b * width + p - 1
                pend.append(list(range(base, base + p)))
                pend_at.append([b * width + i for i in range(p)])
            if j < len(c):
                for d, node in enumerate(nodes[b][j]):
                    if at[b][1 + node] < 0:
                        at[b][1 + node] = offset + b * width + p + d
                        node_slots[b][node] = base + p + d
        offset += len(rows) * width
    flat = torch.cat([o.reshape(-1, o.shape[-1]) for o in outs])[None]
    hidden = None if hids[0] is None else torch.cat([h.reshape(-1, h.shape[-1]) for h in hids])[None]
    return Forwarded(rows, trees, flat, at, pend, node_slots, hidden=hidden, pend_at=pend_at)


def _batch(state: BatchState, drafts: list[Any], trees: list[DraftTree], nodes: Any,
           curve: CostCurve, pad: tuple[int, bool]) -> Forwarded:
    """One forward whose batch holds a copy of each row per chain (the prefix KV is copied)."""
    rows = list(state.active)
    chains = drafts
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
    logits, hid = _run(state, layout, *pad)
    at, pend, node_slots, chain_of, batch_rows, pend_at = [], [], [], [], [], []
    first = 0
    for b, c in enumerate(chains):
        p = layout.pending[first]
        a = [first * width + p - 1] + [-1] * len(trees[b])
        owner = [-1] * len(trees[b])
        slots = [-1] * len(trees[b])
        for j, ids in enumerate(nodes[b]):
            for d, node in enumerate(ids):
                if a[1 + node] < 0:
                    a[1 + node], owner[node], slots[node] = (first + j) * width + p + d, j, base + p + d
        at.append(a)
        pend.append(list(range(base, base + p)))
        pend_at.append([first * width + i for i in range(p)])
        node_slots.append(slots)
        chain_of.append(owner)
        batch_rows.append(list(range(first, first + copies[b])))
        first += copies[b]
    return Forwarded(rows, trees, logits, at, pend, node_slots, chain_of, batch_rows, hidden=hid, pend_at=pend_at)


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
