"""Rows and draft trees: what the runtime decodes, in plain Python (no torch).

A row's committed tokens are ``tokens``; the first ``cached`` of them have KV in the
backend's cache; the rest (at least the last token, the *root*) are fed at the next forward.
Each step feeds, per row, the uncached tokens followed by a draft *tree* (nodes with parent
pointers; a linear draft is a chain), verified by the runtime and committed back.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Row", "DraftTree"]


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
    draft_s: float = 0.0            # seconds its draft sources took to propose (head calls included)
    scratch: dict[int, Any] = field(default_factory=dict)  # per draft op: source memory
    branch: int = -1                # a fork's branch rows: the branch index (-1: a top-level row)
    parent: "Row | None" = None     # a branch row: the row it was forked from
    prompt: str = ""                # a branch row: its branch prompt (text), metadata in ``meta``
    fork_at: int = 0                # a branch row: where its branch prompt starts in ``tokens``
    meta: dict[str, Any] = field(default_factory=dict)
    logprobs: list[float] = field(default_factory=list)  # branch rows: log p of each committed token
    results: list[Any] = field(default_factory=list)     # what joins left on this row
    sampling: Any = None            # a ``verify.RowSampling``: the row's own verification (servers)

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
