"""``draft.model`` strategies export with their draft models: each draft model's step graph is
written beside the target's (manifest role ``draft:<name>``) and drafts on ONNX Runtime, in the
exported decoder and in the in-process ``onnxruntime`` backend (the same runner). The output is
the graph's own greedy decoding, batch 1 and 3, with a draft that agrees (the target itself)
and one that does not (other weights); on torch the same strategy equals Hugging Face greedy.
Errors name the step, the draft model and the field."""
from __future__ import annotations

import json

import pytest
import torch

import decograph
from decograph.backends.onnxruntime.manifest import load_manifest
from decograph.errors import InputError, UnsupportedError
from decograph.export import export_decoder
from decograph.exported import ExportedDecoder
from decograph.frontends.strategy_file import load_strategy_text
from decograph.models.tiny import tiny_model_dir

pytestmark = pytest.mark.usefixtures("private_cache")

STRATEGY = """strategy: small_draft
description: a draft model proposes 4 tokens, verified greedily
steps:
  - prefill
  - iterate:
      body:
        - draft: {source: model, model: small, k: 4}
        - forward: {mask: tree}
        - verify: {rule: greedy}
        - commit: {kv: keep_accepted}
  - emit
"""
PROMPTS = [[3, 4, 5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 3, 4, 5]]
N = 20


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    target = tiny_model_dir(tmp_path_factory.mktemp("target"), seed=1)
    other = tiny_model_dir(tmp_path_factory.mktemp("other"), seed=2)
    return target, other


@pytest.fixture(scope="module")
def program():
    return load_strategy_text(STRATEGY, "small_draft.yaml").program


def test_torch_backend_with_a_draft_model_equals_hf_greedy(dirs, program) -> None:
    target, other = dirs
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(target)).eval()
    with torch.inference_mode():
        want = [hf.generate(torch.tensor([p]), max_new_tokens=N, do_sample=False, pad_token_id=0)[0, len(p):].tolist()
                for p in PROMPTS]
    for draft in (target, other):
        got = decograph.generate(str(target), None, PROMPTS, program, N, draft_models={"small": str(draft)},
                                 eos_token_id=[])
        assert [r.new_token_ids for r in got] == want


@pytest.mark.parametrize("which", ["same", "other"])
def test_exported_draft_model_drafts_on_ort_and_equals_its_own_greedy(dirs, program, tmp_path, which) -> None:
    target, other = dirs
    draft = target if which == "same" else other
    out = export_decoder(program, tmp_path / "dec", model=str(target), draft_models={"small": str(draft)},
                         progress=lambda m: None)
    m = load_manifest(out)
    assert sorted(m.graphs) == ["draft:small", "target"] and m.graphs["draft:small"].file == "draft.small.onnx"
    dec = ExportedDecoder(out)
    dec.eos = set()
    own = [ids for ids, _ in dec.generate_batch(PROMPTS, N, draft=False)]
    runs = dec.generate_batch(PROMPTS, N)
    assert [ids for ids, _ in runs] == own
    assert [dec.generate(p, N)[0] for p in PROMPTS[:1]] == own[:1]
    accepted = sum(st.accepted for _, st in runs)
    if dec.exact():                        # this machine's kernels keep multi-token steps lossless
        assert sum(st.drafted for _, st in runs) > 0
        if which == "same":                # the target as its own draft: nearly every token accepted
            assert accepted >= 0.8 * sum(len(ids) for ids in own)
    ort = decograph.generate(str(target), None, PROMPTS, program, N, draft_models={"small": str(draft)},
                             eos_token_id=[], backend="onnxruntime", passes="none")
    assert [r.new_token_ids for r in ort] == own                      # the in-process backend: the same code


def test_draft_model_export_errors(dirs, program, tmp_path, capsys) -> None:
    target, _ = dirs
    with pytest.raises(UnsupportedError, match=r"step `draft.model\(model=small\)` needs its draft model"):
        export_decoder(program, tmp_path / "a", model=str(target), progress=lambda m: None)
    with pytest.raises(InputError, match="draft model 'big': strategy 'small_draft' has no draft.model"):
        export_decoder(program, tmp_path / "b", model=str(target), draft_models={"small": str(target),
                                                                                  "big": str(target)},
                       progress=lambda m: None)
    wide = tiny_model_dir(tmp_path / "wide", vocab_size=80)
    with pytest.raises(InputError, match="vocabulary of 80 tokens, the target model 64"):
        export_decoder(program, tmp_path / "c", model=str(target), draft_models={"small": str(wide)},
                       progress=lambda m: None)
    assert not any((tmp_path / x).exists() for x in "abc")
    from decograph.cli import main

    strat = tmp_path / "s.yaml"
    strat.write_text(STRATEGY)
    assert main(["export", str(strat), str(tmp_path / "d"), "--model", str(target), "--draft-model", "small"]) == 2
    assert "expected NAME=DIR" in capsys.readouterr().err
    assert main(["export", str(strat), str(tmp_path / "e"), "--model", str(target), "--draft-model",
                 f"small={target}"]) == 0
    assert json.loads((tmp_path / "e" / "manifest.json").read_text())["graphs"]["draft:small"]["quant"] == "none"
