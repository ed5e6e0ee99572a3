"""Budgets, EOS, stop tokens and finish reasons of the torch reference backend.

``max_new_tokens`` must bound every row exactly, for draft sizes 1..16 and budgets around the
draft size; an EOS that greedy really produces ends the output right there (EOS included, as
in Hugging Face), also when it sits inside an accepted draft block.
"""
from __future__ import annotations

import pytest
from runtime_helpers import (
    BUILTINS,
    first_new_at,
    hf_greedy,
    lookahead_program,
    model_draft_program,
    oracle_ref,
    tiny,
)

from decograph.api import generate, generate_stream
from decograph.ir.builder import Builder
from decograph.models.oracle import OracleLM

PROMPTS = [[1, 2, 3], [7, 3, 7, 3, 7, 3, 7, 3, 9]]


def _family(name: str, k: int):
    if name == "self_draft":
        return model_draft_program(k), {"draft_models": {"draft": OracleLM()}}
    if name == "jacobi":
        return "jacobi", {"overrides": {"window": k}}
    if name == "ngram":
        return "ngram", {"overrides": {"k": k, "min_n": 1}}
    if name == "lookahead":
        return lookahead_program(window=k, n=3, candidates=3), {}
    raise AssertionError(name)


def _budgets(k: int) -> list[int]:
    return sorted({b for b in (0, 1, 2, k - 1, k, k + 1) if b >= 0})


@pytest.mark.parametrize("k", [1, 2, 3, 4, 6, 8, 11, 16])
@pytest.mark.parametrize("family", ["self_draft", "jacobi", "ngram", "lookahead"])
def test_budget_bound_for_draft_sizes(family: str, k: int) -> None:
    oracle = OracleLM()
    strategy, kw = _family(family, k)
    for budget in _budgets(k):
        rs = generate(oracle, None, PROMPTS, strategy=strategy, max_new_tokens=budget, **kw)
        for p, r in zip(PROMPTS, rs):
            assert len(r.new_token_ids) <= budget
            assert r.new_token_ids == oracle.reference(p, budget), (family, k, budget)
            assert r.stats.new_tokens == budget
            assert r.stats.finish_reason == "max_new_tokens"
            # Steps never commit past the budget: each step commits accepted + 1 tokens.
            assert sum(r.stats.accepted_per_step) + r.stats.decode_steps == budget
            if family != "lookahead":       # single chains: every chain fits the budget left
                rem = budget
                for acc, drafted in zip(r.stats.accepted_per_step, r.stats.drafted_per_step):
                    assert drafted <= rem - 1
                    rem -= acc + 1
        if family == "self_draft" and budget > 1:
            # All drafts accepted: the first step drafts min(k, budget - 1) and takes them all.
            assert rs[0].stats.accepted_per_step[0] == min(k, budget - 1)


def test_budget_zero_returns_nothing() -> None:
    for strategy in BUILTINS:
        for model in (OracleLM(), tiny(0)):
            rs = generate(model, None, [[1, 2, 3], [4]], strategy=strategy, max_new_tokens=0)
            for r in rs:
                assert r.new_token_ids == [] and r.text == ""
                assert r.stats.new_tokens == 0 and r.stats.decode_steps == 0
                assert r.stats.finish_reason == "max_new_tokens"
    chunks = list(generate_stream(OracleLM(), None, [[1, 2, 3]], max_new_tokens=0))
    assert [(c.token_ids, c.done) for c in chunks] == [((), True)]


@pytest.mark.parametrize("budget", [1, 2, 3, 5, 6])
def test_tiny_llama_budgets_with_self_draft(budget: int) -> None:
    model = tiny(0)
    prompts = [[1, 2, 3, 4], [9, 8, 7, 6, 5, 9, 8]]
    for strategy, kw in ((model_draft_program(5), {"draft_models": {"draft": model}}), ("ngram", {})):
        rs = generate(model, None, prompts, strategy=strategy, max_new_tokens=budget, **kw)
        assert [r.new_token_ids for r in rs] == [hf_greedy(p, budget) for p in prompts]


# ----------------------------------------------------------------------------- EOS

EOS_STRATEGIES = [*BUILTINS, "self_draft"]


