"""One runtime on the real default model: every lossless built-in and two strategy files written
here (two draft sources composed in one tree, which no built-in does; three n-gram candidates
verified as one token tree) decode, batch 1 and batch 4,

- on the torch backend: exactly Hugging Face greedy ``generate``;
- from an fp32 export, in a process where torch cannot be imported: exactly the torch backend;
- from an int4 export: exactly that graph's own one-token-at-a-time greedy decoding.

Each export is written once; the strategies' optimized programs (the IR's JSON form) run on it
through ``ExportedDecoder.with_program``, the same interpreter that runs ``strategy.json``.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import decograph.api as api
from decograph.backends.onnxruntime.session import ORTCausalLM
from decograph.export import export_decoder
from decograph.exported import ExportedDecoder
from decograph.models.adapters import HFCausalLM
from decograph.frontends.strategies import list_strategies, load_strategy
from decograph.frontends.strategy_file import load_strategy_text
from decograph.ir.jsonform import to_json

pytestmark = pytest.mark.real_model

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "benchmarks" / "data" / "spec_bench_questions.jsonl"
N_NEW = 16

TWO_SOURCES = """strategy: ngram_and_jacobi
description: prompt lookup and a Jacobi window in one tree, verified greedily
steps:
  - prefill
  - iterate:
      body:
        - draft: {source: ngram, k: 4, as: copy}
        - draft: {source: jacobi, window: 3, as: guess}
        - forward: {drafts: [copy, guess], mask: tree}
        - verify: {rule: greedy}
        - commit: {}
  - emit
"""
TREE = """strategy: tree3
description: three n-gram candidates verified as one token tree
steps:
  - prefill
  - iterate:
      body:
        - draft: {source: ngram, k: 5, max_n: 3, min_n: 1, candidates: 3}
        - forward: {mask: tree}
        - verify: {rule: greedy}
        - commit: {}
  - emit
"""


def _strategies() -> dict[str, object]:
    out: dict[str, object] = {n: load_strategy(n).program for n, _ in list_strategies()
                              if load_strategy(n).lossless and not load_strategy(n).heads}   # heads: a trained one
    for text, name in ((TWO_SOURCES, "two.yaml"), (TREE, "tree3.yaml")):
        s = load_strategy_text(text, name)
        out[s.program.name] = s.program
    return out


STRATEGIES = _strategies()


@pytest.fixture(scope="module")
def setup(default_model, hf_greedy):
    model, tok = default_model
    qs = [json.loads(line)["turns"][0] for line in DATA.read_text().splitlines()[5::20][:4]]
    prompts = [list(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                            tokenize=True)["input_ids"])[-96:] for q in qs]
    prompts[1] = prompts[1] + prompts[1][-32:]       # a repeat inside the prompt: n-gram drafts fire
    return model, tok, prompts, hf_greedy(model, prompts, N_NEW)


def _optimized(model, tok) -> dict[str, dict]:
    adapter = HFCausalLM(model, tok)
    return {name: to_json(api.optimize(p, adapter)) for name, p in STRATEGIES.items()}


def test_torch_backend_equals_hf_greedy_batch_1_and_4(setup) -> None:
    model, tok, prompts, refs = setup
    for name, program in STRATEGIES.items():
        got = [api.generate(model, tok, [p], strategy=program, max_new_tokens=N_NEW)[0].new_token_ids for p in prompts[:1]]
        assert got == refs[:1], f"{name}, batch 1"
        batch = api.generate(model, tok, prompts, strategy=program, max_new_tokens=N_NEW)
        assert [r.new_token_ids for r in batch] == refs, f"{name}, batch 4"


_RUN = """
from decograph.exported import ExportedDecoder
from decograph.ir.jsonform import from_json
dec = ExportedDecoder(job["dir"])
for name, program in job["programs"].items():
    d = dec.with_program(from_json(program))
    one = [d.generate(p, job["n"])[0] for p in job["prompts"][:1]]
    four = [ids for ids, _ in d.generate_batch(job["prompts"], job["n"])]
    out[name] = {"one": one, "four": four}
"""


def test_fp32_export_without_torch_equals_the_torch_backend(setup, tmp_path, run_without_torch) -> None:
    model, tok, prompts, refs = setup
    out = export_decoder("anpd_corpus", tmp_path / "fp32", model=HFCausalLM(model, tok), chat=False,
                         progress=lambda m: None)          # it carries the corpus anpd_corpus runs with
    got = run_without_torch(_RUN, {"dir": str(out), "programs": _optimized(model, tok), "prompts": prompts,
                                   "n": N_NEW}, tmp_path)
    # the torch backend's tokens are HF's (test_torch_backend_equals_hf_greedy_batch_1_and_4)
    for name, runs in got.items():
        assert runs["one"] == refs[:1], f"{name}, batch 1"
        assert runs["four"] == refs, f"{name}, batch 4"


def test_int4_export_equals_its_own_greedy(ort_greedy, setup, tmp_path) -> None:
    model, tok, prompts, _ = setup
    out = export_decoder("anpd_corpus", tmp_path / "int4", model=HFCausalLM(model, tok), quant="int4", chat=False,
                         progress=lambda m: None)
    dec = ExportedDecoder(out)
    graph = ORTCausalLM(out / "model.onnx")
    want = [ort_greedy(graph, p, N_NEW, set(dec.eos)) for p in prompts]
    from decograph.ir.jsonform import from_json

    for name, program in _optimized(model, tok).items():
        d = dec.with_program(from_json(program))
        assert [d.generate(p, N_NEW)[0] for p in prompts[:1]] == want[:1], f"{name}, batch 1"
        assert [ids for ids, _ in d.generate_batch(prompts, N_NEW)] == want, f"{name}, batch 4"
