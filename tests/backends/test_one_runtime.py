"""One runtime, every backend: the torch backend, the in-process ONNX Runtime backend and an
exported decoder run the same program through the same interpreter, so their draft proposals,
branch rows and sampled tokens agree step by step (tiny fp32 Llama; ONNX Runtime's fp32 graph
is exact on every CPU this project has seen, so drafts run there)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))

from runtime_helpers import tiny  # noqa: E402
from test_fork_join import branches_of, fork_program, provider  # noqa: E402

import decograph  # noqa: E402
from decograph.export import export_decoder  # noqa: E402
from decograph.exported import ExportedDecoder  # noqa: E402
from decograph.models.adapters import HFCausalLM  # noqa: E402
from decograph.ir.builder import Builder  # noqa: E402

pytestmark = pytest.mark.usefixtures("private_cache")

PROMPTS = [[3, 1, 4, 1, 5, 3, 1, 4, 1, 5, 3], [2, 7, 2, 7, 2], [9, 2, 6, 5, 3, 5, 8, 9, 2, 6]]


@pytest.fixture(scope="module")
def model():
    return tiny(2, 48, hidden=32, heads=4, kv_heads=2, init_std=0.3)


def draft_program(source: str, **attrs) -> object:
    b = Builder(f"only_{source}")
    s = b.prefill()
    with b.iterate(s) as loop:
        st = loop.state
        d = b.draft(source, st, **attrs)
        logits = b.forward(st, d, mask="tree")
        loop.next(b.commit(st, b.verify("greedy", st, logits, d), kv="keep_accepted"))
    b.emit(loop.result)
    return b.build()


SOURCES = {"ngram": {"k": 4, "min_n": 1, "candidates": 3}, "jacobi": {"window": 3},
           "gauss_seidel_jacobi": {"block": 4}, "adaptive_ngram": {"k": 4, "min_n": 1, "adaptive": False}}


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_each_draft_source_proposes_the_same_on_every_backend(model, source) -> None:
    """The trace records each step's draft tree: torch and ONNX Runtime see the same ones."""
    program = draft_program(source, **SOURCES[source])
    runs = {}
    for backend in ("torch", "onnxruntime"):
        out = decograph.generate(model, None, PROMPTS, program, 16, eos_token_id=[], backend=backend, passes="none",
                                 trace=True)
        runs[backend] = [(r.new_token_ids, [(t.get("draft"), t.get("accepted")) for t in r.trace]) for r in out]
    assert runs["torch"] == runs["onnxruntime"]
    assert any(t[0]["tokens"] for _, steps in runs["torch"] for t in steps if t[0])      # drafts were made


@pytest.mark.parametrize("rule", ["collect", "concat"])
def test_fork_join_on_onnxruntime_equals_torch(model, rule) -> None:
    program = fork_program(mask="packed", rule=rule, then=rule == "concat")
    got = {}
    for backend in ("torch", "onnxruntime"):
        out = decograph.generate(model, None, PROMPTS, program, 12, eos_token_id=[], backend=backend, passes="none",
                                 branch_providers={"test": provider})
        got[backend] = [(r.new_token_ids, [[b.tokens for b in j] for j in r.branches]) for r in out]
    assert got["torch"] == got["onnxruntime"]
    assert [len(r[1][0]) if r[1] else 0 for r in got["torch"]] == [len(branches_of(i)) for i in range(3)]


def test_seeded_sampling_is_reproducible_on_onnxruntime(model) -> None:
    kw = dict(do_sample=True, temperature=0.8, eos_token_id=[], backend="onnxruntime")
    a = decograph.generate(model, None, PROMPTS, "lookahead", 12, seed=3, **kw)
    b = decograph.generate(model, None, PROMPTS, "lookahead", 12, seed=3, **kw)
    c = decograph.generate(model, None, PROMPTS, "lookahead", 12, seed=4, **kw)
    assert [r.new_token_ids for r in a] == [r.new_token_ids for r in b] != [r.new_token_ids for r in c]


def test_exported_fork_join_and_sampling_run_the_program(model, tmp_path) -> None:
    """A fork/join program and a sampling one, exported: the decoder runs the program as the
    torch backend does (branch providers and seeds passed at run time)."""
    from decograph.models.tiny import tiny_model_dir

    adapter = HFCausalLM.from_pretrained(str(tiny_model_dir(tmp_path / "m")))
    program = fork_program(mask="packed", rule="collect")
    out = export_decoder(program, tmp_path / "fork", model=adapter, passes="none", chat=False,
                         progress=lambda m: None)
    dec = ExportedDecoder(out)
    want = decograph.generate(adapter, None, PROMPTS, program, 10, passes="none", eos_token_id=sorted(dec.eos),
                              branch_providers={"test": provider})
    got = dec.generate_batch(PROMPTS, 10, branch_providers={"test": provider})
    assert [ids for ids, _ in got] == [r.new_token_ids for r in want]
    sampled = export_decoder("ngram", tmp_path / "sample", model=adapter, chat=False, progress=lambda m: None)
    dec = ExportedDecoder(sampled)
    from decograph.passes.sampling import to_sampling

    samp = dec.with_program(to_sampling(dec.program, 0.9, 0, 1.0))
    runs = [[ids for ids, _ in samp.generate_batch(PROMPTS, 12, seed=s)] for s in (5, 5, 6)]
    assert runs[0] == runs[1] != runs[2]
