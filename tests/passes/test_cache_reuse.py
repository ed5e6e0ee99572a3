"""``cache-reuse``: accepted KV is kept where that is exact (causal, tree), rollback happens in
place, and a block-mask forward keeps ``recompute`` unless approximation is allowed."""
from __future__ import annotations

import pytest
from helpers import check_pass

from decograph.passes.cache_reuse import CacheReuse, kv_policy


def _only(pm) -> tuple[str, bool, dict]:
    [rec] = pm.report
    return rec.name, rec.changed, rec.stats


def test_recompute_becomes_keep_accepted_and_copy_in_place() -> None:
    before = """
    strategy jacobi {
      %0 = prefill(%prompt) : State
      %1 = iterate(%0, max_steps=0, until=[eos, max_new_tokens]) : State {
      ^(%2: State):
        %3 = draft.jacobi(%2, init=repeat, window=4) : Tokens[B, 4]
        %4 = forward(%2, %3, dedup=false, layout=sequence, mask=causal) : Logits[B, 5, V]
        %5 = verify.greedy(%2, %4, %3) : Tokens[B, A]
        %6 = commit(%2, %5, kv=recompute, rollback=copy) : State
        yield(%6)
      }
      %7 = emit(%1) : Tokens[B, G]
    }
    """
    after = """
    strategy jacobi {
      %0 = prefill(%prompt) : State
      %1 = iterate(%0, max_steps=0, until=[eos, max_new_tokens]) : State {
      ^(%2: State):
        %3 = draft.jacobi(%2, init=repeat, window=4) : Tokens[B, 4]
        %4 = forward(%2, %3, dedup=false, layout=sequence, mask=causal) : Logits[B, 5, V]
        %5 = verify.greedy(%2, %4, %3) : Tokens[B, A]
        %6 = commit(%2, %5, kv=keep_accepted, rollback=in_place) : State
        yield(%6)
      }
      %7 = emit(%1) : Tokens[B, G]
    }
    """
    pm = check_pass(CacheReuse(), before, after)
    assert _only(pm) == ("cache-reuse", True, {"kv_keep_accepted": 1, "rollback_in_place": 1})


def test_tree_forward_keeps_accepted_kv() -> None:
    before = """
    strategy ngram_tree {
      %0 = prefill(%prompt) : State
      %1 = iterate(%0, max_steps=0, until=[eos, max_new_tokens]) : State {
      ^(%2: State):
        %3 = draft.ngram(%2, candidates=4, k=8, max_n=3, min_n=1) : Tokens[B, 4, 8]
        %4 = forward(%2, %3, dedup=true, layout=batch, mask=tree) : Logits[B, 33, V]
        %5 = verify.sampling(%2, %4, %3, temperature=0.7, top_k=0, top_p=1.0) : Tokens[B, A]
        %6 = commit(%2, %5, kv=recompute, rollback=in_place) : State
        yield(%6)
      }
      %7 = emit(%1) : Tokens[B, G]
    }
    """
    after = """
    strategy ngram_tree {
      %0 = prefill(%prompt) : State
      %1 = iterate(%0, max_steps=0, until=[eos, max_new_tokens]) : State {
      ^(%2: State):
        %3 = draft.ngram(%2, candidates=4, k=8, max_n=3, min_n=1) : Tokens[B, 4, 8]
        %4 = forward(%2, %3, dedup=true, layout=batch, mask=tree) : Logits[B, 33, V]
        %5 = verify.sampling(%2, %4, %3, temperature=0.7, top_k=0, top_p=1.0) : Tokens[B, A]
        %6 = commit(%2, %5, kv=keep_accepted, rollback=in_place) : State
        yield(%6)
      }
      %7 = emit(%1) : Tokens[B, G]
    }
    """
    assert _only(check_pass(CacheReuse(), before, after)) == ("cache-reuse", True, {"kv_keep_accepted": 1})


