"""DiffusionGemma on ONNX Runtime (``backends/onnxruntime/graph_diffusion_gemma``: the encoder and
decoder graphs; ``backends/onnxruntime/noise``: the numpy engine), on tiny random-weight models
built from transformers' own config classes (``tests/test_diffusion_gemma.py``'s).

The graphs' logits equal transformers' (through the torch backend's batch) within 1e-4 over
ragged batches, a prompt longer than the sliding window, self-conditioning and appended
canvases; the step's numpy math equals the torch engine's. The backends cannot share a random
stream (numpy's against torch's), so equality runs feed both the same draws (the noise, and
the samples' uniforms): then ``diffusion_gemma_fast`` and the other confidence rules give
torch's tokens exactly, and ``diffusion_gemma`` too; unpatched, ``diffusion_gemma`` on ORT is
reproducible under ``seed`` and honours ``max_new_tokens`` and EOS. The runs go through
onnxruntime (torch's batch refuses to start), the run-time modules run with torch blocked, and
what is not supported is named."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import decograph
from decograph.backends.onnxruntime.noise import DGSession, OrtNoiseBatch, OrtNoiseStep
from decograph.backends.torch_ref.denoise import TorchNoiseBatch, TorchNoiseStep
from decograph.errors import InputError, UnsupportedError
from tests.test_diffusion_gemma import EOS, P1, P2, P3, program, tiny_diffusion_gemma

pytestmark = pytest.mark.usefixtures("private_cache")

LONG = [2] + list(range(10, 22))        # 13 tokens: past the tiny model's sliding window of 8


@pytest.fixture(scope="module")
def model():
    return tiny_diffusion_gemma()


@pytest.fixture(scope="module")
def firm():
    """Weights of std 0.1: confidences ~0.06 (a threshold of 0.05 keeps several positions a step)."""
    return tiny_diffusion_gemma(seed=1, init_std=0.1)


@pytest.fixture(scope="module")
def peaked():
    """Weights of std 1.0: confident, and chaotic through the self-conditioning (see below)."""
    return tiny_diffusion_gemma(seed=1, init_std=1.0)


@pytest.fixture(scope="module")
def graphs(model, tmp_path_factory):
    from decograph.backends.onnxruntime.graph_diffusion_gemma import export_diffusion_gemma

    return export_diffusion_gemma(model, tmp_path_factory.mktemp("dgemma"))


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _inverse_cdf(probs: np.ndarray, gen: np.random.Generator) -> np.ndarray:
    cdf = np.cumsum(probs, -1, dtype=np.float64)
    u = gen.random(probs.shape[:2])
    return np.minimum((cdf <= (u * cdf[..., -1])[..., None]).sum(-1), probs.shape[-1] - 1)


def same_draws(monkeypatch, seed: int) -> None:
    """Both backends' noise and samples drawn from one numpy generator seeded ``seed`` (call it
    again before the second backend's run)."""
    gen = np.random.default_rng(seed)
    monkeypatch.setattr(TorchNoiseBatch, "noise",
                        lambda self: gen.integers(0, self.vocab_size, (self.ids.shape[0], self.canvas_length)))
    monkeypatch.setattr(OrtNoiseBatch, "noise",
                        lambda self: gen.integers(0, self.vocab_size, (self.valid.shape[0], self.canvas_length)))
    monkeypatch.setattr(TorchNoiseStep, "sample",
                        lambda self, t: _inverse_cdf(torch.softmax(self.processed(t), -1).numpy(), gen))
    monkeypatch.setattr(OrtNoiseStep, "sample", lambda self, t: _inverse_cdf(_softmax(self.processed(t)), gen))


def both(monkeypatch, model, prompts, strategy, n, seed=0, **kw):
    """``strategy`` on torch and on ONNX Runtime with the same draws: (torch's, ORT's) results."""
    out = []
    for backend in ("torch", "onnxruntime"):
        same_draws(monkeypatch, seed)
        out.append(decograph.generate(model, None, prompts, strategy, n, eos_token_id=[EOS], backend=backend, **kw))
    return out


def tokens(results) -> list[list[int]]:
    return [r.new_token_ids for r in results]


