"""``auto-tune``: draft sizes from the cost curve and the acceptance profile; drafts that do not
pay are dropped from their forward and verify (plain decoding as the fallback).

The numbers are worked by hand on a linear cost curve ``c(q) = 0.9 + 0.1 q`` (``LINEAR``),
``E(s) = 1 + sum_{i<s} prod_{j<=i} r_j`` and ``s* = argmax E(s) / c(1 + s)``.
"""
from __future__ import annotations

import pytest
from helpers import check_pass

from decograph.passes.cost import CostCurve
from decograph.passes.auto_tune import AutoTune, best_size
from decograph.passes.manager import PassContext
from decograph.passes.profile import AcceptanceProfile

LINEAR = CostCurve({1: 1.0, 2: 1.1, 4: 1.3, 8: 1.7, 16: 2.5, 32: 4.1})      # c(q) = 0.9 + 0.1 q


def jacobi(window: int) -> str:
    return f"""
    strategy jacobi {{
      %0 = prefill(%prompt) : State
      %1 = iterate(%0, max_steps=0, until=[eos, max_new_tokens]) : State {{
      ^(%2: State):
        %3 = draft.jacobi(%2, init=repeat, window={window}) : Tokens[B, {window}]
        %4 = forward(%2, %3, dedup=false, layout=sequence, mask=causal) : Logits[B, {window + 1}, V]
        %5 = verify.greedy(%2, %4, %3) : Tokens[B, A]
        %6 = commit(%2, %5, kv=keep_accepted, rollback=copy) : State
        yield(%6)
      }}
      %7 = emit(%1) : Tokens[B, G]
    }}
    """


JACOBI_DROPPED = """
strategy jacobi {
  %0 = prefill(%prompt) : State
  %1 = iterate(%0, max_steps=0, until=[eos, max_new_tokens]) : State {
  ^(%2: State):
    %3 = draft.jacobi(%2, init=repeat, window=4) : Tokens[B, 4]
    %4 = forward(%2, dedup=false, layout=sequence, mask=causal) : Logits[B, 1, V]
    %5 = verify.greedy(%2, %4) : Tokens[B, A]
    %6 = commit(%2, %5, kv=keep_accepted, rollback=copy) : State
    yield(%6)
  }
  %7 = emit(%1) : Tokens[B, G]
}
"""


def high_acceptance() -> AcceptanceProfile:
    """380 Jacobi steps that drafted 4 tokens and accepted all 4."""
    profile = AcceptanceProfile()
    for _ in range(38):
        profile.observe("draft.jacobi", accepted=[4] * 10, drafted=[4] * 10)
    return profile


@pytest.mark.parametrize("context", [None, PassContext(cost_curve=LINEAR)], ids=["default-curve", "linear-curve"])
def test_jacobi_dropped_with_the_priors(context: PassContext | None) -> None:
    """Priors 0.05 then 0.3: E(1)/c(2) = 1.05/1.1 < 1 = E(0)/c(1), and wider is worse."""
    pm = check_pass(AutoTune(), jacobi(4), JACOBI_DROPPED, context)
    [rec] = pm.report
    assert (rec.name, rec.changed, rec.stats) == ("auto-tune", True, {"draft.jacobi.dropped": 1})


def test_dropped_draft_is_then_removed_by_canonicalize() -> None:
    after = """
    strategy jacobi {
      %0 = prefill(%prompt) : State
      %1 = iterate(%0, max_steps=0, until=[eos, max_new_tokens]) : State {
      ^(%2: State):
        %3 = forward(%2, dedup=false, layout=sequence, mask=causal) : Logits[B, 1, V]
        %4 = verify.greedy(%2, %3) : Tokens[B, A]
        %5 = commit(%2, %4, kv=keep_accepted, rollback=copy) : State
        yield(%5)
      }
      %6 = emit(%1) : Tokens[B, G]
    }
    """
    pm = check_pass("auto-tune,canonicalize", jacobi(4), after)
    assert [(r.name, r.stats) for r in pm.report] == [
        ("auto-tune", {"draft.jacobi.dropped": 1}), ("canonicalize", {"rewrites": 1})]