def test_copy_rollback_alone_becomes_in_place() -> None:
    before = """
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
    after = """
    strategy greedy {
      %0 = prefill(%prompt) : State
      %1 = iterate(%0, max_steps=0, until=[eos, max_new_tokens]) : State {
      ^(%2: State):
        %3 = forward(%2, dedup=false, layout=sequence, mask=causal) : Logits[B, 1, V]
        %4 = verify.greedy(%2, %3) : Tokens[B, A]
        %5 = commit(%2, %4, kv=keep_accepted, rollback=in_place) : State
        yield(%5)
      }
      %6 = emit(%1) : Tokens[B, G]
    }
    """
    pm = check_pass(CacheReuse(), before, after)
    assert _only(pm) == ("cache-reuse", True, {"rollback_in_place": 1})
    assert _only(check_pass(CacheReuse(), after, after)) == ("cache-reuse", False, {})    # no-op


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


def test_block_mask_forward_keeps_recompute() -> None:
    after = """
    strategy diffusion {
      %0 = prefill(%prompt) : State
      %1 = iterate(%0, max_steps=0, until=[eos, max_new_tokens]) : State {
      ^(%2: State):
        %3 = draft.mask(%2, k=16, mask_token=-1) : Tokens[B, 16]
        %4 = forward(%2, %3, dedup=false, layout=sequence, mask=block) : Logits[B, 17, V]
        %5 = unmask.threshold(%2, %4, contiguous=false, threshold=0.9) : Tokens[B, A]
        %6 = commit(%2, %5, kv=recompute, rollback=in_place) : State
        yield(%6)
      }
      %7 = emit(%1) : Tokens[B, G]
    }
    """
    assert _only(check_pass(CacheReuse(), DIFFUSION, after)) == ("cache-reuse", True, {"rollback_in_place": 1})


def test_block_mask_forward_with_approximate_gets_block_approx() -> None:
    after = """
    strategy diffusion {
      %0 = prefill(%prompt) : State
      %1 = iterate(%0, max_steps=0, until=[eos, max_new_tokens]) : State {
      ^(%2: State):
        %3 = draft.mask(%2, k=16, mask_token=-1) : Tokens[B, 16]
        %4 = forward(%2, %3, dedup=false, layout=sequence, mask=block) : Logits[B, 17, V]
        %5 = unmask.threshold(%2, %4, contiguous=false, threshold=0.9) : Tokens[B, A]
        %6 = commit(%2, %5, kv=block_approx, rollback=in_place) : State
        yield(%6)
      }
      %7 = emit(%1) : Tokens[B, G]
    }
    """
    pm = check_pass("cache-reuse{approximate=true}", DIFFUSION, after)
    assert _only(pm) == ("cache-reuse{approximate=true}", True, {"kv_block_approx": 1, "rollback_in_place": 1})
    assert CacheReuse(approximate=True).spelled() == "cache-reuse{approximate=true}"


@pytest.mark.parametrize("mask, approximate, policy", [
    ("causal", False, "keep_accepted"), ("tree", False, "keep_accepted"), ("packed", False, "keep_accepted"),
    ("causal", True, "keep_accepted"), ("block", False, None), ("block", True, "block_approx"),
    ("no-such-mask", True, None),
])
def test_kv_policy_table(mask: str, approximate: bool, policy: str | None) -> None:
    assert kv_policy(mask, approximate) == policy


def test_block_mask_forward_dual_gets_block_approx_dual() -> None:
    after = """
    strategy diffusion {
      %0 = prefill(%prompt) : State
      %1 = iterate(%0, max_steps=0, until=[eos, max_new_tokens]) : State {
      ^(%2: State):
        %3 = draft.mask(%2, k=16, mask_token=-1) : Tokens[B, 16]
        %4 = forward(%2, %3, dedup=false, layout=sequence, mask=block) : Logits[B, 17, V]
        %5 = unmask.threshold(%2, %4, contiguous=false, threshold=0.9) : Tokens[B, A]
        %6 = commit(%2, %5, kv=block_approx_dual, rollback=in_place) : State
        yield(%6)
      }
      %7 = emit(%1) : Tokens[B, G]
    }
    """
    pm = check_pass("cache-reuse{approximate=true,dual=true}", DIFFUSION, after)
    assert _only(pm) == ("cache-reuse{approximate=true,dual=true}", True,
                         {"kv_block_approx_dual": 1, "rollback_in_place": 1})
    assert kv_policy("block", True, dual=True) == "block_approx_dual"
    assert kv_policy("causal", True, dual=True) == "keep_accepted"
    assert kv_policy("block", False, dual=True) is None
