"""ONNX Runtime's CUDA EP path, as far as a machine without a GPU can check it: the float16 step
graph (what GroupQueryAttention's CUDA kernel takes) is valid, matches torch within float16's
tolerance and decodes losslessly against its own greedy; a KV cache held in ORT-allocated
buffers (the GPU layout: bound in place, read back only for edits) gives bit-identical steps to
the host-shared cache; the device choice and its errors. Nothing here runs on a GPU."""
from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import decograph
from decograph.api import resolve_model
from decograph.backends import get_backend
from decograph.backends.onnxruntime.export import export_step, quantize_step
from decograph.backends.onnxruntime.kv import BLOCK_BASE, KV, StepSession, causal_mask, pick_device, session_options
from decograph.backends.onnxruntime.session import ORTCausalLM
from decograph.errors import InputError, ModelError
from decograph.export import export_decoder
from decograph.exported import ExportedDecoder
from decograph.models.adapters import HFCausalLM
from decograph.models.tiny import tiny_llama, tiny_model_dir

PROMPTS = [[1, 5, 9, 5, 9, 5, 9, 5], [3, 4, 3, 4, 3], [7, 8, 9, 10, 11, 12, 7, 8]]


pytestmark = pytest.mark.usefixtures("private_cache")


@pytest.fixture(scope="module")
def half(tiny, tmp_path_factory):
    return export_step(tiny, tmp_path_factory.mktemp("onnx16") / "model.fp16.onnx", exact=False, dtype="float16")


def test_float16_graph_is_valid_and_close_to_torch(tiny, half) -> None:
    proto = onnx.load(str(half))
    onnx.checker.check_model(proto)
    onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    types = {i.name: i.type.tensor_type.elem_type for i in [*proto.graph.input, *proto.graph.output]}
    assert types["past_key_values.0.key"] == types["present.1.value"] == onnx.TensorProto.FLOAT16
    assert types["attention_mask"] == types["logits"] == onnx.TensorProto.FLOAT       # the host's interface
    inits = {t.data_type for t in proto.graph.initializer if t.dims and len(t.dims) == 2}
    assert inits == {onnx.TensorProto.FLOAT16}                                        # every weight matrix
    a, ref = ORTCausalLM(half), resolve_model(tiny)[0]
    assert a.step.kv_dtype == np.float16 and a.device == "cpu"
    for m in (a, ref):
        m._c = m.new_cache(2)
    ids, pos = torch.tensor([[1, 5, 9, 5], [3, 4, 3, 0]]), torch.tensor([[0, 1, 2, 3], [0, 1, 2, 0]])
    attend = torch.ones(4, 4, dtype=torch.bool).tril().repeat(2, 1, 1)
    attend[1, 3], attend[1, 3, 3] = False, True
    got, want = (m.forward(m._c, ids, pos, attend) for m in (a, ref))
    # float16 activations: about 3 significant digits; tolerance 1e-2 of the logits' range
    assert got.dtype == torch.float32 and (got - want).abs().max() < 1e-2 * want.abs().max()
    for (k1, v1), (k2, v2) in zip(a.slot_tensors(a._c), ref.slot_tensors(ref._c)):
        assert k1.dtype == torch.float16
        assert (k1.float() - k2).abs().max() < 1e-2 * k2.abs().max() + 1e-3
        assert (v1.float() - v2).abs().max() < 1e-2 * v2.abs().max() + 1e-3


@pytest.mark.parametrize("bits", [0, 4])
@pytest.mark.parametrize("strategy", ["ngram", "lookahead", "jacobi"])
def test_float16_graph_decodes_like_its_own_greedy(ort_greedy, tiny, half, tmp_path, strategy, bits) -> None:
    path = half if not bits else quantize_step(half, tmp_path / "model.fp16.int4.onnx", bits, 0)
    a = ORTCausalLM(path, vocab_size=resolve_model(tiny)[0].vocab_size)
    want = [ort_greedy(a, p, 16) for p in PROMPTS]
    for batch in (PROMPTS[:1], PROMPTS):
        out = decograph.generate(a, None, batch, strategy, 16, eos_token_id=[])
        assert [r.new_token_ids for r in out] == want[: len(batch)]


@pytest.mark.parametrize("growth", [False, True])
def test_a_cache_in_ort_buffers_steps_like_the_host_shared_one(half, tiny, tmp_path, growth) -> None:
    """The CUDA EP's cache layout (OrtValues ORT owns, the graph writing them in place, the host
    reading copies) on the CPU: the same bits as the cache that shares numpy's memory, through
    growth (``reserve``), row selection and slot compaction."""
    fp32 = export_step(tiny, tmp_path / "model.onnx", exact=True)
    for path in (fp32, half):
        step = StepSession(path, 1)
        runs = []
        for shared in (True, False):
            kv = step.new_kv(2, 4 if growth else 64, shared=shared)
            assert kv.shared is shared and (kv.bufs == []) is (not shared)
            rng = np.random.default_rng(0)
            outs = [step.run(kv, rng.integers(0, 64, (2, 6)), np.arange(6)[None].repeat(2, 0),
                             causal_mask(6, 0).repeat(2, 0)).copy()]
            for i in range(5):
                outs.append(step.run(kv, rng.integers(0, 64, (2, 1)), np.full((2, 1), 6 + i),
                                     causal_mask(1, 6 + i).repeat(2, 0)).copy())
            kv.replace([np.ascontiguousarray(b[::-1]) for b in kv.host()], kv.length)       # rows swapped
            kv.replace([b[:, :, [0, 2, 4, 5, 7, 9]] for b in kv.views()], 6)                # slots kept
            outs.append(step.run(kv, np.array([[3], [4]]), np.full((2, 1), 11),
                                 causal_mask(1, 6).repeat(2, 0)).copy())
            runs.append((outs, [v.copy() for v in kv.views()]))
        (o1, kv1), (o2, kv2) = runs
        assert all(np.array_equal(a, b) for a, b in zip(o1, o2))
        assert all(a.dtype == step.kv_dtype and np.array_equal(a, b) for a, b in zip(kv1, kv2))