@pytest.mark.parametrize("which", ["model", "peaked"])
def test_graph_logits_equal_transformers(which, request, tmp_path) -> None:
    """Both batches over a ragged batch (one prompt past the window), three steps on each of
    three canvases: each step's logits, the self-conditioning signal each computes (one row
    keeping its last). Each step then starts from torch's signal: through a model of weights
    as large as ``peaked``'s the signal multiplies a difference about 10x a step, so the graphs
    are compared on equal inputs (that growth is the model's, not the graphs')."""
    from decograph.backends.onnxruntime.graph_diffusion_gemma import export_diffusion_gemma
    from decograph.models.diffusion_gemma import DiffusionGemmaAdapter

    m = request.getfixturevalue(which)
    adapter = DiffusionGemmaAdapter(m)
    session = DGSession(export_diffusion_gemma(m, tmp_path / "g"))
    prompts = [LONG, P3]
    ref_batch = TorchNoiseBatch(adapter, prompts)
    ort_batch = OrtNoiseBatch(session, prompts, adapter.pad_token_id, np.random.default_rng(0))
    rng = np.random.default_rng(1)
    worst = 0.0
    for _ in range(3):
        for step in range(3):
            canvas = rng.integers(0, 64, (2, 8))
            ref, got = ref_batch.forward(canvas), ort_batch.forward(canvas)
            want = ref.logits.numpy()
            worst = max(worst, float(np.abs(got.logits - want).max() / max(1.0, np.abs(want).max())))
            for f in ("entropy", "confidence"):
                np.testing.assert_allclose(getattr(got, f)(0.7), getattr(ref, f)(0.7), rtol=1e-4, atol=1e-5)
            assert (got.argmax(0.7) == ref.argmax(0.7)).mean() > 0.9          # near-ties of random weights aside
            keep = np.array([False, step == 2])
            ref.condition(keep)
            got.condition(keep)
            sig = ref_batch.signal.numpy()
            worst = max(worst, float(np.abs(ort_batch.signal - sig).max() / max(1.0, np.abs(sig).max())))
            ort_batch.signal = sig.copy()
        canvas = rng.integers(0, 64, (2, 8))
        ref_batch.append(canvas)
        ort_batch.append(canvas)
    assert worst < 1e-4, worst


def test_the_step_math_equals_torch() -> None:
    """On given logits: entropy, confidence, argmax as the torch engine's; samples follow the
    softmax (frequencies within 0.02 over 4000 draws) and repeat under one seed."""
    gen = np.random.default_rng(0)
    logits = (gen.standard_normal((2, 5, 16)) * 3).astype(np.float32)
    ort = OrtNoiseStep(None, logits)
    ref = TorchNoiseStep(None, torch.from_numpy(logits))
    for t in (0.4, 0.8, 1.0):
        np.testing.assert_allclose(ort.entropy(t), ref.entropy(t), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ort.confidence(t), ref.confidence(t), rtol=1e-5, atol=1e-6)
        assert (ort.argmax(t) == ref.argmax(t)).all()

    class Rows:
        rng = np.random.default_rng(3)

    wide = np.broadcast_to(np.log(np.array([0.1, 0.2, 0.3, 0.4], np.float32)), (1, 4000, 4)).copy()
    draws = OrtNoiseStep(Rows(), wide).sample(1.0)
    assert np.abs(np.bincount(draws[0], minlength=4) / 4000 - [0.1, 0.2, 0.3, 0.4]).max() < 0.02
    Rows.rng = np.random.default_rng(3)
    assert (OrtNoiseStep(Rows(), wide).sample(1.0) == draws).all()


@pytest.mark.parametrize("prompts", [[P1], [P3], [P1, P2], [P3, LONG]], ids=["p1", "p3", "batch2", "ragged"])
@pytest.mark.parametrize("which,threshold", [("model", 0.9), ("firm", 0.9), ("firm", 0.05)])
def test_fast_equals_torch_given_the_same_noise(which, threshold, prompts, request, monkeypatch) -> None:
    """``diffusion_gemma_fast`` (argmax and the confidence threshold): torch's tokens and
    positions kept per step, batch 1 and 2, ragged, three canvases; one position a step, or
    several (threshold 0.05 on ``firm``)."""
    m = request.getfixturevalue(which)
    ref, got = both(monkeypatch, m, prompts, "diffusion_gemma_fast", 20, seed=len(prompts),
                    overrides={"threshold": threshold})
    assert tokens(got) == tokens(ref)
    assert [r.stats.accepted_per_step for r in got] == [r.stats.accepted_per_step for r in ref]
    if threshold < 0.1:
        assert max(max(r.stats.accepted_per_step) for r in got) > 1


