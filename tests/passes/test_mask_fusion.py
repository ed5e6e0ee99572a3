"""``mask-fusion``: multi-chain causal forwards become one tree-masked forward; the layout is
chosen by the cost model (``auto``) or forced by the ``layout`` option."""
from __future__ import annotations

import pytest
from helpers import check_pass

from decograph.passes.cost import DEFAULT_CURVE
from decograph.errors import PassError
from decograph.ir.parser import parse_program
from decograph.passes import parse_pipeline
from decograph.passes.analysis import cost_model
from decograph.passes.manager import PassManager
from decograph.passes.mask_fusion import MaskFusion, choose_layout

NGRAM4 = """
strategy ngram4 {
  %0 = prefill(%prompt) : State
  %1 = iterate(%0, max_steps=0, until=[eos, max_new_tokens]) : State {
  ^(%2: State):
    %3 = draft.ngram(%2, candidates=4, k=8, max_n=3, min_n=1) : Tokens[B, 4, 8]
    %4 = forward(%2, %3, dedup=true, layout=sequence, mask=causal) : Logits[B, 33, V]
    %5 = verify.greedy(%2, %4, %3) : Tokens[B, A]
    %6 = commit(%2, %5, kv=keep_accepted, rollback=in_place) : State
    yield(%6)
  }
  %7 = emit(%1) : Tokens[B, G]
}
"""


def test_auto_picks_sequence_on_the_default_curve() -> None:
    after = """
    strategy ngram4 {
      %0 = prefill(%prompt) : State
      %1 = iterate(%0, max_steps=0, until=[eos, max_new_tokens]) : State {
      ^(%2: State):
        %3 = draft.ngram(%2, candidates=4, k=8, max_n=3, min_n=1) : Tokens[B, 4, 8]
        %4 = forward(%2, %3, dedup=true, layout=sequence, mask=tree) : Logits[B, 33, V]
        %5 = verify.greedy(%2, %4, %3) : Tokens[B, A]
        %6 = commit(%2, %5, kv=keep_accepted, rollback=in_place) : State
        yield(%6)
      }
      %7 = emit(%1) : Tokens[B, G]
    }
    """
    pm = check_pass(MaskFusion(), NGRAM4, after)
    [rec] = pm.report
    assert (rec.name, rec.changed) == ("mask-fusion", True)
    assert rec.stats == {"fused_sequence": 1, "forwards_per_step_before": 4}


def test_forced_batch_layout() -> None:
    after = """
    strategy ngram4 {
      %0 = prefill(%prompt) : State
      %1 = iterate(%0, max_steps=0, until=[eos, max_new_tokens]) : State {
      ^(%2: State):
        %3 = draft.ngram(%2, candidates=4, k=8, max_n=3, min_n=1) : Tokens[B, 4, 8]
        %4 = forward(%2, %3, dedup=true, layout=batch, mask=tree) : Logits[B, 33, V]
        %5 = verify.greedy(%2, %4, %3) : Tokens[B, A]
        %6 = commit(%2, %5, kv=keep_accepted, rollback=in_place) : State
        yield(%6)
      }
      %7 = emit(%1) : Tokens[B, G]
    }
    """
    pm = check_pass("mask-fusion{layout=batch}", NGRAM4, after)
    [rec] = pm.report
    assert rec.name == "mask-fusion{layout=batch}"
    assert rec.stats == {"fused_batch": 1, "forwards_per_step_before": 4}


def test_lookahead_jacobi_window_and_pool_fuse_into_one_forward() -> None:
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
        %5 = forward(%2, %3, %4, dedup=false, layout=sequence, mask=tree) : Logits[B, 14, V]
        %6 = verify.greedy(%2, %5, %3, %4) : Tokens[B, A]
        %7 = commit(%2, %6, kv=keep_accepted, rollback=copy) : State
        yield(%7)
      }
      %8 = emit(%1) : Tokens[B, G]
    }
    """
    pm = check_pass(MaskFusion(), before, after)
    assert pm.report[0].stats == {"fused_sequence": 1, "forwards_per_step_before": 4}   # 1 window + 3 pool chains


SINGLE_CHAIN = """
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

ALREADY_TREE = NGRAM4.replace("mask=causal", "mask=tree")


@pytest.mark.parametrize("program", [SINGLE_CHAIN, ALREADY_TREE], ids=["single-chain", "already-tree"])
@pytest.mark.parametrize("pipeline", ["mask-fusion", "mask-fusion{layout=batch}"])
def test_single_chain_and_tree_forwards_are_left_alone(program: str, pipeline: str) -> None:
    pm = check_pass(pipeline, program, program)
    [rec] = pm.report
    assert (rec.changed, rec.stats) == (False, {})


def test_choose_layout_packed_beats_batch_rows_at_every_context() -> None:
    """Packed, the forward computes 1 + 32 queries; as batch rows 4 + 32 plus KV copies."""
    [cost] = cost_model(parse_program(NGRAM4)).values()
    assert cost.evaluate(cost.chains) == 4
    assert cost.evaluate(cost.queries, A=0) == 4 + 32
    for context in (0, 1, 64, 512, 4096):
        assert choose_layout(cost, DEFAULT_CURVE, context) == "sequence"


def test_bad_layout_option_names_the_pass() -> None:
    pm = PassManager(parse_pipeline("canonicalize,mask-fusion{layout=diagonal}"))
    with pytest.raises(PassError) as err:
        pm.run(parse_program(NGRAM4))
    assert str(err.value) == ("pass 'mask-fusion{layout=diagonal}' failed (passes run before it: canonicalize): "
                              "mask-fusion: layout must be auto, sequence or batch, not 'diagonal'")
