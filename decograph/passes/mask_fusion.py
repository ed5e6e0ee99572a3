"""``mask-fusion``: one forward per step instead of one per candidate chain.

A ``forward`` with ``mask=causal`` over several chains (a Jacobi window beside n-gram
candidates, several n-gram matches, a lookahead pool) runs one causal forward per chain.
Fusion turns it into a single forward under a structural tree mask: every query attends to
the cached prefix, the pending tokens, and its own ancestors (parent pointers; the mask is
only materialized by the backend). The chains are packed into each row's sequence
(``layout=sequence``, sharing the prefix's KV in place) or laid out as batch rows that copy
the prefix's KV (``layout=batch``); ``layout=auto`` picks the cheaper by the cost model at
context length ``context``. A causal forward over a forked state (one forward per branch)
becomes one ``mask=packed`` forward: each branch a segment of its row's sequence.

    %5 = forward(%2, %3, %4, dedup=false, layout=sequence, mask=causal) : Logits[B, 14, V]
becomes
    %5 = forward(%2, %3, %4, dedup=false, layout=sequence, mask=tree) : Logits[B, 14, V]
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from decograph.passes.cost import DEFAULT_CURVE
from decograph.errors import PassError
from decograph.ir import ops as O
from decograph.passes.analysis import AnalysisManager, ForwardCost
from decograph.passes.manager import Pass, PassResult
from decograph.passes.rewrite import map_ops, rebuild

__all__ = ["MaskFusion", "choose_layout", "choose_branch_layout"]

# Relative cost of copying one slot of KV for one row, per unit of one-token forward time
# (SmolLM2-135M: 46 KB per slot, ~10 GB/s, ~20 ms per token).
_COPY_PER_SLOT = 2.5e-4


def choose_layout(cost: ForwardCost, curve: Any, context: int) -> str:
    """``sequence`` or ``batch``, whichever the cost model says is cheaper per step.

    Packed, the forward has ``P + nodes`` queries; as batch rows, ``C * (P + K)`` queries
    (the same GEMM rows, the pending tokens repeated per copy) plus copying the prefix's
    KV into and out of ``C`` copies. Evaluated with one pending token. With one cost curve
    for both (the torch backend's), packing never loses; ``batch`` is there for backends
    whose curve for a dense tree mask is steeper than for plain causal rows.
    """
    chains = cost.evaluate(cost.chains)
    separate = cost.evaluate(cost.queries, A=0, S=context)       # C*P + nodes with P = 1
    packed = curve(max(1, round(separate - (chains - 1))))
    batch = curve(max(1, round(separate))) + 2 * chains * context * _COPY_PER_SLOT
    return "sequence" if packed <= batch else "batch"


def choose_branch_layout(cost: ForwardCost, curve: Any, context: int) -> str:
    """Fork branches: packed into the row's sequence (the prefix's KV shared in place) or one
    batch row each (the prefix's KV copied once per extra branch). The same query tokens
    either way, so packing wins unless the backend's curve prices a packed mask higher."""
    queries = max(1, round(cost.evaluate(cost.queries, A=0, S=context)))
    branches = cost.evaluate(cost.chains)
    packed = curve(queries)
    batch = curve(queries) + (branches - 1) * context * _COPY_PER_SLOT
    return "sequence" if packed <= batch else "batch"


@dataclass(frozen=True)
class MaskFusion(Pass):
    """Fuses multi-chain causal forwards into one tree-masked forward."""

    name: ClassVar[str] = "mask-fusion"
    layout: str = "auto"
    context: int = 512

    def run(self, program: O.Program, am: AnalysisManager) -> PassResult:
        if self.layout not in ("auto", "sequence", "batch"):
            raise PassError(f"mask-fusion: layout must be auto, sequence or batch, not {self.layout!r}")
        costs: dict[int, ForwardCost] = am.get("cost", program)
        curve = getattr(am.context, "cost_curve", None) or DEFAULT_CURVE
        fused: dict[str, int] = {}

        def fuse(op: O.Op, vmap: dict[int, O.Value]) -> list[O.Op]:
            cost = costs.get(id(op)) if isinstance(op, O.Forward) else None
            if cost is None or op.mask != "causal" or cost.evaluate(cost.chains) <= 1:
                return [op]
            forked = bool(op.state.type.shape)
            if self.layout != "auto":
                layout = self.layout
            else:
                layout = (choose_branch_layout if forked else choose_layout)(cost, curve, self.context)
            fused[layout] = fused.get(layout, 0) + 1
            fused["forwards_per_step_before"] = fused.get("forwards_per_step_before", 0) + int(cost.evaluate(cost.forwards))
            return [rebuild(op, vmap, mask="packed" if forked else "tree", layout=layout)]

        out = map_ops(program, fuse)
        stats = {f"fused_{k}" if k in ("sequence", "batch") else k: v for k, v in fused.items()}
        return PassResult(out, out is not program, stats)
