"""The forward-cost curve: time for a forward over q query tokens relative to one token.

Drafting pays only when the tokens a draft is expected to add outweigh the extra cost of a
wider forward, and on a CPU that cost is far from linear (SmolLM2-135M, 2 cores: 1.0 for one
token, ~1.5 for two, ~1.7 for four to eight, ~2.1 for sixteen). A backend measures the curve
for its model and machine (the torch backend: ``decograph.backends.torch_ref.cost``); without a
measurement the conservative ``DEFAULT_CURVE`` stands in; ``plausible_curve`` rejects a
measurement that timing noise spoiled. Pure Python: the passes, the runtime
and the torch-free exported decoder all use it.
"""
from __future__ import annotations

import math

__all__ = ["CostCurve", "DEFAULT_CURVE", "POINTS", "curve_defect", "plausible_curve"]

POINTS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)


class CostCurve:
    """Relative cost of a forward over ``q`` query tokens, interpolated between measured points.
    Its points are fixed once made; costs asked for are remembered (drafting asks for the same
    few widths thousands of times a request)."""

    def __init__(self, points: dict[int, float]) -> None:
        self.points = dict(sorted(points.items()))
        self._known: dict[int, float] = {}

    def __call__(self, q: int) -> float:
        """The cost of feeding ``q`` query tokens, padding them to the cheapest width first."""
        c = self._known.get(q)
        if c is None:
            c = self._known[q] = self.raw(self.best_width(q))
        return c

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
            # past the widest measured forward the work grows with the tokens: never assume a
            # wider step costs less per token than the widest one timed (a flat measured tail
            # extrapolated linearly made 256 query tokens look as cheap as 20)
            last = keys[-1]
            return self.points[last] * q / last
        else:
            b = next(k for k in keys if k > q)
            a = keys[keys.index(b) - 1]
        ya, yb = self.points[a], self.points[b]
        return ya + (yb - ya) * (q - a) / (b - a)


DEFAULT_CURVE = CostCurve({1: 1.0, 2: 1.5, 3: 1.7, 4: 1.7, 8: 1.8, 16: 2.1, 32: 2.8})


# A wider forward never costs much less than a narrower one: it does the same work and more.
# Timing noise on a busy machine is what breaks that, so the tolerances only catch noise:
# small GEMMs do vary (SmolLM2 on 2 threads: 3 tokens ~1.9, 4 tokens ~1.7, which passes), and
# a few rows can even cost a little less than one where one row takes another kernel (the
# torch fast path's oneDNN products: one row a matrix-vector product over the plain weights,
# 3 to 6 rows a blocked GEMM, timed at 0.96-0.97 of one token), whereas a width timed well
# below one token's cost is noise for sure.
FLOOR = 0.9           # no width below this fraction of one token's cost
MONOTONE = 0.8        # no width below this fraction of any narrower width's cost


def _shortfalls(points: dict[int, float]) -> list[tuple[float, str]]:
    """Each width that falls short of a plausible curve, in order: (by how much, why)."""
    if not points:
        return [(1.0, "no points")]
    out: list[tuple[float, str]] = []
    if not abs(points.get(1, math.nan) - 1.0) <= 1e-6:           # NaN fails too
        out.append((1.0, f"cost(1) is {points.get(1)}, not 1"))
    peak, peak_cost = 1, 0.0
    for w, c in sorted(points.items()):
        if not math.isfinite(c):
            out.append((1.0, f"cost({w}) is {c}"))
            continue
        found = [(FLOOR - c, f"{w} tokens cost {c:.2f} of one token (below {FLOOR})"),
                 (MONOTONE * peak_cost - c, f"{w} tokens cost {c:.2f}, below {MONOTONE} of {peak} tokens' {peak_cost:.2f}")]
        worst = max(found)
        if worst[0] > 0:
            out.append(worst)
        if c > peak_cost:
            peak, peak_cost = w, c
    return out


def plausible_curve(points: dict[int, float]) -> str | None:
    """Why the measured relative costs ``points`` (width -> cost, ``points[1] == 1``) cannot
    be a real cost curve, or ``None`` when they can: every width costs at least ``FLOOR`` of
    one token, and none less than ``MONOTONE`` of a narrower one. A curve timed while other
    jobs shared the machine fails this (8 tokens at 0.87 of one token); measure it again.
    """
    found = [why for _, why in _shortfalls(points)]
    if len(found) > 2:
        found = found[:2] + [f"{len(found) - 2} more"]
    return "; ".join(found) or None


def curve_defect(points: dict[int, float]) -> float:
    """How far ``points`` is from plausible (0 when ``plausible_curve`` passes it): the sum of
    its shortfalls, to keep the least bad of several implausible measurements."""
    return sum(by for by, _ in _shortfalls(points))
