"""decograph's masked-diffusion model on ONNX Runtime: the exported forward is a valid graph
that matches the torch model (logits and the queries' K/V within 1e-4, with and without context
KV, key masks and ``logits_at``), and every unmask strategy, with each KV mode, batch 1 and 3,
infilling and EOS, gives the torch backend's tokens; the export is cached; errors are named."""
from __future__ import annotations


import onnx
import pytest
import torch

import decograph
from decograph.backends import get_backend
from decograph.backends.onnxruntime.mdm import ORTMDMAdapter, export_mdm
from decograph.errors import ModelError, UnsupportedError
from decograph.models.diffusion import MDMAdapter
from decograph.models.mdm import tiny_mdm
from decograph.models.tiny import tiny_llama

PROMPTS = [[5, 6, 7, 8, 9], [11, 12], [20, 21, 22]]


pytestmark = pytest.mark.usefixtures("private_cache")


@pytest.fixture(scope="module")
def model2():
    return tiny_mdm(n_layers=2, seed=3)


def test_exported_forward_matches_torch(model2, tmp_path) -> None:
    path = export_mdm(model2, tmp_path / "mdm.onnx")
    onnx.checker.check_model(onnx.load(str(path)))
    c = model2.config
    a = ORTMDMAdapter(path, mask_token_id=c.mask_token_id, eos_token_ids=(c.eos_token_id,), max_positions=c.max_len)
    assert a.supports_kv and a.vocab_size == c.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, c.vocab_size, (2, 30), generator=g)
    pos = torch.arange(30).expand(2, 30).contiguous()
    valid = torch.ones(2, 30, dtype=torch.bool)
    valid[1, 24:] = False
    with torch.no_grad():
        want, want_kv = model2(ids, pos, key_valid=valid, return_kv=True)
    got, got_kv = a.forward(ids, pos, valid, return_kv=True)
    assert (got - want).abs().max() < 1e-4
    for (k1, v1), (k2, v2) in zip(got_kv, want_kv):
        assert (k1 - k2).abs().max() < 1e-4 and (v1 - v2).abs().max() < 1e-4
    # a block's step against cached context: its own positions masked out of the context
    cv = torch.ones(2, 30, dtype=torch.bool)
    cv[:, 8:14] = False
    cv[0, 27:] = False
    at = torch.tensor([[0, 2, 5], [1, 1, 4]])
    with torch.no_grad():
        want, _ = model2(ids[:, 8:14], pos[:, 8:14], context=want_kv, context_valid=cv, logits_at=at)
    got, none = a.forward(ids[:, 8:14], pos[:, 8:14], None, context=got_kv, context_valid=cv, logits_at=at)
    assert none is None and got.shape == (2, 3, c.vocab_size) and (got - want).abs().max() < 1e-4
    with pytest.raises(ModelError, match="past the model's max_len"):
        a.forward(ids[:, :2], torch.tensor([[0, c.max_len]] * 2), None)


@pytest.mark.parametrize("strategy,over", [
    ("llada", {"k": 2}), ("llada_semi_ar", {"block": 4}), ("lud", {"block": 8, "threshold": 0.5}),
    ("fast_dllm", {"block": 8, "threshold": 0.5, "kv": "recompute"}),
    ("fast_dllm", {"block": 8, "threshold": 0.5, "kv": "block_approx"}),
    ("fast_dllm", {"block": 8, "threshold": 0.5, "kv": "block_approx_dual"}),
    ("fast_dllm_factor", {"block": 8, "factor": 2.0}),
])
def test_unmask_strategies_on_ort_give_the_torch_tokens(model2, strategy, over) -> None:
    for prompts in (PROMPTS[:1], PROMPTS):
        runs = [[r.new_token_ids for r in decograph.generate(model2, None, prompts, strategy, 20, passes="none",
                                                             overrides=over, eos_token_id=[], backend=b)]
                for b in ("torch", "onnxruntime")]
        assert runs[0] == runs[1]
    suffixes = [[30, 31, 32], [], [40, 41, 42, 43, 44]]
    eos = runs[0][0][5]                                     # a token met mid-output ends it there
    for kw in ({"suffixes": suffixes, "eos_token_id": []}, {"eos_token_id": eos}):
        runs = [[r.new_token_ids for r in decograph.generate(model2, None, PROMPTS, strategy, 16, passes="none",
                                                             overrides=over, backend=b, **kw)]
                for b in ("torch", "onnxruntime")]
        assert runs[0] == runs[1]


def test_export_is_cached_and_errors_are_named(model2, tmp_path_factory) -> None:
    backend = get_backend("onnxruntime")
    a = backend.prepare(MDMAdapter(model2))
    assert isinstance(a, ORTMDMAdapter) and a.path.parent.name.startswith("mdm-")
    stamp = a.path.stat().st_mtime_ns
    b = get_backend("onnxruntime").prepare(MDMAdapter(model2))
    assert b.path == a.path and b.path.stat().st_mtime_ns == stamp                 # reused, not rewritten
    other = get_backend("onnxruntime").prepare(MDMAdapter(tiny_mdm(n_layers=2, seed=4)))
    assert other.path != a.path                                                     # other weights, other file
    with pytest.raises(UnsupportedError, match="masked-diffusion model runs in fp32 only"):
        get_backend("onnxruntime-int4").prepare(MDMAdapter(model2))
    with pytest.raises(ModelError, match="takes decograph's MDMTransformer, not LlamaForCausalLM"):
        export_mdm(tiny_llama(), tmp_path_factory.mktemp("x") / "m.onnx")
    with pytest.raises(ModelError, match="no such ONNX model file"):
        ORTMDMAdapter(tmp_path_factory.mktemp("y") / "none.onnx", mask_token_id=1, eos_token_ids=(0,), max_positions=8)
