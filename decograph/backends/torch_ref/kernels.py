"""The torch reference kernels: the definition every other backend's kernels must match.

See ``decograph.backends.base`` for the kernel slots and their signatures.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["verify_greedy", "unmask_confidence", "kv_compact", "tree_attention", "ancestors", "StructuredMask"]


def verify_greedy(logits: torch.Tensor, tokens: torch.Tensor, parents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Argmax per node, and whether each node's path from the root matches the argmax."""
    argmax = logits.argmax(-1)
    ok = torch.ones(len(tokens), dtype=torch.bool)
    match = (tokens == argmax[parents.clamp_min(0)]).tolist()
    par = parents.tolist()
    for i in range(1, len(par)):
        ok[i] = bool(match[i]) and bool(ok[par[i]])
    return argmax, ok


def unmask_confidence(logits: torch.Tensor, mask_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Max softmax probability and argmax per row, the mask token excluded."""
    lg = logits.float().clone()
    lg[:, mask_id] = float("-inf")
    return torch.softmax(lg, -1).max(-1)


def kv_compact(cache: torch.Tensor, row: int, keep: torch.Tensor) -> None:
    """Slots ``keep`` (ascending) of ``cache[row]`` moved to slots ``0..len(keep)-1``, in place."""
    cache[row, : len(keep)] = cache[row, keep].clone()


def ancestors(parents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Depth of every node (roots: parent -1, depth 0) and ``anc [T, max_depth + 1]``:
    ``anc[i, d]`` is i's ancestor at depth d (i itself at its own depth; -1 past it). A node j
    is visible to i iff ``anc[i, depth[j]] == j``: the structural mask, O(T * depth)."""
    par = parents.tolist()
    depth = [0] * len(par)
    for i, p in enumerate(par):
        if p >= i:
            raise ValueError(f"tree node {i} has parent {p}: parents must precede their children")
        depth[i] = depth[p] + 1 if p >= 0 else 0
    width = max(depth, default=0) + 1
    anc = torch.full((len(par), width), -1, dtype=torch.int32)
    for i in range(len(par)):
        j = i
        while j >= 0:
            anc[i, depth[j]] = j
            j = par[j]
    return torch.tensor(depth, dtype=torch.int32), anc


@dataclass(frozen=True)
class StructuredMask:
    """A step's attention pattern without a T x T tensor: per physical row ``b``, query ``i``
    belongs to segment ``seg[b, i]``, sees cache slot ``j < S`` iff ``prefix_valid[b,
    seg[b, i], j]``, and sees query ``j`` iff j is i or an ancestor of i (``parents[b]``: -1
    for roots, parents before children)."""

    parents: torch.Tensor          # [B, T] long
    seg: torch.Tensor              # [B, T] long
    prefix_valid: torch.Tensor     # [B, G, S] bool

    def dense(self) -> torch.Tensor:
        """The bool [B, T, S + T] pattern (for the reference and for tests)."""
        rows = []
        for b in range(self.parents.shape[0]):
            depth, anc = ancestors(self.parents[b])
            t = len(depth)
            tree = anc[:, depth.long()] == torch.arange(t, dtype=torch.int32)[None, :]
            rows.append(torch.cat([self.prefix_valid[b, self.seg[b]], tree], 1))
        return torch.stack(rows)


def tree_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: StructuredMask,
                   scale: float) -> torch.Tensor:
    """Attention of ``q [B, H, T, D]`` over ``k, v [B, Hkv, S + T, D]`` (the cache, then the
    queries' own slots; H a multiple of Hkv) under ``mask``. Materializes the dense mask: this
    is the reference, not the kernel. Returns ``[B, H, T, D]``."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1).float(), v.repeat_interleave(groups, 1).float()
    att = (q.float() @ k.transpose(-1, -2)) * scale
    att = att.masked_fill(~mask.dense()[:, None], float("-inf"))
    return (torch.softmax(att, -1) @ v).to(q.dtype)