def test_window_kept_when_acceptance_is_high() -> None:
    """Observed rates 381/400 = 0.9525, then 386/400 = 0.965 (x3), then the 0.3 prior:
    E(s)/c(1+s) = 1, 1.775, 2.393, 2.891, 3.296 (s=4), 3.248: the window of 4 stays."""
    ctx = PassContext(cost_curve=LINEAR, acceptance=high_acceptance())
    assert ctx.acceptance.rates("draft.jacobi", 5) == pytest.approx([0.9525, 0.965, 0.965, 0.965, 0.3])
    [rec] = check_pass(AutoTune(), jacobi(4), jacobi(4), ctx).report
    assert (rec.changed, rec.stats) == (False, {})


def test_window_widened_to_the_best_size() -> None:
    ctx = PassContext(cost_curve=LINEAR, acceptance=high_acceptance())
    [rec] = check_pass(AutoTune(), jacobi(2), jacobi(4), ctx).report
    assert (rec.changed, rec.stats) == (True, {"draft.jacobi.window": "2->4"})


def test_prompt_lookup_k_from_the_priors() -> None:
    """Priors 0.35, 0.7, 0.75, 0.8, 0.8...: E(s)/c(1+s) = 1.227, 1.329, 1.368, 1.376 (s=4), 1.362."""
    before = """
    strategy ngram {
      %0 = prefill(%prompt) : State
      %1 = iterate(%0, max_steps=0, until=[eos, max_new_tokens]) : State {
      ^(%2: State):
        %3 = draft.ngram(%2, candidates=1, k=8, max_n=3, min_n=1) : Tokens[B, 8]
        %4 = forward(%2, %3, dedup=false, layout=sequence, mask=causal) : Logits[B, 9, V]
        %5 = verify.greedy(%2, %4, %3) : Tokens[B, A]
        %6 = commit(%2, %5, kv=keep_accepted, rollback=copy) : State
        yield(%6)
      }
      %7 = emit(%1) : Tokens[B, G]
    }
    """
    after = """
    strategy ngram {
      %0 = prefill(%prompt) : State
      %1 = iterate(%0, max_steps=0, until=[eos, max_new_tokens]) : State {
      ^(%2: State):
        %3 = draft.ngram(%2, candidates=1, k=4, max_n=3, min_n=1) : Tokens[B, 4]
        %4 = forward(%2, %3, dedup=false, layout=sequence, mask=causal) : Logits[B, 5, V]
        %5 = verify.greedy(%2, %4, %3) : Tokens[B, A]
        %6 = commit(%2, %5, kv=keep_accepted, rollback=copy) : State
        yield(%6)
      }
      %7 = emit(%1) : Tokens[B, G]
    }
    """
    pm = check_pass(AutoTune(), before, after, PassContext(cost_curve=LINEAR))
    assert pm.report[0].stats == {"draft.ngram.k": "8->4"}


def adaptive(k: int) -> str:
    return f"""
    strategy anpd {{
      %0 = prefill(%prompt) : State
      %1 = iterate(%0, max_steps=0, until=[eos, max_new_tokens]) : State {{
      ^(%2: State):
        %3 = draft.adaptive_ngram(%2, adaptive=true, candidates=1, k={k}, max_n=4, min_n=2) : Tokens[B, {k}]
        %4 = forward(%2, %3, dedup=false, layout=sequence, mask=causal) : Logits[B, {k + 1}, V]
        %5 = verify.greedy(%2, %4, %3) : Tokens[B, A]
        %6 = commit(%2, %5, kv=keep_accepted, rollback=copy) : State
        yield(%6)
      }}
      %7 = emit(%1) : Tokens[B, G]
    }}
    """


@pytest.mark.parametrize("floor, k", [(0.05, 12), (0.2, 5)])
def test_adaptive_ngram_k_is_the_longest_draft_with_a_chance(floor: float, k: int) -> None:
    """Priors 0.4, 0.7, 0.8, 0.85...: s* = 5 on LINEAR; the cumulative chance 0.4, 0.28, 0.224,
    0.19, ... stays >= 0.05 for 12 tokens and >= 0.2 for 3, so k = max(5, longest)."""
    pm = check_pass(AutoTune(floor=floor), adaptive(8), adaptive(k), PassContext(cost_curve=LINEAR))
    assert pm.report[0].stats == {"draft.adaptive_ngram.k": f"8->{k}"}


def test_adaptive_ngram_is_kept_when_the_mean_acceptance_says_drafting_never_pays() -> None:
    """A profile of rejected drafts makes s* = 0: a plain n-gram draft would be dropped, the
    adaptive one stays as written (it drafts per row and match level, and only what pays)."""
    from decograph.passes.profile import AcceptanceProfile

    profile = AcceptanceProfile()
    profile.observe("draft.adaptive_ngram", [0] * 500, [4] * 500)
    ctx = PassContext(cost_curve=LINEAR, acceptance=profile)
    pm = check_pass(AutoTune(), adaptive(8), adaptive(8), ctx)
    assert pm.report[0].stats == {}