def _strategy(name: str, model) -> tuple[object, dict]:
    if name == "self_draft":
        return model_draft_program(8), {"draft_models": {"draft": model}}
    return name, {}


@pytest.mark.parametrize("strategy", EOS_STRATEGIES)
def test_oracle_eos_inside_accepted_block(strategy: str) -> None:
    oracle = OracleLM()
    strat, kw = _strategy(strategy, OracleLM())
    for p in PROMPTS:
        full = oracle.reference(p, 40)
        for lo in (1, 3, 9):
            j = first_new_at(full, lo)
            eos = full[j]
            want = full[: j + 1]
            [r] = generate(oracle, None, [p], strategy=strat, max_new_tokens=40, eos_token_id=eos, **kw)
            assert r.new_token_ids == want, (strategy, p, j)
            assert r.stats.finish_reason == "eos"
            assert r.stats.new_tokens == j + 1
            # EOS declared by the model itself (no eos_token_id argument).
            own = OracleLM(eos_token_id=eos)
            strat2, kw2 = _strategy(strategy, OracleLM())
            [r2] = generate(own, None, [p], strategy=strat2, max_new_tokens=40, **kw2)
            assert r2.new_token_ids == want == own.reference(p, 40)
            # Nothing is streamed after the EOS.
            chunks = list(generate_stream(oracle, None, [p], strategy=strat, max_new_tokens=40, eos_token_id=eos, **kw))
            assert [t for c in chunks for t in c.token_ids] == want
            assert chunks[-1].done and sum(c.done for c in chunks) == 1


def test_eos_truncates_an_accepted_draft_block() -> None:
    """Self-drafting accepts 8 tokens in the first step; an EOS at index 3 cuts that block."""
    oracle = OracleLM()
    p = [1, 2, 3]
    full = oracle.reference(p, 20)
    j = first_new_at(full, 3)
    assert j < 8
    [r] = generate(oracle, None, [p], strategy=model_draft_program(8), max_new_tokens=20, eos_token_id=full[j],
                   draft_models={"draft": oracle})
    assert r.new_token_ids == full[: j + 1]
    assert r.stats.decode_steps == 1
    assert r.stats.accepted_per_step == (8,)


@pytest.mark.parametrize("strategy", EOS_STRATEGIES)
def test_tiny_llama_eos_equals_hf(strategy: str) -> None:
    model = tiny(0)
    prompts = [[1, 2, 3, 4], [9, 8, 7, 6, 5, 9, 8, 7, 6, 5, 9, 8]]
    strat, kw = _strategy(strategy, model)
    for p in prompts:
        full = hf_greedy(p, 24)
        j = first_new_at(full, 4)
        eos = full[j]
        want = hf_greedy(p, 24, eos=eos)
        assert want == full[: j + 1]
        [r] = generate(model, None, [p], strategy=strat, max_new_tokens=24, eos_token_id=eos, **kw)
        assert r.new_token_ids == want, (strategy, p)
        assert r.stats.finish_reason == "eos"
    # A batch where the rows end at different steps, with the EOS in the model's config.
    eos = hf_greedy(prompts[0], 24)[first_new_at(hf_greedy(prompts[0], 24), 4)]
    with_eos = tiny(0, eos_token_id=eos)
    rs = generate(with_eos, None, prompts, strategy=strat, max_new_tokens=24,
                  **({"draft_models": {"draft": with_eos}} if kw else {}))
    assert [r.new_token_ids for r in rs] == [hf_greedy(p, 24, eos=eos) for p in prompts]


def test_list_of_eos_ids_stops_at_the_first_one_produced() -> None:
    oracle = OracleLM()
    for p in PROMPTS:
        full = oracle.reference(p, 40)
        j1 = first_new_at(full, 2)
        j2 = first_new_at(full, j1 + 1)
        for strategy in ("greedy", "ngram", "lookahead"):
            [r] = generate(oracle, None, [p], strategy=strategy, max_new_tokens=40, eos_token_id=[full[j2], full[j1]])
            assert r.new_token_ids == full[: j1 + 1]
            assert r.stats.finish_reason == "eos"
    model = tiny(0)
    p = [1, 2, 3, 4]
    full = hf_greedy(p, 20)
    j1 = first_new_at(full, 3)
    j2 = first_new_at(full, j1 + 1)
    [r] = generate(model, None, [p], strategy="jacobi", max_new_tokens=20, eos_token_id=[full[j2], full[j1]])
    assert r.new_token_ids == hf_greedy(p, 20, eos=[full[j2], full[j1]]) == full[: j1 + 1]


