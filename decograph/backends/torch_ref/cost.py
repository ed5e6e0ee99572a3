"""The forward-cost curve: time for a forward over q query tokens relative to one token.

Drafting pays only when the tokens a draft is expected to add outweigh the extra cost of a
wider forward, and on a CPU that cost is far from linear (SmolLM2-135M, 2 cores: 1.0 for one
token, ~1.5 for two, ~1.7 for four to eight, ~2.1 for sixteen). The curve is measured once
per model shape and machine and cached in ``$XDG_CACHE_HOME/decograph/cost_curves.json``
(re-measured when it is not plausible, e.g. timed under load); without a measurement a
conservative default stands in.
"""
from __future__ import annotations

import json
import os
import platform
import time
from typing import Any

import torch

from decograph.measure_cache import cpu_name
from decograph.passes.cost import DEFAULT_CURVE, POINTS, CostCurve, curve_defect, plausible_curve

__all__ = ["CostCurve", "DEFAULT_CURVE", "measure_cost_curve", "cached_cost_curve"]


def measure_cost_curve(adapter: Any, context: int = 256, reps: int = 5) -> CostCurve:
    """Time of a forward over q query tokens after ``context`` cached ones, relative to q=1: the
    fastest of ``reps`` runs (after one warm-up). The widths take turns within each repetition,
    so a change in the machine's load hits them all alike, and the fastest run is the one other
    jobs disturbed least."""
    vocab = adapter.vocab_size
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        cache = adapter.new_cache(1)
        ids = torch.randint(0, vocab, (1, context), generator=gen)
        adapter.forward(cache, ids, torch.arange(context)[None], torch.ones(context, context, dtype=torch.bool).tril()[None])
        feeds = {q: (torch.randint(0, vocab, (1, q), generator=gen), torch.arange(context, context + q)[None],
                     torch.cat([torch.ones(q, context, dtype=torch.bool), torch.ones(q, q, dtype=torch.bool).tril()], 1)[None])
                 for q in POINTS}
        times = {q: float("inf") for q in POINTS}
        for rep in range(reps + 1):
            for q, (ids, pos, attend) in feeds.items():
                t = time.perf_counter()
                adapter.forward(cache, ids, pos, attend)
                if rep:
                    times[q] = min(times[q], time.perf_counter() - t)
                adapter.truncate(cache, context)
    return CostCurve({q: times[q] / times[1] for q in POINTS})


def _key(adapter: Any) -> str | None:
    own = getattr(adapter, "cost_key", None)      # adapters that are not a torch model name their own
    if own is not None:
        return json.dumps([own, torch.get_num_threads(), platform.machine(), cpu_name(), os.cpu_count()])
    model = getattr(adapter, "model", None)
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    shape = [getattr(cfg, k, None) for k in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                                              "num_attention_heads", "num_key_value_heads", "vocab_size")]
    # the fast path's kernels decide the curve's shape (MKL packed: 8 tokens ~1.5x one; plain:
    # ~2.0x), so a curve timed with other kernels is not this one
    path = getattr(adapter, "fast", None)
    fast = [getattr(path, "kernels", True), int(getattr(path, "packed_rows", 0))] if path is not None else False
    return json.dumps([shape, str(getattr(adapter, "dtype", "")), fast, torch.get_num_threads(),
                       platform.machine(), cpu_name(), os.cpu_count(), torch.__version__])


def _points(stored: dict[str, float]) -> dict[int, float]:
    return {int(q): float(c) for q, c in stored.items()}


# A forward over q query tokens never costs more than q one-token forwards (running the tokens
# one at a time would do): a curve above that was timed while other jobs shared the machine.
# Such a curve is worse than noisy: Gemma 3 270M timed under load at 2.38 for two tokens made
# the auto-tuner drop every draft (its 262k-row LM head already makes the curve steep).
SUPERLINEAR = 1.1


def _superlinear(points: dict[int, float]) -> list[tuple[float, str]]:
    """Each width timed above ``SUPERLINEAR`` times its token count: (by how much, why)."""
    return [(c / q - SUPERLINEAR, f"{q} tokens cost {c:.2f} of one token (more than {q} one-token forwards)")
            for q, c in sorted(points.items()) if q > 1 and c > SUPERLINEAR * q]


def _why_implausible(points: dict[int, float]) -> str | None:
    """``plausible_curve``'s verdict, and the super-linear rule above."""
    found = [why for _, why in _superlinear(points)]
    base = plausible_curve(points)
    return "; ".join(([base] if base else []) + found) or None


def _defect(points: dict[int, float]) -> float:
    return curve_defect(points) + sum(excess for excess, _ in _superlinear(points))


def cached_cost_curve(adapter: Any) -> CostCurve:
    """The adapter's measured curve, measuring and caching it on first use (announced on
    stderr; seconds on an idle machine). A curve that cannot be right (``plausible_curve``, or
    a width dearer than its token count of one-token forwards: timing noise from other jobs)
    is measured again, cached or not."""
    from decograph.measure_cache import cached

    key = _key(adapter)
    if key is None:
        return DEFAULT_CURVE
    points = cached("cost_curves.json", key,
                    lambda: {str(q): c for q, c in measure_cost_curve(adapter).points.items()},
                    what="the forward-cost curve of this model",
                    eta="a few seconds, a minute or two on a busy machine",
                    check=lambda stored: _why_implausible(_points(stored)),
                    rank=lambda stored: _defect(_points(stored)))
    return CostCurve(_points(points))
