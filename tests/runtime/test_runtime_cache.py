"""The slot cache under speculation: rollback, compaction, ragged batches and re-entrancy.

After every committed step each active row's valid slots must be exactly the KV of its cached
committed tokens: compared with a cache rebuilt from scratch by one causal forward (tiny Llama,
allclose) or slot by slot (the oracle records each slot's token and position).
"""
from __future__ import annotations

import pytest
import torch
from runtime_helpers import (
    draft_program,
    hf_greedy,
    lookahead_program,
    model_draft_program,
    tiny,
)

from decograph.api import _setup, generate, generate_stream
from decograph.backends.torch_ref.batch import BatchState
from decograph.models.oracle import OracleLM

ATOL = 1e-5


def _interp(model, prompts, strategy, max_new_tokens, draft_models=None):
    return _setup(model, None, prompts, strategy, max_new_tokens, chat=False, do_sample=False, temperature=1.0,
                  top_k=0, top_p=1.0, seed=None, eos_token_id=None, stop_token_ids=(), draft_models=draft_models,
                  overrides=None)


def _scratch_kv(model, tokens: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    with torch.no_grad():
        out = model(input_ids=torch.tensor([tokens]), use_cache=True)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    return [(layer.keys[0], layer.values[0]) for layer in cache.layers]


def check_cache(state: BatchState, hf_model=None, kv: str = "keep_accepted") -> int:
    """Asserts the cache invariants for every active row; returns how many rows it checked."""
    if not state.active:                 # every row finished: the cache is no longer used
        return 0
    adapter = state.adapter
    assert state.valid.shape == (len(state.active), adapter.cache_len(state.cache))
    if state.valid.shape[1]:
        assert bool(state.valid[:, -1].any()), "the invalid tail was not cropped"
    tensors = adapter.slot_tensors(state.cache) if hf_model is not None else None
    for b, row in enumerate(state.active):
        slots = state.valid[b].nonzero().flatten()
        assert len(slots) == row.cached
        if kv == "keep_accepted":
            assert row.cached == len(row.tokens) - 1     # only the bonus token is pending
        else:
            assert 0 < len(row.tokens) - row.cached
        if hf_model is None:
            assert state.cache.tokens[b, slots].tolist() == row.tokens[: row.cached]
            assert state.cache.positions[b, slots].tolist() == list(range(row.cached))
        else:
            ref = _scratch_kv(hf_model, row.tokens[: row.cached])
            assert len(ref) == len(tensors)
            for (k, v), (rk, rv) in zip(tensors, ref):
                torch.testing.assert_close(k[b][:, slots], rk, atol=ATOL, rtol=ATOL)
                torch.testing.assert_close(v[b][:, slots], rv, atol=ATOL, rtol=ATOL)
    return len(state.active)


def run_checked(model, prompts, strategy, max_new_tokens, hf_model=None, draft_models=None, kv="keep_accepted",
                every: int = 1):
    """Runs like ``generate`` and checks the cache after every ``every``-th event; returns the
    interpreter (its ``state`` holds the rows) and the number of row checks made."""
    interp, ids, _ = _interp(model, prompts, strategy, max_new_tokens, draft_models)
    checks = 0
    gen = interp.run(ids)
    with torch.inference_mode():
        for i, _event in enumerate(gen):
            if i % every == 0:
                checks += check_cache(interp.state, hf_model, kv)
    return interp, checks


TINY_STRATEGIES = {
    "jacobi": lambda m: ("jacobi", None),
    "ngram": lambda m: ("ngram", None),
    "lookahead": lambda m: ("lookahead", None),
    "self_draft": lambda m: (model_draft_program(4), {"draft": m}),
    "other_draft": lambda m: (model_draft_program(3), {"draft": tiny(7)}),
}


@pytest.mark.parametrize("name", sorted(TINY_STRATEGIES))
def test_tiny_kv_matches_scratch_after_every_step_batch1(name: str) -> None:
    model = tiny(0)
    strategy, drafts = TINY_STRATEGIES[name](model)
    p = [9, 8, 7, 6, 5, 9, 8, 7, 6, 5, 9, 8]
    interp, checks = run_checked(model, [p], strategy, 20, hf_model=model, draft_models=drafts)
    assert checks >= 3
    assert interp.state.rows[0].new_tokens == hf_greedy(p, 20)


@pytest.mark.parametrize("name", ["lookahead", "ngram", "self_draft"])
def test_tiny_kv_ragged_batch_stopped_early(name: str) -> None:
    """A loop capped at 5 steps: the rows are left mid-generation, with ragged lengths."""
    model = tiny(0)
    prompts = [[1, 2, 3, 4], [9, 8, 7, 6, 5, 9, 8, 7, 6, 5, 9, 8], [17]]
    if name == "lookahead":
        strategy, drafts = lookahead_program(4, 3, 4, max_steps=5), None
    elif name == "ngram":
        strategy, drafts = draft_program("ngram", k=6, max_steps=5), None
    else:
        strategy, drafts = model_draft_program(3, max_steps=5), {"draft": model}
    interp, checks = run_checked(model, prompts, strategy, 30, hf_model=model, draft_models=drafts)
    state = interp.state
    assert len(state.active) == 3 and checks == 5 * 3 * 3   # 5 steps, 3 events each, 3 rows checked
    assert check_cache(state, model) == 3           # the state the loop stopped in
    lengths = {len(r.tokens) for r in state.active}
    assert len(lengths) >= 2
    for p, row in zip(prompts, state.rows):
        assert row.new_tokens == hf_greedy(p, 30)[: len(row.new_tokens)]
        assert row.steps == 5


def test_tiny_kv_recompute_commit() -> None:
    model = tiny(0)
    prompts = [[1, 2, 3, 4], [9, 8, 7, 6, 5, 9, 8, 7, 6, 5, 9, 8]]
    strategy = draft_program("ngram", kv="recompute", k=4)
    interp, checks = run_checked(model, prompts, strategy, 16, hf_model=model, kv="recompute")
    assert checks > 0
    assert [r.new_tokens for r in interp.state.rows] == [hf_greedy(p, 16) for p in prompts]


ORACLE_PROMPTS = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11], [4], [7, 3, 7, 3, 7, 3, 7, 3, 7, 3, 7, 3, 9]]


