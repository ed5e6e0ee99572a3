"""The interpreter's per-step trace records (``RunConfig.trace``, ``decograph viz``)."""
from __future__ import annotations

from typing import Any

from decograph.runtime.rows import Row

__all__ = ["trace_step"]


def trace_step(fwd: Any, b: int, row: Row, path: list[int], bonus: int, committed: list[int],
                start: int) -> dict[str, Any]:
    """The trace record of row ``b``'s step (before its counters move): the draft tree (tokens,
    parent pointers, and per node the draft op and chain that first proposed it), the accepted
    node ids and tokens, the bonus token, what was committed after EOS/budget clipping and the
    position in the generated sequence where it starts. Ints, strings and lists only."""
    tree = fwd.plan.trees[b]
    source, chain = [-1] * len(tree), [-1] * len(tree)
    k = 0
    for d, per_draft in enumerate(fwd.nodes):
        for ids in per_draft[b]:
            for node in ids:
                if source[node] < 0:
                    source[node], chain[node] = d, k
            k += 1
    return {"kind": "step", "row": row.index, "step": row.steps, "start": start,
            "draft": {"tokens": [int(t) for t in tree.tokens], "parent": list(tree.parent), "source": source,
                      "chain": chain},
            "sources": [d.source.op.NAME for d in fwd.drafts],
            "accepted": {"nodes": list(path), "tokens": [int(tree.tokens[i]) for i in path]},
            "bonus": int(bonus), "committed": [int(t) for t in committed], "done": row.done,
            "finish_reason": row.finish_reason or None}
