"""Text and JSON forms round-trip: ``parse(print(p))`` equals ``p`` and ``print(parse(t)) == t``.

Random valid programs come from a hypothesis strategy that drives the ``Builder``; every op
also has an explicit canonical-text round trip.
"""
from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from decograph.ir import (OPS, Block, Builder, Program, Value, from_json, parse_program,
                          print_program, structurally_equal, to_json, verify)
from decograph.ir import ops as O

# -- structural equality, independent of the printer ------------------------------------------


def _same_attr(x: Any, y: Any, where: str) -> None:
    assert type(x) is type(y), f"{where}: {x!r} ({type(x).__name__}) vs {y!r} ({type(y).__name__})"
    if isinstance(x, tuple):
        assert len(x) == len(y), f"{where}: {x!r} vs {y!r}"
        for i, (a, b) in enumerate(zip(x, y)):
            _same_attr(a, b, f"{where}[{i}]")
    elif isinstance(x, float) and math.isnan(x):
        assert math.isnan(y), where
    else:
        assert x == y, f"{where}: {x!r} vs {y!r}"


def _same_block(a: Block, b: Block, m: dict[int, Value], path: str) -> None:
    assert len(a.params) == len(b.params), path
    for p, q in zip(a.params, b.params):
        assert p.type == q.type, f"{path}: param {p.type} vs {q.type}"
        m[id(p)] = q
    assert len(a.ops) == len(b.ops), f"{path}: {len(a.ops)} ops vs {len(b.ops)}"
    for i, (x, y) in enumerate(zip(a.ops, b.ops)):
        where = f"{path}[{i}] {x.NAME}"
        assert type(x) is type(y), f"{where} vs {y.NAME}"
        for f in x.attr_fields():
            _same_attr(getattr(x, f.name), getattr(y, f.name), f"{where}.{f.name}")
        assert len(x.operands) == len(y.operands), where
        for j, (u, v) in enumerate(zip(x.operands, y.operands)):
            assert m.get(id(u)) is v, f"{where}: operand {j} refers to a different value"
        assert [str(r.type) for r in x.results] == [str(r.type) for r in y.results], where
        for r, s in zip(x.results, y.results):
            assert r.type == s.type, where
            m[id(r)] = s
        if isinstance(x, O.Iterate):
            _same_block(x.body, y.body, m, where + ".body")


def assert_same(a: Program, b: Program) -> None:
    """``a`` and ``b`` have the same ops, attributes (types included), types and data flow."""
    assert a.name == b.name
    assert a.description == b.description
    assert [k for k, _ in a.params] == [k for k, _ in b.params]
    for (k, x), (_, y) in zip(a.params, b.params):
        _same_attr(x, y, f"param {k}")
    _same_block(a.body, b.body, {}, "ops")


# -- random valid programs through the Builder ------------------------------------------------

_CHARS = st.one_of(st.sampled_from(['"', "\\", "\n", "\r", "\t", "'", "\x00", "\x1c", "\u2028", "é", "🙂", "%", "}", "#"]),
                   st.characters())
TEXT = st.text(_CHARS, max_size=12)
IDENT = st.from_regex(r"[A-Za-z_][A-Za-z0-9_.]{0,10}", fullmatch=True)
PARAM_KEY = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True).filter(lambda k: k not in ("name", "description"))
FINITE = st.floats(allow_nan=False, allow_infinity=False)
PARAM_VALUE = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(10**12), 10**12), FINITE, TEXT),
    lambda inner: st.lists(inner, max_size=3).map(tuple), max_leaves=6)
SIZE = st.integers(1, O.MAX_DRAFT)


def _temperature() -> st.SearchStrategy[float | int]:
    return st.one_of(st.floats(1e-6, 1e6), st.integers(1, 100))


