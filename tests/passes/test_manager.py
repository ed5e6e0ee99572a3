"""The pass manager: pipeline text, errors naming the pass at fault, instruments, analysis
caching, and the default pipeline over every built-in strategy."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
from helpers import canonical, check_pass

from decograph.errors import PassError, VerifyError
from decograph.frontends.strategies import builtin_names, load_strategy
from decograph.ir import ops as O
from decograph.ir.parser import parse_program
from decograph.ir.printer import print_program
from decograph.ir.verify import verify
from decograph.passes import DEFAULT_PIPELINES, get_pass, parse_pipeline, pass_names, run_pipeline
from decograph.passes.analysis import AnalysisManager
from decograph.passes.cache_reuse import CacheReuse
from decograph.passes.canonicalize import Canonicalize
from decograph.passes.manager import Pass, PassContext, PassManager, PassResult, PrintIR, Timing
from decograph.passes.mask_fusion import MaskFusion
from decograph.passes.rewrite import map_ops, rebuild

KNOWN = "auto-tune, cache-reuse, canonicalize, mask-fusion, speculative-batching"

NGRAM4 = canonical("""
strategy ngram4 {
  %0 = prefill(%prompt) : State
  %1 = iterate(%0, max_steps=0, until=[eos, max_new_tokens]) : State {
  ^(%2: State):
    %3 = draft.ngram(%2, candidates=4, k=8, max_n=3, min_n=1) : Tokens[B, 4, 8]
    %4 = forward(%2, %3, dedup=true, layout=sequence, mask=causal) : Logits[B, 33, V]
    %5 = verify.greedy(%2, %4, %3) : Tokens[B, A]
    %6 = commit(%2, %5, kv=recompute, rollback=copy) : State
    yield(%6)
  }
  %7 = emit(%1) : Tokens[B, G]
}
""")

# ----------------------------------------------------------------------------- pipeline text


@pytest.mark.parametrize("text, spelled", [
    ("mask-fusion,cache-reuse{approximate=true}", ["mask-fusion", "cache-reuse{approximate=true}"]),
    (" canonicalize , auto-tune{ max_size = 8 , floor=0.1} ", ["canonicalize", "auto-tune{max_size=8,floor=0.1}"]),
    ("speculative-batching{candidates=4},mask-fusion{layout=batch,context=64}",
     ["speculative-batching", "mask-fusion{layout=batch,context=64}"]),      # defaults are not spelled
    ("cache-reuse{approximate=FALSE},mask-fusion{}", ["cache-reuse", "mask-fusion"]),
    ("canonicalize,", ["canonicalize"]),
    ("", []),
    ("none", []),
])
def test_parse_pipeline(text: str, spelled: list[str]) -> None:
    passes = parse_pipeline(text)
    assert [p.spelled() for p in passes] == spelled
    again = parse_pipeline(",".join(spelled))       # the spelling reads back to equal passes
    assert again == passes


def test_parse_pipeline_typed_options() -> None:
    [fusion, reuse, tune] = parse_pipeline("mask-fusion{layout=batch,context=64},cache-reuse{approximate=true},"
                                           "auto-tune{floor=0.25}")
    assert (fusion.layout, fusion.context) == ("batch", 64)
    assert reuse.approximate is True
    assert tune.floor == 0.25 and tune.max_size == 16
    assert pass_names() == KNOWN.split(", ")


@pytest.mark.parametrize("text, message", [
    ("mask-fusion,loop-unroll",
     f"pipeline 'mask-fusion,loop-unroll': unknown pass 'loop-unroll'; known passes: {KNOWN}"),
    ("cache-reuse{aggressive=true}",
     "pipeline 'cache-reuse{aggressive=true}': pass 'cache-reuse' has no option 'aggressive=true' "
     "(options: approximate, dual)"),
    ("canonicalize{level=2}",
     "pipeline 'canonicalize{level=2}': pass 'canonicalize' has no option 'level=2' (options: none)"),
    ("cache-reuse{approximate=yes}",
     "pipeline 'cache-reuse{approximate=yes}': cache-reuse{approximate}: expected true or false, got 'yes'"),
    ("speculative-batching{candidates=many}",
     "pipeline 'speculative-batching{candidates=many}': speculative-batching{candidates}: "
     "invalid literal for int() with base 10: 'many'"),
    ("mask-fusion;cache-reuse",
     "pipeline 'mask-fusion;cache-reuse': cannot read a pass at column 1: 'mask-fusion;cache-reuse'"),
    ("mask-fusion,,cache-reuse",
     "pipeline 'mask-fusion,,cache-reuse': cannot read a pass at column 13: ',cache-reuse'"),
    ("Mask-Fusion", "pipeline 'Mask-Fusion': cannot read a pass at column 1: 'Mask-Fusion'"),
    ("mask-fusion{layout=batch", "pipeline 'mask-fusion{layout=batch': cannot read a pass at column 1: "
                                 "'mask-fusion{layout=batch'"),
])
def test_parse_pipeline_errors(text: str, message: str) -> None:
    with pytest.raises(PassError) as err:
        parse_pipeline(text)
    assert str(err.value) == message


def test_get_pass_errors() -> None:
    with pytest.raises(PassError, match=r"^unknown pass 'nope'; known passes: auto-tune, cache-reuse, "):
        get_pass("nope")
    with pytest.raises(PassError) as err:
        get_pass("mask-fusion", foo=1)
    assert str(err.value) == "pass 'mask-fusion' has no option 'foo' (options: layout, context)"
    assert get_pass("cache-reuse", approximate=True) == CacheReuse(approximate=True)


# ----------------------------------------------------------------------------- failing passes


@dataclass(frozen=True)
class Explode(Pass):
    name: ClassVar[str] = "explode"
    fuse: int = 0

    def run(self, program: O.Program, am: AnalysisManager) -> PassResult:
        raise RuntimeError("boom")


@dataclass(frozen=True)
class BreakLayout(Pass):
    """Returns invalid IR: every forward laid out as batch rows, under mask=causal."""

    name: ClassVar[str] = "break-layout"
    claim_change: bool = True

    def run(self, program: O.Program, am: AnalysisManager) -> PassResult:
        out = map_ops(program, lambda op, vmap: [rebuild(op, vmap, layout="batch", mask="causal")]
                      if isinstance(op, O.Forward) else [op])
        return PassResult(out, self.claim_change, {"broken": 1})


def test_crashing_pass_is_named_with_the_passes_before_it() -> None:
    pm = PassManager([Canonicalize(), MaskFusion(layout="batch"), Explode(fuse=3)])
    with pytest.raises(PassError) as err:
        pm.run(parse_program(NGRAM4))
    assert str(err.value) == ("pass 'explode{fuse=3}' failed (passes run before it: canonicalize, "
                              "mask-fusion{layout=batch}): RuntimeError: boom")
    assert isinstance(err.value.__cause__, RuntimeError)


def test_pass_returning_invalid_ir_is_caught_by_the_verifier() -> None:
    pm = PassManager([CacheReuse(), BreakLayout()])
    with pytest.raises(PassError) as err:
        pm.run(parse_program(NGRAM4))
    first = str(err.value).splitlines()[0]
    assert first == ("pass 'break-layout' failed (passes run before it: cache-reuse): verify error at line 6, "
                     "op `forward`, field 'layout': 'batch' lays out the chains or branches of a tree or packed forward, not mask=causal")
    assert isinstance(err.value.__cause__, VerifyError)
    assert [r.name for r in pm.report] == ["cache-reuse"]


def test_unchanged_result_is_neither_verified_nor_used() -> None:
    program = parse_program(NGRAM4)
    pm = PassManager([BreakLayout(claim_change=False)])
    assert pm.run(program) is program
    assert [(r.name, r.changed, r.stats) for r in pm.report] == [
        ("break-layout{claim_change=false}", False, {"broken": 1})]


# ----------------------------------------------------------------------------- instruments


FUSED_BATCH = NGRAM4.replace("layout=sequence, mask=causal", "layout=batch, mask=tree")


def test_print_ir_before_and_after() -> None:
    out: list[str] = []
    pm = PassManager([Canonicalize(), MaskFusion(layout="batch")], instruments=(
        PrintIR(before=("mask-fusion",), after=("*",), write=out.append),))
    result = pm.run(parse_program(NGRAM4))
    assert print_program(result) == FUSED_BATCH
    assert out == [
        "// ----- IR after canonicalize (unchanged) -----\n" + NGRAM4,
        "// ----- IR before mask-fusion{layout=batch} -----\n" + NGRAM4,
        "// ----- IR after mask-fusion{layout=batch} (changed) -----\n" + FUSED_BATCH,
    ]


def test_print_ir_every_pass_before_and_timing() -> None:
    out: list[str] = []
    timing = Timing()
    _, report = run_pipeline(parse_program(NGRAM4), "canonicalize,cache-reuse",
                             instruments=(PrintIR(before=("*",), write=out.append), timing))
    assert [text.splitlines()[0] for text in out] == ["// ----- IR before canonicalize -----",
                                                       "// ----- IR before cache-reuse -----"]
    assert [name for name, _ in timing.times] == ["canonicalize", "cache-reuse"]
    assert all(s >= 0 for _, s in timing.times) and all(r.seconds >= 0 for r in report)
    assert [(r.name, r.changed, r.stats) for r in report] == [
        ("canonicalize", False, {}), ("cache-reuse", True, {"kv_keep_accepted": 1, "rollback_in_place": 1})]


# ----------------------------------------------------------------------------- analyses


@dataclass(frozen=True)
class Probe(Pass):
    """Asks for the cost analysis and records the manager's hit/miss counts after."""

    name: ClassVar[str] = "probe"
    seen: list = None  # type: ignore[assignment]

    def run(self, program: O.Program, am: AnalysisManager) -> PassResult:
        am.get("cost", program)
        self.seen.append((am.hits, am.misses))
        return PassResult(program, False)