def test_chaotic_weights_equal_torch_while_no_signal_feeds_back(peaked, monkeypatch) -> None:
    """On ``peaked``'s weights (std 1.0) the self-conditioning loop multiplies a difference of
    float rounding (2e-6 of the logits) about 10x a step, so after a few steps the backends'
    canvases part: not a near-tie of the rule but the model's own sensitivity to any float
    difference (given equal inputs each step, the graphs' logits stay within 5e-5: see the
    logits test). With threshold 0 each canvas takes one step, no signal feeds back, and the
    tokens are torch's (the canvases of a ragged batch)."""
    ref, got = both(monkeypatch, peaked, [P3, LONG], "diffusion_gemma_fast", 24, overrides={"threshold": 0.0})
    assert tokens(got) == tokens(ref)
    assert all(set(r.stats.accepted_per_step) == {8} for r in got)


@pytest.mark.parametrize("over", [{"steps": 6, "stable": 1, "confident": 50.0}, {"steps": 4, "bound": 2.0},
                                  {"steps": 5, "t_min": 0.2, "t_max": 1.5}])
def test_diffusion_gemma_equals_torch_given_the_same_draws(model, over, monkeypatch) -> None:
    """The entropy-bound sampler (temperatures, entropies, the bound, the adaptive stop, the
    self-conditioning) with the same noise and uniforms: torch's tokens and step counts."""
    for seed in (0, 1):
        ref, got = both(monkeypatch, model, [P1, P2], "diffusion_gemma", 24, seed=seed, overrides=over)
        assert tokens(got) == tokens(ref)
        assert [r.stats.decode_steps for r in got] == [r.stats.decode_steps for r in ref]
        assert [r.stats.accepted_per_step for r in got] == [r.stats.accepted_per_step for r in ref]


def _unmask_programs() -> list[tuple[str, object]]:
    """Every built-in strategy with an unmask step, and each confidence rule over draft.noise."""
    from decograph.frontends.strategies import builtin_names, load_strategy
    from decograph.ir import ops as O

    out: list[tuple[str, object]] = []
    for name in builtin_names():
        if any(isinstance(op, O.UNMASK_OPS) for op in load_strategy(name).program.walk()):
            out.append((name, name))
    for rule in ("threshold, threshold: 0.5", "factor, factor: 1.0", "topk_per_step, k: 3"):
        out.append((rule.split(",")[0], program("source: noise", f"rule: {rule}")))
    return out


def test_every_unmask_strategy_that_runs_on_torch_runs_on_ort(model, monkeypatch) -> None:
    """Each strategy DiffusionGemma takes on torch gives torch's tokens on ORT (same draws);
    each it refuses, ORT refuses too."""
    ran = []
    for name, strategy in _unmask_programs():
        over = {"steps": 4} if name == "diffusion_gemma" else None
        try:
            ref, got = both(monkeypatch, model, [P1, P2], strategy, 12, seed=2, overrides=over)
        except UnsupportedError:
            with pytest.raises(UnsupportedError):
                decograph.generate(model, None, [P1], strategy, 4, backend="onnxruntime")
            continue
        ran.append(name)
        assert all(len(r.new_token_ids) == 12 or r.new_token_ids[-1] == EOS for r in got), name
        assert tokens(got) == tokens(ref), name
    assert {"diffusion_gemma", "diffusion_gemma_fast", "factor", "topk_per_step", "threshold"} <= set(ran)
    assert not {"llada", "fast_dllm", "lud"} & set(ran)


def test_sampling_is_seeded_and_honours_budget_and_eos(model) -> None:
    """``diffusion_gemma`` on ORT: a seed repeats its tokens; the budget cuts inside a canvas
    (0: nothing); a row whose canvas holds EOS ends there while the other goes on."""
    def run(seed, n=20, prompts=(P1, P2)):
        return decograph.generate(model, None, list(prompts), "diffusion_gemma", n, eos_token_id=[EOS],
                                  backend="onnxruntime", seed=seed, overrides={"steps": 4})

    a, b, c = run(5), run(5), run(6)
    assert tokens(a) == tokens(b) and tokens(a) != tokens(c)
    assert all(len(r.new_token_ids) <= 20 for r in a)
    assert tokens(run(5, n=0, prompts=(P1,))) == [[]]
    for seed in range(40):
        got = run(seed, n=32)
        ended = [r for r in got if r.stats.finish_reason == "eos"]
        if len(ended) == 1 and len(ended[0].new_token_ids) < 24:
            break
    else:
        pytest.fail("no seed ends exactly one row early")
    for r in got:
        ids = r.new_token_ids
        assert EOS not in ids[:-1] and len(ids) <= 32
        assert r.stats.finish_reason == ("eos" if ids[-1:] == [EOS] else "max_new_tokens")
        assert r.stats.finish_reason == "eos" or len(ids) == 32


