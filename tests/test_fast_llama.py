"""The Llama fast path computes what transformers' own forward computes (same ops, same order)."""
from __future__ import annotations

import pytest
import torch

from decograph.models.adapters import HFCausalLM
from decograph.models.fast_llama import onednn_packing_available, packing_available
from decograph.models.tiny import tiny_llama


def _attend(past_valid: torch.Tensor, parents: list[int]) -> torch.Tensor:
    t = len(parents)
    new = torch.eye(t, dtype=torch.bool)
    for i, p in enumerate(parents):
        if p >= 0:
            new[i] |= new[p]
    return torch.cat([past_valid[None].expand(t, -1), new], 1)[None]


@pytest.mark.parametrize("seed", range(4))
def test_fast_path_matches_transformers_forward(seed):
    model = tiny_llama(seed=seed)
    fast, slow = HFCausalLM(model), HFCausalLM(model, fast=False)
    assert fast.fast is not None and slow.fast is None
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, 64, (1, 9), generator=g)
    caches = []
    for a in (fast, slow):
        c = a.new_cache(1)
        causal = torch.ones(9, 9, dtype=torch.bool).tril()[None]
        a.forward(c, prompt, torch.arange(9)[None], causal)
        caches.append(c)
    valid = torch.ones(9, dtype=torch.bool)
    valid[3] = False                                   # a rolled-back hole
    parents = [-1, 0, 0, 2, -1, 4]
    depth = [1, 2, 2, 3, 1, 2]
    ids = torch.randint(0, 64, (1, 6), generator=g)
    pos = torch.tensor([[8 + d for d in depth]])
    out = [a.forward(c, ids, pos, _attend(valid, parents)) for a, c in zip((fast, slow), caches)]
    torch.testing.assert_close(out[0], out[1], atol=1e-5, rtol=1e-5)
    for (kf, vf), (ks, vs) in zip(fast.slot_tensors(caches[0]), slow.slot_tensors(caches[1])):
        torch.testing.assert_close(kf, ks, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(vf, vs, atol=1e-5, rtol=1e-5)
    one = [a.forward(c, ids[:, :1], torch.tensor([[15]]), torch.ones(1, 1, c.layers[0].length + 1, dtype=torch.bool))
           for a, c in zip((fast, slow), caches)]
    torch.testing.assert_close(one[0], one[1], atol=1e-5, rtol=1e-5)


def test_non_llama_models_use_the_generic_path():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, use_sliding_window=False)
    assert HFCausalLM(Qwen2ForCausalLM(cfg)).fast is None


@pytest.mark.parametrize("kernels", ["onednn", "mkl"])
def test_both_matmul_kernels_match_transformers(kernels):
    from decograph.models.fast_llama import LlamaFastPath

    model = tiny_llama(seed=1)
    a = HFCausalLM(model)
    a.fast = LlamaFastPath(model, kernels)
    ref = HFCausalLM(model, fast=False)
    prompt = torch.randint(0, 64, (1, 7), generator=torch.Generator().manual_seed(3))
    outs = []
    for ad in (a, ref):
        c = ad.new_cache(1)
        outs.append(ad.forward(c, prompt, torch.arange(7)[None], torch.ones(7, 7, dtype=torch.bool).tril()[None]))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)


def test_the_default_kernel_is_measured_once_per_machine(tmp_path, monkeypatch):
    import decograph.models.fast_llama as fl

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert fl.measure_kernels(reps=2) in fl.KERNELS
    calls = []
    monkeypatch.setattr(fl, "measure_kernels", lambda: calls.append(1) or "mkl")
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        assert fl.default_kernels() == "mkl"
        return
    assert fl.default_kernels() == "mkl" and fl.default_kernels() == "mkl" and calls == [1]   # cached
    assert (tmp_path / "decograph" / "kernels.json").is_file()
    assert fl.LlamaFastPath(tiny_llama()).kernels == "mkl"


def _layer_linears(g: torch.Generator) -> list[tuple[int, list[torch.nn.Linear]]]:
    """(input width, linears sharing it) of a decoder layer's shapes: fused Q/K/V with a bias,
    the down projection, gate/up; random weights."""
    out = []
    for k, outs in ((576, ((40, False), (24, True))), (1536, ((576, False),)), (576, ((3072, False),))):
        lin = [torch.nn.Linear(k, n, bias=b) for n, b in outs]
        for m in lin:
            with torch.no_grad():
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.05)
        out.append((k, lin))
    return out


@pytest.mark.skipif(not packing_available(), reason="this torch build has no MKL packed GEMM (non-x86)")
def test_packed_projections_equal_the_plain_ones_bit_for_bit():
    """MKL's packed GEMM (2 to ``PACKED_MAX`` rows: draft steps) computes the same products as
    ``x @ W.T`` with the same rounding, on a decoder layer's shapes (a 1536-wide input blocks
    differently from 17 rows on, so wider products, prompts among them, stay plain): packing
    changes the speed of a draft step, never its tokens."""
    from decograph.models.fast_llama import PACKED_MAX, _Proj

    g = torch.Generator().manual_seed(0)
    for k, lin in _layer_linears(g):
        plain, packed = _Proj("mkl", *lin), _Proj("mkl", *lin, packed=True)
        assert plain.packed is None and packed.packed is not None
        for shape in [(1, m) for m in range(1, PACKED_MAX + 1)] + [(4, 4), (2, 3), (1, 64), (2, 70), (1, 300)]:
            x = torch.randn(*shape, k, generator=g)
            assert torch.equal(packed(x), plain(x)), (k, shape)


