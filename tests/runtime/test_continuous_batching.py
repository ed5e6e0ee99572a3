"""Continuous batching (``decograph.runtime.scheduler``): requests that join a running batch
at later steps, and leave it when they end or are cancelled, get exactly the tokens they get
alone, on the torch backend and on ONNX Runtime (tiny random Llama; ONNX Runtime's fp32 graph
is exact here). Load-aware drafting: a wide batch drafts less."""
from __future__ import annotations

import threading

import pytest
from runtime_helpers import tiny

import decograph
from decograph.api import Decoder
from decograph.errors import UnsupportedError
from decograph.ir import ops as O
from decograph.passes.cost import CostCurve
from decograph.runtime import Admission, RunConfig
from decograph.runtime.drafts import make_source
from decograph.runtime.rows import Row
from decograph.runtime.scheduler import Scheduler

pytestmark = pytest.mark.usefixtures("private_cache")

PROMPTS = [[3, 1, 4, 1, 5, 3, 1, 4, 1, 5, 3], [2, 7, 2, 7, 2], [9, 2, 6, 5, 3, 5, 8, 9, 2, 6], [5],
           [1, 2, 3, 4, 1, 2, 3, 4, 1, 2], [8, 8, 8, 8, 8, 8, 8], [4, 6, 4, 6, 4, 6, 4, 6, 4], [7, 3]]
BUDGETS = [12, 7, 16, 9, 14, 3, 11, 10]


@pytest.fixture(scope="module")
def model():
    return tiny(2, 48, hidden=32, heads=4, kv_heads=2, init_std=0.3)


def alone(model, backend: str, strategy: str) -> list[list[int]]:
    return [decograph.generate(model, None, [p], strategy, n, eos_token_id=[], backend=backend)[0].new_token_ids
            for p, n in zip(PROMPTS, BUDGETS)]


def staggered(model, backend: str, strategy: str, cancel: int | None = None) -> tuple[dict[int, list[int]], dict]:
    """The interpreter with an admission hook: one prompt joins at each step boundary, and
    ``cancel`` (an index) leaves two steps after it joined."""
    dec = Decoder(model, None, strategy, backend=backend)
    waiting = list(range(len(PROMPTS)))
    got: dict[int, list[int]] = {i: [] for i in waiting}
    ends: dict[int, bool] = {}
    boundary = [0]
    joined: dict[int, int] = {}

    def admit(idle: bool) -> Admission:
        boundary[0] += 1
        out = Admission()
        if waiting:
            i = waiting.pop(0)
            joined[i] = boundary[0]
            out.new.append((i, PROMPTS[i], BUDGETS[i]))
        if cancel is not None and joined.get(cancel) == boundary[0] - 2:
            out.cancel.append(cancel)
        return out

    cfg = RunConfig(admit=admit)
    cfg.eos_token_ids = ()
    interp = dec.interpreter(cfg)
    interp.cfg.eos_token_ids = ()
    interp.eos = set()
    for ev in interp.run([]):
        got[ev.row] += ev.tokens
        if ev.done:
            ends[ev.row] = True
    return got, ends


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
@pytest.mark.parametrize("strategy", ["greedy", "anpd", "lookahead"])
def test_rows_joining_a_running_batch_get_their_tokens_alone(model, backend, strategy) -> None:
    want = alone(model, backend, strategy)
    got, ends = staggered(model, backend, strategy)
    assert [got[i] for i in range(len(PROMPTS))] == want
    assert all(ends.get(i) for i in range(len(PROMPTS)))


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_a_cancelled_row_leaves_and_the_others_are_untouched(model, backend) -> None:
    want = alone(model, backend, "anpd")
    got, ends = staggered(model, backend, "anpd", cancel=2)
    for i in range(len(PROMPTS)):
        if i == 2:
            assert len(got[i]) < BUDGETS[2] and got[i] == want[2][:len(got[i])] and i not in ends
        else:
            assert got[i] == want[i], i


def test_admission_refuses_a_forking_program(model) -> None:
    from test_fork_join import fork_program

    dec = Decoder(model, None, fork_program(), backend="torch", passes="none")
    with pytest.raises(UnsupportedError, match="continuous batching runs causal programs without fork/join"):
        dec.interpreter(RunConfig(admit=lambda idle: Admission()))


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_scheduler_serves_concurrent_requests_exactly(model, backend) -> None:
    """16 requests from 4 threads, a batch of at most 5: each gets its tokens alone."""
    dec = Decoder(model, None, "anpd", backend=backend)
    want = alone(model, backend, "anpd")

    def make(lane, cfg):
        cfg.eos_token_ids = ()
        return dec.interpreter(cfg)

    sched = Scheduler(make, max_batch=5)
    results: dict[int, list[int]] = {}
    lock = threading.Lock()

    def client(k: int) -> None:
        for j in range(4):
            i = (k * 4 + j) % len(PROMPTS)
            req = sched.submit(PROMPTS[i], BUDGETS[i])
            toks = req.result(timeout=120)
            with lock:
                results[k * 4 + j] = toks
            assert req.stats.completion_tokens == len(toks)
            assert req.stats.forwards >= 1

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert sched.close(5)
    assert len(results) == 16
    for n, toks in results.items():
        assert toks == want[n % len(PROMPTS)], n


