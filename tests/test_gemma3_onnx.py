"""Gemma 3 on ONNX Runtime (``backends/onnxruntime/graph_gemma3.py``): the step graph against
transformers' ``Gemma3ForCausalLM`` (prefill, one-token steps, draft trees and rows of different
lengths, all across the sliding window), k-token steps bit-identical to one-token steps, the
exported decoder without torch equal to the torch backend, the ``onnxruntime*`` backends equal
to their graph's own greedy, and (``real_model``) Gemma 3 270M's int4 export equal to its own
one-token greedy decoding, with torch blocked, batch 1 and 4, over a prompt longer than the
window."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from decograph.backends.onnxruntime.engine import tree_masks
from decograph.backends.onnxruntime.export import export_step, graph_version, quantize_step
from decograph.backends.onnxruntime.graph_gemma3 import GEMMA3_GRAPH_VERSION
from decograph.backends.onnxruntime.kv import StepSession, causal_mask
from decograph.backends.onnxruntime.runner import width_invariant
from decograph.errors import ModelError
from decograph.runtime.rows import DraftTree

WINDOW = 8
VOCAB = 96

pytestmark = pytest.mark.usefixtures("private_cache")


def tiny_gemma3(window: int = WINDOW, softcap: float | None = None, seed: int = 0) -> torch.nn.Module:
    """A random ``Gemma3ForCausalLM``: local and global layers mixed, a linearly scaled global
    rotary base, random norm weights (so the ``1 + w`` folding is seen), a small window."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, GenerationConfig

    cfg = Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24, sliding_window=window,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 8.0}},
        max_position_embeddings=256, final_logit_softcapping=softcap, initializer_range=0.2,
        bos_token_id=None, eos_token_id=None, pad_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Gemma3ForCausalLM(cfg).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.normal_(0.0, 0.3)
    model.generation_config = GenerationConfig(eos_token_id=None)
    return model


@pytest.fixture(scope="module")
def gemma():
    return tiny_gemma3()


@pytest.fixture(scope="module")
def step_path(gemma, tmp_path_factory):
    return export_step(gemma, tmp_path_factory.mktemp("g3") / "model.onnx")


def _hf(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def test_the_graph_uses_fused_ops_and_checks(step_path, gemma) -> None:
    proto = onnx.load(str(step_path))
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("GroupQueryAttention") == 4 and ops.count("FastGelu") == 4
    assert ops.count("SkipSimplifiedLayerNormalization") == 2 * 4 and "RotaryEmbedding" not in ops
    assert graph_version(gemma) == GEMMA3_GRAPH_VERSION


@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("exact", [True, False])
def test_prefill_and_steps_match_transformers_across_the_window(exact, softcap, tmp_path) -> None:
    model = tiny_gemma3(softcap=softcap)
    step = StepSession(export_step(model, tmp_path / "m.onnx", exact=exact))
    ids = np.random.default_rng(0).integers(0, VOCAB, 40).tolist()
    ref = _hf(model, ids)
    # the window matters here: without it transformers computes other logits
    wide = tiny_gemma3(window=1000, softcap=softcap)
    assert np.abs(_hf(wide, ids)[-1] - ref[-1]).max() > 1e-2
    kv = step.new_kv(1, 48)
    got = step.run(kv, np.array([ids]), np.arange(40)[None], causal_mask(40, 0))[0]
    assert np.abs(got - ref).max() < 1e-4
    kv = step.new_kv(1, 48)
    step.run(kv, np.array([ids[:3]]), np.arange(3)[None], causal_mask(3, 0), 1)
    for i in range(3, 40):                          # one token a step, the window sliding over the cache
        lg = step.run(kv, np.array([ids[i:i + 1]]), np.array([[i]]), causal_mask(1, i))
        assert np.abs(lg[0, -1] - ref[i]).max() < 1e-4, i


def test_trees_and_rows_of_other_lengths_see_the_window_by_position(gemma, step_path) -> None:
    """Draft-tree nodes share depths (their slots are not their positions) and rows of a batch
    hold caches of different lengths: each node's logits are those of a plain forward over its
    path, with the window counted in positions."""
    step = StepSession(step_path)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, VOCAB, n).tolist() for n in (21, 13)]
    kv = step.new_kv(2, 48)
    for b, p in enumerate(prompts):                 # each row's prompt alone, gathered into one cache
        one = step.new_kv(1, 48)
        step.run(one, np.array([p]), np.arange(len(p))[None], causal_mask(len(p), 0), 1)
        for dst, src in zip(kv.host(), one.host()):
            dst[b, :, :len(p)] = src[0, :, :len(p)]
    kv.length = 21
    lengths = np.array([21, 13])
    trees = []
    for _ in prompts:       # root -> a -> c -> e, a -> d, root -> b: siblings at two depths
        a, b, c, d, e = rng.choice(VOCAB, 5, replace=False).tolist()
        t = DraftTree()
        for chain in ([a, c, e], [a, d], [b]):
            t.add_chain(chain)
        assert t.parent == [-1, 0, 1, 0, -1]
        trees.append(t)
    pending = [rng.integers(0, VOCAB, 2).tolist() for _ in prompts]
    w = 2 + 5
    ids = np.array([p + t.tokens for p, t in zip(pending, trees)])
    pos = np.array([[n, n + 1] + [n + 1 + d for d in t.depth] for n, t in zip(lengths, trees)])
    logits = step.run(kv, ids, pos, tree_masks(lengths, [2, 2], trees, w, 21), lengths=lengths)
    for b, (p, t) in enumerate(zip(prompts, trees)):
        base = p + pending[b]
        assert np.abs(logits[b, 1] - _hf(gemma, base)[-1]).max() < 1e-4
        for i in range(len(t)):
            path, j = [], i
            while j >= 0:
                path.insert(0, t.tokens[j])
                j = t.parent[j]
            assert np.abs(logits[b, 2 + i] - _hf(gemma, base + path)[-1]).max() < 1e-4, (b, i)


