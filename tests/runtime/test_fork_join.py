"""Fork/join on the torch runtime: every branch decodes exactly what it would decode alone.

The oracle predicts the mismatch token whenever a query sees a wrong set of positions, so a
segment that attends to a sibling branch, misses a prefix slot or sits at a wrong position
changes the tokens. Each layout (one forward per branch, packed segments, batch copies) is
checked against the oracle's own greedy reference and against the tiny Llama decoding each
branch alone; the KV of the packed physical rows is checked slot by slot after every step.
"""
from __future__ import annotations

from typing import Any

import pytest
import torch
from runtime_helpers import tiny

from decograph.api import _setup, generate
from decograph.runtime.branches import Branch, list_items
from decograph.errors import InputError, VerifyError
from decograph.ir.builder import Builder
from decograph.models.oracle import OracleLM

PROMPTS = [[3, 1, 4, 1, 5], [2, 7], [9, 2, 6, 5, 3, 5, 8]]


def fork_program(mask: str = "causal", layout: str = "sequence", rule: str = "collect", draft: str = "",
                 max_tokens: int = 9, then: bool = False) -> Any:
    b = Builder("fork_test")
    s = b.prefill()
    fk = b.fork(s, b.draft("branches", s, provider="test", max_tokens=max_tokens))
    with b.iterate(fk) as loop:
        st = loop.state
        drafts = (b.draft(draft, st, k=4),) if draft else ()
        logits = b.forward(st, *drafts, mask=mask, layout=layout)
        loop.next(b.commit(st, b.verify("greedy", st, logits, *drafts), kv="keep_accepted"))
    out = b.join(loop.result, rule=rule)
    if then:
        with b.iterate(out) as loop2:
            st = loop2.state
            loop2.next(b.commit(st, b.verify("greedy", st, b.forward(st)), kv="keep_accepted"))
        out = loop2.result
    b.emit(out)
    return b.build()


def branches_of(row_index: int) -> list[list[int]]:
    """Row-dependent branch prompts: different counts per row (row 1 has none)."""
    return {0: [[1], [2, 3], [4, 4, 4]], 1: [], 2: [[5], [6, 2], [7], [8, 8]]}[row_index]


def provider(row: Any) -> list[Branch]:
    return [Branch(f"b{i}", tuple(ids), {"i": i}) for i, ids in enumerate(branches_of(row.index))]


def run(model: Any, program: Any, prompts: list[list[int]], max_new: int = 20, eos: Any = None,
        check: bool = False) -> Any:
    interp, ids, _ = _setup(model, None, prompts, program, max_new, False, False, 1.0, 0, 1.0, None, eos, (),
                            None, None, "none", {"test": provider})
    for _ in interp.run(ids):
        if check:
            check_branch_cache(interp.state)
    return interp


def check_branch_cache(state: Any) -> None:
    """Each active (branch) row's valid slots hold exactly its cached tokens at positions 0.."""
    for b, row in enumerate(state.active):
        slots = state.valid[b].nonzero().flatten()
        p = state.phys[b]
        assert len(slots) == row.cached
        assert state.cache.tokens[p, slots].tolist() == row.tokens[: row.cached]
        assert state.cache.positions[p, slots].tolist() == list(range(row.cached))


@pytest.mark.parametrize("mask,layout", [("causal", "sequence"), ("packed", "sequence"), ("packed", "batch")])
def test_every_branch_equals_its_own_greedy_on_the_oracle(mask: str, layout: str) -> None:
    oracle = OracleLM(vocab_size=32, period=3)
    interp = run(oracle, fork_program(mask, layout), PROMPTS, check=True)
    for row in interp.state.rows:
        [results] = row.results
        got = [list(r.tokens) for r in results]
        want = [oracle.reference(PROMPTS[row.index] + ids, 9) for ids in branches_of(row.index)]
        assert got == want
        assert [r.prompt_ids for r in results] == [tuple(ids) for ids in branches_of(row.index)]
        assert row.new_tokens == []              # collect appends nothing


def test_packing_runs_one_forward_per_step_and_shares_the_prefix() -> None:
    oracle = OracleLM(vocab_size=32, period=3)
    fused = run(oracle, fork_program("packed"), PROMPTS)
    separate = run(oracle, fork_program("causal"), PROMPTS)
    # 9 tokens per branch: prefill + 9 steps packed; 4 branches on row 2 make 4 forwards per step unfused
    assert fused.state.forwards == 1 + 9
    assert separate.state.forwards == 1 + 9 * 4
    assert all(r.kv_bytes_copied == 0 for r in fused.state.rows)