def test_scheduler_cancel_frees_the_row(model) -> None:
    dec = Decoder(model, None, "greedy", backend="torch")
    started = threading.Event()

    def make(lane, cfg):
        cfg.eos_token_ids = ()
        return dec.interpreter(cfg)

    sched = Scheduler(make, max_batch=4)
    chunks = []

    def listener(item):
        chunks.append(item)
        started.set()

    long = sched.submit(PROMPTS[0], 10_000, listener=listener)
    assert started.wait(60)
    long.cancel()
    assert long.done.wait(60)
    assert long.stats.finish_reason == "cancelled"
    assert chunks[-1] is None
    short = sched.submit(PROMPTS[1], 5)
    assert len(short.result(timeout=60)) == 5
    assert sched.running() == 0
    assert sched.close(5)


def test_load_aware_drafting_drafts_less_in_a_wide_batch() -> None:
    """ANPD's draft length weighs the whole batch's forward: on a curve that is flat for a few
    tokens and linear beyond, one row drafts its full match and sixteen rows draft nothing."""
    from decograph.frontends.strategies import load_strategy

    [op] = [o for o in load_strategy("anpd").program.walk() if isinstance(o, O.DRAFT_OPS)]
    src = make_source(op, {})
    src.cost = CostCurve({1: 1.0, 2: 1.0, 4: 1.1, 8: 1.3, 16: 2.0, 32: 4.0, 64: 8.0})
    toks = [5, 6, 7, 8, 9, 10, 11, 12, 1, 2, 3, 5, 6, 7, 8]
    row = Row(0, list(toks), len(toks), 100, cached=len(toks) - 1)
    src.rows = 1
    one = src.propose(row, 20)
    row16 = Row(0, list(toks), len(toks), 100, cached=len(toks) - 1)
    src.rows = 16
    sixteen = src.propose(row16, 20)
    assert one and len(one[0]) >= 3
    assert sum(map(len, sixteen)) < len(one[0])


def test_a_draft_token_in_a_rows_padding_is_free_at_any_batch_size() -> None:
    """A backend whose step computes at least two query tokens per row (``Engine.min_query``:
    an exact ONNX graph's padding row) charges a one-token draft nothing, so sixteen rows on a
    linear curve still draft one token each, and never more than the curve pays for."""
    from decograph.frontends.strategies import load_strategy

    [op] = [o for o in load_strategy("anpd").program.walk() if isinstance(o, O.DRAFT_OPS)]
    toks = [5, 6, 7, 8, 9, 10, 11, 12, 1, 2, 3, 5, 6, 7, 8]
    drafts = {}
    for min_query in (1, 2):
        src = make_source(op, {})
        src.cost = CostCurve({1: 1.0, 2: 1.0, 4: 1.1, 8: 1.3, 16: 2.0, 32: 4.0, 64: 8.0, 128: 16.0})
        src.rows, src.min_query = 16, min_query
        assert src.step_cost(1) == src.cost(16 * min_query)
        drafts[min_query] = src.propose(Row(0, list(toks), len(toks), 100, cached=len(toks) - 1), 20)
    assert sum(map(len, drafts[1])) == 0
    assert [len(c) for c in drafts[2]] == [1]


def test_an_exact_graph_computes_two_query_tokens_a_step(model) -> None:
    """The ONNX engine reports the query tokens its rows compute at least: two (the filler or
    padding row that keeps every product off one row)."""
    dec = Decoder(model, None, "anpd", backend="onnxruntime")
    interp = dec.interpreter(RunConfig())
    assert interp.engine.min_query == 2
    assert all(src.min_query == 2 for src in interp.sources.values())


def test_onnxruntime_batches_hold_no_more_rows_than_stay_exact(model) -> None:
    """The graph's measured batch shape caps a batch (wider ones step row by row), so 8 prompts
    in one call still get their tokens alone (this tiny fp32 graph keeps 4 rows exact here)."""
    dec = Decoder(model, None, "anpd", backend="onnxruntime")
    engine = dec.interpreter(RunConfig()).engine
    assert engine.max_rows in (1, 2, 4, 8, 16)
    out = decograph.generate(model, None, PROMPTS, "anpd", 10, eos_token_id=[], backend="onnxruntime")
    assert [r.new_token_ids for r in out] == [
        decograph.generate(model, None, [p], "anpd", 10, eos_token_id=[], backend="onnxruntime")[0].new_token_ids
        for p in PROMPTS]