GREEDY = """
strategy greedy {
  %0 = prefill(%prompt) : State
  %1 = iterate(%0, max_steps=0, until=[eos, max_new_tokens]) : State {
  ^(%2: State):
    %3 = forward(%2, dedup=false, layout=sequence, mask=causal) : Logits[B, 1, V]
    %4 = verify.greedy(%2, %3) : Tokens[B, A]
    %5 = commit(%2, %4, kv=keep_accepted, rollback=copy) : State
    yield(%5)
  }
  %6 = emit(%1) : Tokens[B, G]
}
"""


def test_no_draft_is_a_no_op() -> None:
    [rec] = check_pass(AutoTune(), GREEDY, GREEDY).report
    assert (rec.changed, rec.stats) == (False, {})


LOOKAHEAD = """
strategy lookahead {
  %0 = prefill(%prompt) : State
  %1 = iterate(%0, max_steps=0, until=[eos, max_new_tokens]) : State {
  ^(%2: State):
    %3 = draft.jacobi(%2, init=repeat, window=4) : Tokens[B, 4]
    %4 = draft.ngram_pool(%2, candidates=3, n=4) : Tokens[B, 3, 3]
    %5 = forward(%2, %3, %4, dedup=false, layout=sequence, mask=causal) : Logits[B, 14, V]
    %6 = verify.greedy(%2, %5, %3, %4) : Tokens[B, A]
    %7 = commit(%2, %6, kv=keep_accepted, rollback=copy) : State
    yield(%7)
  }
  %8 = emit(%1) : Tokens[B, G]
}
"""

LOOKAHEAD_DROPPED = """
strategy lookahead {
  %0 = prefill(%prompt) : State
  %1 = iterate(%0, max_steps=0, until=[eos, max_new_tokens]) : State {
  ^(%2: State):
    %3 = draft.jacobi(%2, init=repeat, window=4) : Tokens[B, 4]
    %4 = draft.ngram_pool(%2, candidates=3, n=4) : Tokens[B, 3, 3]
    %5 = forward(%2, dedup=false, layout=sequence, mask=causal) : Logits[B, 1, V]
    %6 = verify.greedy(%2, %5) : Tokens[B, A]
    %7 = commit(%2, %6, kv=keep_accepted, rollback=copy) : State
    yield(%7)
  }
  %8 = emit(%1) : Tokens[B, G]
}
"""


def test_lookahead_with_the_priors_falls_back_to_plain_decoding() -> None:
    """Pool priors 0.12, 0.5: E(1)/c(2) = 1.12/1.5 < 1 on the default curve, so both go."""
    check_pass(AutoTune(), LOOKAHEAD, LOOKAHEAD_DROPPED)


def test_lookahead_dropped_pool_is_counted() -> None:
    pm = check_pass(AutoTune(), LOOKAHEAD, LOOKAHEAD_DROPPED)
    assert pm.report[0].stats == {"draft.jacobi.dropped": 1, "draft.ngram_pool.dropped": 1}


def _line(q: int) -> float:
    return 1 + 0.25 * (q - 1)


@pytest.mark.parametrize("rates, curve, pending, expected", [
    # E = 1, 1.8, 2.2, 2.24 over c = 1, 1.25, 1.5, 1.75: ratios 1, 1.44, 1.4667, 1.28
    ([0.8, 0.5, 0.1], _line, 1, (2, 2.2 / 1.5)),
    # two pending tokens shift the curve: ratios 0.8, 1.2, 1.2571, 1.12
    ([0.8, 0.5, 0.1], _line, 2, (2, 2.2 / 1.75)),
    ([0.1], _line, 1, (0, 1.0)),            # 1.1 / 1.25 < 1: nothing pays
    ([0.25], _line, 1, (0, 1.0)),           # 1.25 / 1.25 ties: the smaller size wins
    ([], lambda q: 2.0, 1, (0, 0.5)),
    ([0.9525, 0.965, 0.965, 0.965, 0.3, 0.3], LINEAR, 1, (4, 4.6146 / 1.4)),
])
def test_best_size_by_hand(rates, curve, pending, expected) -> None:
    size, ratio = best_size(rates, curve, pending)
    assert size == expected[0]
    assert ratio == pytest.approx(expected[1], abs=1e-4)
