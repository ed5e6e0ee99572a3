"""``speculative-batching``: many draft candidates, one deduplicated token tree.

- An n-gram draft (``draft.ngram``, ``draft.adaptive_ngram``) that proposes one continuation
  proposes up to ``candidates``: the continuations of that many distinct earlier matches,
  across match levels (the longest suffix match first).
- A forward over several chains (candidates, a lookahead pool beside a Jacobi window)
  merges them into a trie (``dedup=true``): chains sharing a prefix share its nodes, each
  node gets the position prefix length + depth, and the tree is verified in one forward once
  mask fusion has fused it. Rows of a batch keep their own trees and accept ragged counts.

How many candidates really run is the runtime's call per step: the adaptive n-gram source
adds alternative continuations only where they fit in the forward's cheapest width.

    %3 = draft.adaptive_ngram(%2, adaptive=true, candidates=1, k=8, max_n=4, min_n=2) : Tokens[B, 8]
    %4 = forward(%2, %3, dedup=false, layout=sequence, mask=causal) : Logits[B, 9, V]
becomes
    %3 = draft.adaptive_ngram(%2, adaptive=true, candidates=4, k=8, max_n=4, min_n=2) : Tokens[B, 4, 8]
    %4 = forward(%2, %3, dedup=true, layout=sequence, mask=causal) : Logits[B, 33, V]
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from decograph.errors import PassError
from decograph.ir import ops as O
from decograph.passes.analysis import AnalysisManager
from decograph.passes.manager import Pass, PassResult
from decograph.passes.rewrite import map_ops, rebuild

__all__ = ["SpeculativeBatching"]

_WIDENED = (O.DraftNgram, O.DraftAdaptiveNgram)


@dataclass(frozen=True)
class SpeculativeBatching(Pass):
    """Widens n-gram drafts to ``candidates`` continuations and dedups multi-chain forwards."""

    name: ClassVar[str] = "speculative-batching"
    candidates: int = 4

    def run(self, program: O.Program, am: AnalysisManager) -> PassResult:
        if not 1 <= self.candidates <= O.MAX_DRAFT:
            raise PassError(f"speculative-batching: candidates must be in 1..{O.MAX_DRAFT}, not {self.candidates}")
        stats: dict[str, int] = {}

        def widen(op: O.Op, vmap: dict[int, O.Value]) -> list[O.Op]:
            if isinstance(op, _WIDENED) and op.candidates == 1 and self.candidates > 1:
                stats["drafts_widened"] = stats.get("drafts_widened", 0) + 1
                return [rebuild(op, vmap, candidates=self.candidates)]
            if isinstance(op, O.Forward) and not op.dedup and op.mask != "block":
                chains = sum(O.draft_chains(d.type) if isinstance(O.draft_chains(d.type), int) else 2
                             for d in op.drafts)
                if chains > 1:
                    stats["forwards_deduped"] = stats.get("forwards_deduped", 0) + 1
                    return [rebuild(op, vmap, dedup=True)]
            return [op]

        out = map_ops(program, widen)
        return PassResult(out, out is not program, stats)
