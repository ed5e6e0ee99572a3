"""The shipped draft head on the real default model (SmolLM2-135M-Instruct).

- The head shipped in ``decograph/heads/shipped/`` is found for the default model by its
  fingerprint, and it really drafts: its trees are accepted more than one token per forward.
- torch (the Llama fast path): ``eagle`` and ``eagle_anpd`` equal Hugging Face greedy
  ``generate`` token for token, batch 1 and 4, with EOS inside an accepted tree ending the
  output exactly there and ``max_new_tokens`` honoured.
- The int4 export of ``eagle_anpd`` (the head as its own graph beside a step graph with
  hidden states), run where torch cannot be imported, equals that graph's own one-token-at-a-
  time greedy decoding, batch 1 and 4.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import decograph.api as api
from decograph.export import export_decoder
from decograph.heads.store import SHIPPED, model_fingerprint, resolve_head
from decograph.models.adapters import HFCausalLM

pytestmark = pytest.mark.real_model

DATA = Path(__file__).resolve().parents[1] / "benchmarks" / "data" / "spec_bench_questions.jsonl"
N_NEW = 32
N_INT4 = 128


@pytest.fixture(scope="module")
def setup(default_model, hf_greedy):
    model, tok = default_model
    qs = [json.loads(line)["turns"][0] for line in DATA.read_text().splitlines()[3::37][:4]]
    prompts = [list(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                            tokenize=True)["input_ids"])[-160:] for q in qs]
    return model, tok, prompts, hf_greedy(model, prompts, N_NEW)


def test_the_shipped_head_is_found_for_the_default_model(default_model) -> None:
    model, _ = default_model
    fp = model_fingerprint(model.config, model.get_input_embeddings().weight.detach().float().numpy())
    head = resolve_head("default", fp, "the default model")
    assert head.config.model == fp
    assert any(p.suffix == ".npz" for p in SHIPPED.iterdir())
    assert head.config.meta.get("steps", 0) > 0          # a trained head, with its training facts


@pytest.mark.parametrize("name", ["eagle", "eagle_anpd"])
def test_torch_equals_hf_greedy_batch_1_and_4(setup, name) -> None:
    model, tok, prompts, refs = setup
    one = api.generate(model, tok, prompts[:1], strategy=name, max_new_tokens=N_NEW)
    assert [r.new_token_ids for r in one] == refs[:1], f"{name}, batch 1"
    four = api.generate(model, tok, prompts, strategy=name, max_new_tokens=N_NEW)
    assert [r.new_token_ids for r in four] == refs, f"{name}, batch 4"
    if name == "eagle":
        # the head drafts for real: with a fixed 16-node tree (the cost-based budget may draft
        # nothing on a batch), its trees commit more than one token per step
        fixed = api.generate(model, tok, prompts, strategy=name, max_new_tokens=N_NEW, overrides={"nodes": 16})
        assert [r.new_token_ids for r in fixed] == refs, f"{name} nodes=16, batch 4"
        new, steps = sum(r.stats.new_tokens for r in fixed), sum(r.stats.decode_steps for r in fixed)
        assert new / steps > 1.1, f"eagle committed {new} tokens in {steps} steps"

def test_eos_and_budgets_are_exact(setup, hf_greedy) -> None:
    model, tok, prompts, refs = setup
    for n in (1, 9):
        got = api.generate(model, tok, prompts[:2], strategy="eagle", max_new_tokens=n)
        assert [r.new_token_ids for r in got] == [r[:n] for r in refs[:2]], f"max_new_tokens={n}"
    # an end token the greedy output reaches in its middle: the output stops exactly there
    end = refs[0][10]
    want = hf_greedy(model, prompts[:1], N_NEW, ends=[end])
    got = api.generate(model, tok, prompts[:1], strategy="eagle", max_new_tokens=N_NEW, eos_token_id=[end])
    assert [r.new_token_ids for r in got] == want


_RUN = """
from decograph.exported import ExportedDecoder
dec = ExportedDecoder(job["dir"])
out["one"] = [dec.generate(p, job["n"])[0] for p in job["prompts"][:1]]
out["four"] = [ids for ids, _ in dec.generate_batch(job["prompts"], job["n"])]
out["greedy"] = [ids for ids, _ in dec.generate_batch(job["prompts"], job["n"], draft=False)]
"""


def test_int4_export_without_torch_equals_its_own_greedy(setup, tmp_path, run_without_torch, ort_greedy) -> None:
    from decograph.backends.onnxruntime.session import ORTCausalLM
    from decograph.exported import ExportedDecoder

    model, tok, prompts, _ = setup
    out = export_decoder("eagle_anpd", tmp_path / "int4", model=HFCausalLM(model, tok), quant="int4", chat=False,
                         progress=lambda m: None)
    # 128 tokens: a branching tree's masked holes once changed int4 outputs only after ~60 tokens
    got = run_without_torch(_RUN, {"dir": str(out), "prompts": prompts, "n": N_INT4}, tmp_path)
    graph = ORTCausalLM(out / "model.onnx")
    want = [ort_greedy(graph, p, N_INT4, set(ExportedDecoder(out).eos)) for p in prompts]
    assert got["greedy"] == want
    assert got["one"] == want[:1]
    assert got["four"] == want