def test_analysis_manager_hits_misses_and_invalidation() -> None:
    program = parse_program(NGRAM4)
    am = AnalysisManager()
    first = am.get("cost", program)
    assert am.get("cost", program) is first
    assert (am.hits, am.misses) == (1, 1)
    am.get("users", program)
    am.invalidate(preserved=("users",))
    am.get("users", program)
    assert (am.hits, am.misses) == (2, 2)
    assert am.get("cost", program) is not first
    assert (am.hits, am.misses) == (2, 3)
    am.get("cost", parse_program(NGRAM4))           # another program object: a miss
    assert (am.hits, am.misses) == (2, 4)


def test_pass_manager_caches_until_a_pass_changes_the_program() -> None:
    seen: list = []
    probe = Probe(seen=seen)
    # mask-fusion reads "cost" (a hit) and changes the program: the last probe misses
    PassManager([probe, probe, MaskFusion(), probe]).run(parse_program(NGRAM4))
    assert seen == [(0, 1), (1, 1), (2, 2)]
    seen.clear()
    # mask-fusion finds nothing to fuse the second time: the cache survives
    PassManager([MaskFusion(), MaskFusion(), probe]).run(parse_program(NGRAM4))
    assert seen == [(1, 2)]


# ----------------------------------------------------------------------------- default pipeline


