"""The ONNX Runtime path: the exported step against torch (checker, shape inference, logits and
KV within 1e-4), a k-token step bit-identical to k one-token steps (fp32, int4, int8), every
lossless strategy on ORT equal to ORT's own one-token greedy (tiny model and the real default
model), fp32 ORT against the torch reference with any parting explained by a near-tie (the step
and the logit margin are reported), the export cache keyed by the graph's version, and errors."""
from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import torch

import decograph
from decograph.api import resolve_model
from decograph.backends import get_backend
from decograph.backends.onnxruntime.backend import export_dir
from decograph.backends.onnxruntime.export import (QUANT, export_step, io_names, quant_tag,
                                                   quantize_step)
from decograph.backends.onnxruntime.kv import StepSession
from decograph.backends.onnxruntime.session import ORTCausalLM
from decograph.errors import ModelError, UnsupportedError
from decograph.exported import width_invariant
from decograph.frontends.strategies import list_strategies, load_strategy
from decograph.models.tiny import tiny_llama

# strategies with draft heads need a head trained for the model
LOSSLESS = [name for name, _ in list_strategies() if load_strategy(name).lossless and not load_strategy(name).heads]
PROMPTS = [[1, 5, 9, 5, 9, 5, 9, 5], [3, 4, 3, 4, 3], [7, 8, 9, 10, 11, 12, 7, 8]]


pytestmark = pytest.mark.usefixtures("private_cache")


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    return export_step(tiny, tmp_path_factory.mktemp("onnx") / "model.onnx")


def test_export_is_a_valid_graph_with_optimum_names(exported) -> None:
    proto = onnx.load(str(exported))
    onnx.checker.check_model(proto)
    onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    ins, outs = io_names(2)
    assert [i.name for i in proto.graph.input] == ins and [o.name for o in proto.graph.output] == outs
    assert not list(exported.parent.glob("*.tmp"))


def test_step_matches_torch_logits_and_kv(tiny, exported) -> None:
    ort_a = ORTCausalLM(exported)
    ref_a = resolve_model(tiny)[0]
    for a in (ort_a, ref_a):
        a._c = a.new_cache(2)
    ids = torch.tensor([[1, 5, 9, 5], [3, 4, 3, 0]])
    pos = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 0]])
    attend = torch.ones(4, 4, dtype=torch.bool).tril().repeat(2, 1, 1)
    attend[1, 3] = False
    attend[1, 3, 3] = True
    outs = [a.forward(a._c, ids, pos, attend) for a in (ort_a, ref_a)]
    assert (outs[0] - outs[1]).abs().max() < 1e-4
    # a tree step over the cache: two children of the last token, siblings not seeing each other
    tree = torch.tensor([[9, 7], [3, 2]])
    tpos = torch.tensor([[4, 4], [3, 3]])
    att = torch.cat([torch.ones(2, 2, 4, dtype=torch.bool), torch.eye(2, dtype=torch.bool).repeat(2, 1, 1)], 2)
    att[1, :, 3] = False
    outs = [a.forward(a._c, tree, tpos, att) for a in (ort_a, ref_a)]
    assert (outs[0] - outs[1]).abs().max() < 1e-4
    for (k1, v1), (k2, v2) in zip(ort_a.slot_tensors(ort_a._c), ref_a.slot_tensors(ref_a._c)):
        assert (k1 - k2[:, :, : k1.shape[2]]).abs().max() < 1e-4 and (v1 - v2[:, :, : v1.shape[2]]).abs().max() < 1e-4


@pytest.mark.parametrize("backend", ["onnxruntime", "onnxruntime-int4", "onnxruntime-int8"])
@pytest.mark.parametrize("strategy", LOSSLESS)
def test_every_lossless_strategy_equals_ort_greedy(ort_greedy, tiny, strategy, backend) -> None:
    """On a quantized graph, lossless means: the tokens of that graph's own greedy decoding."""
    ort_a = get_backend(backend).prepare(resolve_model(tiny)[0])
    want = [ort_greedy(ort_a, p, 20) for p in PROMPTS]
    for batch in (PROMPTS[:1], PROMPTS):
        out = decograph.generate(tiny, None, batch, strategy, 20, eos_token_id=[], backend=backend)
        assert [r.new_token_ids for r in out] == want[: len(batch)]
    eos = want[0][6]                                        # a token met mid-output ends it there
    [r] = decograph.generate(tiny, None, PROMPTS[:1], strategy, 20, eos_token_id=eos, backend=backend)
    assert r.new_token_ids == want[0][: want[0].index(eos) + 1]
    for n in (0, 1, 7):
        [r] = decograph.generate(tiny, None, PROMPTS[:1], strategy, n, eos_token_id=[], backend=backend)
        assert r.new_token_ids == want[0][:n]


