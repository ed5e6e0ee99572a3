"""``canonicalize``: CSE of drafts, dropping draft operands a forward did not run, single-chain
forwards made causal, dead steps removed; BEFORE/AFTER snapshots of the whole program."""
from __future__ import annotations

import pytest
from helpers import check_pass

from decograph.passes.canonicalize import Canonicalize


def _stats(pm) -> tuple[bool, dict]:
    [rec] = pm.report
    assert rec.name == "canonicalize"
    return rec.changed, rec.stats


def test_single_chain_tree_forward_becomes_causal() -> None:
    before = """
    strategy jacobi_tree {
      %0 = prefill(%prompt) : State
      %1 = iterate(%0, max_steps=0, until=[eos, max_new_tokens]) : State {
      ^(%2: State):
        %3 = draft.jacobi(%2, init=repeat, window=4) : Tokens[B, 4]
        %4 = forward(%2, %3, dedup=true, layout=sequence, mask=tree) : Logits[B, 5, V]
        %5 = verify.greedy(%2, %4, %3) : Tokens[B, A]
        %6 = commit(%2, %5, kv=keep_accepted, rollback=copy) : State
        yield(%6)
      }
      %7 = emit(%1) : Tokens[B, G]
    }
    """
    after = """
    strategy jacobi_tree {
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
    pm = check_pass(Canonicalize(), before, after)
    assert _stats(pm) == (True, {"rewrites": 1})
    assert not _stats(check_pass(Canonicalize(), after, after))[0]     # a fixed point


def test_single_chain_batch_layout_becomes_sequence() -> None:
    before = """
    strategy ngram_batch {
      %0 = prefill(%prompt) : State
      %1 = iterate(%0, max_steps=0, until=[eos, max_new_tokens]) : State {
      ^(%2: State):
        %3 = draft.ngram(%2, candidates=1, k=6, max_n=3, min_n=1) : Tokens[B, 6]
        %4 = forward(%2, %3, dedup=false, layout=batch, mask=tree) : Logits[B, 7, V]
        %5 = verify.greedy(%2, %4, %3) : Tokens[B, A]
        %6 = commit(%2, %5, kv=recompute, rollback=in_place) : State
        yield(%6)
      }
      %7 = emit(%1) : Tokens[B, G]
    }
    """
    after = """
    strategy ngram_batch {
      %0 = prefill(%prompt) : State
      %1 = iterate(%0, max_steps=0, until=[eos, max_new_tokens]) : State {
      ^(%2: State):
        %3 = draft.ngram(%2, candidates=1, k=6, max_n=3, min_n=1) : Tokens[B, 6]
        %4 = forward(%2, %3, dedup=false, layout=sequence, mask=causal) : Logits[B, 7, V]
        %5 = verify.greedy(%2, %4, %3) : Tokens[B, A]
        %6 = commit(%2, %5, kv=recompute, rollback=in_place) : State
        yield(%6)
      }
      %7 = emit(%1) : Tokens[B, G]
    }
    """
    assert _stats(check_pass(Canonicalize(), before, after)) == (True, {"rewrites": 1})


def test_dead_draft_left_by_auto_tune_is_removed() -> None:
    """The auto-tuner's fallback takes a draft off its forward and verify; the op stays."""
    before = """
    strategy fallback {
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
    assert _stats(check_pass(Canonicalize(), before, FALLBACK_AFTER)) == (True, {"rewrites": 1})


def test_verify_naming_a_draft_its_forward_did_not_run_is_repaired() -> None:
    """Invalid input (the verifier rejects it): verify loses the operand, then the draft dies."""
    before = """
    strategy fallback {
      %0 = prefill(%prompt) : State
      %1 = iterate(%0, max_steps=0, until=[eos, max_new_tokens]) : State {
      ^(%2: State):
        %3 = draft.jacobi(%2, init=repeat, window=4) : Tokens[B, 4]
        %4 = forward(%2, dedup=false, layout=sequence, mask=causal) : Logits[B, 1, V]
        %5 = verify.greedy(%2, %4, %3) : Tokens[B, A]
        %6 = commit(%2, %5, kv=keep_accepted, rollback=copy) : State
        yield(%6)
      }
      %7 = emit(%1) : Tokens[B, G]
    }
    """
    pm = check_pass(Canonicalize(), before, FALLBACK_AFTER, verify_input=False)
    assert _stats(pm) == (True, {"rewrites": 2})        # round 1: the operand, round 2: the draft


FALLBACK_AFTER = """
strategy fallback {
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


def test_identical_drafts_are_merged_different_ones_kept() -> None:
    before = """
    strategy twins {
      %0 = prefill(%prompt) : State
      %1 = iterate(%0, max_steps=0, until=[eos, max_new_tokens]) : State {
      ^(%2: State):
        %3 = draft.ngram(%2, candidates=1, k=4, max_n=3, min_n=1) : Tokens[B, 4]
        %4 = draft.ngram(%2, candidates=1, k=4, max_n=3, min_n=1) : Tokens[B, 4]
        %5 = draft.ngram(%2, candidates=1, k=5, max_n=3, min_n=1) : Tokens[B, 5]
        %6 = forward(%2, %3, %4, %5, dedup=false, layout=sequence, mask=tree) : Logits[B, 14, V]
        %7 = verify.greedy(%2, %6, %3, %4, %5) : Tokens[B, A]
        %8 = commit(%2, %7, kv=keep_accepted, rollback=copy) : State
        yield(%8)
      }
      %9 = emit(%1) : Tokens[B, G]
    }
    """
    after = """
    strategy twins {
      %0 = prefill(%prompt) : State
      %1 = iterate(%0, max_steps=0, until=[eos, max_new_tokens]) : State {
      ^(%2: State):
        %3 = draft.ngram(%2, candidates=1, k=4, max_n=3, min_n=1) : Tokens[B, 4]
        %4 = draft.ngram(%2, candidates=1, k=5, max_n=3, min_n=1) : Tokens[B, 5]
        %5 = forward(%2, %3, %3, %4, dedup=false, layout=sequence, mask=tree) : Logits[B, 14, V]
        %6 = verify.greedy(%2, %5, %3, %3, %4) : Tokens[B, A]
        %7 = commit(%2, %6, kv=keep_accepted, rollback=copy) : State
        yield(%7)
      }
      %8 = emit(%1) : Tokens[B, G]
    }
    """
    assert _stats(check_pass(Canonicalize(), before, after)) == (True, {"rewrites": 1})


def test_dead_verify_then_dead_forward_removed() -> None:
    before = """
    strategy dead {
      %0 = prefill(%prompt) : State
      %1 = iterate(%0, max_steps=0, until=[eos, max_new_tokens]) : State {
      ^(%2: State):
        %3 = forward(%2, dedup=false, layout=sequence, mask=causal) : Logits[B, 1, V]
        %4 = verify.greedy(%2, %3) : Tokens[B, A]
        %5 = forward(%2, dedup=false, layout=sequence, mask=causal) : Logits[B, 1, V]
        %6 = verify.threshold(%2, %5, threshold=0.5) : Tokens[B, A]
        %7 = commit(%2, %4, kv=keep_accepted, rollback=copy) : State
        yield(%7)
      }
      %8 = emit(%1) : Tokens[B, G]
    }
    """
    after = """
    strategy dead {
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
    assert _stats(check_pass(Canonicalize(), before, after)) == (True, {"rewrites": 2})


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

LOOKAHEAD_TREE = """
strategy lookahead {
  %0 = prefill(%prompt) : State
  %1 = iterate(%0, max_steps=0, until=[eos, max_new_tokens]) : State {
  ^(%2: State):
    %3 = draft.jacobi(%2, init=repeat, window=4) : Tokens[B, 4]
    %4 = draft.ngram_pool(%2, candidates=3, n=4) : Tokens[B, 3, 3]
    %5 = forward(%2, %3, %4, dedup=true, layout=sequence, mask=tree) : Logits[B, 14, V]
    %6 = verify.greedy(%2, %5, %3, %4) : Tokens[B, A]
    %7 = commit(%2, %6, kv=keep_accepted, rollback=in_place) : State
    yield(%7)
  }
  %8 = emit(%1) : Tokens[B, G]
}
"""

DIFFUSION = """
strategy diffusion {
  %0 = prefill(%prompt) : State
  %1 = iterate(%0, max_steps=0, until=[eos, max_new_tokens]) : State {
  ^(%2: State):
    %3 = draft.mask(%2, k=32, mask_token=-1) : Tokens[B, 32]
    %4 = forward(%2, %3, dedup=false, layout=sequence, mask=block) : Logits[B, 33, V]
    %5 = unmask.threshold(%2, %4, contiguous=false, threshold=0.9) : Tokens[B, A]
    %6 = commit(%2, %5, kv=recompute, rollback=copy) : State
    yield(%6)
  }
  %7 = emit(%1) : Tokens[B, G]
}
"""


@pytest.mark.parametrize("program", [GREEDY, LOOKAHEAD_TREE, DIFFUSION], ids=["greedy", "lookahead", "diffusion"])
def test_canonical_programs_are_left_alone(program: str) -> None:
    pm = check_pass(Canonicalize(), program, program)
    assert _stats(pm) == (False, {})
