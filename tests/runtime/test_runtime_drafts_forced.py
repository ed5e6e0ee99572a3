"""Forced acceptance patterns with ``draft.model``: a draft model equal to the target (every
draft accepted) and a draft model that disagrees (drafts rejected), through ``generate``."""
from __future__ import annotations

import pytest
from runtime_helpers import (
    ShiftedOracle,
    expected_accepts_all,
    hf_greedy,
    model_draft_program,
    tiny,
)

from decograph.api import generate
from decograph.errors import UnsupportedError
from decograph.models.oracle import OracleLM

PROMPTS = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11], [4], [7, 3, 7, 3, 7, 3, 9]]


@pytest.mark.parametrize("k", [1, 2, 3, 5, 8])
def test_oracle_self_draft_accepts_everything(k: int) -> None:
    oracle = OracleLM()
    n = 23
    rs = generate(oracle, None, PROMPTS, strategy=model_draft_program(k), max_new_tokens=n,
                  draft_models={"draft": OracleLM()})
    for p, r in zip(PROMPTS, rs):
        assert r.new_token_ids == oracle.reference(p, n)
        assert list(r.stats.accepted_per_step) == expected_accepts_all(n, k)
        assert list(r.stats.drafted_per_step) == expected_accepts_all(n, k)
        assert r.stats.decode_steps == len(expected_accepts_all(n, k))


@pytest.mark.parametrize("k", [2, 4, 7])
def test_tiny_llama_self_draft_accepts_everything(k: int) -> None:
    model = tiny(0)
    prompts = [[1, 2, 3, 4], [9, 8, 7, 6, 5, 9, 8], [17]]
    n = 17
    rs = generate(model, None, prompts, strategy=model_draft_program(k), max_new_tokens=n,
                  draft_models={"draft": model})
    for p, r in zip(prompts, rs):
        assert r.new_token_ids == hf_greedy(p, n)
        assert list(r.stats.accepted_per_step) == expected_accepts_all(n, k)


@pytest.mark.parametrize("k", [1, 3, 6])
def test_oracle_always_wrong_draft_rejects_everything(k: int) -> None:
    oracle = OracleLM()
    n = 19
    rs = generate(oracle, None, PROMPTS, strategy=model_draft_program(k), max_new_tokens=n,
                  draft_models={"draft": ShiftedOracle()})
    for p, r in zip(PROMPTS, rs):
        assert r.new_token_ids == oracle.reference(p, n)
        assert set(r.stats.accepted_per_step) == {0}
        assert r.stats.decode_steps == n
        # Each step drafts min(k, remaining - 1) tokens, all rejected.
        assert list(r.stats.drafted_per_step) == [min(k, n - i - 1) for i in range(n)]


def test_oracle_other_period_draft_is_partly_rejected() -> None:
    oracle = OracleLM()
    n = 30
    rs = generate(oracle, None, PROMPTS, strategy=model_draft_program(4), max_new_tokens=n,
                  draft_models={"draft": OracleLM(period=3)})
    assert [r.new_token_ids for r in rs] == [oracle.reference(p, n) for p in PROMPTS]
    accepted = [a for r in rs for a in r.stats.accepted_per_step]
    assert 0 in accepted                       # rejections happened
    assert sum(accepted) < sum(r.stats.drafted_per_step[i] for r in rs for i in range(r.stats.decode_steps))


@pytest.mark.parametrize("k", [3, 8])
def test_tiny_llama_other_seed_draft_mostly_rejected(k: int) -> None:
    model, other = tiny(0), tiny(7)
    prompts = [[1, 2, 3, 4], [9, 8, 7, 6, 5, 9, 8], [17]]
    n = 16
    rs = generate(model, None, prompts, strategy=model_draft_program(k), max_new_tokens=n,
                  draft_models={"draft": other})
    for p, r in zip(prompts, rs):
        assert r.new_token_ids == hf_greedy(p, n)
        assert r.stats.accepted_per_step.count(0) >= r.stats.decode_steps // 2


def test_missing_draft_model_is_a_named_error() -> None:
    with pytest.raises(UnsupportedError, match="draft_models"):
        generate(OracleLM(), None, [1, 2], strategy=model_draft_program(2), max_new_tokens=4)


def test_draft_model_with_another_vocabulary_is_refused() -> None:
    """A larger draft vocabulary drafts ids the target cannot embed, a smaller one cannot embed
    the target's tokens (both an IndexError deep in torch before the check existed)."""
    from decograph.errors import InputError

    for vocab in (128, 32):
        with pytest.raises(InputError, match=rf"'draft'.*{vocab}.*64"):
            generate(tiny(0), None, [[1, 2, 3]], strategy=model_draft_program(3), max_new_tokens=8,
                     draft_models={"draft": tiny(3, vocab=vocab)})
