"""The forward-cost curve: interpolation, the cheapest padded width, and padded forwards
keeping tokens exact."""
from __future__ import annotations

from decograph.backends.torch_ref import Interpreter, RunConfig
from decograph.passes.cost import CostCurve
from decograph.models.adapters import as_adapter
from decograph.frontends.strategies import load_strategy
from decograph.models.oracle import OracleLM

BUMPY = CostCurve({1: 1.0, 2: 3.0, 3: 3.0, 4: 1.5, 8: 2.0, 16: 4.0})


def test_interpolation_and_best_width():
    assert BUMPY.raw(6) == 1.75
    assert BUMPY.best_width(2) == 4 and BUMPY.best_width(3) == 4
    assert BUMPY.best_width(1) == 1 and BUMPY.best_width(9) == 9
    assert BUMPY(2) == 1.5 and BUMPY(12) == BUMPY.raw(12) == 3.0


def test_padded_widths_keep_tokens_exact():
    oracle = OracleLM(vocab_size=32, period=4)
    prompts = [[3, 1, 4], [7, 2, 9, 9, 1], [5]]
    for name in ("ngram", "anpd", "jacobi", "lookahead"):
        interp = Interpreter(load_strategy(name).program, as_adapter(oracle), RunConfig(max_new_tokens=24, cost_curve=BUMPY))
        list(interp.run(prompts))
        for row, p in zip(interp.state.rows, prompts):
            assert row.new_tokens == oracle.reference(p, 24), name