@st.composite
def _draft_attrs(draw: st.DrawFn, source: str) -> dict[str, Any]:
    """In-range attributes for ``draft.<source>``; each omitted attribute keeps its default."""
    def some(name: str, strat: st.SearchStrategy[Any]) -> dict[str, Any]:
        return {name: draw(strat)} if draw(st.booleans()) else {}

    if source == "jacobi":
        return {**some("window", SIZE), **some("init", st.sampled_from(["repeat", "pad"]))}
    if source == "gauss_seidel_jacobi":
        return {**some("block", SIZE), **some("init", st.sampled_from(["repeat", "pad"]))}
    if source == "ngram_pool":
        return {**some("n", st.integers(2, 16)), **some("candidates", SIZE)}
    if source == "model":
        return {**some("k", SIZE), **some("model", TEXT)}
    attrs = some("k", SIZE)
    if draw(st.booleans()):
        hi = draw(st.integers(1, 16))
        attrs.update(max_n=hi, min_n=draw(st.integers(1, hi)))
    if source == "adaptive_ngram":
        attrs.update(some("adaptive", st.booleans()))
    return attrs


_SOURCES = ["jacobi", "gauss_seidel_jacobi", "ngram", "ngram_pool", "adaptive_ngram", "model"]


def _spec_step(draw: st.DrawFn, b: Builder, state: Value, forked: bool) -> Value:
    """0-3 drafts, one forward under a fitting mask, a verify rule, a commit."""
    sources = draw(st.lists(st.sampled_from(_SOURCES), max_size=3))
    drafts = [b.draft(src, state, **draw(_draft_attrs(src))) for src in sources]
    linear = len(drafts) <= 1 and all(d.type.rank == 2 for d in drafts)
    masks = (["causal"] if linear else []) + ["tree"] + (["packed"] if forked else [])
    logits = b.forward(state, *drafts, mask=draw(st.sampled_from(masks)))
    rule = draw(st.sampled_from(["greedy", "sampling", "threshold"]))
    attrs: dict[str, Any] = {}
    if rule == "sampling":
        attrs = draw(st.fixed_dictionaries({}, optional={
            "temperature": _temperature(), "top_k": st.integers(0, 1 << 30), "top_p": st.floats(1e-9, 1.0)}))
    elif rule == "threshold" and draw(st.booleans()):
        attrs = {"threshold": draw(st.floats(0.0, 1.0))}
    accepted = b.verify(rule, state, logits, *drafts, **attrs)
    return b.commit(state, accepted, kv=draw(st.sampled_from(O.KV_POLICIES)))


def _diffusion_step(draw: st.DrawFn, b: Builder, state: Value) -> Value:
    """draft.mask, a block forward, an unmask rule, a commit."""
    attrs = draw(st.fixed_dictionaries({}, optional={"k": SIZE, "mask_token": st.integers(-1, 1 << 20)}))
    masked = b.draft("mask", state, **attrs)
    logits = b.forward(state, masked, mask="block")
    rule, strat = draw(st.sampled_from([
        ("threshold", st.fixed_dictionaries({}, optional={"threshold": st.floats(0.0, 1.0)})),
        ("factor", st.fixed_dictionaries({}, optional={"factor": st.floats(1e-9, 1e6)})),
        ("topk_per_step", st.fixed_dictionaries({}, optional={"k": SIZE})),
    ]))
    accepted = b.unmask(rule, state, logits, **draw(strat))
    return b.commit(state, accepted, kv=draw(st.sampled_from(O.KV_POLICIES)))


def _loop(draw: st.DrawFn, b: Builder, state: Value, forked: bool, depth: int = 0) -> Value:
    until = tuple(draw(st.lists(st.sampled_from(O.UNTIL), min_size=1, max_size=4, unique=True)))
    max_steps = draw(st.one_of(st.just(0), st.integers(0, 1 << 30)))
    with b.iterate(state, until=until, max_steps=max_steps) as loop:
        s = loop.state
        for _ in range(draw(st.integers(1, 2))):
            kind = draw(st.sampled_from(["spec", "spec", "diffusion", "nested"]))
            if kind == "nested" and depth == 0:
                s = _loop(draw, b, s, forked, depth + 1)
            elif kind == "diffusion":
                s = _diffusion_step(draw, b, s)
            else:
                s = _spec_step(draw, b, s, forked)
        loop.next(s)
    assert loop.result is not None
    return loop.result