@pytest.mark.parametrize("bits", [0, 4])
def test_k_token_steps_are_bit_identical_to_one_token_steps(step_path, bits, tmp_path) -> None:
    """What lets the exported decoder draft on Gemma 3: the exact graph's k-token step is k
    one-token steps, bit for bit (fp32 always; int4 where this CPU's kernels allow, and the
    runner's check must then say so, so the decoder falls back to plain greedy)."""
    path = quantize_step(step_path, tmp_path / "q.onnx", bits) if bits else step_path
    step = StepSession(path)
    if bits == 0:
        assert width_invariant(step, 9, context=23)
    else:
        width_invariant(step, 9, context=23)        # either answer is lawful; it must not fail


def test_the_float16_graph_runs_on_the_cpu_near_transformers(gemma, tmp_path) -> None:
    """The CUDA EP's float16 graph (``export --dtype float16``), checked on the CPU EP."""
    step = StepSession(export_step(gemma, tmp_path / "f16.onnx", dtype="float16"))
    ids = np.random.default_rng(0).integers(0, VOCAB, 30).tolist()
    kv = step.new_kv(1, 40)
    got = step.run(kv, np.array([ids]), np.arange(30)[None], causal_mask(30, 0))[0]
    ref = _hf(gemma, ids)
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()


def test_unsupported_configs_are_refused(tmp_path) -> None:
    from transformers import Gemma3ForCausalLM

    model = tiny_gemma3()
    model.config.attn_logit_softcapping = 50.0
    with pytest.raises(ModelError, match="soft-capping"):
        export_step(model, tmp_path / "a.onnx")
    model.config.attn_logit_softcapping = None
    model.config.hidden_activation = "relu"
    with pytest.raises(ModelError, match="tanh-GELU"):
        export_step(model, tmp_path / "b.onnx")
    assert Gemma3ForCausalLM is type(model)


# -- export and the onnxruntime backends -------------------------------------------------------

TEXTS = ["t1 t5 t9 t5 t9 t5 t9 t5 t9 t5 t9 t5 t3", "t3 t4 t3 t4 t3 t4 t3 t4 t3 t4 t3 t4", "t7 t2"]


@pytest.fixture(scope="module")
def gemma_dir(gemma, tmp_path_factory):
    from decograph.models.tiny import word_tokenizer

    out = tmp_path_factory.mktemp("g3dir") / "tiny-gemma3"
    gemma.save_pretrained(out)
    word_tokenizer(VOCAB).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def gemma_export(gemma_dir, tmp_path_factory):
    from decograph.export import export_decoder

    return export_decoder("anpd", tmp_path_factory.mktemp("g3exp") / "dec", model=str(gemma_dir), chat=False,
                          progress=lambda m: None)


def test_the_exported_decoder_without_torch_equals_the_torch_backend(gemma_export, gemma_dir, run_without_torch,
                                                                     tmp_path) -> None:
    import json

    import decograph
    from decograph.models.adapters import HFCausalLM

    manifest = json.loads((gemma_export / "manifest.json").read_text())
    assert manifest["graphs"]["target"]["graph"] == GEMMA3_GRAPH_VERSION
    body = """
from decograph.exported import ExportedDecoder
dec = ExportedDecoder(job["dir"])
prompts = [dec.encode(t) for t in job["texts"]]
out["alone"] = [dec.generate(p, 24)[0] for p in prompts]
out["plain"] = [dec.generate(p, 24, draft=False)[0] for p in prompts]
out["batch"] = [ids for ids, _ in dec.generate_batch(prompts, 24)]
out["drafted"] = sum(dec.generate(p, 24)[1].drafted for p in prompts)
"""
    got = run_without_torch(body, {"dir": str(gemma_export), "texts": TEXTS}, tmp_path)
    adapter = HFCausalLM.from_pretrained(str(gemma_dir))
    torch_out = decograph.generate(adapter.model, adapter.tokenizer, TEXTS, "anpd", 24, eos_token_id=[])
    want = [r.new_token_ids for r in torch_out]
    assert got["alone"] == got["plain"] == got["batch"] == want
    assert got["drafted"] > 0                       # the drafts ran (and changed nothing)