def test_quantized_graphs_use_matmulnbits(tiny) -> None:
    for bits in (4, 8):
        a = get_backend(f"onnxruntime-int{bits}").prepare(resolve_model(tiny)[0])
        assert a.path.name == f"model.{quant_tag(bits)}.onnx"   # the exported decoder's settings name the file
        proto = onnx.load(str(a.path))
        nbits = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
        assert len(nbits) == 2 * 4 + 1                  # q/k/v, o, gate/up, down per layer; the head
        attrs = [{x.name: x.i for x in n.attribute} for n in nbits]
        assert {(a["bits"], a.get("accuracy_level", 0)) for a in attrs} == {(bits, QUANT["accuracy_level"])}


@pytest.mark.parametrize("bits", [4, 8])
def test_a_tied_embedding_is_read_from_the_quantized_head(bits, tmp_path) -> None:
    """Tied embeddings (SmolLM2, Gemma 3): the quantized graph looks token rows up in the LM
    head's own blocks (GatherBlockQuantized), exactly their dequantized values, and keeps no
    float table; an untied table stays float (the ``tiny`` model above)."""
    import numpy as np
    from onnx import numpy_helper

    import onnxruntime as ort

    model = tiny_llama(vocab_size=64, hidden=64)
    with torch.no_grad():
        model.lm_head.weight.copy_(model.model.embed_tokens.weight)
    src = export_step(model, tmp_path / "m.onnx")
    dst = quantize_step(src, tmp_path / "q.onnx", bits=bits)
    proto = onnx.load(str(dst))
    [gbq] = [n for n in proto.graph.node if n.op_type == "GatherBlockQuantized"]
    assert not [n for n in proto.graph.node if n.op_type == "Gather" and n.input[0] == "embed.weight"]
    assert "embed.weight" not in {i.name for i in proto.graph.initializer}
    [head] = [n for n in proto.graph.node if n.op_type == "MatMulNBits" and n.output[0].startswith("logits")
              or n.op_type == "MatMulNBits" and "lm_head" in n.input[1]]
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    blocks, scales = inits[head.input[1]], inits[head.input[2]].reshape(64, -1)
    if bits == 4:
        q = np.stack([blocks & 15, blocks >> 4], -1).reshape(64, -1).astype(np.float32) - 8
    else:
        q = blocks.reshape(64, -1).astype(np.float32) - 128
    want = (q.reshape(64, scales.shape[1], -1) * scales[:, :, None]).reshape(64, -1)
    proto.graph.output.append(onnx.helper.make_tensor_value_info(gbq.output[0], onnx.TensorProto.FLOAT, None))
    probe = tmp_path / "probe.onnx"
    onnx.save(proto, str(probe))
    sess = ort.InferenceSession(str(probe))
    ids = np.array([[3, 17, 63, 0]], np.int64)
    feeds = {"input_ids": ids, "position_ids": np.arange(4)[None], "logits_keep": np.array([1]),
             "attention_mask": np.zeros((1, 1, 4, 4), np.float32), "cache_lengths": np.zeros(1, np.int64)}
    feeds |= {n: np.zeros((1, 2, 0, 16), np.float32) for n in io_names(2)[0] if n.startswith("past_key_values")}
    rows = sess.run([gbq.output[0]], feeds)[0]
    assert np.array_equal(rows.reshape(4, -1), want[ids[0]])
    # and the graph decodes: a lossless strategy gives its own greedy's tokens
    prompts = [[1, 5, 9, 5, 9, 5, 9, 5], [3, 4, 3, 4, 3]]
    greedy = decograph.generate(model, None, prompts, "greedy", 12, eos_token_id=[], backend=f"onnxruntime-int{bits}")
    anpd = decograph.generate(model, None, prompts, "anpd", 12, eos_token_id=[], backend=f"onnxruntime-int{bits}")
    assert [r.new_token_ids for r in anpd] == [r.new_token_ids for r in greedy]


