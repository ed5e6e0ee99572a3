"""Unmask strategies export with decograph's masked-diffusion model: the decoder directory holds
the model's forward graph, the optimized program and the tokenizer; in a process where torch
cannot be imported, ``ExportedDecoder`` runs every unmask strategy (each KV mode, infilling,
EOS) and gives the torch backend's tokens on the same weights, batch 1 and 3. Bad input is
named: a causal program on the diffusion export, quantization, a manifest whose mask token is
missing or out of range."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import decograph
from decograph.backends.onnxruntime.manifest import ManifestError, load_manifest
from decograph.errors import InputError, UnsupportedError
from decograph.export import export_decoder
from decograph.exported import ExportedDecoder
from decograph.frontends.strategies import load_strategy
from decograph.ir.jsonform import to_json
from decograph.models.mdm import save_mdm, tiny_mdm
from decograph.models.tiny import word_tokenizer

PROMPTS = [[5, 6, 7, 8, 9], [11, 12], [20, 21, 22]]
SUFFIXES = [[30, 31, 32], [], [40, 41, 42, 43, 44]]
CASES = {
    "llada": {"k": 2}, "llada_semi_ar": {"block": 4}, "lud": {"block": 8, "threshold": 0.5},
    "fast_dllm": {"block": 8, "threshold": 0.5, "kv": "block_approx"},
    "fast_dllm_dual": {"block": 8, "threshold": 0.5, "kv": "block_approx_dual"},
    "fast_dllm_factor": {"block": 8, "factor": 2.0},
}

pytestmark = pytest.mark.usefixtures("private_cache")


@pytest.fixture(scope="module")
def mdm_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("mdm") / "tiny-mdm"
    model = tiny_mdm(n_layers=2, seed=3)
    save_mdm(model, d)
    word_tokenizer(model.config.vocab_size, model.config.eos_token_id).save_pretrained(d)
    return d


def _program(name: str):
    return load_strategy(name.removesuffix("_dual"), overrides=CASES[name]).program


_RUN = """
from decograph.exported import ExportedDecoder
from decograph.ir.jsonform import from_json
dec = ExportedDecoder(job["dir"])
out["own"] = [ids for ids, _ in dec.generate_batch(job["prompts"], job["n"])]
for name, program in job["programs"].items():
    d = dec.with_program(from_json(program))
    out[name] = {"one": d.generate(job["prompts"][0], job["n"])[0],
                 "three": [ids for ids, _ in d.generate_batch(job["prompts"], job["n"])],
                 "infill": [ids for ids, _ in d.generate_batch(job["prompts"], job["n"], suffixes=job["suffixes"])]}
"""


def test_unmask_exports_run_without_torch_and_equal_the_torch_backend(mdm_dir, tmp_path, run_without_torch) -> None:
    out = export_decoder("fast_dllm", tmp_path / "dec", model=mdm_dir, overrides=CASES["fast_dllm_dual"],
                         progress=lambda m: None)
    m = load_manifest(out)
    assert m.target.diffusion and m.target.mask_token_id == 1 and m.target.quant == "none"
    assert [op.NAME for op in m.program.walk()].count("unmask.threshold") == 1
    n = 16
    programs = {name: to_json(_program(name)) for name in CASES}
    got = run_without_torch(_RUN, {"dir": str(out), "programs": programs, "prompts": PROMPTS, "n": n,
                                   "suffixes": SUFFIXES}, tmp_path)

    def torch_run(program, prompts, **kw):
        return [r.new_token_ids for r in decograph.generate(str(mdm_dir), None, prompts, program, n, passes="none",
                                                            **kw)]

    assert got["own"] == torch_run(m.program, PROMPTS)          # strategy.json, the export's own program
    for name in CASES:
        program = _program(name)
        three = torch_run(program, PROMPTS)
        assert got[name]["one"] == torch_run(program, PROMPTS[:1])[0], f"{name}, batch 1"
        assert got[name]["three"] == three, f"{name}, batch 3"
        assert got[name]["infill"] == torch_run(program, PROMPTS, suffixes=SUFFIXES), f"{name}, infilling"
        assert any(len(set(ids)) > 1 for ids in three)


def test_exported_unmask_decoder_honours_eos_and_streams(mdm_dir, tmp_path) -> None:
    out = export_decoder("llada_semi_ar", tmp_path / "dec", model=mdm_dir, overrides={"block": 4},
                         progress=lambda m: None)
    dec = ExportedDecoder(out)
    [(ids, _)] = dec.generate_batch(PROMPTS[:1], 16)
    eos = ids[5]                                           # a token met mid-output: EOS from there
    dec.eos = {eos}
    [(cut, stats)] = dec.generate_batch(PROMPTS[:1], 16)
    want = decograph.generate(str(mdm_dir), None, PROMPTS[:1], dec.program, 16, passes="none", eos_token_id=eos)
    assert cut == want[0].new_token_ids and cut[-1] == eos and stats.finish_reason == "eos"
    events = list(dec.stream(PROMPTS, 12))
    for row in range(len(PROMPTS)):
        mine = [e for e in events if e.row == row]
        assert mine[-1].done and sum(len(e.tokens) for e in mine) == len(dec.generate_batch([PROMPTS[row]], 12)[0][0])


def test_bad_unmask_exports_are_named(mdm_dir, tmp_path) -> None:
    with pytest.raises(UnsupportedError, match="step `draft.ngram` cannot run on a masked-diffusion model"):
        export_decoder("ngram", tmp_path / "a", model=mdm_dir, progress=lambda m: None)
    with pytest.raises(UnsupportedError, match="float32 without quantization only"):
        export_decoder("llada", tmp_path / "b", model=mdm_dir, quant="int4", progress=lambda m: None)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    out = export_decoder("llada", tmp_path / "c", model=mdm_dir, progress=lambda m: None)
    dec = ExportedDecoder(out)
    with pytest.raises(InputError, match="no causal step graph"):
        dec.cost_curve()
    mpath = out / "manifest.json"
    good = json.loads(mpath.read_text())
    for change, msg in ((lambda g: g.pop("mask_token_id"), "graphs.target.mask_token_id' is missing"),
                        (lambda g: g.update(mask_token_id=64), "graphs.target.mask_token_id' is 64"),
                        (lambda g: g.update(graph="5"), "belongs to a masked-diffusion graph only")):
        bad = json.loads(json.dumps(good))
        change(bad["graphs"]["target"])
        mpath.write_text(json.dumps(bad))
        with pytest.raises(ManifestError, match=msg):
            load_manifest(out)
    mpath.write_text(json.dumps(good))