@st.composite
def programs(draw: st.DrawFn) -> Program:
    """A random valid program: prefill, maybe a one-shot step, maybe fork/join, 1-2 loops, emit."""
    params = draw(st.dictionaries(PARAM_KEY, PARAM_VALUE, max_size=3))
    b = Builder(draw(IDENT), draw(st.one_of(st.just(""), TEXT)), **params)
    s = b.prefill()
    if draw(st.booleans()):
        s = _spec_step(draw, b, s, False)
    forked = draw(st.booleans())
    if forked:
        kind = draw(st.sampled_from(["prompts", "delimiter", "provider"]))
        given = tuple(draw(st.lists(TEXT, min_size=1, max_size=4))) if kind == "prompts" else draw(IDENT)
        attrs = draw(st.fixed_dictionaries({}, optional={"max_branches": SIZE, "max_tokens": SIZE, "template": TEXT}))
        s = b.fork(s, b.draft("branches", s, **{kind: given}, **attrs))
    for _ in range(draw(st.integers(1, 2))):
        s = _loop(draw, b, s, forked)
    if forked:
        s = b.join(s, rule=draw(st.sampled_from(["concat", "collect", "ner_dedup"])))
    b.emit(s)
    return b.build()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(programs())
def test_random_programs_round_trip(p: Program) -> None:
    text = print_program(p)
    assert print_program(p) == text, "printing is not deterministic"

    parsed = parse_program(text)
    verify(parsed)
    assert_same(p, parsed)
    assert structurally_equal(p, parsed)
    assert print_program(parsed) == text

    data = to_json(p)
    assert to_json(p) == data, "the JSON form is not deterministic"
    back = from_json(json.loads(json.dumps(data)))
    verify(back)
    assert_same(p, back)
    assert print_program(back) == text
    assert to_json(parsed) == data


# -- one canonical round trip per op ----------------------------------------------------------