@pytest.mark.parametrize("strategy", ["jacobi", "gs_jacobi", "ngram", "anpd", "lookahead", "self_draft"])
def test_oracle_slots_exact_after_every_step(strategy: str) -> None:
    oracle = OracleLM()
    drafts = None
    if strategy == "self_draft":
        strategy, drafts = model_draft_program(5), {"draft": OracleLM(period=3)}
    interp, checks = run_checked(oracle, ORACLE_PROMPTS, strategy, 40, draft_models=drafts)
    assert checks > 4
    assert [r.new_tokens for r in interp.state.rows] == [oracle.reference(p, 40) for p in ORACLE_PROMPTS]


def _count_compactions(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = BatchState._compact

    def counting(self: BatchState, union: torch.Tensor, most: int) -> None:
        calls.append(self.valid.shape[1])
        real(self, union, most)

    monkeypatch.setattr(BatchState, "_compact", counting)
    return calls


def test_compaction_keeps_the_oracle_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    """Many candidates on a long generation: rejected slots pile up until the cache compacts."""
    calls = _count_compactions(monkeypatch)
    oracle = OracleLM(vocab_size=16)
    strategy = lookahead_program(window=4, n=3, candidates=6)
    interp, checks = run_checked(oracle, ORACLE_PROMPTS, strategy, 160, every=3)
    assert len(calls) >= 1
    assert [r.new_tokens for r in interp.state.rows] == [oracle.reference(p, 160) for p in ORACLE_PROMPTS]
    out = generate(oracle, None, ORACLE_PROMPTS, strategy=strategy, max_new_tokens=160)
    assert [r.new_token_ids for r in out] == [oracle.reference(p, 160) for p in ORACLE_PROMPTS]


def test_compaction_keeps_the_tiny_llama_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_compactions(monkeypatch)
    model = tiny(0)
    prompts = [[1, 2, 3, 4], [30, 31, 30, 31, 30, 31, 30]]
    strategy = lookahead_program(window=5, n=3, candidates=6)
    interp, checks = run_checked(model, prompts, strategy, 70, hf_model=model, every=4)
    assert calls and checks > 0
    assert [r.new_tokens for r in interp.state.rows] == [hf_greedy(p, 70) for p in prompts]


# ----------------------------------------------------------------------------- re-entrancy and batches


def test_consecutive_generations_equal_fresh_runs() -> None:
    model, oracle = tiny(0), OracleLM()
    prompts = [[1, 2, 3, 4], [9, 8, 7, 6, 5, 9, 8]]
    want_tiny = [hf_greedy(p, 12) for p in prompts]
    want_oracle = [oracle.reference(p, 12) for p in prompts]
    for _ in range(2):
        for strategy in ("lookahead", "ngram", "anpd"):
            assert [r.new_token_ids for r in generate(model, None, prompts, strategy=strategy, max_new_tokens=12)] \
                == want_tiny
            assert [r.new_token_ids for r in generate(oracle, None, prompts, strategy=strategy, max_new_tokens=12)] \
                == want_oracle
    # A stream abandoned half-way leaves nothing behind either.
    stream = generate_stream(model, None, prompts, strategy="jacobi", max_new_tokens=12)
    next(stream), next(stream)
    assert [r.new_token_ids for r in generate(model, None, prompts, strategy="jacobi", max_new_tokens=12)] == want_tiny
    stream.close()


def test_interleaved_streams_equal_fresh_runs() -> None:
    model = tiny(0)
    a_prompts = [[1, 2, 3, 4], [17]]
    b_prompts = [[9, 8, 7, 6, 5, 9, 8, 7, 6, 5]]
    streams = {
        "a": generate_stream(model, None, a_prompts, strategy="lookahead", max_new_tokens=14),
        "b": generate_stream(model, None, b_prompts, strategy=model_draft_program(3), max_new_tokens=14,
                             draft_models={"draft": model}),
        "c": generate_stream(OracleLM(), None, a_prompts, strategy="jacobi", max_new_tokens=14),
    }
    got = {k: {} for k in streams}
    live = dict(streams)
    while live:
        for key in list(live):
            chunk = next(live[key], None)
            if chunk is None:
                del live[key]
                continue
            got[key].setdefault(chunk.row, []).extend(chunk.token_ids)
    assert [got["a"][i] for i in range(2)] == [hf_greedy(p, 14) for p in a_prompts]
    assert got["b"][0] == hf_greedy(b_prompts[0], 14)
    assert [got["c"][i] for i in range(2)] == [OracleLM().reference(p, 14) for p in a_prompts]


@pytest.mark.parametrize("strategy", ["jacobi", "lookahead", "self_draft"])
def test_each_row_of_a_ragged_batch_equals_its_batch1_run(strategy: str) -> None:
    model = tiny(0)
    prompts = [[5], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [40, 41, 40, 41], [2, 2]]
    kw = {"draft_models": {"draft": model}} if strategy == "self_draft" else {}
    strat = model_draft_program(4) if strategy == "self_draft" else strategy
    batch = generate(model, None, prompts, strategy=strat, max_new_tokens=18, **kw)
    for p, r in zip(prompts, batch):
        [single] = generate(model, None, [p], strategy=strat, max_new_tokens=18, **kw)
        assert r.new_token_ids == single.new_token_ids == hf_greedy(p, 18)


def test_concurrent_generations_in_threads_equal_fresh_runs() -> None:
    import threading

    model = tiny(0)
    jobs = [([[1, 2, 3, 4], [17]], "lookahead"), ([[9, 8, 7, 6, 5, 9, 8]], "ngram"), ([[2, 2], [5]], "jacobi")]
    want = [[hf_greedy(p, 12) for p in prompts] for prompts, _ in jobs]
    got: dict[int, list] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            prompts, strategy = jobs[i % len(jobs)]
            for _ in range(2):
                out = generate(model, None, prompts, strategy=strategy, max_new_tokens=12)
                got.setdefault(i, []).append([r.new_token_ids for r in out])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i in range(6):
        assert got[i] == [want[i % len(jobs)]] * 2