def _mixed(model, backend: str, strategy: str) -> dict[int, list[int]]:
    """Every prompt joins one running batch, a step apart; odd rows sample with their own
    temperature, top-p and seed (``RowSampling``), even rows keep the program's rule."""
    from decograph.runtime.verify import RowSampling

    dec = Decoder(model, None, strategy, backend=backend)
    waiting = list(range(len(PROMPTS)))
    got: dict[int, list[int]] = {i: [] for i in waiting}

    def admit(idle: bool) -> Admission:
        out = Admission()
        if waiting:
            i = waiting.pop(0)
            own = RowSampling(0.6 + 0.1 * i, 0.9, seed=10 + i) if i % 2 else None
            out.new.append((i, PROMPTS[i], BUDGETS[i], own))
        return out

    cfg = RunConfig(admit=admit)
    interp = dec.interpreter(cfg)
    interp.cfg.eos_token_ids, interp.eos = (), set()
    for ev in interp.run([]):
        got[ev.row] += ev.tokens
    return got


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_rows_with_their_own_sampling_parameters_share_a_batch(model, backend) -> None:
    """Rows of different temperatures decode in one batch: each sampling row gets exactly the
    tokens of its prompt sampled alone at its temperature, top-p and seed; the greedy rows
    their greedy tokens."""
    from decograph.passes.sampling import to_sampling

    got = _mixed(model, backend, "greedy")
    greedy = alone(model, backend, "greedy")
    base = Decoder(model, None, "greedy", backend=backend).program
    for i, (p, n) in enumerate(zip(PROMPTS, BUDGETS)):
        if i % 2 == 0:
            assert got[i] == greedy[i], i
            continue
        [r] = decograph.generate(model, None, [p], to_sampling(base, 0.6 + 0.1 * i, 0, 0.9), n, eos_token_id=[],
                                 backend=backend, seed=10 + i, passes="none")
        assert got[i] == r.new_token_ids, i
    assert any(got[i] != greedy[i] for i in range(1, len(PROMPTS), 2))      # they did sample


def test_sampling_rows_beside_drafting_greedy_rows_leave_them_exact(model) -> None:
    """With drafts (anpd), the greedy rows of a mixed batch keep their tokens alone; the
    sampling rows decode their budgets."""
    got = _mixed(model, "torch", "anpd")
    want = alone(model, "torch", "anpd")
    for i in range(len(PROMPTS)):
        if i % 2 == 0:
            assert got[i] == want[i], i
        else:
            assert len(got[i]) == BUDGETS[i] and all(0 <= t < 48 for t in got[i])


def test_row_sampling_refuses_bad_parameters() -> None:
    from decograph.errors import InputError
    from decograph.runtime.verify import RowSampling

    for bad in ({"temperature": -1.0}, {"temperature": float("nan")}, {"temperature": 1.0, "top_p": 0.0},
                {"temperature": 1.0, "top_p": 1.5}, {"temperature": 1.0, "top_k": -2}):
        with pytest.raises(InputError):
            RowSampling(**bad)


def test_a_step_boundary_admits_prompts_up_to_the_prefill_budget(model) -> None:
    """A burst of requests: each boundary takes in prompts of at most ``prefill_tokens`` tokens
    in all (one request at least, whatever its length), so their forwards spread over the
    running batch's steps; each request still gets its tokens alone."""
    dec = Decoder(model, None, "anpd", backend="torch")
    want = alone(model, "torch", "anpd")
    admitted: list[list[int]] = []

    def make(lane, cfg):
        inner = cfg.admit

        def admit(idle):
            got = inner(idle)
            if got.new:
                admitted.append([len(p) for _, p, *_ in got.new])
            return got
        cfg.admit = admit
        cfg.eos_token_ids = ()
        return dec.interpreter(cfg)

    sched = Scheduler(make, max_batch=8, prefill_tokens=12)
    reqs = [sched.submit(p, n) for p, n in zip(PROMPTS, BUDGETS)]
    got = [r.result(timeout=120) for r in reqs]
    assert sched.close(5)
    assert got == want
    assert sum(map(len, admitted)) == len(PROMPTS) and len(admitted) >= 3
    assert all(len(a) == 1 or sum(a) <= 12 for a in admitted), admitted
    with pytest.raises(Exception, match="prefill_tokens"):
        Scheduler(make, prefill_tokens=-1)