PROGRAMS = {
    "tree_spec": '''\
strategy tree_spec(greedy=false, seed=none, tags=[a, "b c"], temperature=0.7) "several drafts,\\none \\"tree\\" forward" {
  %0 = prefill(%prompt) : State
  %1 = iterate(%0, max_steps=64, until=[eos, stop]) : State {
  ^(%2: State):
    %3 = draft.ngram(%2, candidates=1, k=4, max_n=3, min_n=2) : Tokens[B, 4]
    %4 = draft.model(%2, k=3, model="small draft") : Tokens[B, 3]
    %5 = draft.ngram_pool(%2, candidates=2, n=3) : Tokens[B, 2, 2]
    %6 = forward(%2, %3, %4, %5, dedup=false, layout=sequence, mask=tree) : Logits[B, 12, V]
    %7 = verify.sampling(%2, %6, %3, %4, %5, temperature=0.7, top_k=50, top_p=0.95) : Tokens[B, A]
    %8 = commit(%2, %7, kv=recompute, rollback=copy) : State
    yield(%8)
  }
  %9 = emit(%1) : Tokens[B, G]
}
''',
    "jacobi": '''\
strategy jacobi {
  %0 = prefill(%prompt) : State
  %1 = iterate(%0, max_steps=0, until=[eos, max_new_tokens]) : State {
  ^(%2: State):
    %3 = draft.jacobi(%2, init=repeat, window=5) : Tokens[B, 5]
    %4 = forward(%2, %3, dedup=false, layout=sequence, mask=causal) : Logits[B, 6, V]
    %5 = verify.greedy(%2, %4, %3) : Tokens[B, A]
    %6 = commit(%2, %5, kv=keep_accepted, rollback=copy) : State
    yield(%6)
  }
  %7 = iterate(%1, max_steps=0, until=[max_new_tokens]) : State {
  ^(%8: State):
    %9 = draft.gauss_seidel_jacobi(%8, block=4, init=pad) : Tokens[B, 4]
    %10 = draft.adaptive_ngram(%8, adaptive=false, candidates=1, k=6, max_n=4, min_n=2) : Tokens[B, 6]
    %11 = forward(%8, %9, %10, dedup=false, layout=sequence, mask=tree) : Logits[B, 11, V]
    %12 = verify.threshold(%8, %11, %9, %10, threshold=0.8) : Tokens[B, A]
    %13 = commit(%8, %12, kv=block_approx, rollback=copy) : State
    yield(%13)
  }
  %14 = emit(%7) : Tokens[B, G]
}
''',
    "diffusion": '''\
strategy diffusion "LLaDA-style blocks" {
  %0 = prefill(%prompt) : State
  %1 = iterate(%0, max_steps=0, until=[max_new_tokens]) : State {
  ^(%2: State):
    %3 = draft.mask(%2, k=32, mask_token=-1) : Tokens[B, 32]
    %4 = forward(%2, %3, dedup=false, layout=sequence, mask=block) : Logits[B, 33, V]
    %5 = unmask.threshold(%2, %4, contiguous=false, threshold=0.9) : Tokens[B, A]
    %6 = commit(%2, %5, kv=block_approx, rollback=copy) : State
    %7 = draft.mask(%6, k=8, mask_token=126336) : Tokens[B, 8]
    %8 = forward(%6, %7, dedup=false, layout=sequence, mask=block) : Logits[B, 9, V]
    %9 = unmask.factor(%6, %8, factor=1.0) : Tokens[B, A]
    %10 = commit(%6, %9, kv=keep_accepted, rollback=copy) : State
    %11 = draft.mask(%10, k=4, mask_token=-1) : Tokens[B, 4]
    %12 = forward(%10, %11, dedup=false, layout=sequence, mask=block) : Logits[B, 5, V]
    %13 = unmask.topk_per_step(%10, %12, k=2) : Tokens[B, A]
    %14 = commit(%10, %13, kv=keep_accepted, rollback=copy) : State
    yield(%14)
  }
  %15 = emit(%1) : Tokens[B, G]
}
''',
    "parallel": '''\
strategy parallel "branches with \\"quotes\\", \\\\ and \\u00fcn\\u00efcode" {
  %0 = prefill(%prompt) : State
  %1 = draft.branches(%0, delimiter="", max_branches=2, max_tokens=0, prompts=["Plan:\\n", "Say \\"hi\\" \\\\ \\ud83d\\ude42"], provider="", template="{item}") : Tokens[B, 2, L]
  %2 = fork(%0, %1) : State[2]
  %3 = iterate(%2, max_steps=0, until=[eos, max_new_tokens]) : State[2] {
  ^(%4: State[2]):
    %5 = draft.ngram(%4, candidates=1, k=8, max_n=3, min_n=1) : Tokens[B, 8]
    %6 = forward(%4, %5, dedup=false, layout=sequence, mask=packed) : Logits[B, 18, V]
    %7 = verify.greedy(%4, %6, %5) : Tokens[B, A]
    %8 = commit(%4, %7, kv=keep_accepted, rollback=copy) : State[2]
    yield(%8)
  }
  %9 = join(%3, rule=ner_dedup) : State
  %10 = emit(%9) : Tokens[B, G]
}
''',
}

PROGRAMS["noise"] = '''\
strategy noise {
  %0 = prefill(%prompt) : State
  %1 = iterate(%0, max_steps=0, until=[eos, max_new_tokens]) : State {
  ^(%2: State):
    %3 = draft.noise(%2, k=0) : Tokens[B, L]
    %4 = forward(%2, %3, dedup=false, layout=sequence, mask=block) : Logits[B, L + 1, V]
    %5 = unmask.entropy_bound(%2, %4, bound=0.25, confident=0.01, stable=2, steps=12, t_max=1.0, t_min=0.5) : Tokens[B, A]
    %6 = commit(%2, %5, kv=recompute, rollback=copy) : State
    %7 = draft.noise(%6, k=16) : Tokens[B, 16]
    %8 = forward(%6, %7, dedup=false, layout=sequence, mask=block) : Logits[B, 17, V]
    %9 = unmask.entropy_bound(%6, %8, bound=0.1, confident=0.005, stable=0, steps=48, t_max=0.8, t_min=0.4) : Tokens[B, A]
    %10 = commit(%6, %9, kv=recompute, rollback=in_place) : State
    yield(%10)
  }
  %11 = emit(%1) : Tokens[B, G]
}
'''