def test_the_run_goes_through_onnxruntime(model, monkeypatch) -> None:
    """The ORT backend's run never starts torch's batch; it runs both graphs; the graphs are
    exported once into the ONNX cache."""
    from decograph.api import resolve_model
    from decograph.backends import get_backend
    from decograph.measure_cache import cache_path

    calls = {"encode": 0, "decode": 0}
    for f in calls:
        real = getattr(DGSession, f)

        def spy(self, *a, _f=f, _real=real, **k):
            calls[_f] += 1
            return _real(self, *a, **k)

        monkeypatch.setattr(DGSession, f, spy)

    def refuse(*a, **k):
        raise AssertionError("the torch backend's batch started on the onnxruntime backend")

    monkeypatch.setattr(TorchNoiseBatch, "__init__", refuse)
    out = decograph.generate(model, None, [P1], "diffusion_gemma_fast", 16, eos_token_id=[], backend="onnxruntime")
    assert len(out[0].new_token_ids) == 16
    assert calls["encode"] == 2 and calls["decode"] == len(out[0].stats.accepted_per_step) >= 2
    path = get_backend("onnxruntime").prepare(resolve_model(model)[0]).session.path
    assert path.parent == cache_path("onnx") and path.name.startswith("dgemma-")
    stamp = (path / "decoder.onnx").stat().st_mtime_ns
    decograph.generate(model, None, [P2], "diffusion_gemma_fast", 8, backend="onnxruntime")
    assert (path / "decoder.onnx").stat().st_mtime_ns == stamp


def test_run_time_modules_run_without_torch(model, graphs, run_without_torch, tmp_path) -> None:
    """The engine over the exported graphs, with torch and transformers blocked: the tokens of
    the in-process ORT run under the same seed."""
    body = """
from decograph.backends.onnxruntime.noise import DGSession, OrtNoiseEngine
from decograph.frontends.strategies import load_strategy
from decograph.runtime.interp import Interpreter, RunConfig
engine = OrtNoiseEngine(DGSession(job["dir"]), pad_id=0, max_positions=256, seed=job["seed"])
for name in ("diffusion_gemma", "diffusion_gemma_fast"):
    cfg = RunConfig(max_new_tokens=job["n"], eos_token_ids=(1,), seed=job["seed"])
    interp = Interpreter(load_strategy(name, {"steps": 4} if name == "diffusion_gemma" else None).program, engine, cfg)
    list(interp.run(job["prompts"]))
    out[name] = [r.gen for r in interp.state.rows]
"""
    got = run_without_torch(body, {"dir": str(graphs), "seed": 9, "n": 20, "prompts": [P1, P3]}, tmp_path)
    for name in ("diffusion_gemma", "diffusion_gemma_fast"):
        want = decograph.generate(model, None, [P1, P3], name, 20, eos_token_id=[EOS], backend="onnxruntime", seed=9,
                                  overrides={"steps": 4} if name == "diffusion_gemma" else None)
        assert got[name] == tokens(want), name


def test_what_is_not_supported_is_named(model, tmp_path) -> None:
    from decograph.backends.onnxruntime.graph_diffusion_gemma import build_dg_decoder
    from decograph.errors import ModelError
    from decograph.export import export_decoder
    from decograph.models.tiny import tiny_llama

    with pytest.raises(UnsupportedError, match=r"'onnxruntime-int4': DiffusionGemma runs on ONNX Runtime in fp32 only"):
        decograph.generate(model, None, [P1], "diffusion_gemma", 4, backend="onnxruntime-int4")
    with pytest.raises(InputError, match=r"do_sample"):
        decograph.generate(model, None, [P1], "diffusion_gemma", 4, backend="onnxruntime", do_sample=True)
    with pytest.raises(UnsupportedError, match=r"step `verify\.greedy` cannot run on .*ONNX Runtime"):
        decograph.generate(model, None, [P1], "greedy", 4, backend="onnxruntime")
    with pytest.raises(UnsupportedError, match=r"`draft\.mask` is masked diffusion"):
        decograph.generate(model, None, [P1], "fast_dllm", 4, backend="onnxruntime")
    with pytest.raises(UnsupportedError, match=r"torch and onnxruntime backends; it has no exported decoder yet"):
        export_decoder("diffusion_gemma", tmp_path / "out", model=model, progress=lambda m: None)
    with pytest.raises(ModelError, match=r"takes a DiffusionGemmaForBlockDiffusion, not LlamaForCausalLM"):
        build_dg_decoder(tiny_llama(vocab_size=64, hidden=32, seed=0))
