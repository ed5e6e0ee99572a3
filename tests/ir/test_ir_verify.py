"""Malformed programs: the exact first line of each ``VerifyError`` / ``ParseError``, and that
every message names the op, the line and the operand or field, quotes the offending line with a
``>`` marker and says what would fix it."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Union

import pytest

from decograph.errors import ParseError, VerifyError
from decograph.ir import Builder, Program, Value, parse_program, print_program, verify
from decograph.ir import ops as O
from decograph.ir.types import Sym, Type

BASE = '''\
strategy t {
  %0 = prefill(%prompt) : State
  %1 = iterate(%0, max_steps=0, until=[eos, max_new_tokens]) : State {
  ^(%2: State):
    %3 = draft.ngram(%2, k=8, max_n=3, min_n=1) : Tokens[B, 8]
    %4 = forward(%2, %3, mask=causal) : Logits[B, 9, V]
    %5 = verify.greedy(%2, %4, %3) : Tokens[B, A]
    %6 = commit(%2, %5, kv=keep_accepted) : State
    yield(%6)
  }
  %7 = emit(%1) : Tokens[B, G]
}
'''


def edit(old: str, new: str) -> str:
    """BASE with the one occurrence of ``old`` replaced."""
    assert BASE.count(old) == 1, old
    return BASE.replace(old, new)


# -- programs built with the Builder (build() verifies) ---------------------------------------


def _loop(b: Builder, init: Value, body: Callable[[Value], Value]) -> Value:
    with b.iterate(init) as loop:
        loop.next(body(loop.state))
    assert loop.result is not None
    return loop.result


def _greedy_step(b: Builder, s: Value) -> Value:
    d = b.draft("ngram", s, k=8)
    return b.commit(s, b.verify("greedy", s, b.forward(s, d), d))


def out_of_scope_use() -> Program:
    b = Builder("t")
    with b.iterate(b.prefill()) as loop:
        loop.next(_greedy_step(b, loop.state))
    b.emit(loop.state)  # the body parameter, outside the body
    return b.build()


def undefined_use() -> Program:
    b = Builder("t")
    s = b.prefill()
    ghost = Value(Type("Tokens", (Sym("B"), 8)))  # defined by no op
    logits = b.forward(s, ghost)
    b.emit(b.commit(s, b.verify("greedy", s, logits, ghost)))
    return b.build()


def logits_from_draft() -> Program:
    b = Builder("t")

    def body(s: Value) -> Value:
        d = b.draft("ngram", s, k=8)
        return b.commit(s, b.verify("greedy", s, d, d))
    b.emit(_loop(b, b.prefill(), body))
    return b.build()


def other_drafts() -> Program:
    b = Builder("t")

    def body(s: Value) -> Value:
        d1, d2 = b.draft("ngram", s, k=4), b.draft("jacobi", s, window=3)
        return b.commit(s, b.verify("greedy", s, b.forward(s, d1, d2, mask="tree"), d2, d1))
    b.emit(_loop(b, b.prefill(), body))
    return b.build()


def commit_of_draft() -> Program:
    b = Builder("t")
    b.emit(_loop(b, b.prefill(), lambda s: b.commit(s, b.draft("ngram", s, k=8))))
    return b.build()


def join_unforked() -> Program:
    b = Builder("t")
    b.emit(b.join(_loop(b, b.prefill(), lambda s: _greedy_step(b, s))))
    return b.build()


def nan_attribute() -> Program:
    b = Builder("t")

    def body(s: Value) -> Value:
        d = b.draft("ngram", s, k=8)
        return b.commit(s, b.verify("sampling", s, b.forward(s, d), d, top_p=math.nan))
    b.emit(_loop(b, b.prefill(), body))
    return b.build()


def fork_of_pool() -> Program:
    b = Builder("t")
    s = b.prefill()
    forked = b.fork(s, b.draft("ngram_pool", s, n=3, candidates=2))
    b.emit(b.join(_loop(b, forked, lambda st: _greedy_step(b, st))))
    return b.build()


def verify_after_block() -> Program:
    b = Builder("t")

    def body(s: Value) -> Value:
        d = b.draft("mask", s, k=8)
        return b.commit(s, b.verify("greedy", s, b.forward(s, d, mask="block"), d))
    b.emit(_loop(b, b.prefill(), body))
    return b.build()


def emit_twice() -> Program:
    b = Builder("t")
    s = b.prefill()
    b.emit(s)
    b.emit(s)
    return b.build()


def defined_twice_by_reuse() -> Program:
    b = Builder("t")
    s = b.prefill()
    b.emit(s)
    p = b.build()
    prefill = p.body.ops[0]
    return verify(Program("t", O.Block(p.body.params, (prefill, prefill, p.body.ops[1]))))


# -- the cases --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    source: Union[str, Callable[[], Program]]
    error: type[Exception]
    first: str  # the exact first line of the message
    op: str
    field: str  # the operand or field named
    marker: str  # text of the line quoted with '>'


def _v(line: int, op: str, what: str, msg: str) -> str:
    return f"verify error at line {line}, op `{op}`, {what}: {msg}"


CASES = [
    Case("undefined value (parser)", edit("emit(%1)", "emit(%9)"), ParseError,
         "parse error at line 11, column 13, op `emit`, operand 'state': use of undefined value %9 (found '%9')",
         "emit", "operand 'state'", "%7 = emit(%9) : Tokens[B, G]"),
    Case("undefined value (verifier)", undefined_use, VerifyError,
         _v(3, "forward", "operand 'drafts'[0]", "%<undefined> is used before it is defined"),
         "forward", "operand 'drafts'[0]", "%1 = forward(%0, %<undefined>, dedup=false, layout=sequence, mask=causal)"),
    Case("value used outside its iterate body", out_of_scope_use, VerifyError,
         _v(11, "emit", "operand 'state'", "%2 is defined inside an iterate body and is not visible here"),
         "emit", "operand 'state'", "%7 = emit(%2) : Tokens[B, G]"),
    Case("value defined twice (parser)", edit("%6 = commit", "%5 = commit"), ParseError,
         "parse error at line 8, column 5, op `commit`, result %5: value %5 is defined twice",
         "commit", "result %5", "%5 = commit(%2, %5, kv=keep_accepted) : State"),
    Case("value defined twice (verifier)", defined_twice_by_reuse, VerifyError,
         _v(3, "prefill", "its result", "this value is defined twice"),
         "prefill", "its result", "%1 = prefill(%prompt) : State"),
    Case("unknown op", edit("draft.ngram(", "draft.ngarm("), ParseError,
         "parse error at line 5, column 10, op `draft.ngarm`: unknown op; known ops: " + ", ".join(sorted(O.OPS)),
         "draft.ngarm", "unknown op", "%3 = draft.ngarm(%2, k=8, max_n=3, min_n=1)"),
    Case("unknown attribute", edit("k=8, max_n", "k=8, size=3, max_n"), ParseError,
         "parse error at line 5, column 31, op `draft.ngram`, field 'size': unknown attribute; "
         "draft.ngram takes candidates, k, max_n, min_n",
         "draft.ngram", "field 'size'", "%3 = draft.ngram(%2, k=8, size=3, max_n=3, min_n=1)"),
    Case("attribute on an op without attributes", edit("verify.greedy(%2, %4, %3)", "verify.greedy(%2, %4, %3, mask=tree)"),
         ParseError, "parse error at line 7, column 36, op `verify.greedy`, field 'mask': unknown attribute; "
         "verify.greedy takes no attributes",
         "verify.greedy", "field 'mask'", "%5 = verify.greedy(%2, %4, %3, mask=tree)"),
    Case("wrong attribute type", edit("k=8,", 'k="eight",'), VerifyError,
         _v(5, "draft.ngram", "field 'k'", "must be int, got 'eight'"),
         "draft.ngram", "field 'k'", "%3 = draft.ngram(%2, candidates=1, k=eight, max_n=3, min_n=1)"),
    Case("bool for an int attribute", edit("k=8,", "k=true,"), VerifyError,
         _v(5, "draft.ngram", "field 'k'", "must be int, got True"),
         "draft.ngram", "field 'k'", "%3 = draft.ngram(%2, candidates=1, k=true, max_n=3, min_n=1)"),
    Case("window 0", edit("draft.ngram(%2, k=8, max_n=3, min_n=1) : Tokens[B, 8]", "draft.jacobi(%2, window=0) : Tokens[B, 0]"),
         VerifyError, _v(5, "draft.jacobi", "field 'window'", "0 is out of range [1, 64]"),
         "draft.jacobi", "field 'window'", "%3 = draft.jacobi(%2, init=repeat, window=0) : Tokens[B, 0]"),
    Case("window 65", edit("draft.ngram(%2, k=8, max_n=3, min_n=1) : Tokens[B, 8]", "draft.jacobi(%2, window=65) : Tokens[B, 65]"),
         VerifyError, _v(5, "draft.jacobi", "field 'window'", "65 is out of range [1, 64]"),
         "draft.jacobi", "field 'window'", "%3 = draft.jacobi(%2, init=repeat, window=65)"),
    Case("threshold -0.1", edit("verify.greedy(%2, %4, %3)", "verify.threshold(%2, %4, %3, threshold=-0.1)"), VerifyError,
         _v(7, "verify.threshold", "field 'threshold'", "-0.1 is out of range [0, 1]"),
         "verify.threshold", "field 'threshold'", "%5 = verify.threshold(%2, %4, %3, threshold=-0.1)"),
    Case("bad mask name", edit("mask=causal", "mask=diagonal"), VerifyError,
         _v(6, "forward", "field 'mask'", "'diagonal' is not one of causal, tree, block, packed"),
         "forward", "field 'mask'", "%4 = forward(%2, %3, dedup=false, layout=sequence, mask=diagonal)"),
    Case("batch layout on a causal forward", edit("mask=causal", "layout=batch, mask=causal"), VerifyError,
         _v(6, "forward", "field 'layout'", "'batch' lays out the chains or branches of a tree or packed forward, not mask=causal"),
         "forward", "field 'layout'", "%4 = forward(%2, %3, dedup=false, layout=batch, mask=causal)"),
    Case("block mask without draft.mask", edit("mask=causal", "mask=block"), VerifyError,
         _v(6, "forward", "field 'mask'", "'block' (bidirectional) needs a draft.mask or draft.noise"),
         "forward", "field 'mask'", "%4 = forward(%2, %3, dedup=false, layout=sequence, mask=block)"),
    Case("packed mask on an unforked state", edit("mask=causal", "mask=packed"), VerifyError,
         _v(6, "forward", "field 'mask'", "'packed' needs a forked state"),
         "forward", "field 'mask'", "%4 = forward(%2, %3, dedup=false, layout=sequence, mask=packed)"),
    Case("verify logits from a draft op", logits_from_draft, VerifyError,
         _v(6, "verify.greedy", "operand 'logits'", "must be Logits, got Tokens[B, 8] from `draft.ngram`"),
         "verify.greedy", "operand 'logits'", "%4 = verify.greedy(%2, %3, %3) : Tokens[B, A]"),
    Case("verify drafts differ from its forward's", other_drafts, VerifyError,
         _v(8, "verify.greedy", "operand 'drafts'", "must be exactly the drafts its forward ran, in the same order"),
         "verify.greedy", "operand 'drafts'", "%6 = verify.greedy(%2, %5, %4, %3)"),
    Case("verify after a block forward", verify_after_block, VerifyError,
         _v(7, "verify.greedy", "operand 'logits'", "comes from a block (bidirectional) forward"),
         "verify.greedy", "operand 'logits'", "%5 = verify.greedy(%2, %4, %3)"),
    Case("commit of a non-verify value", commit_of_draft, VerifyError,
         _v(6, "commit", "operand 'accepted'", "must come from a verify or unmask step, comes from `draft.ngram`"),
         "commit", "operand 'accepted'", "%4 = commit(%2, %3, kv=recompute, rollback=copy) : State"),
    Case("iterate body without yield", edit("    yield(%6)\n", ""), VerifyError,
         _v(8, "commit", "the iterate body", "an iterate body must end with `yield(%state)`"),
         "commit", "the iterate body", "%6 = commit(%2, %5, kv=keep_accepted, rollback=copy) : State"),
    Case("yield at top level", edit("  %7 = emit", "  yield(%1)\n  %7 = emit"), VerifyError,
         _v(11, "yield", "the terminator", "`yield` may only end an iterate body"),
         "yield", "the terminator", "  yield(%1)"),
    Case("missing emit", edit("  %7 = emit(%1) : Tokens[B, G]\n", ""), VerifyError,
         _v(3, "iterate", "the program", "a strategy must end with `emit`"),
         "iterate", "the program", "%1 = iterate(%0, max_steps=0, until=[eos, max_new_tokens]) : State {"),
    Case("emit twice", emit_twice, VerifyError,
         _v(3, "emit", "the terminator", "`emit` may only end the strategy"),
         "emit", "the terminator", "%1 = emit(%0) : Tokens[B, G]"),
    Case("wrong declared result type", edit("Tokens[B, 8]", "Tokens[B, 7]"), VerifyError,
         _v(5, "draft.ngram", "its result type", "declared Tokens[B, 7], the type rule gives Tokens[B, 8]"),
         "draft.ngram", "its result type", "%3 = draft.ngram(%2, candidates=1, k=8, max_n=3, min_n=1) : Tokens[B, 7]"),
    Case("min_n > max_n", edit("max_n=3, min_n=1", "max_n=2, min_n=3"), VerifyError,
         _v(5, "draft.ngram", "field 'min_n'", "min_n=3 exceeds max_n=2"),
         "draft.ngram", "field 'min_n'", "%3 = draft.ngram(%2, candidates=1, k=8, max_n=2, min_n=3)"),
    Case("unmask after a causal forward", edit("verify.greedy(%2, %4, %3)", "unmask.threshold(%2, %4, contiguous=false, threshold=0.9)"),
         VerifyError, _v(7, "unmask.threshold", "operand 'logits'",
                         "`unmask.threshold` needs a forward with mask=block over a draft.mask or draft.noise"),
         "unmask.threshold", "operand 'logits'", "%5 = unmask.threshold(%2, %4, contiguous=false, threshold=0.9)"),
    Case("join of an unforked state", join_unforked, VerifyError,
         _v(11, "join", "operand 'state'", "is not a forked state (State[N])"),
         "join", "operand 'state'", "%7 = join(%1, rule=concat) : State"),
    Case("fork of something other than draft.branches", fork_of_pool, VerifyError,
         _v(4, "fork", "operand 'branches'", "must come from `draft.branches`, comes from `draft.ngram_pool`"),
         "fork", "operand 'branches'", "%2 = fork(%0, %1) : State[2]"),
    Case("empty until list", edit("until=[eos, max_new_tokens]", "until=[]"), VerifyError,
         _v(3, "iterate", "field 'until'", "is empty; it needs at least one of eos, max_new_tokens, stop"),
         "iterate", "field 'until'", "%1 = iterate(%0, max_steps=0, until=[]) : State {"),
    Case("bad until entry", edit("until=[eos, max_new_tokens]", "until=[eos, forever]"), VerifyError,
         _v(3, "iterate", "field 'until'", "'forever' is not one of eos, max_new_tokens, stop"),
         "iterate", "field 'until'", "%1 = iterate(%0, max_steps=0, until=[eos, forever]) : State {"),
    Case("non-finite float attribute (text)", edit("verify.greedy(%2, %4, %3)", "verify.threshold(%2, %4, %3, threshold=inf)"),
         VerifyError, _v(7, "verify.threshold", "field 'threshold'", "must be finite, got inf"),
         "verify.threshold", "field 'threshold'", "%5 = verify.threshold(%2, %4, %3, threshold=inf)"),
    Case("non-finite float attribute (builder)", nan_attribute, VerifyError,
         _v(7, "verify.sampling", "field 'top_p'", "must be finite, got nan"),
         "verify.sampling", "field 'top_p'", "%5 = verify.sampling(%2, %4, %3, temperature=1.0, top_k=0, top_p=nan)"),
    Case("unknown type", edit("Tokens[B, 8]", "Tensor[B, 8]"), ParseError,
         "parse error at line 5, column 51, op `draft.ngram`: unknown type 'Tensor'; types are Tokens, Logits, Mask, KV, State",
         "draft.ngram", "unknown type 'Tensor'", "Tensor[B, 8]"),
    Case("bad dim", edit("Tokens[B, 8]", "Tokens[B, (8]"), ParseError,
         "parse error at line 5, column 61, op `draft.ngram`: dim '( 8': missing ')'",
         "draft.ngram", "dim '( 8'", "Tokens[B, (8]"),
    Case("missing result type", edit("  %7 = emit(%1) : Tokens[B, G]", "  %7 = emit(%1)"), ParseError,
         "parse error at line 11, column 8, op `emit`, its results: names 1 result but declares 0 types",
         "emit", "its results", "%7 = emit(%1)"),
    Case("attribute given twice", edit("k=8,", "k=8, k=9,"), ParseError,
         "parse error at line 5, column 31, op `draft.ngram`, field 'k': attribute given twice",
         "draft.ngram", "field 'k'", "%3 = draft.ngram(%2, k=8, k=9, max_n=3, min_n=1)"),
    Case("operand after an attribute", edit("commit(%2, %5, kv=keep_accepted)", "commit(%2, kv=keep_accepted, %5)"),
         ParseError, "parse error at line 8, column 39, op `commit`, operand 'accepted': operands must come before "
         "attributes (found '%5')",
         "commit", "operand 'accepted'", "%6 = commit(%2, kv=keep_accepted, %5)"),
]


def _raise(case: Case) -> Exception:
    with pytest.raises(case.error) as info:
        if isinstance(case.source, str):
            verify(parse_program(case.source))
        else:
            case.source()
    return info.value


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_error_message(case: Case) -> None:
    lines = str(_raise(case)).splitlines()
    assert lines[0] == case.first
    line = int(re.search(r"at line (\d+)", lines[0]).group(1))  # type: ignore[union-attr]
    assert f"op `{case.op}`" in lines[0]
    assert case.field in lines[0]
    marked = [ln for ln in lines[1:] if ln.startswith(">")]
    assert len(marked) == 1, lines
    assert re.match(rf">\s+{line} \| ", marked[0]), marked
    assert case.marker in marked[0]
    assert lines[-1].startswith("fix: ") and len(lines[-1]) > len("fix: ")
    if isinstance(case.source, str):  # parse errors quote the source, verify errors the canonical text
        quoted = marked[0].split(" | ", 1)[1]
        source = case.source.splitlines()[line - 1]
        assert quoted == source or case.error is VerifyError


def test_cases_cover_distinct_messages() -> None:
    firsts = [c.first for c in CASES]
    assert len(firsts) == len(set(firsts)) >= 14


def test_quote_shows_neighbouring_lines() -> None:
    msg = str(_raise(CASES[[c.id for c in CASES].index("bad mask name")]))
    assert msg.splitlines()[1:5] == [
        "    4 |   ^(%2: State):",
        "    5 |     %3 = draft.ngram(%2, candidates=1, k=8, max_n=3, min_n=1) : Tokens[B, 8]",
        ">   6 |     %4 = forward(%2, %3, dedup=false, layout=sequence, mask=diagonal) : Logits[B, 9, V]",
        "    7 |     %5 = verify.greedy(%2, %4, %3) : Tokens[B, A]",
    ]


def test_unknown_op_suggests_a_near_name() -> None:
    msg = str(_raise(CASES[[c.id for c in CASES].index("unknown op")]))
    assert msg.splitlines()[-1] == "fix: use one of the known ops (did you mean draft.ngram?)"


@pytest.mark.parametrize(("program", "first"), [
    (lambda: Builder("my strategy").build(),
     "verify error in strategy 'my strategy', its name: 'my strategy' is not a name the text form can hold"),
    (lambda: Builder("t", x={"a": 1}).build(),
     "verify error in strategy 't', param 'x': {'a': 1} cannot be written in the text form"),
    (lambda: Builder("t").build(), "verify error in strategy 't', the program: a strategy must end with `emit`"),
])
def test_program_level_errors(program: Callable[[], Program], first: str) -> None:
    with pytest.raises(VerifyError) as info:
        program()
    lines = str(info.value).splitlines()
    assert lines[0] == first
    assert lines[-1].startswith("fix: ")


def test_verify_returns_valid_program_unchanged() -> None:
    p = parse_program(BASE)
    assert verify(p) is p
    canonical = (BASE.replace("ngram(%2, k=8", "ngram(%2, candidates=1, k=8")
                 .replace("mask=causal)", "dedup=false, layout=sequence, mask=causal)")
                 .replace("kv=keep_accepted)", "kv=keep_accepted, rollback=copy)"))
    assert print_program(p) == canonical    # omitted attributes print with their defaults


def test_verify_rejects_non_programs() -> None:
    with pytest.raises(VerifyError, match="expected a Program, got str"):
        verify(BASE)  # type: ignore[arg-type]


def test_unexpected_character_is_located() -> None:
    with pytest.raises(ParseError) as info:
        parse_program(edit("k=8,", "k=8;"))
    lines = str(info.value).splitlines()
    assert lines[0] == "parse error at line 5, column 29: unexpected character ';'"
    assert lines[2].startswith(">   5 |") and lines[-1].startswith("fix: ")