@pytest.mark.parametrize("exact", [True, False])
def test_rotary_inside_attention_matches_torch(exact, tmp_path) -> None:
    """Head sizes divisible by 16 (the real models') take GQA's own rotary: explicit positions
    still hold for padded batches, left-padded prefills and tree steps."""
    model = tiny_llama(hidden=64, heads=4, kv_heads=2)                  # head size 16
    path = export_step(model, tmp_path / "m.onnx", exact=exact)
    assert "RotaryEmbedding" not in {n.op_type for n in onnx.load(str(path)).graph.node}
    a, ref = ORTCausalLM(path), resolve_model(model)[0]
    ca, cr = a.new_cache(2), ref.new_cache(2)
    ids, pos = torch.tensor([[1, 5, 9, 5], [0, 0, 3, 4]]), torch.tensor([[0, 1, 2, 3], [0, 0, 0, 1]])
    att = torch.ones(4, 4, dtype=torch.bool).tril().repeat(2, 1, 1)
    att[1, :, :2] = False
    att[1, 0, 0] = att[1, 1, 1] = True
    assert (a.forward(ca, ids, pos, att) - ref.forward(cr, ids, pos, att))[:, 2:].abs().max() < 1e-4
    tree, tpos = torch.tensor([[9, 7], [3, 2]]), torch.tensor([[4, 4], [2, 2]])
    att = torch.cat([att[:, -1:].repeat(1, 2, 1), torch.eye(2, dtype=torch.bool).repeat(2, 1, 1)], 2)
    assert (a.forward(ca, tree, tpos, att) - ref.forward(cr, tree, tpos, att)).abs().max() < 1e-4
    one = torch.ones(2, 1, 7, dtype=torch.bool)
    one[1, :, :2] = False
    one[:, :, 4:6] = False
    assert (a.forward(ca, torch.tensor([[3], [8]]), torch.tensor([[5], [3]]), one)
            - ref.forward(cr, torch.tensor([[3], [8]]), torch.tensor([[5], [3]]), one)).abs().max() < 1e-4


def test_graph_uses_fused_ops(exported) -> None:
    ops = [n.op_type for n in onnx.load(str(exported)).graph.node]
    for op, count in (("GroupQueryAttention", 2), ("RotaryEmbedding", 4), ("SkipSimplifiedLayerNormalization", 4)):
        assert ops.count(op) == count, op
    assert len(ops) < 40 * 2


def _steps(adapter, prompt, toks, widths):
    """Logits and KV of ``toks`` fed after ``prompt`` in steps of the given widths (a one-token
    step with a filler query row after it, as the engine runs it: ``engine.MIN_ROWS``)."""
    cache = adapter.new_cache(1)
    n = len(prompt)
    adapter.forward(cache, torch.tensor([prompt]), torch.arange(n)[None], torch.ones(n, n, dtype=torch.bool).tril()[None])
    out, i = [], 0
    for w in widths:
        past = adapter.cache_len(cache)
        q = max(w, 2)
        attend = torch.cat([torch.ones(q, past, dtype=torch.bool), torch.ones(q, q, dtype=torch.bool).tril()], 1)[None]
        feed = toks[i:i + w] + toks[i + w - 1:i + w] * (q - w)
        out.append(adapter.forward(cache, torch.tensor([feed]), torch.arange(past, past + q)[None], attend)[0, :w])
        adapter.truncate(cache, past + w)
        i += w
    return torch.cat(out), [torch.cat(kv, 0) for kv in adapter.slot_tensors(cache)]


@pytest.mark.parametrize("bits", [0, 4, 8])
def test_an_exact_graphs_k_token_step_is_bit_identical_to_k_one_token_steps(tiny, exported, bits, tmp_path) -> None:
    """What makes verification lossless on the exported decoder's graphs: a row's logits and KV
    do not depend on how many query tokens its step has (with int8 activations, the smallest
    difference would become a different token now and then). The float and int8 graphs are
    exact on every CPU; the int4 graph's MatMulNBits kernels are on some (seen: with AVX-512,
    and on an AMD EPYC without it once no step multiplies a lone row). Where they are not, the
    differences are rounding's, and ``width_invariant`` (the exported decoder's check, which
    then decodes without drafts) must see what this test sees."""
    path = quantize_step(exported, tmp_path / "q.onnx", bits) if bits else exported
    a = ORTCausalLM(path)
    prompt, toks = [1, 5, 9, 5, 9, 5, 9, 5, 3, 4], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18]
    one_logits, one_kv = _steps(a, prompt, toks, [1] * 12)
    identical = True
    for widths in ([2] * 6, [4, 8], [12], [3, 1, 5, 3]):
        logits, kv = _steps(a, prompt, toks, widths)
        same = torch.equal(logits, one_logits) and all(torch.equal(x, y) for x, y in zip(kv, one_kv))
        if bits != 4:
            assert same, widths
        identical &= same
        assert (logits - one_logits).abs().max() < 1e-3 * one_logits.abs().max(), widths
    if not identical:
        assert not width_invariant(StepSession(path), 12), "the exactness check missed what this test saw"