def test_no_eos_configured_runs_to_the_budget() -> None:
    oracle = OracleLM()                       # no EOS
    p = [1, 2, 3]
    full = oracle.reference(p, 30)
    [r] = generate(oracle, None, [p], strategy="ngram", max_new_tokens=30)
    assert r.new_token_ids == full and r.stats.finish_reason == "max_new_tokens"
    # A model that declares an EOS, overridden with an empty list: no EOS at all.
    j = first_new_at(full, 2)
    own = OracleLM(eos_token_id=full[j])
    [r] = generate(own, None, [p], strategy="ngram", max_new_tokens=30, eos_token_id=[])
    assert r.new_token_ids == full
    [r] = generate(own, None, [p], strategy="ngram", max_new_tokens=30)
    assert r.new_token_ids == full[: j + 1]


def test_eos_ignored_when_the_loop_does_not_stop_on_it() -> None:
    oracle = OracleLM()
    b = Builder("no_eos")
    s = b.prefill()
    with b.iterate(s, until=("max_new_tokens",)) as loop:
        d = b.draft("ngram", loop.state, k=4)
        lg = b.forward(loop.state, d)
        loop.next(b.commit(loop.state, b.verify("greedy", loop.state, lg, d)))
    b.emit(loop.result)
    p = [1, 2, 3]
    full = oracle.reference(p, 25)
    [r] = generate(oracle, None, [p], strategy=b.build(), max_new_tokens=25, eos_token_id=full[first_new_at(full, 2)])
    assert r.new_token_ids == full


def test_stop_token_ids_and_finish_reasons() -> None:
    oracle = OracleLM()
    prompts = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11], [4]]
    fulls = [oracle.reference(p, 30) for p in prompts]
    j = first_new_at(fulls[0], 3)
    stop = fulls[0][j]
    for strategy in ("greedy", "jacobi", "lookahead"):
        rs = generate(oracle, None, prompts, strategy=strategy, max_new_tokens=30, stop_token_ids=[stop])
        for full, r in zip(fulls, rs):
            if stop in full:
                i = full.index(stop)
                assert r.new_token_ids == full[: i + 1] and r.stats.finish_reason == "stop"
            else:
                assert r.new_token_ids == full and r.stats.finish_reason == "max_new_tokens"
        assert rs[0].stats.finish_reason == "stop"
    # EOS and a stop token: whichever comes first ends the row, with its own reason.
    j2 = first_new_at(fulls[0], j + 1)
    [r] = generate(oracle, None, prompts[0], max_new_tokens=30, stop_token_ids=[fulls[0][j2]], eos_token_id=stop)
    assert r.new_token_ids == fulls[0][: j + 1] and r.stats.finish_reason == "eos"
    [r] = generate(oracle, None, prompts[0], max_new_tokens=30, stop_token_ids=[stop], eos_token_id=fulls[0][j2])
    assert r.new_token_ids == fulls[0][: j + 1] and r.stats.finish_reason == "stop"


def test_loop_step_cap_reports_max_steps() -> None:
    """A strategy whose loop stops after max_steps leaves rows short of their budget; their
    finish reason must not claim the budget was reached."""
    oracle = OracleLM()
    b = Builder("capped")
    s = b.prefill()
    with b.iterate(s, max_steps=3) as loop:
        lg = b.forward(loop.state)
        loop.next(b.commit(loop.state, b.verify("greedy", loop.state, lg)))
    b.emit(loop.result)
    p = [1, 2, 3]
    [r] = generate(oracle, None, [p], strategy=b.build(), max_new_tokens=10)
    assert r.new_token_ids == oracle.reference(p, 3)
    assert r.stats.decode_steps == 3
    assert r.stats.finish_reason == "max_steps"
    [r] = generate(oracle, None, [p], strategy=b.build(), max_new_tokens=3)
    assert r.stats.finish_reason == "max_new_tokens"