@pytest.mark.parametrize("backend", ["onnxruntime", "onnxruntime-int4"])
def test_the_onnxruntime_backends_equal_their_graphs_own_greedy(ort_greedy, gemma, backend) -> None:
    import decograph
    from decograph.api import resolve_model
    from decograph.backends import get_backend

    graph = get_backend(backend).prepare(resolve_model(gemma)[0])
    prompts = [[1, 5, 9, 5, 9, 5, 9, 5, 9, 5, 9, 5, 3], [3, 4, 3, 4, 3, 4, 3, 4, 3, 4], [7, 2]]
    want = [ort_greedy(graph, p, 20) for p in prompts]
    for strategy in ("anpd", "greedy"):
        for batch in (prompts[:1], prompts):
            out = decograph.generate(gemma, None, batch, strategy, 20, eos_token_id=[], backend=backend)
            assert [r.new_token_ids for r in out] == want[: len(batch)], (strategy, len(batch))


# -- the real Gemma 3 270M (real_model) ----------------------------------------------------------

DATA = Path(__file__).resolve().parents[1] / "benchmarks" / "data" / "spec_bench_questions.jsonl"
N_NEW = 20
CODE = 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n    if n < 2:\n        return n\n'


@pytest.fixture(scope="module")
def real_gemma():
    from decograph.models.gemma3 import load_gemma3

    torch.set_num_threads(2)
    return load_gemma3(progress=False)


def _real_prompts(tok) -> list[list[int]]:
    """Raw text: a Spec-Bench article cut to 680 tokens (past the 512-token window), the code
    completion and two Spec-Bench questions."""
    import json

    rows = [json.loads(line) for line in DATA.read_text().splitlines()]
    article = next(ids for r in rows if r["category"] == "summarization"
                   and len(ids := tok(r["turns"][0])["input_ids"]) >= 700)
    questions = [next(r["turns"][0] for r in rows if r["category"] == c) for c in ("writing", "qa")]
    return [article[:680], tok(CODE)["input_ids"]] + [tok(q)["input_ids"] for q in questions]


@pytest.mark.real_model
def test_real_gemma3_fp32_graph_matches_transformers_past_the_window(real_gemma, tmp_path) -> None:
    model, tok = real_gemma
    ids = _real_prompts(tok)[0]
    path = export_step(model, tmp_path / "model.onnx")
    step = StepSession(path)
    kv = step.new_kv(1, len(ids) + 8)
    n = len(ids) - 4
    got = [step.run(kv, np.array([ids[:n]]), np.arange(n)[None], causal_mask(n, 0), 1)[0, -1].copy()]
    for i in range(n, len(ids)):                    # one-token steps, each with its padding row
        got.append(step.run(kv, np.array([ids[i:i + 1]]), np.array([[i]]), causal_mask(1, i))[0, -1].copy())
    with torch.no_grad():
        ref = model(torch.tensor([ids]), logits_to_keep=5).logits[0].numpy()
    err = np.abs(np.stack(got) - ref).max()
    assert err < 1e-3 * np.abs(ref).max(), err
    assert [int(g.argmax()) for g in got] == ref.argmax(-1).tolist()


@pytest.mark.real_model
def test_real_gemma3_int4_export_equals_its_own_greedy_without_torch(real_gemma, run_without_torch, tmp_path) -> None:
    """The exported int4 decoder (anpd) against its own one-token greedy decoding, with torch
    blocked: batch 1 (the 680-token article, the code) and batch 4 (article and the others).
    Where this CPU's int4 kernels are not exact the decoder must decode without drafts (and
    say so), never differ."""
    from decograph.export import export_decoder
    from decograph.models.adapters import HFCausalLM

    model, tok = real_gemma
    prompts = _real_prompts(tok)
    # the loaded model (the module's fixture reads the real cache; this test's cache is private)
    out = export_decoder("anpd", tmp_path / "dec", model=HFCausalLM(model, tok), quant="int4", chat=False,
                         progress=lambda m: None)
    body = """
import warnings
from decograph.exported import ExportedDecoder
dec = ExportedDecoder(job["dir"])
out["encoded"] = dec.encode(job["code"])
prompts = job["prompts"]
out["exact"] = dec.exact()
with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always")
    runs = [dec.generate(p, job["n"]) for p in prompts[:2]]
    out["batch"] = [ids for ids, _ in dec.generate_batch(prompts, job["n"])]
out["warned"] = any("without drafts" in str(w.message) for w in seen)
out["alone"] = [ids for ids, _ in runs]
out["drafted"] = sum(s.drafted for _, s in runs)
out["plain"] = [dec.generate(p, job["n"], draft=False)[0] for p in prompts]
"""
    got = run_without_torch(body, {"dir": str(out), "prompts": prompts, "n": N_NEW, "code": CODE}, tmp_path)
    assert got["encoded"] == prompts[1]                     # <bos> and all, as transformers' tokenizer
    assert got["alone"] == got["plain"][:2] and got["batch"] == got["plain"]
    if got["exact"]:
        assert got["drafted"] > 0 and not got["warned"]
    else:
        assert got["drafted"] == 0 and got["warned"]