def test_branches_with_ngram_drafts_in_their_segments() -> None:
    oracle = OracleLM(vocab_size=32, period=4)
    interp = run(oracle, fork_program("packed", draft="ngram", max_tokens=24), PROMPTS, check=True)
    for row in interp.state.rows:
        want = [oracle.reference(PROMPTS[row.index] + ids, 24) for ids in branches_of(row.index)]
        assert [list(r.tokens) for r in row.results[0]] == want
    assert interp.state.forwards < 1 + 24      # drafts accepted: fewer steps than tokens


def test_eos_at_once_and_budgets_end_branches_exactly() -> None:
    oracle = OracleLM(vocab_size=32, period=3)
    # the first branch of row 0 predicts this token first: make it EOS
    first = oracle.reference(PROMPTS[0] + [1], 1)[0]
    eos_oracle = OracleLM(vocab_size=32, period=3, eos_token_id=first)
    interp = run(eos_oracle, fork_program("packed"), PROMPTS)
    [results] = interp.state.rows[0].results
    assert list(results[0].tokens) == [first] and results[0].finish_reason == "eos"
    assert results[0].text == "" and results[0].logprob == 0.0
    for r, ids in zip(results, branches_of(0)):
        assert list(r.tokens) == eos_oracle.reference(PROMPTS[0] + ids, 9)


def test_concat_join_appends_and_decoding_goes_on_as_greedy_over_the_joined_text() -> None:
    oracle = OracleLM(vocab_size=32, period=3)
    interp = run(oracle, fork_program("packed", rule="concat", then=True, max_tokens=5), PROMPTS, max_new=40,
                 check=True)
    for row in interp.state.rows:
        joined = [t for ids in branches_of(row.index) for t in ids + oracle.reference(PROMPTS[row.index] + ids, 5)]
        assert row.new_tokens[: len(joined)] == joined
        rest = oracle.reference(PROMPTS[row.index] + joined, 40 - len(joined))
        assert row.new_tokens[len(joined):] == rest
        assert len(row.new_tokens) == 40


@pytest.mark.parametrize("mask,layout", [("packed", "sequence"), ("packed", "batch"), ("causal", "sequence")])
def test_tiny_llama_branches_match_decoding_each_alone(mask: str, layout: str) -> None:
    model = tiny()
    interp = run(model, fork_program(mask, layout), PROMPTS)
    for row in interp.state.rows:
        for r, ids in zip(row.results[0], branches_of(row.index)):
            [alone] = generate(model, None, [PROMPTS[row.index] + ids], "greedy", 9, passes="none")
            assert list(r.tokens) == alone.new_token_ids
            # log p of each token: the model's own log-softmax at that step
            with torch.no_grad():
                seq = torch.tensor([PROMPTS[row.index] + ids + alone.new_token_ids])
                logp = torch.log_softmax(model(input_ids=seq).logits[0].float(), -1)
            start = len(PROMPTS[row.index]) + len(ids) - 1
            want = sum(float(logp[start + k, t]) for k, t in enumerate(alone.new_token_ids))
            assert r.logprob == pytest.approx(want, abs=1e-3)


def test_default_pipeline_fuses_branches_and_keeps_tokens() -> None:
    oracle = OracleLM(vocab_size=32, period=3)
    program = fork_program("causal")
    interp, ids, _ = _setup(oracle, None, PROMPTS, program, 20, False, False, 1.0, 0, 1.0, None, None, (),
                            None, None, "default", {"test": provider})
    list(interp.run(ids))
    fwd = [op for op in interp.program.walk() if op.NAME == "forward"]
    assert fwd[0].mask == "packed"
    plain = run(oracle, program, PROMPTS)
    assert [r.results for r in interp.state.rows] == [r.results for r in plain.state.rows]


def test_list_items_takes_the_last_list() -> None:
    text = "Plan:\n1. a\n2. b\nthen\n1) x\n\n2) y\n3) z\nGo."
    assert list_items(text, r"\s*\d+[.)]\s") == ["1) x", "2) y", "3) z"]
    assert list_items("no list here", r"\d+\.") == []


def test_branch_errors_name_the_step() -> None:
    oracle = OracleLM(vocab_size=32)
    with pytest.raises(InputError, match="no branch provider 'test' was given"):
        _setup_run = _setup(oracle, None, PROMPTS, fork_program(), 5, False, False, 1.0, 0, 1.0, None, None, (),
                            None, None, "none")
        list(_setup_run[0].run(_setup_run[1]))
    for attrs, message in [({"prompts": ("a",), "delimiter": "x"}, "needs exactly one of branch prompts, a "
                                                                    "delimiter or a provider"),
                           ({"delimiter": "(unclosed"}, "'\\(unclosed' is not a valid regex")]:
        b = Builder("t")
        s = b.prefill()
        b.emit(b.join(b.fork(s, b.draft("branches", s, **attrs))))
        with pytest.raises(VerifyError, match=message):
            b.build()