def test_a_packed_fast_path_matches_transformers_and_the_plain_one():
    from decograph.models.fast_llama import LlamaFastPath

    model = tiny_llama(seed=2)
    packed, plain, ref = HFCausalLM(model), HFCausalLM(model), HFCausalLM(model, fast=False)
    packed.fast, plain.fast = LlamaFastPath(model, "mkl", packed=True), LlamaFastPath(model, "mkl", packed=False)
    assert packed.fast.packed == packing_available() and not plain.fast.packed
    prompt = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(4))
    outs = []
    for ad in (packed, plain, ref):
        c = ad.new_cache(2)
        outs.append(ad.forward(c, prompt, torch.arange(7)[None].expand(2, -1), torch.ones(7, 7, dtype=torch.bool).tril()[None].expand(2, -1, -1)))
    assert torch.equal(outs[0], outs[1])
    torch.testing.assert_close(outs[0], outs[2], atol=1e-5, rtol=1e-5)


def test_the_cost_curve_is_keyed_by_the_cpu_and_the_fast_paths_kernels():
    """A curve timed on another CPU, or with other matmul kernels (the packed GEMM makes 8
    tokens ~1.5x one instead of ~2.0x), is not this one: its key differs."""
    from decograph.backends.torch_ref.cost import _key
    from decograph.measure_cache import cpu_name
    from decograph.models.fast_llama import LlamaFastPath

    model = tiny_llama(seed=1)
    a, b = HFCausalLM(model), HFCausalLM(model)
    a.fast, b.fast = LlamaFastPath(model, "mkl", packed=True), LlamaFastPath(model, "mkl", packed=False)
    keys = {_key(a), _key(b), _key(HFCausalLM(model, fast=False))}
    assert len(keys) == 3 or not a.fast.packed
    assert all(cpu_name() in k for k in keys)


@pytest.mark.parametrize("shape", [(1, 1, 576), (1, 8, 576), (3, 37, 64), (2, 5, 960)])
def test_rms_norm_is_transformers_llama_rms_norm_bit_for_bit(shape):
    """The fast path's ``rms_norm`` (torch's fused op for float32) equals transformers'
    ``LlamaRMSNorm`` exactly: a different rounding here would move greedy tokens off Hugging Face's."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from decograph.models.fast_llama import rms_norm

    g = torch.Generator().manual_seed(shape[-1] + shape[1])
    norm = LlamaRMSNorm(shape[-1], eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape[-1], generator=g))
        for scale in (1e-3, 1.0, 40.0):
            x = torch.randn(*shape, generator=g) * scale
            assert torch.equal(rms_norm(x, norm.weight, 1e-5), norm(x))



def test_rotating_q_and_k_together_is_rotate_half_bit_for_bit():
    """The fast path rotates Q and K in one set of ops, ``cat(x2, x1) * cat(-sin1, sin2)``:
    the same values as transformers' ``x * cos + rotate_half(x) * sin``, bit for bit."""
    from transformers.models.llama.modeling_llama import rotate_half

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 12, 7, 64, generator=g) * 3
    ang = torch.rand(2, 1, 7, 32, generator=g) * 100
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)
    signed = torch.cat((-sin[..., :32], sin[..., 32:]), -1)
    fused = x * cos + torch.cat((x[..., 32:], x[..., :32]), -1) * signed
    assert torch.equal(fused, x * cos + rotate_half(x) * sin)


@pytest.mark.skipif(not onednn_packing_available(), reason="this torch build has no oneDNN weight reorder")
def test_onednn_blocked_weights_give_the_plain_products_bit_for_bit():
    """oneDNN's linear from weights reordered once (2+ rows) and from the plain ones (one row)
    computes exactly what the plain call computes, biases, fused projections, batches and
    prompt-length products included: the reorder changes the speed, never a token."""
    from decograph.models.fast_llama import _Proj

    g = torch.Generator().manual_seed(0)
    for k, lin in _layer_linears(g):
        plain, blocked = _Proj("onednn", *lin), _Proj("onednn", *lin, packed=True)
        assert plain.blocked is None and blocked.blocked is not None
        for shape in [(1, m) for m in range(1, 18)] + [(4, 1), (4, 4), (2, 3), (1, 64), (2, 70), (1, 300)]:
            x = torch.randn(*shape, k, generator=g)
            assert torch.equal(blocked(x), plain(x)), (k, shape)


@pytest.mark.skipif(not onednn_packing_available(), reason="this torch build has no oneDNN weight reorder")
def test_a_blocked_onednn_fast_path_equals_the_plain_one_bit_for_bit():
    from decograph.models.fast_llama import LlamaFastPath

    model = tiny_llama(seed=2)
    blocked, plain = HFCausalLM(model), HFCausalLM(model)
    blocked.fast, plain.fast = LlamaFastPath(model, "onednn", packed=True), LlamaFastPath(model, "onednn", packed=False)
    assert blocked.fast.packed and blocked.fast.packed_rows > 0 and not plain.fast.packed
    prompt = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(4))
    draft = torch.randint(0, 64, (2, 3), generator=torch.Generator().manual_seed(5))
    outs = []
    for ad in (blocked, plain):
        c = ad.new_cache(2)
        first = ad.forward(c, prompt, torch.arange(7)[None].expand(2, -1),
                           torch.ones(7, 7, dtype=torch.bool).tril()[None].expand(2, -1, -1))
        attend = torch.ones(2, 3, 10, dtype=torch.bool)
        attend[:, :, 7:] = torch.ones(3, 3, dtype=torch.bool).tril()
        outs.append((first, ad.forward(c, draft, torch.arange(7, 10)[None].expand(2, -1), attend)))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