def test_export_cache_is_keyed_by_the_graph_version(tiny, monkeypatch) -> None:
    from decograph.backends.onnxruntime import graph

    before = export_dir(tiny)
    monkeypatch.setattr(graph, "GRAPH_VERSION", graph.GRAPH_VERSION + "-next")
    assert export_dir(tiny) != before


def test_a_mask_seeing_a_later_slot_is_refused(exported) -> None:
    a = ORTCausalLM(exported)
    cache = a.new_cache(1)
    with pytest.raises(UnsupportedError, match="causally"):
        a.forward(cache, torch.tensor([[1, 2]]), torch.tensor([[0, 1]]), torch.ones(1, 2, 2, dtype=torch.bool))


def test_errors(tmp_path, exported) -> None:
    with pytest.raises(ModelError, match="no such ONNX model"):
        ORTCausalLM(tmp_path / "none.onnx")
    bad = tmp_path / "bad.onnx"
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.save(proto, bad)
    with pytest.raises(ModelError, match="not a decograph step graph"):
        ORTCausalLM(bad)
    proto.ir_version = 99
    onnx.save(proto, bad)
    with pytest.raises(ModelError, match="ONNX Runtime cannot load it"):
        ORTCausalLM(bad)
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(ModelError, match="Llama-architecture"):
        export_step(gpt2, tmp_path / "g.onnx")
    from transformers import BertConfig, BertForMaskedLM

    from decograph.models.diffusion import HFMaskedDiffusion

    bert = HFMaskedDiffusion(BertForMaskedLM(BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1,
                                                        num_attention_heads=2, intermediate_size=32)), mask_token_id=3)
    with pytest.raises(UnsupportedError, match="exports Hugging Face causal LMs and decograph's own diffusion "
                                               "models .train-mdm, adapt-diffusion.; got HFMaskedDiffusion"):
        decograph.generate(bert, None, [[5, 6]], "fast_dllm", 4, backend="onnxruntime",
                           overrides={"kv": "recompute"})


@pytest.mark.real_model
def test_default_model_on_ort(ort_greedy, default_model, monkeypatch) -> None:
    monkeypatch.delenv("XDG_CACHE_HOME")                    # the export is cached across runs
    model, tok = default_model
    data = Path(__file__).resolve().parents[2] / "benchmarks" / "data" / "spec_bench_questions.jsonl"
    qs = [json.loads(line)["turns"][0] for line in data.read_text().splitlines()[::40][:4]]
    prompts = [list(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                            tokenize=True)["input_ids"])[-200:] for q in qs]
    for backend in ("onnxruntime-int4", "onnxruntime"):       # int4: lossless against its own greedy
        adapter = get_backend(backend).prepare(resolve_model(model)[0])
        eos = adapter.eos_token_ids
        want = [ort_greedy(adapter, p, 24, eos) for p in prompts]
        for strategy in ("anpd", "ngram", "lookahead"):
            out = decograph.generate(model, tok, prompts, strategy, 24, backend=backend)
            assert [r.new_token_ids for r in out] == want, (backend, strategy)
    assert export_dir(model).joinpath("model.onnx").is_file()
    ref = decograph.generate(model, tok, prompts, "greedy", 24)          # the torch reference
    for p, r, w in zip(prompts, ref, want):
        if r.new_token_ids != w:                                         # report, do not hide
            i = next(j for j, (a, b) in enumerate(zip(r.new_token_ids, w)) if a != b)
            with torch.inference_mode():
                logits = model(torch.tensor([p + w[:i]])).logits[0, -1].float()
            top = logits.topk(2).values
            margin = float(top[0] - top[1])
            assert margin < 1e-3, f"ORT and torch part at step {i} with a logit margin of {margin:.2e}"