@pytest.mark.parametrize("name", builtin_names())
def test_default_pipeline_on_every_builtin(name: str) -> None:
    program = load_strategy(name).program
    text_in = print_program(program)
    out, report = run_pipeline(program)
    verify(out)
    text = print_program(out)
    assert print_program(parse_program(text)) == text
    assert print_program(program) == text_in                     # the input is untouched
    assert [r.name for r in report] == DEFAULT_PIPELINES["torch"].split(",")
    again, _ = run_pipeline(out)                                   # a fixed point
    assert print_program(again) == text
    for op in out.walk():
        if isinstance(op, O.Forward) and len(op.drafts) > 0:
            fused = "packed" if op.state.type.shape else "tree"          # fork branches pack
            assert op.mask == fused or all(O.draft_chains(d.type) == 1 for d in op.drafts)
        if isinstance(op, O.Commit) and not any(isinstance(o, (O.DraftMask, O.DraftNoise)) for o in out.walk()):
            assert (op.kv, op.rollback) == ("keep_accepted", "in_place")
        elif isinstance(op, O.Commit):          # block forwards: no exact policy, the file's is kept
            assert op.kv == dict(load_strategy(name).program.params).get("kv", "recompute")


def test_run_pipeline_none_default_and_unknown_backend() -> None:
    program = parse_program(NGRAM4)
    out, report = run_pipeline(program, "none")
    assert out is program and report == []
    by_default, _ = run_pipeline(program, "default")
    other_backend, _ = run_pipeline(program, None, PassContext(backend="no-such-backend"))
    assert print_program(other_backend) == print_program(by_default)
    check_pass(DEFAULT_PIPELINES["torch"], NGRAM4, print_program(by_default))
