"""Acceptance profiles: how often each draft source's tokens are accepted, by position.

The auto-tuner reads them. A profile starts from per-source priors (measured on SmolLM2-135M,
Spec-Bench: Jacobi guesses are right ~5% of the time, n-gram copies ~40% for the first token
and ~75% for each later one) and takes in what runs observe (``observe``), so a strategy is
re-tuned to the acceptance the model and workload really show.
"""
from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["AcceptanceProfile", "PRIORS"]

# Per source: chance the first draft token is accepted, then each later one given the one before.
PRIORS: dict[str, tuple[float, ...]] = {
    "draft.jacobi": (0.05, 0.3),
    "draft.gauss_seidel_jacobi": (0.05, 0.3),
    "draft.ngram": (0.35, 0.7, 0.75, 0.8),
    "draft.adaptive_ngram": (0.4, 0.7, 0.8, 0.85),
    "draft.ngram_pool": (0.12, 0.5),
    "draft.model": (0.7, 0.8),
}
_WEIGHT = 20.0        # the prior counts as this many observed steps per position


@dataclass
class AcceptanceProfile:
    """Per draft-op name: accepted/tried counts per draft position (conditional)."""

    hits: dict[str, list[float]] = field(default_factory=dict)
    tries: dict[str, list[float]] = field(default_factory=dict)

    def rates(self, name: str, length: int) -> list[float]:
        """Chance that draft token ``i`` is accepted given tokens ``0..i-1`` were, i < length."""
        prior = PRIORS.get(name, (0.3, 0.6))
        out = []
        for i in range(length):
            p = prior[min(i, len(prior) - 1)]
            h = self.hits.get(name, [])
            t = self.tries.get(name, [])
            hi, ti = (h[i], t[i]) if i < len(t) else (0.0, 0.0)
            out.append((hi + _WEIGHT * p) / (ti + _WEIGHT))
        return out

    def observe(self, name: str, accepted: list[int], drafted: list[int]) -> None:
        """Take in steps that drafted ``drafted[s]`` tokens and accepted ``accepted[s]``."""
        h = self.hits.setdefault(name, [])
        t = self.tries.setdefault(name, [])
        for a, d in zip(accepted, drafted):
            for i in range(min(d, 64)):
                if i > a:
                    break
                while len(t) <= i:
                    t.append(0.0)
                    h.append(0.0)
                t[i] += 1
                h[i] += i < a

    def key(self) -> tuple[tuple[str, tuple[float, ...]], ...]:
        """A hashable summary (rates rounded), for caching tuned programs."""
        return tuple((n, tuple(round(r, 2) for r in self.rates(n, 4))) for n in sorted(self.tries))
