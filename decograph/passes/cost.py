"""The forward-cost curve: time for a forward over q query tokens relative to one token.

Drafting pays only when the tokens a draft is expected to add outweigh the extra cost of a
wider forward, and on a CPU that cost is far from linear (SmolLM2-135M, 2 cores: 1.0 for one
token, ~1.5 for two, ~1.7 for four to eight, ~2.1 for sixteen). A backend measures the curve
for its model and machine (the torch backend: ``decograph.backends.torch_ref.cost``); without a
measurement the conservative ``DEFAULT_CURVE`` stands in. Pure Python: the passes, the runtime
and the torch-free exported decoder all use it.
"""
from __future__ import annotations

__all__ = ["CostCurve", "DEFAULT_CURVE", "POINTS"]

POINTS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)


class CostCurve:
    """Relative cost of a forward over ``q`` query tokens, interpolated between measured points."""

    def __init__(self, points: dict[int, float]) -> None:
        self.points = dict(sorted(points.items()))

    def __call__(self, q: int) -> float:
        """The cost of feeding ``q`` query tokens, padding them to the cheapest width first."""
        return self.raw(self.best_width(q))

    def best_width(self, q: int) -> int:
        """The width >= q that is cheapest to run (small GEMMs can cost more than larger ones:
        on SmolLM2 with 2 threads a 3-token forward costs more than a 4-token one)."""
        best = q
        for w in self.points:
            if w > q and self.raw(w) < self.raw(best):
                best = w
        return best

    def raw(self, q: int) -> float:
        """The measured (interpolated) cost of exactly ``q`` query tokens."""
        if q in self.points:
            return self.points[q]
        keys = list(self.points)
        if q > keys[-1]:
            a, b = keys[-2], keys[-1]
        else:
            b = next(k for k in keys if k > q)
            a = keys[keys.index(b) - 1]
        ya, yb = self.points[a], self.points[b]
        return ya + (yb - ya) * (q - a) / (b - a)


DEFAULT_CURVE = CostCurve({1: 1.0, 2: 1.5, 3: 1.7, 4: 1.7, 8: 1.8, 16: 2.1, 32: 2.8})