def test_ort_adapters_get_their_own_cost_curve(exported, monkeypatch, tmp_path) -> None:
    from decograph.api import _cost_curve
    from decograph.backends.torch_ref import cost

    small = ORTCausalLM(exported)
    assert _cost_curve(small) is cost.DEFAULT_CURVE                   # tiny graphs: deterministic default
    big = ORTCausalLM(exported)
    big.weight_bytes = 100_000_000
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(cost, "measure_cost_curve", lambda a: cost.CostCurve({1: 1.0, 2: 2.5, 4: 3.0}))
    curve = _cost_curve(big)
    assert curve(2) == 2.5
    table = json.loads((tmp_path / "decograph" / "cost_curves.json").read_text())
    assert any('"onnxruntime"' in k and exported.parent.name in k for k in table)


@pytest.mark.parametrize("rows", [[0, 3, 2], [1, 2, 3], [0, 1], [2, 0, 1], [3, 1]])
def test_a_cache_keeps_the_selected_rows(exported, rows) -> None:
    """``KV.select`` keeps the chosen rows in the given order: moved one by one in place where
    every row's source lies at or after its place (a finished row's place taken by a later
    row, as ``OrtBatch.settle`` asks), gathered otherwise; the spare rows' allocation stays."""
    import numpy as np

    step = StepSession(exported)
    kv = step.new_kv(4, 16)
    for b in kv.host():
        b[...] = np.arange(4, dtype=b.dtype)[:, None, None, None] + np.arange(16, dtype=b.dtype)[None, None, :, None] / 100
    before = [b.copy() for b in kv.host()]
    kv.length = 12
    kv.select(np.array(rows), 10)
    assert kv.batch == len(rows) and kv.length == 10 and kv.rows_capacity == 4
    for b, old in zip(kv.host(), before):
        assert np.array_equal(b[:, :, :10], old[rows][:, :, :10])


def test_a_large_cache_buffer_is_zero_pages_that_rows_write() -> None:
    """``cache_zeros``: a large buffer is an anonymous map (zeros, writable, C-contiguous, not
    drawn from the heap), a small one plain ``np.zeros``."""
    import mmap

    import numpy as np

    from decograph.backends.onnxruntime.kv import cache_zeros

    big = cache_zeros((4, 3, 2048, 64), np.float32)
    owner = big
    while isinstance(owner, np.ndarray):
        owner = owner.base
    assert isinstance(getattr(owner, "obj", owner), mmap.mmap)
    assert big.shape == (4, 3, 2048, 64) and big.flags.c_contiguous and big.flags.writeable
    assert not big.any()
    big[1, 2, 5] = 7.0
    assert big.sum() == 7.0 * 64
    small = cache_zeros((1, 2, 8, 4), np.float16)
    assert small.dtype == np.float16 and not small.any() and small.base is None


def test_admissions_land_in_the_gathered_caches_room(exported) -> None:
    """A gathered batch's cache holds the engine's ``max_rows`` rows and ``_GATHER_SLOTS`` slots,
    so rows admitted later are copied into it (no new allocation of the whole cache), and every
    row still gets its tokens alone."""
    import numpy as np

    from decograph.backends.onnxruntime.engine import _GATHER_SLOTS
    from decograph.backends.onnxruntime.solo import OrtEngine
    from decograph.runtime.rows import Row

    engine = OrtEngine(StepSession(exported), max_rows=8)
    batch = engine.start([Row(0, list(PROMPTS[0]), len(PROMPTS[0]), 6), Row(1, list(PROMPTS[1]), len(PROMPTS[1]), 6)])
    batch.prefill()
    first = batch.kv._full[0]
    assert batch.kv.batch == 2 and batch.kv.rows_capacity == 8 and batch.kv.capacity >= _GATHER_SLOTS
    batch.admit([Row(2, list(PROMPTS[2]), len(PROMPTS[2]), 6)])
    assert batch.kv._full[0] is first and batch.kv.batch == 3
    want = [decograph.generate(ORTCausalLM(exported), None, [p], "greedy", 1, eos_token_id=[])[0].new_token_ids[0]
            for p in PROMPTS]
    assert [int(np.argmax(r)) for r in batch.roots] == want


def test_a_step_graph_reports_the_query_tokens_a_step_computes(exported) -> None:
    """``StepSession.min_query``: an exact graph gives a one-token step a padding query row (its
    K/V land in the slot after the step's), so every step computes two query tokens; an engine
    without batch filler rows charges drafts by it."""
    from decograph.backends.onnxruntime.solo import OrtEngine

    step = StepSession(exported)
    assert step.min_query == 2
    assert OrtEngine(step, batch_filler=False).min_query == 2
