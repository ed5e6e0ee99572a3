"""``auto-tune``: draft length, window and candidate count from measured costs.

For each draft feeding a forward, the pass picks the size ``s`` with the most expected
tokens per unit of forward time,

    E(s) = 1 + sum_{i<s} prod_{j<=i} r_j         (r: the acceptance profile's rates)
    s*   = argmax_s E(s) / c(1 + s)              (c: the model's forward-cost curve)

and sets it (``window``, ``block`` or ``k``). When no size pays (``s* = 0``) the draft is
dropped from its forward, so the strategy falls back to plain decoding (``canonicalize``
then removes the dead draft). Adaptive n-gram drafts size each step themselves; for them
``k`` becomes the longest draft with a real chance (cumulative acceptance >= ``floor``), and
they are never dropped (they draft nothing, per step, where nothing pays).
Candidate counts are left to the runtime: the adaptive n-gram source adds alternative
continuations only where they fit in the forward's cheapest width.

    %3 = draft.jacobi(%2, init=repeat, window=4) : Tokens[B, 4]
    %4 = forward(%2, %3, dedup=false, layout=sequence, mask=causal) : Logits[B, 5, V]
    %5 = verify.greedy(%2, %4, %3) : Tokens[B, A]
becomes (Jacobi's ~5% acceptance does not pay for a wider forward)
    %4 = forward(%2, dedup=false, layout=sequence, mask=causal) : Logits[B, 1, V]
    %5 = verify.greedy(%2, %4) : Tokens[B, A]
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from decograph.passes.cost import DEFAULT_CURVE
from decograph.ir import ops as O
from decograph.passes.analysis import AnalysisManager
from decograph.passes.manager import Pass, PassResult
from decograph.passes.profile import AcceptanceProfile
from decograph.passes.rewrite import map_ops, rebuild

__all__ = ["AutoTune", "best_size"]

_SIZE_FIELD = {O.DraftJacobi: "window", O.DraftGaussSeidelJacobi: "block", O.DraftNgram: "k",
               O.DraftAdaptiveNgram: "k", O.DraftModel: "k"}


def best_size(rates: list[float], curve: Any, pending: int = 1) -> tuple[int, float]:
    """(s*, E(s*)/c(pending + s*)) over sizes 0..len(rates)."""
    best, best_ratio = 0, 1.0 / curve(pending)
    expected, chance = 1.0, 1.0
    for i, r in enumerate(rates):
        chance *= r
        expected += chance
        ratio = expected / curve(pending + i + 1)
        if ratio > best_ratio + 1e-12:
            best, best_ratio = i + 1, ratio
    return best, best_ratio


@dataclass(frozen=True)
class AutoTune(Pass):
    """Sizes drafts by the cost curve and acceptance; drops drafts that do not pay."""

    name: ClassVar[str] = "auto-tune"
    max_size: int = 16
    floor: float = 0.05

    def _tune(self, op: O.Op, profile: AcceptanceProfile, curve: Any, stats: dict[str, Any]) -> dict[str, int] | None:
        """The attribute changes for a draft, or None when it should be dropped."""
        field = _SIZE_FIELD.get(type(op))
        if field is None:
            if isinstance(op, O.DraftNgramPool):
                size, _ = best_size(profile.rates(op.NAME, op.n - 1), curve)
                if size:
                    return {}
                stats[f"{op.NAME}.dropped"] = stats.get(f"{op.NAME}.dropped", 0) + 1
                return None
            return {}
        current = int(getattr(op, field))
        size, _ = best_size(profile.rates(op.NAME, self.max_size), curve)
        if isinstance(op, O.DraftAdaptiveNgram) and op.adaptive:
            chance, longest = 1.0, 0
            for r in profile.rates(op.NAME, self.max_size):
                chance *= r
                if chance < self.floor:
                    break
                longest += 1
            if not size:
                # Never dropped: the source sizes each draft itself from its own row's acceptance
                # per match level (a 16-token repeat is accepted ~90% of the time where the mean
                # first-token rate over all drafts is ~10%) and from the backend's cost, and it
                # drafts nothing where nothing pays. A mean that says "never" would cost those.
                return {}
            size = max(size, longest)
        if size == 0:
            stats[f"{op.NAME}.dropped"] = stats.get(f"{op.NAME}.dropped", 0) + 1
            return None
        if size != current:
            stats[f"{op.NAME}.{field}"] = f"{current}->{size}"
            return {field: size}
        return {}

    def run(self, program: O.Program, am: AnalysisManager) -> PassResult:
        ctx = am.context
        curve = getattr(ctx, "cost_curve", None) or DEFAULT_CURVE
        profile = getattr(ctx, "acceptance", None) or AcceptanceProfile()
        stats: dict[str, Any] = {}
        dropped: set[int] = set()

        def tune(op: O.Op, vmap: dict[int, O.Value]) -> list[O.Op]:
            if isinstance(op, O.DRAFT_OPS):
                change = self._tune(op, profile, curve, stats)
                if change is None:
                    dropped.add(id(op.result))
                    return [op]
                return [rebuild(op, vmap, **change)]
            if isinstance(op, (O.Forward,) + O.VERIFY_OPS) and any(id(d) in dropped for d in op.drafts):
                return [rebuild(op, vmap, drafts=tuple(d for d in op.drafts if id(d) not in dropped))]
            return [op]

        out = map_ops(program, tune)
        return PassResult(out, out is not program, stats)
