"""Batch state of the torch reference backend: rows, the slot cache, query layouts, masks.

A row's committed tokens are ``tokens``; the first ``cached`` of them have valid KV slots in
the cache; the rest (at least the last token, the *root*) are fed at the next forward. Each
step feeds, per row, the uncached tokens followed by a draft *tree* (nodes with parent
pointers; a linear draft is a chain). Masks stay structural (parents, validity) until
``StepLayout.attend`` materializes the boolean pattern the adapter needs.

Rejected draft slots are never copied or moved: they are marked invalid and the cache tail is
cropped, so rollback is free; the cache is compacted only when holes pile up.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from decograph.frontends.adapters import CausalLMAdapter

__all__ = ["Row", "BatchState", "DraftTree", "StepLayout"]


@dataclass
class Row:
    """One sequence being decoded."""

    index: int                      # position in the caller's prompt list
    tokens: list[int]
    n_prompt: int
    max_new: int
    cached: int = 0                 # committed tokens with valid KV
    done: bool = False
    finish_reason: str = ""
    accepted: list[int] = field(default_factory=list)   # draft tokens accepted per step
    drafted: list[int] = field(default_factory=list)    # draft tokens proposed per step
    steps: int = 0
    prefill_forwards: int = 0       # 1 when a prefill forward ran for this row (prompt > 1 token)
    forwards: int = 0               # forwards this row took part in (prefill included)
    query_tokens: int = 0           # query positions computed for this row, padding included
    kv_bytes_copied: int = 0        # KV bytes moved for this row (compaction, copies)
    scratch: dict[int, Any] = field(default_factory=dict)  # per draft op: source memory

    @property
    def new_tokens(self) -> list[int]:
        return self.tokens[self.n_prompt:]

    @property
    def remaining(self) -> int:
        return self.max_new - (len(self.tokens) - self.n_prompt)

    @property
    def pending(self) -> list[int]:
        """Committed tokens without KV yet (they lead the next forward)."""
        return self.tokens[self.cached:]


@dataclass
class DraftTree:
    """Draft tokens of one row as a trie hanging off the root (the last pending token).

    ``parent[i]`` is -1 for children of the root. With ``dedup``, chains added with
    ``add_chain`` share common prefixes (a trie); without, each chain hangs off the root on
    its own (a forest). The node ids of each chain are returned.
    """

    dedup: bool = True

    tokens: list[int] = field(default_factory=list)
    parent: list[int] = field(default_factory=list)
    depth: list[int] = field(default_factory=list)
    children: dict[int, dict[int, int]] = field(default_factory=dict)

    def add_chain(self, chain: list[int]) -> list[int]:
        ids, at = [], -1
        for tok in chain:
            kids = self.children.setdefault(at, {})
            node = kids.get(tok) if self.dedup else None
            if node is None:
                node = len(self.tokens)
                kids.setdefault(tok, node)
                self.tokens.append(tok)
                self.parent.append(at)
                self.depth.append(1 if at < 0 else self.depth[at] + 1)
            ids.append(node)
            at = node
        return ids

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass
class StepLayout:
    """Where each row's pending tokens and draft nodes sit in one batched forward."""

    rows: list[Row]
    trees: list[DraftTree]
    width: int                      # T, query tokens per row (padded)
    pending: list[int] = field(default_factory=list)   # per row: pending tokens fed (snapshot)

    def __post_init__(self) -> None:
        self.pending = [len(r.pending) for r in self.rows]

    def root_index(self, b: int) -> int:
        return self.pending[b] - 1

    def node_index(self, b: int, node: int) -> int:
        return self.pending[b] + node

    def inputs(self, valid: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """input_ids [B, T], position_ids [B, T] and attend [B, T, S + T] for this step."""
        nb, t, s = len(self.rows), self.width, valid.shape[1]
        ids = torch.full((nb, t), pad_id, dtype=torch.long)
        pos = torch.zeros((nb, t), dtype=torch.long)
        new = torch.eye(t, dtype=torch.bool).repeat(nb, 1, 1)
        real = torch.zeros((nb, t), dtype=torch.bool)
        for b, (row, tree) in enumerate(zip(self.rows, self.trees)):
            pend = row.pending
            r, n = len(pend), len(tree)
            ids[b, :r] = torch.tensor(pend)
            pos[b, :r] = torch.arange(row.cached, row.cached + r)
            new[b, :r, :r] = torch.ones(r, r, dtype=torch.bool).tril()
            real[b, : r + n] = True
            if n:
                ids[b, r : r + n] = torch.tensor(tree.tokens)
                base = row.cached + r - 1
                pos[b, r : r + n] = torch.tensor([base + d for d in tree.depth])
                new[b, r : r + n, :r] = True
                for i, p in enumerate(tree.parent):
                    if p >= 0:
                        new[b, r + i, r : r + n] |= new[b, r + p, r : r + n]
        cached = valid[:, None, :].expand(nb, t, s) & real[:, :, None]
        return ids, pos, torch.cat([cached, new], dim=2)


class BatchState:
    """Active rows plus the shared slot cache and its per-row validity mask [B_active, S]."""

    def __init__(self, adapter: CausalLMAdapter, rows: list[Row]) -> None:
        self.adapter = adapter
        self.rows = rows                    # all rows, in caller order
        self.active = [r for r in rows if not r.done]
        self.cache = adapter.new_cache(len(self.active))
        self.valid = torch.zeros((len(self.active), 0), dtype=torch.bool)
        self.forwards = 0
        self.steps = 0
        self._owners = list(self.active)    # the row each cache row belongs to
        self._bytes = 0                     # bytes of one slot of one row, once known

    def _slot_bytes(self) -> int:
        """Bytes of one cache slot of one row, over every layer's keys and values (0 for
        adapters that do not expose their cache tensors, such as the test oracles)."""
        if self._bytes:
            return self._bytes
        try:
            pairs = self.adapter.slot_tensors(self.cache)
        except NotImplementedError:
            return 0
        self._bytes = sum((k[0, :, 0].numel() * k.element_size() + v[0, :, 0].numel() * v.element_size())
                   for k, v in pairs if k is not None and k.shape[2] > 0)
        return self._bytes

    def copy_rows(self, index: list[int]) -> None:
        """New cache row ``i`` is a copy of row ``index[i]`` (dropping rows, or expanding them
        into per-chain copies and back); the copied KV is counted against each row."""
        per_row = self.valid.shape[1] * self._slot_bytes()
        for i in index:
            self._owners[i].kv_bytes_copied += per_row
        self._owners = [self._owners[i] for i in index]
        idx = torch.tensor(index)
        self.adapter.select_rows(self.cache, idx)
        self.valid = self.valid[idx]

    def forward(self, layout: StepLayout, pad_id: int) -> torch.Tensor:
        """Run one forward for ``layout``; the new slots start out invalid."""
        ids, pos, attend = layout.inputs(self.valid, pad_id)
        logits = self.adapter.forward(self.cache, ids, pos, attend)
        self.valid = torch.cat([self.valid, torch.zeros(ids.shape, dtype=torch.bool)], dim=1)
        self.forwards += 1
        for r in {id(r): r for r in layout.rows}.values():
            r.forwards += 1
        for r in layout.rows:
            r.query_tokens += ids.shape[1]
        return logits

    def keep_slots(self, b: int, slots: list[int]) -> None:
        """Mark the given physical slots of active row ``b`` valid."""
        if slots:
            self.valid[b, torch.tensor(slots)] = True

    def settle(self, copy: bool = False) -> None:
        """Drop finished rows, crop the invalid tail, compact when holes dominate (always
        when there are holes, with ``copy``: the unoptimized rollback)."""
        keep = [i for i, r in enumerate(self.active) if not r.done]
        if len(keep) < len(self.active):
            self.active = [self.active[i] for i in keep]
            if keep:
                self.copy_rows(keep)
        if not self.active:
            return
        used = self.valid.any(dim=0).nonzero()
        length = int(used[-1]) + 1 if len(used) else 0
        if length < self.valid.shape[1]:
            self.adapter.truncate(self.cache, length)
            self.valid = self.valid[:, :length]
        counts = self.valid.sum(dim=1)
        most = int(counts.max())
        if self.valid.shape[1] > 2 * most + 64 or (copy and most < self.valid.shape[1]):
            self._compact(most)

    def _compact(self, most: int) -> None:
        nb, s = self.valid.shape
        order = torch.argsort(self.valid.to(torch.int8), dim=1, stable=True)[:, s - most :]
        for r in self.active:
            r.kv_bytes_copied += most * self._slot_bytes()
        self.adapter.gather_slots(self.cache, order)
        self.valid = torch.gather(self.valid, 1, order)
