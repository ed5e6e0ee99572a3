"""``speculative-batching``: single-continuation n-gram drafts propose ``candidates`` chains and
multi-chain forwards merge their chains into a trie (``dedup=true``)."""
from __future__ import annotations

import pytest
from helpers import check_pass

from decograph.errors import PassError
from decograph.ir.parser import parse_program
from decograph.passes.manager import PassManager
from decograph.passes.speculative_batching import SpeculativeBatching

ANPD = """
strategy anpd {
  %0 = prefill(%prompt) : State
  %1 = iterate(%0, max_steps=0, until=[eos, max_new_tokens]) : State {
  ^(%2: State):
    %3 = draft.adaptive_ngram(%2, adaptive=true, candidates=1, k=8, max_n=4, min_n=2) : Tokens[B, 8]
    %4 = forward(%2, %3, dedup=false, layout=sequence, mask=causal) : Logits[B, 9, V]
    %5 = verify.greedy(%2, %4, %3) : Tokens[B, A]
    %6 = commit(%2, %5, kv=keep_accepted, rollback=copy) : State
    yield(%6)
  }
  %7 = emit(%1) : Tokens[B, G]
}
"""


def test_adaptive_ngram_widened_to_four_candidates_and_deduped() -> None:
    after = """
    strategy anpd {
      %0 = prefill(%prompt) : State
      %1 = iterate(%0, max_steps=0, until=[eos, max_new_tokens]) : State {
      ^(%2: State):
        %3 = draft.adaptive_ngram(%2, adaptive=true, candidates=4, k=8, max_n=4, min_n=2) : Tokens[B, 4, 8]
        %4 = forward(%2, %3, dedup=true, layout=sequence, mask=causal) : Logits[B, 33, V]
        %5 = verify.greedy(%2, %4, %3) : Tokens[B, A]
        %6 = commit(%2, %5, kv=keep_accepted, rollback=copy) : State
        yield(%6)
      }
      %7 = emit(%1) : Tokens[B, G]
    }
    """
    pm = check_pass(SpeculativeBatching(), ANPD, after)
    [rec] = pm.report
    assert (rec.name, rec.changed) == ("speculative-batching", True)
    assert rec.stats == {"drafts_widened": 1, "forwards_deduped": 1}


def test_candidates_option_on_prompt_lookup() -> None:
    before = """
    strategy ngram {
      %0 = prefill(%prompt) : State
      %1 = iterate(%0, max_steps=0, until=[eos, max_new_tokens]) : State {
      ^(%2: State):
        %3 = draft.ngram(%2, candidates=1, k=6, max_n=3, min_n=1) : Tokens[B, 6]
        %4 = forward(%2, %3, dedup=false, layout=sequence, mask=causal) : Logits[B, 7, V]
        %5 = verify.greedy(%2, %4, %3) : Tokens[B, A]
        %6 = commit(%2, %5, kv=recompute, rollback=copy) : State
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
        %3 = draft.ngram(%2, candidates=8, k=6, max_n=3, min_n=1) : Tokens[B, 8, 6]
        %4 = forward(%2, %3, dedup=true, layout=sequence, mask=causal) : Logits[B, 49, V]
        %5 = verify.greedy(%2, %4, %3) : Tokens[B, A]
        %6 = commit(%2, %5, kv=recompute, rollback=copy) : State
        yield(%6)
      }
      %7 = emit(%1) : Tokens[B, G]
    }
    """
    pm = check_pass("speculative-batching{candidates=8}", before, after)
    assert pm.report[0].name == "speculative-batching{candidates=8}"
    assert pm.report[0].stats == {"drafts_widened": 1, "forwards_deduped": 1}
    # candidates=1 widens nothing, and one chain needs no trie
    assert check_pass("speculative-batching{candidates=1}", before, before).report[0].changed is False


