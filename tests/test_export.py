"""``decograph export`` and the exported decoder: the files and manifest, tokens equal to the
same ONNX graph's own greedy decoding (fp32 and int4), a run that never imports torch (in a
subprocess), the CLI, and errors (unsupported strategies, a modified file, a used directory)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest

from decograph.backends.onnxruntime.session import ORTCausalLM
from decograph.cli import main
from decograph.errors import InputError, ModelError, UnsupportedError
from decograph.export import export_decoder
from decograph.exported import ExportedDecoder
from decograph.models.adapters import HFCausalLM
from decograph.models.tiny import tiny_model_dir

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["t1 t5 t9 t5 t9 t5 t9 t5", "t3 t4 t3 t4 t3", "t7"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("m"))


pytestmark = pytest.mark.usefixtures("private_cache")


PLAN = {"anpd": ["draft.adaptive_ngram"], "ngram": ["draft.ngram"], "greedy": [], "jacobi": ["draft.jacobi"],
        "gs_jacobi": ["draft.gauss_seidel_jacobi"], "lookahead": ["draft.jacobi", "draft.ngram_pool"]}


def drafts_of(out: Path) -> list[str]:
    """The draft steps of the exported program (strategy.json: what the decoder runs)."""
    from decograph.ir.jsonform import from_json

    program = from_json(json.loads((out / "strategy.json").read_text()))
    return sorted(op.NAME for op in program.walk() if op.NAME.startswith("draft."))


@pytest.mark.parametrize("quant", ["none", "int4"])
@pytest.mark.parametrize("strategy", list(PLAN))
def test_exported_decoder_equals_the_graphs_own_greedy(ort_greedy, model_dir, tmp_path, strategy, quant) -> None:
    # the Jacobi family as written: the default pipeline's auto-tune drops drafts that do not
    # pay on this model's measured cost curve, and exports plain greedy decoding then
    passes = "none" if strategy in ("jacobi", "gs_jacobi", "lookahead") else "default"
    out = export_decoder(strategy, tmp_path / "dec", model=HFCausalLM.from_pretrained(str(model_dir)), quant=quant,
                         chat=False, passes=passes, progress=lambda m: None)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.onnx", "strategy.json", "tokenizer.json"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["strategy"] == strategy and manifest["graphs"]["target"]["quant"] == quant
    assert drafts_of(out) == PLAN[strategy]
    assert not list(tmp_path.glob(".dec*"))                     # no temporary directory left
    if quant != "none":                             # int8 activations: the fast kernels, exact graph
        levels = {a.i for n in onnx.load(str(out / "model.onnx")).graph.node if n.op_type == "MatMulNBits"
                  for a in n.attribute if a.name == "accuracy_level"}
        assert levels == {4}
    dec = ExportedDecoder(out)
    graph = ORTCausalLM(out / "model.onnx")
    drafted = 0
    for text in PROMPTS:
        ids = dec.encode(text)
        for n in (0, 1, 9, 24):
            got, stats = dec.generate(ids, n)
            assert got == ort_greedy(graph, ids, n) == dec.generate(ids, n, draft=False)[0]
            assert stats.new_tokens == len(got) <= n and stats.accepted <= stats.drafted
            drafted += stats.drafted
        want = ort_greedy(graph, ids, 24)
        eos = want[5]
        dec.eos = {eos}
        got, stats = dec.generate(ids, 24)
        assert got == want[: want.index(eos) + 1] and stats.finish_reason == "eos"
        dec.eos = set(manifest["eos_token_ids"])
    # the repetitive prompts get drafts, where this machine's kernels pass the exactness check
    # (int4 on some CPUs does not, seen on an AMD EPYC without AVX-512: it then decodes greedily)
    assert (drafted > 0) == (strategy != "greedy" and dec.exact())
    # a batch: prompts of 8, 5 and 1 tokens, each row its own greedy (its own cache length);
    # rows end at different steps (EOS in one, the budget in the others)
    ids = [dec.encode(t) for t in PROMPTS]
    for n in (1, 7, 24):
        want = [ort_greedy(graph, p, n) for p in ids]
        rows = dec.generate_batch(ids, n)
        assert [r[0] for r in rows] == want and [r[1].new_tokens for r in rows] == [len(w) for w in want]
        assert [r[0] for r in dec.generate_batch(ids, n, draft=False)] == want
    want = [ort_greedy(graph, p, 24) for p in ids]
    eos = want[1][4]
    dec.eos = {eos}
    rows = dec.generate_batch(ids, 24)
    assert len(rows[1][0]) <= 5 and rows[1][1].finish_reason == "eos"
    for w, (got, stats) in zip(want, rows):
        assert got == (w[:w.index(eos) + 1] if eos in w else w)
        assert stats.finish_reason == ("eos" if eos in w else "max_new_tokens")


def test_block_size_is_the_exports_choice(ort_greedy, model_dir, tmp_path) -> None:
    out = export_decoder("anpd", tmp_path / "dec", model=HFCausalLM.from_pretrained(str(model_dir)), quant="int4",
                         block_size=16, chat=False, progress=lambda m: None)
    sizes = {a.i for n in onnx.load(str(out / "model.onnx")).graph.node if n.op_type == "MatMulNBits"
             for a in n.attribute if a.name == "block_size"}
    assert sizes == {16} and json.loads((out / "manifest.json").read_text())["graphs"]["target"]["block_size"] == 16
    # written under temporary names (private), then given the permissions a plain write gives
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    assert {f.name: f.stat().st_mode & 0o777 for f in out.iterdir()} == {f.name: 0o666 & ~umask for f in out.iterdir()}
    dec = ExportedDecoder(out)
    ids = dec.encode(PROMPTS[0])
    assert dec.generate(ids, 16)[0] == dec.generate(ids, 16, draft=False)[0] == ort_greedy(ORTCausalLM(out / "model.onnx"), ids, 16)


def test_exported_decoder_cost_curve_and_exactness_are_cached(model_dir, tmp_path, monkeypatch) -> None:
    from decograph.backends.onnxruntime import runner as runner_mod

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    out = export_decoder("anpd", tmp_path / "dec", model=HFCausalLM.from_pretrained(str(model_dir)), quant="int4",
                         chat=False, progress=lambda m: None)
    dec = ExportedDecoder(out)
    curve = dec.cost_curve()
    assert curve[0] == curve[1] == 1.0 and curve == sorted(curve) and len(curve) >= 9   # 1 token: a padding row
    exact = dec.exact()                 # True or False by this machine's kernels; cached either way
    table = json.loads((tmp_path / "xdg" / "decograph" / "exported_machine.json").read_text())
    kinds = {json.loads(k)[0] for k in table}
    assert {"curve-5", "bounds-1", f"exact-7-{dec.check_width()}"} <= kinds
    assert kinds <= {"curve-5", "bounds-1"} | {f"exact-7-{w}" for w in range(2, dec.check_width() + 1)}  # narrower, if not
    again = ExportedDecoder(out)
    monkeypatch.setattr(again.runner, "_measure_curve", lambda: pytest.fail("measured again"))
    monkeypatch.setattr(again.runner, "_check_exact", lambda w: pytest.fail("checked again"))
    monkeypatch.setattr(runner_mod, "key_boundaries", lambda step: pytest.fail("scanned again"))
    assert again.cost_curve() == curve and again.exact() == exact       # read back, not measured again


def test_a_machine_whose_kernels_are_not_exact_decodes_without_drafts(model_dir, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    out = export_decoder("anpd", tmp_path / "dec", model=HFCausalLM.from_pretrained(str(model_dir)), quant="int4",
                         chat=False, progress=lambda m: None)
    dec = ExportedDecoder(out)
    monkeypatch.setattr(dec.runner, "_check_exact", lambda w: False)
    ids = dec.encode(PROMPTS[0])
    with pytest.warns(RuntimeWarning, match="without drafts"):
        got, stats = dec.generate(ids, 16)
    assert got == dec.generate(ids, 16, draft=False)[0] and stats.drafted == 0 and stats.forwards == len(got)


def test_a_machine_exact_only_for_narrow_steps_drafts_within_them(model_dir, tmp_path, monkeypatch) -> None:
    """Kernels exact for steps of up to 3 tokens, not wider: drafts are cut to 2 tokens (a step
    of 3), still the graph's own greedy tokens, and the widths are searched, not all checked."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    out = export_decoder("anpd", tmp_path / "dec", model=HFCausalLM.from_pretrained(str(model_dir)), quant="int4",
                         chat=False, progress=lambda m: None)
    dec = ExportedDecoder(out)
    checked: list[int] = []
    monkeypatch.setattr(dec.runner, "_check_exact", lambda w: checked.append(w) or w <= 3)
    widths: list[int] = []
    real_run = dec.runner.step.run
    monkeypatch.setattr(dec.runner.step, "run", lambda kv, ids, *a, **k: widths.append(ids.shape[1]) or
                        real_run(kv, ids, *a, **k))
    ids = dec.encode(PROMPTS[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)         # drafting goes on: no "without drafts"
        dec.generate(ids, 2)                                    # the machine's measurements, before recording
        del widths[:]
        got, stats = dec.generate(ids, 24)
    steps = widths[1:]                      # after the prefill
    assert got == dec.generate(ids, 24, draft=False)[0]
    assert stats.drafted > 0 and stats.accepted > 0 and max(steps) <= 3
    assert dec._interpreter([ids], 24, True, None).engine.max_query == 3     # the cap the drafts get
    assert checked[0] == dec.check_width() and 3 in checked and len(checked) <= 5


def test_exported_run_never_imports_torch(ort_greedy, model_dir, tmp_path) -> None:
    out = tmp_path / "dec"
    assert main(["export", "anpd", str(out), "--model", str(model_dir), "--quant", "int4", "--no-chat"]) == 0
    code = ("import sys, json\nfrom decograph.cli import main\n"
            f"rc = main(['run', '--exported', {str(out)!r}, '--prompt', 't1 t5 t9 t5 t9 t5', '--prompt', 't3 t4', "
            "'--max-new-tokens', '16', '--json'])\n"
            "assert rc == 0\nassert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'torch imported'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stdout.strip().splitlines()[-2:]]    # one batch of two
    dec = ExportedDecoder(out)
    graph = ORTCausalLM(out / "model.onnx")
    for record, prompt in zip(records, ("t1 t5 t9 t5 t9 t5", "t3 t4")):
        assert record["prompt"] == prompt and record["new_token_ids"] == ort_greedy(graph, dec.encode(prompt), 16)
        assert record["strategy"] == "anpd" and record["quant"] == "int4"


def test_any_strategy_file_exports_and_runs_its_program(ort_greedy, model_dir, tmp_path) -> None:
    """Strategy files no built-in matches (two draft sources in one tree, lossy threshold
    verification) export as written and run on the runtime: the greedy one equals the graph's
    own greedy decoding."""
    model = HFCausalLM.from_pretrained(str(model_dir))
    from decograph.frontends.strategy_file import load_strategy_text

    two = load_strategy_text("strategy: two\ndescription: two chains\nsteps:\n  - prefill\n  - iterate:\n      body:\n"
                             "        - draft: {source: ngram, as: a}\n        - draft: {source: jacobi, as: b}\n"
                             "        - forward: {drafts: [a, b]}\n        - verify: {rule: greedy}\n"
                             "        - commit: {}\n  - emit\n", "two.yaml")
    out = export_decoder(two, tmp_path / "two", model=model, passes="none", chat=False, progress=lambda m: None)
    assert drafts_of(out) == ["draft.jacobi", "draft.ngram"]
    dec = ExportedDecoder(out)
    graph = ORTCausalLM(out / "model.onnx")
    ids = [dec.encode(t) for t in PROMPTS]
    assert [r[0] for r in dec.generate_batch(ids, 20)] == [ort_greedy(graph, p, 20) for p in ids]

    lossy = load_strategy_text("strategy: lossy\ndescription: threshold verification\nsteps:\n  - prefill\n  - iterate:\n      body:\n"
                               "        - draft: {source: ngram}\n        - forward: {}\n"
                               "        - verify: {rule: threshold, threshold: 0.5}\n        - commit: {}\n  - emit\n",
                               "lossy.yaml")
    out = export_decoder(lossy, tmp_path / "t", model=model, passes="none", chat=False, progress=lambda m: None)
    [(got, stats)] = ExportedDecoder(out).generate_batch([ids[0]], 12)
    assert len(got) == stats.new_tokens == 12


def test_export_errors(model_dir, tmp_path) -> None:
    model = HFCausalLM.from_pretrained(str(model_dir))
    with pytest.raises(UnsupportedError, match="needs a masked-diffusion model"):
        export_decoder("llada", tmp_path / "m", model=model, passes="none", progress=lambda m: None)
    assert not (tmp_path / "m").exists()
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("x")
    with pytest.raises(InputError, match="not empty"):
        export_decoder("greedy", tmp_path / "used", model=model, progress=lambda m: None)
    with pytest.raises(InputError, match="--quant"):
        export_decoder("greedy", tmp_path / "q", model=model, quant="int3", progress=lambda m: None)
    with pytest.raises(InputError, match="block_size"):
        export_decoder("greedy", tmp_path / "q", model=model, quant="int4", block_size=48, progress=lambda m: None)
    out = export_decoder("greedy", tmp_path / "ok", model=model, chat=False, progress=lambda m: None)
    with (out / "model.onnx").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(ModelError, match="sha256 differs"):
        ExportedDecoder(out)
    with pytest.raises(ModelError, match="no manifest.json"):
        ExportedDecoder(tmp_path)
    good = export_decoder("greedy", tmp_path / "good", model=model, chat=False, progress=lambda m: None)
    dec = ExportedDecoder(good)
    with pytest.raises(InputError, match="prompt 1 is empty"):
        dec.generate_batch([[1, 2], []], 4)
    with pytest.raises(InputError, match="no prompts"):
        dec.generate_batch([], 4)
    kv = dec.step.new_kv(2, 8)
    with pytest.raises(ModelError, match=r"lengths \[0, 3\]: expected 2 row lengths in \[0, 0\]"):
        dec.step.run(kv, np.ones((2, 1), np.int64), np.zeros((2, 1), np.int64), np.zeros((2, 1, 1, 1), np.float32),
                     lengths=np.array([0, 3]))
    manifest = json.loads((good / "manifest.json").read_text())
    (good / "manifest.json").write_text(json.dumps(manifest | {"plan": {"draft": "medusa"}}))
    with pytest.raises(ModelError, match="field 'plan' is not a field"):
        ExportedDecoder(good)
    assert main(["run", "--exported", str(out), "--strategy", "anpd", "--prompt", "t1"]) == 2


@pytest.mark.real_model
def test_default_model_int4_decoder(ort_greedy, default_model, tmp_path, monkeypatch) -> None:
    """The exported int4 ANPD decoder of the default model: its chat encoding equals the HF
    tokenizer's, and its tokens equal the int4 graph's own greedy decoding."""
    monkeypatch.delenv("XDG_CACHE_HOME")
    model, tok = default_model
    out = export_decoder("anpd", tmp_path / "smol-int4", model=HFCausalLM(model, tok), quant="int4",
                         progress=lambda m: None)
    dec = ExportedDecoder(out)
    graph = ORTCausalLM(out / "model.onnx")
    for q in ["List the planets of the solar system in order.", "Repeat: one two three, one two three, one two three."]:
        ids = dec.encode(q)
        hf = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True)
        assert ids == list(hf["input_ids"] if hasattr(hf, "keys") else hf)
        got, stats = dec.generate(ids, 32)
        assert got == ort_greedy(graph, ids, 32, set(dec.eos))
        assert stats.forwards <= len(got) + 1
    # a batch of three prompts of different lengths, and the Jacobi family's programs (as
    # written, no passes) on the same graph
    qs = ["List the planets of the solar system in order.", "Write a haiku about rain.",
          "Repeat: one two three, one two three, one two three."]
    ids = [dec.encode(q) for q in qs]
    want = [ort_greedy(graph, p, 24, set(dec.eos)) for p in ids]
    assert [r[0] for r in dec.generate_batch(ids, 24)] == want
    from decograph.api import as_program

    for name in ("jacobi", "gs_jacobi", "lookahead"):
        assert [r[0] for r in dec.with_program(as_program(name)).generate_batch(ids, 24)] == want, name


class _EdgeStep:
    """A step graph stand-in exact for every width except where a step's keys cross 64: a
    query's logits then move by one ulp-sized step (what Gemma 3's int4 graph did on an AVX-512
    VNNI CPU: a dense step ending at 64 keys against one-token steps ending at 65)."""

    vocab_size = 7

    class _KV:
        def __init__(self) -> None:
            self.length = 0

        def views(self) -> list:
            return []

    def new_kv(self, batch: int, capacity: int = 0):
        return self._KV()

    def run(self, kv, ids, pos, mask, keep=0, **kw):
        kv.length += ids.shape[1]
        total = kv.length
        logits = (pos[0, :, None] * 31 + ids[0, :, None] * 7 + np.arange(self.vocab_size)[None]) % 11
        return (logits + (1e-3 if total > 64 else 0.0))[None].astype(np.float32)


def test_the_exactness_check_covers_steps_ending_at_64_keys() -> None:
    from decograph.backends.onnxruntime.runner import width_invariant

    step = _EdgeStep()
    assert width_invariant(step, 6, boundaries=())          # the random-order check alone misses it
    assert not width_invariant(step, 6)
    assert not width_invariant(step, 2)


class _PeriodicStep(_EdgeStep):
    """``_EdgeStep`` with a code-path change at every ``64 + 128 k`` keys (Gemma 3's graphs on
    an AVX-512 VNNI CPU: 64, 192, 320, ...), optionally one more at ``extra`` keys."""

    def __init__(self, extra: int = 0) -> None:
        self.extra = extra

    def run(self, kv, ids, pos, mask, keep=0, **kw):
        kv.length += ids.shape[1]
        total = kv.length
        logits = (pos[0, :, None] * 31 + ids[0, :, None] * 7 + np.arange(self.vocab_size)[None]) % 11
        paths = len(range(64, total, 128)) + (0 < self.extra < total)
        return (logits + 1e-3 * paths)[None].astype(np.float32)


def test_key_boundaries_are_found_and_steps_cut_there_stay_exact() -> None:
    from decograph.backends.onnxruntime.runner import IRREGULAR, KeyBoundaries, key_boundaries, width_invariant

    step = _PeriodicStep()
    kb = key_boundaries(step)
    assert kb == KeyBoundaries(64, 128)
    assert [kb.next(k) for k in (0, 64, 65, 192, 193, 1000)] == [64, 64, 192, 192, 320, 1088]
    # a row of 60 cached slots: 3 query tokens (slots 60-62, one-token steps ending at 62-64 keys),
    # in a step at most 4 wide (ending at 64 keys); at 62 slots one token; past the boundary 127
    assert kb.room(60) == (3, 4) and kb.room(62) == (1, 2) and kb.room(63) == (128, 129)
    assert not width_invariant(step, 9)
    for context in (37, 50, 60, 183):
        assert width_invariant(step, 16, context, boundaries=(64, 128, 192), bounds=kb)
    # boundaries that are no first + k * period: no drafting (the caller's check fails)
    assert key_boundaries(_EdgeStep()) == IRREGULAR
    assert key_boundaries(_PeriodicStep(extra=112)) == IRREGULAR
    assert key_boundaries(_PeriodicStep(extra=1104)) == IRREGULAR       # the check past the scan finds it


def test_the_engine_cuts_each_rows_step_at_the_boundaries() -> None:
    from decograph.backends.onnxruntime.engine import OrtBatch
    from decograph.backends.onnxruntime.runner import KeyBoundaries
    from decograph.backends.onnxruntime.solo import OrtEngine, SoloBatch

    class _Rows:
        def __init__(self, lengths):
            self.lengths = lengths

        def key_lengths(self):
            return self.lengths

    engine = OrtEngine(_EdgeStep(), max_query=9, bounds=KeyBoundaries(64, 128))
    batch = _Rows([30, 60, 62])
    batch.__class__ = type("B", (_Rows, OrtBatch), {})          # a batch: no row wider than another's room
    assert engine.query_caps(batch) == [2, 2, 1]
    solo = _Rows([30, 60, 62, 100])
    solo.__class__ = type("S", (_Rows, SoloBatch), {})          # rows alone: each its own room
    assert engine.query_caps(solo) == [9, 3, 1, 9]
    assert OrtEngine(_EdgeStep(), max_query=9).query_caps(batch) is None
