"""Batch state of the torch reference backend: rows, the slot cache, query layouts, masks.

A row's committed tokens are ``tokens``; the first ``cached`` of them have valid KV slots in
the cache; the rest (at least the last token, the *root*) are fed at the next forward. Each
step feeds, per row, the uncached tokens followed by a draft *tree* (nodes with parent
pointers; a linear draft is a chain). Masks stay structural (parents, validity) until
``StepLayout.attend`` materializes the boolean pattern the adapter needs.

Rejected draft slots are never copied or moved: they are marked invalid and the cache tail is
cropped, so rollback is free; the cache is compacted only when holes pile up.

Rows are *logical*: after a ``fork`` several branch rows share one *physical* cache row (its
prefix slots), each with its own validity mask, and a forward packs their query segments one
after another into that physical row (``phys``/``offset``), each segment attending to its own
valid slots and its own tokens only. The forked-from rows wait on a stack until ``join``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from decograph.backends.torch_ref.kernels import StructuredMask
from decograph.errors import UnsupportedError
from decograph.models.adapters import CausalLMAdapter
from decograph.runtime.rows import DraftTree, Row

__all__ = ["Row", "BatchState", "DraftTree", "StepLayout"]


@dataclass
class StepLayout:
    """Where each row's pending tokens and draft nodes sit in one batched forward.

    Row ``b``'s segment (its pending tokens, then its tree's nodes) starts at column
    ``offset[b]`` of physical row ``phys[b]`` (default: row ``b``, offset 0); several rows
    sharing a physical row (fork branches) are packed one after another.
    """

    rows: list[Row]
    trees: list[DraftTree]
    width: int                      # T, query tokens per physical row (padded)
    phys: list[int] | None = None
    n_phys: int | None = None
    pending: list[int] = field(default_factory=list)   # per row: pending tokens fed (snapshot)
    offset: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.pending = [len(r.pending) for r in self.rows]
        if self.phys is None:
            self.phys = list(range(len(self.rows)))
        if self.n_phys is None:
            self.n_phys = max(self.phys, default=-1) + 1
        used = [0] * self.n_phys
        self.offset = []
        for b, p in enumerate(self.phys):
            self.offset.append(used[p])
            used[p] += self.pending[b] + len(self.trees[b])
        if max(used, default=0) > self.width:
            raise ValueError(f"segments need {max(used)} query tokens, the layout is {self.width} wide")

    @staticmethod
    def need(rows: list[Row], trees: list[DraftTree], phys: list[int] | None = None) -> int:
        """Query tokens the widest physical row needs."""
        used: dict[int, int] = {}
        for b, (r, t) in enumerate(zip(rows, trees)):
            p = b if phys is None else phys[b]
            used[p] = used.get(p, 0) + len(r.pending) + len(t)
        return max(used.values(), default=0)

    @classmethod
    def fit(cls, rows: list[Row], trees: list[DraftTree], pad: Callable[[int], int],
            phys: list[int] | None = None, n_phys: int | None = None) -> "StepLayout":
        return cls(rows, trees, pad(cls.need(rows, trees, phys)), phys, n_phys)

    def flat(self, b: int, i: int) -> int:
        """Index into the flattened logits [n_phys * width] of row ``b``'s query ``i``."""
        return self.phys[b] * self.width + self.offset[b] + i  # type: ignore[index]

    def root_index(self, b: int) -> int:
        return self.offset[b] + self.pending[b] - 1

    def node_index(self, b: int, node: int) -> int:
        return self.offset[b] + self.pending[b] + node

    def inputs(self, valid: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """input_ids [P, T], position_ids [P, T] and attend [P, T, S + T] for this step."""
        nb, t, s = self.n_phys, self.width, valid.shape[1]
        assert nb is not None and self.phys is not None
        ids = torch.full((nb, t), pad_id, dtype=torch.long)
        pos = torch.zeros((nb, t), dtype=torch.long)
        new = torch.eye(t, dtype=torch.bool).repeat(nb, 1, 1)
        cached = torch.zeros((nb, t, s), dtype=torch.bool)
        for b, (row, tree) in enumerate(zip(self.rows, self.trees)):
            p, o = self.phys[b], self.offset[b]
            pend = row.pending
            r, n = len(pend), len(tree)
            ids[p, o : o + r] = torch.tensor(pend, dtype=torch.long)
            pos[p, o : o + r] = torch.arange(row.cached, row.cached + r)
            new[p, o : o + r, o : o + r] = torch.ones(r, r, dtype=torch.bool).tril()
            cached[p, o : o + r + n] = valid[b]
            if n:
                q = o + r
                ids[p, q : q + n] = torch.tensor(tree.tokens, dtype=torch.long)
                base = row.cached + r - 1
                pos[p, q : q + n] = torch.tensor([base + d for d in tree.depth])
                new[p, q : q + n, o : q] = True
                for i, par in enumerate(tree.parent):
                    if par >= 0:
                        new[p, q + i, q : q + n] |= new[p, q + par, q : q + n]
        return ids, pos, torch.cat([cached, new], dim=2)

    def structure(self, valid: torch.Tensor) -> StructuredMask:
        """The pattern ``inputs``' ``attend`` holds, structurally (no T x T tensor): each
        segment's pending tokens form a chain, its tree's roots hang off the last pending one;
        padding queries form a last segment that sees no cache slot."""
        nb, t, s = self.n_phys, self.width, valid.shape[1]
        assert nb is not None and self.phys is not None
        parents = torch.full((nb, t), -1, dtype=torch.long)
        groups: list[list[torch.Tensor]] = [[] for _ in range(nb)]
        seg = torch.full((nb, t), -1, dtype=torch.long)
        for b, (row, tree) in enumerate(zip(self.rows, self.trees)):
            p, o, r, n = self.phys[b], self.offset[b], len(row.pending), len(tree)
            seg[p, o : o + r + n] = len(groups[p])
            groups[p].append(valid[b])
            parents[p, o + 1 : o + r] = torch.arange(o, o + r - 1)
            q = o + r
            if n:
                parents[p, q : q + n] = torch.tensor([q + par if par >= 0 else q - 1 if r else -1 for par in tree.parent])
        g = max(len(x) for x in groups) + 1
        prefix = torch.zeros((nb, g, s), dtype=torch.bool)
        for p, rows in enumerate(groups):
            for i, v in enumerate(rows):
                prefix[p, i] = v
            seg[p][seg[p] < 0] = g - 1
        return StructuredMask(parents, seg, prefix)


@dataclass
class _Level:
    """A suspended level of rows (the rows a fork split), restored by ``join``."""

    rows: list[Row]
    active: list[Row]
    phys: list[int]
    valid: torch.Tensor
    owners: list[Row]
    branches: list[list[Row]] = field(default_factory=list)   # per active row: its branch rows
    forwards: int = 0                                          # forwards run before the fork


class BatchState:
    """Active rows plus the shared slot cache and per-row validity masks [B_active, S].

    ``phys[b]`` is active row ``b``'s physical cache row (the identity until a fork packs
    branch rows into their parent's); ``n_phys`` physical rows are in the cache.
    """

    def __init__(self, adapter: CausalLMAdapter, rows: list[Row]) -> None:
        self.adapter = adapter
        self.rows = rows                    # all rows of the current level, in order
        self.active = [r for r in rows if not r.done]
        self.cache = adapter.new_cache(len(self.active))
        self.valid = torch.zeros((len(self.active), 0), dtype=torch.bool)
        self.phys = list(range(len(self.active)))
        self.n_phys = len(self.active)
        self.forwards = 0
        self.steps = 0
        self._owners = list(self.active)    # the row each valid row belongs to
        self._bytes = 0                     # bytes of one slot of one row, once known
        self._stack: list[_Level] = []      # levels suspended by fork, innermost last
        self.attention: Any = None          # a backend's attention kernel (adapters that take one)
        self.compact: Any = None            # a backend's kv.compact kernel (adapters that take one)

    @property
    def forked(self) -> bool:
        return bool(self._stack)

    @property
    def packed(self) -> bool:
        """Whether some physical row holds several active rows."""
        return len(set(self.phys)) < len(self.phys)

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

    def _select_phys(self, index: list[int], owners: list[Row]) -> None:
        """New physical row ``i`` is a copy of physical row ``index[i]``; one row of copied KV
        is counted against each of ``owners`` (the rows the copies were made for)."""
        per_row = self.valid.shape[1] * self._slot_bytes()
        for o in owners:
            o.kv_bytes_copied += per_row
        if index != list(range(self.n_phys)):
            self.adapter.select_rows(self.cache, torch.tensor(index))
        self.n_phys = len(index)

    def copy_rows(self, index: list[int]) -> None:
        """New valid row ``i`` is a copy of row ``index[i]`` in a physical row of its own
        (expanding rows into per-chain copies and back); not while forked."""
        assert not self._stack, "row copies of a forked state"
        owners = [self._owners[i] for i in index]
        self._select_phys([self.phys[i] for i in index], owners)
        self._owners = owners
        self.valid = self.valid[torch.tensor(index, dtype=torch.long)]
        self.phys = list(range(len(index)))

    def unpack(self) -> None:
        """Give every active row a physical row of its own (the batch layout of a fork):
        the first row on a physical row keeps it, the others get copies of it."""
        seen: set[int] = set()
        index = list(range(self.n_phys))
        owners: list[Row] = []
        for b, p in enumerate(self.phys):
            if p in seen:
                self.phys[b] = len(index)
                index.append(p)
                owners.append(self.active[b])
            seen.add(p)
        if owners:
            self._select_phys(index, owners)

    def run_layout(self, layout: StepLayout, pad_id: int, index: list[int] | None = None,
                   logits: bool = True, hidden: bool = False) -> Any:
        """Run one forward for ``layout`` (its rows are valid rows ``index``, default all);
        the new slots start out invalid. ``logits=False`` (a prompt's forward): the caller
        reads no logits, so an adapter that can skips the vocabulary projection. ``hidden``:
        returns ``(logits, hidden)``, the final hidden states [P, T, H] too (draft heads)."""
        valid = self.valid if index is None else self.valid[torch.tensor(index, dtype=torch.long)]
        ids, pos, attend = layout.inputs(valid, pad_id)
        kw = {} if logits or not getattr(self.adapter, "supports_logits_to_keep", False) else {"logits_to_keep": 1}
        if hidden:
            if not getattr(self.adapter, "supports_hidden", False):
                raise UnsupportedError(f"{type(self.adapter).__name__} does not return the model's hidden states, "
                                       "which draft.head needs: use a Hugging Face causal LM")
            kw["hidden"] = True
        if self.attention is not None:
            out = self.adapter.forward(self.cache, ids, pos, attend, structure=layout.structure(valid),
                                       attention=self.attention, **kw)
        else:
            out = self.adapter.forward(self.cache, ids, pos, attend, **kw)
        t = ids.shape[1]
        self.valid = torch.cat([self.valid, torch.zeros((self.valid.shape[0], t), dtype=torch.bool)], dim=1)
        for lv in self._stack:
            lv.valid = torch.cat([lv.valid, torch.zeros((lv.valid.shape[0], t), dtype=torch.bool)], dim=1)
        self.forwards += 1
        for r in {id(r): r for r in layout.rows}.values():
            r.forwards += 1
        assert layout.phys is not None
        for b, r in enumerate(layout.rows):       # a packed physical row's width is shared
            r.query_tokens += layout.pending[b] + len(layout.trees[b]) if self.packed else t
        return out

    def keep_slots(self, b: int, slots: list[int]) -> None:
        """Mark the given physical slots of active row ``b`` valid."""
        if slots:
            self.valid[b, torch.tensor(slots)] = True

    # -- fork / join ---------------------------------------------------------------------

    def fork(self, branches: list[list[Row]]) -> None:
        """Split active row ``b`` into the rows ``branches[b]``, which share its physical row
        and start from its validity mask; the current rows wait until ``join``."""
        level = _Level(self.rows, self.active, self.phys, self.valid, self._owners, branches, self.forwards)
        self._stack.append(level)
        self.rows = [r for bs in branches for r in bs]
        pick = [b for b, bs in enumerate(branches) for r in bs if not r.done]
        self.active = [r for r in self.rows if not r.done]
        self.phys = [level.phys[b] for b in pick]
        self.valid = level.valid[torch.tensor(pick, dtype=torch.long)] if pick else level.valid[:0]
        self._owners = list(self.active)

    def join(self) -> list[list[Row]]:
        """Restore the rows the innermost fork split; returns each active row's branch rows.
        The branches' slots are dropped (invalid) and their physical rows freed at ``settle``."""
        level = self._stack.pop()
        self.rows, self.active, self.phys, self._owners = level.rows, level.active, level.phys, level.owners
        self.valid = level.valid
        for row, branches in zip(self.active, level.branches):   # the row's cost includes its branches'
            if branches:
                row.forwards += self.forwards - level.forwards
            row.query_tokens += sum(b.query_tokens for b in branches)
            row.kv_bytes_copied += sum(b.kv_bytes_copied for b in branches)
        return level.branches

    # -- housekeeping --------------------------------------------------------------------

    def _levels(self) -> list[tuple[list[int], torch.Tensor]]:
        return [(lv.phys, lv.valid) for lv in self._stack] + [(self.phys, self.valid)]

    def _union(self) -> torch.Tensor:
        """[n_phys, S]: slots valid for some row of some level."""
        u = torch.zeros((self.n_phys, self.valid.shape[1]), dtype=torch.bool)
        for phys, valid in self._levels():
            for b, p in enumerate(phys):
                u[p] |= valid[b]
        return u

    def settle(self, copy: bool = False) -> None:
        """Drop finished rows and unused physical rows, crop the invalid tail, compact when
        holes dominate (always when there are holes, with ``copy``: the unoptimized rollback)."""
        keep = [i for i, r in enumerate(self.active) if not r.done]
        if len(keep) < len(self.active):
            idx = torch.tensor(keep, dtype=torch.long)
            self.active = [self.active[i] for i in keep]
            self._owners = [self._owners[i] for i in keep]
            self.phys = [self.phys[i] for i in keep]
            self.valid = self.valid[idx]
        used = sorted({p for phys, _ in self._levels() for p in phys})
        if used != list(range(self.n_phys)):
            if not used:
                self.n_phys = 0
                return
            owner = {}
            for lv_rows, (phys, _) in zip([lv.active for lv in self._stack] + [self.active], self._levels()):
                for r, p in zip(lv_rows, phys):
                    owner.setdefault(p, r)
            self._select_phys(used, [owner[p] for p in used])
            remap = {p: i for i, p in enumerate(used)}
            for lv in self._stack:
                lv.phys = [remap[p] for p in lv.phys]
            self.phys = [remap[p] for p in self.phys]
        if not self.active and not self._stack:
            return
        union = self._union()
        cols = union.any(dim=0).nonzero()
        length = int(cols[-1]) + 1 if len(cols) else 0
        if length < self.valid.shape[1]:
            self.adapter.truncate(self.cache, length)
            self.valid = self.valid[:, :length]
            for lv in self._stack:
                lv.valid = lv.valid[:, :length]
            union = union[:, :length]
        most = int(union.sum(dim=1).max()) if self.n_phys else 0
        if union.shape[1] > 2 * most + 64 or (copy and most < union.shape[1]):
            self._compact(union, most)

    def _compact(self, union: torch.Tensor, most: int) -> None:
        s = union.shape[1]
        # each physical row keeps its valid slots (and, short of ``most``, the last invalid ones),
        # in slot order: every kept slot moves only forward, so a kernel can compact in place
        order = torch.argsort(union.to(torch.int8), dim=1, stable=True)[:, s - most :].sort(dim=1).values
        for r in self.active:
            r.kv_bytes_copied += most * self._slot_bytes()
        self.adapter.gather_slots(self.cache, order, **({"kernel": self.compact} if self.compact else {}))
        self.valid = torch.gather(self.valid, 1, order[torch.tensor(self.phys, dtype=torch.long)]) if self.phys \
            else self.valid[:, :most]
        for lv in self._stack:
            lv.valid = (torch.gather(lv.valid, 1, order[torch.tensor(lv.phys, dtype=torch.long)]) if lv.phys
                        else lv.valid[:, :most])