PROGRAMS["eagle"] = '''\
strategy eagle {
  %0 = prefill(%prompt) : State
  %1 = iterate(%0, max_steps=0, until=[eos, max_new_tokens]) : State {
  ^(%2: State):
    %3 = draft.head(%2, depth=5, head="heads/my head.npz", nodes=0, topk=4) : Tokens[B, N, 5]
    %4 = draft.head(%2, depth=3, head=default, nodes=10, topk=8) : Tokens[B, 10, 3]
    %5 = draft.corpus(%2, corpus=default, k=6, max_n=8, min_n=2) : Tokens[B, 6]
    %6 = forward(%2, %3, %4, %5, dedup=true, layout=sequence, mask=tree) : Logits[B, 5*N + 37, V]
    %7 = verify.greedy(%2, %6, %3, %4, %5) : Tokens[B, A]
    %8 = commit(%2, %7, kv=keep_accepted, rollback=in_place) : State
    yield(%8)
  }
  %9 = emit(%1) : Tokens[B, G]
}
'''

OP_PROGRAM = {
    "prefill": "jacobi", "iterate": "jacobi", "yield": "jacobi", "emit": "jacobi", "commit": "jacobi",
    "forward": "jacobi", "draft.jacobi": "jacobi", "draft.gauss_seidel_jacobi": "jacobi",
    "draft.adaptive_ngram": "jacobi", "verify.greedy": "jacobi", "verify.threshold": "jacobi",
    "draft.ngram": "tree_spec", "draft.model": "tree_spec", "draft.ngram_pool": "tree_spec",
    "verify.sampling": "tree_spec",
    "draft.mask": "diffusion", "unmask.threshold": "diffusion", "unmask.factor": "diffusion",
    "unmask.topk_per_step": "diffusion", "draft.noise": "noise", "unmask.entropy_bound": "noise",
    "draft.branches": "parallel", "fork": "parallel", "join": "parallel", "draft.head": "eagle",
    "draft.corpus": "eagle",
}


def _op_names(p: Program) -> set[str]:
    return {op.NAME for op in p.walk()}


@pytest.mark.parametrize("name", sorted(OPS))
def test_op_round_trips(name: str) -> None:
    text = PROGRAMS[OP_PROGRAM[name]]
    p = verify(parse_program(text))
    assert name in _op_names(p)
    assert print_program(p) == text
    again = parse_program(print_program(p))
    assert_same(p, again)
    assert print_program(from_json(json.loads(json.dumps(to_json(p))))) == text


def test_every_op_is_covered() -> None:
    assert set(OP_PROGRAM) == set(OPS)
    covered = set().union(*(_op_names(parse_program(t)) for t in PROGRAMS.values()))
    assert covered == set(OPS)


def test_canonical_text_decodes_strings() -> None:
    p = parse_program(PROGRAMS["parallel"])
    assert p.description == 'branches with "quotes", \\ and ünïcode'
    branches = next(op for op in p.walk() if isinstance(op, O.DraftBranches))
    assert branches.prompts == ("Plan:\n", 'Say "hi" \\ 🙂')
    spec = parse_program(PROGRAMS["tree_spec"])
    assert spec.params == (("greedy", False), ("seed", None), ("tags", ("a", "b c")), ("temperature", 0.7))


def test_omitted_attributes_take_defaults_and_print_canonically() -> None:
    text = PROGRAMS["jacobi"].replace("(%2, init=repeat, window=5)", "(%2)").replace("max_steps=0, until=[eos, max_new_tokens]", "")
    assert print_program(verify(parse_program(text))) == PROGRAMS["jacobi"]


def test_comments_and_whitespace_are_not_significant() -> None:
    text = PROGRAMS["jacobi"].replace("\n  %0", "  # the prompt's KV\n\n      %0").replace(", ", " ,  ")
    assert print_program(verify(parse_program(text))) == PROGRAMS["jacobi"]


def test_non_finite_floats_print_and_parse() -> None:
    text = PROGRAMS["tree_spec"].replace("temperature=0.7)", "temperature=inf, x=-inf, y=nan)")
    p = parse_program(text)
    params = dict(p.params)
    assert params["temperature"] == math.inf and params["x"] == -math.inf and math.isnan(params["y"])
    assert print_program(p) == text