def test_device_choice_and_errors(half, monkeypatch) -> None:
    have = ort.get_available_providers()
    assert pick_device("auto") == ("cuda" if "CUDAExecutionProvider" in have else "cpu")
    assert pick_device("cpu") == "cpu"
    with pytest.raises(ModelError, match="ONNX Runtime device must be auto, cpu or cuda, got 'tpu'"):
        pick_device("tpu")
    if "CUDAExecutionProvider" in have:
        return
    with pytest.raises(ModelError, match="needs CUDAExecutionProvider.*onnxruntime-gpu"):
        pick_device("cuda")
    with pytest.raises(ModelError, match="needs CUDAExecutionProvider"):
        StepSession(half, device="cuda")
    monkeypatch.setenv("DECOGRAPH_ORT_DEVICE", "cuda")
    with pytest.raises(ModelError, match="needs CUDAExecutionProvider"):
        get_backend("onnxruntime").prepare(resolve_model(tiny_llama())[0])
    # a CUDA EP that is listed but cannot start (no GPU, no CUDA libraries): named, not a silent CPU run
    monkeypatch.setattr(ort, "get_available_providers", lambda: [*have, "CUDAExecutionProvider"])
    assert pick_device("auto") == "cuda"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ModelError, match="could not start CUDAExecutionProvider"):
            StepSession(half, device="cuda")
    with pytest.raises(ModelError, match="cannot share host memory"):
        KV(type("OnCuda", (), {"device": "cuda"})(), 1, 8, shared=True)


def test_session_options_read_their_settings_and_refuse_bad_ones(monkeypatch) -> None:
    for key in ("DECOGRAPH_ORT_THREADS", "DECOGRAPH_ORT_SPINNING", "DECOGRAPH_ORT_BLOCK_BASE"):
        monkeypatch.delenv(key, raising=False)
    opts = session_options(2, False)
    assert opts.intra_op_num_threads == 2
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert opts.get_session_config_entry("session.intra_op.dynamic_block_base") == str(BLOCK_BASE) == "2"
    monkeypatch.setenv("DECOGRAPH_ORT_SPINNING", "off")
    monkeypatch.setenv("DECOGRAPH_ORT_BLOCK_BASE", "4")
    opts = session_options()
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert opts.get_session_config_entry("session.intra_op.dynamic_block_base") == "4"
    monkeypatch.setenv("DECOGRAPH_ORT_BLOCK_BASE", "0")            # ORT's static split: the entry is not set
    with pytest.raises(RuntimeError, match="does not have configuration with key"):
        session_options().get_session_config_entry("session.intra_op.dynamic_block_base")
    for bad in ("two", "-1", "1.5"):
        monkeypatch.setenv("DECOGRAPH_ORT_BLOCK_BASE", bad)
        with pytest.raises(InputError, match=f"DECOGRAPH_ORT_BLOCK_BASE must be a whole number >= 0, got '{bad}'"):
            session_options()


def test_dynamic_blocks_change_no_output(tiny, tmp_path, monkeypatch) -> None:
    """The int4 step with ORT's dynamic block split gives the static split's logits and K/V bit
    for bit: a 6-token prompt, then steps of 1, 3 and 8 query tokens, 2 threads."""
    qpath = quantize_step(export_step(tiny, tmp_path / "model.onnx", exact=True), tmp_path / "model.int4.onnx", bits=4)
    runs = []
    for base in ("0", "1"):
        monkeypatch.setenv("DECOGRAPH_ORT_BLOCK_BASE", base)
        step = StepSession(qpath, 2)
        kv = step.new_kv(1, 64)
        rng = np.random.default_rng(0)
        outs, past = [], 0
        for t in (6, 1, 3, 8):
            outs.append(step.run(kv, rng.integers(0, 64, (1, t)), np.arange(past, past + t)[None],
                                 causal_mask(t, past)).copy())
            past += t
        runs.append((outs, [v.copy() for v in kv.views()]))
    (o1, kv1), (o2, kv2) = runs
    assert all(np.array_equal(a, b) for a, b in zip(o1, o2))
    assert all(np.array_equal(a, b) for a, b in zip(kv1, kv2))


def test_float16_export_runs_on_the_cpu_here(tmp_path) -> None:
    model_dir = tiny_model_dir(tmp_path / "m")
    adapter = HFCausalLM.from_pretrained(str(model_dir))
    out = export_decoder("anpd", tmp_path / "dec", model=adapter, quant="int4", dtype="float16", chat=False,
                         progress=lambda m: None)
    dec = ExportedDecoder(out)
    assert dec.manifest.target.dtype == "float16" and dec.step.kv_dtype == np.float16
    assert dec.device == pick_device("auto")          # auto: the CUDA EP for a float16 export where it is there
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)     # kernels not exact here: decodes without drafts
        for text in ("t1 t5 t9 t5 t9 t5 t9 t5", "t3 t4 t3 t4 t3"):
            prompt = dec.encode(text)
            want, _ = dec.generate(prompt, 24, draft=False)
            got, _ = dec.generate(prompt, 24)
            assert got == want and len(got) == 24
    with pytest.raises(InputError, match="--dtype must be float32 or float16"):
        export_decoder("anpd", tmp_path / "dec2", model=adapter, dtype="bfloat16", progress=lambda m: None)