def test_lookahead_window_and_pool_share_one_trie() -> None:
    before = """
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
    after = """
    strategy lookahead {
      %0 = prefill(%prompt) : State
      %1 = iterate(%0, max_steps=0, until=[eos, max_new_tokens]) : State {
      ^(%2: State):
        %3 = draft.jacobi(%2, init=repeat, window=4) : Tokens[B, 4]
        %4 = draft.ngram_pool(%2, candidates=3, n=4) : Tokens[B, 3, 3]
        %5 = forward(%2, %3, %4, dedup=true, layout=sequence, mask=causal) : Logits[B, 14, V]
        %6 = verify.greedy(%2, %5, %3, %4) : Tokens[B, A]
        %7 = commit(%2, %6, kv=keep_accepted, rollback=copy) : State
        yield(%7)
      }
      %8 = emit(%1) : Tokens[B, G]
    }
    """
    assert check_pass(SpeculativeBatching(), before, after).report[0].stats == {"forwards_deduped": 1}


def test_already_several_candidates_are_not_rewidened() -> None:
    before = """
    strategy ngram2 {
      %0 = prefill(%prompt) : State
      %1 = iterate(%0, max_steps=0, until=[eos, max_new_tokens]) : State {
      ^(%2: State):
        %3 = draft.ngram(%2, candidates=2, k=4, max_n=3, min_n=1) : Tokens[B, 2, 4]
        %4 = forward(%2, %3, dedup=false, layout=sequence, mask=tree) : Logits[B, 9, V]
        %5 = verify.greedy(%2, %4, %3) : Tokens[B, A]
        %6 = commit(%2, %5, kv=keep_accepted, rollback=in_place) : State
        yield(%6)
      }
      %7 = emit(%1) : Tokens[B, G]
    }
    """
    after = """
    strategy ngram2 {
      %0 = prefill(%prompt) : State
      %1 = iterate(%0, max_steps=0, until=[eos, max_new_tokens]) : State {
      ^(%2: State):
        %3 = draft.ngram(%2, candidates=2, k=4, max_n=3, min_n=1) : Tokens[B, 2, 4]
        %4 = forward(%2, %3, dedup=true, layout=sequence, mask=tree) : Logits[B, 9, V]
        %5 = verify.greedy(%2, %4, %3) : Tokens[B, A]
        %6 = commit(%2, %5, kv=keep_accepted, rollback=in_place) : State
        yield(%6)
      }
      %7 = emit(%1) : Tokens[B, G]
    }
    """
    assert check_pass(SpeculativeBatching(), before, after).report[0].stats == {"forwards_deduped": 1}


JACOBI = """
strategy jacobi {
  %0 = prefill(%prompt) : State
  %1 = iterate(%0, max_steps=0, until=[eos, max_new_tokens]) : State {
  ^(%2: State):
    %3 = draft.jacobi(%2, init=repeat, window=4) : Tokens[B, 4]
    %4 = forward(%2, %3, dedup=false, layout=sequence, mask=causal) : Logits[B, 5, V]
    %5 = verify.greedy(%2, %4, %3) : Tokens[B, A]
    %6 = commit(%2, %5, kv=keep_accepted, rollback=copy) : State
    yield(%6)
  }
  %7 = emit(%1) : Tokens[B, G]
}
"""

DIFFUSION = """
strategy diffusion {
  %0 = prefill(%prompt) : State
  %1 = iterate(%0, max_steps=0, until=[eos, max_new_tokens]) : State {
  ^(%2: State):
    %3 = draft.mask(%2, k=16, mask_token=-1) : Tokens[B, 16]
    %4 = forward(%2, %3, dedup=false, layout=sequence, mask=block) : Logits[B, 17, V]
    %5 = unmask.threshold(%2, %4, contiguous=false, threshold=0.9) : Tokens[B, A]
    %6 = commit(%2, %5, kv=recompute, rollback=copy) : State
    yield(%6)
  }
  %7 = emit(%1) : Tokens[B, G]
}
"""


@pytest.mark.parametrize("program", [JACOBI, DIFFUSION], ids=["jacobi", "diffusion"])
def test_no_ngram_draft_and_one_chain_is_a_no_op(program: str) -> None:
    [rec] = check_pass(SpeculativeBatching(), program, program).report
    assert (rec.changed, rec.stats) == (False, {})


@pytest.mark.parametrize("candidates", [0, 65])
def test_candidates_out_of_range(candidates: int) -> None:
    pm = PassManager([SpeculativeBatching(candidates=candidates)])
    with pytest.raises(PassError) as err:
        pm.run(parse_program(ANPD))
    assert str(err.value) == (f"pass 'speculative-batching{{candidates={candidates}}}' failed (passes run before it: "
                              f"none): speculative-batching: candidates must be in 1..64, not {candidates}")
