"""The Gemma 3 fast path (``models/fast_gemma3.py``): bit-identical logits and cache to
transformers' own forward under the same masks, over a prefill, draft trees with rolled-back
slots, rows of a batch at different positions, and one-token steps across the sliding window."""
from __future__ import annotations

import pytest
import torch

from decograph.models.adapters import HFCausalLM
from decograph.models.fast_gemma3 import Gemma3FastPath, supports_gemma3_fast_path
from decograph.models.sliding import model_mask


def tiny_gemma3(kv_heads: int, softcap: float | None = None) -> torch.nn.Module:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=kv_heads, head_dim=16, query_pre_attn_scalar=24, sliding_window=6,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 8.0}},
        max_position_embeddings=256, final_logit_softcapping=softcap, initializer_range=0.2,
        bos_token_id=None, eos_token_id=None, pad_token_id=0, attn_implementation="sdpa")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = Gemma3ForCausalLM(cfg).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.normal_(0.0, 0.3)
    return model


def _step(adapter, fast, caches, ids, pos, attend):
    """One step on both caches: transformers' forward (the adapter's) and the fast path's."""
    ref = adapter.forward(caches[0], ids, pos, attend)
    slot_pos = pos if caches[1].positions is None else torch.cat([caches[1].positions, pos], 1)
    with torch.no_grad():
        got = fast.forward(caches[1], ids, pos, model_mask(adapter.layout, attend, pos, slot_pos, torch.float32,
                                                           torch.device("cpu")))
    caches[1].positions = slot_pos
    assert torch.equal(got, ref)
    for a, b in zip(caches[0].layers, caches[1].layers):
        assert a.length == b.length and torch.equal(a.keys[:, :, :a.length], b.keys[:, :, :b.length])


@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_fast_path_is_bit_identical_to_transformers(kv_heads, softcap) -> None:
    model = tiny_gemma3(kv_heads, softcap)
    assert supports_gemma3_fast_path(model)
    adapter = HFCausalLM(model, fast=False)
    fast = Gemma3FastPath(model)
    caches = [adapter.new_cache(2), adapter.new_cache(2)]
    g = torch.Generator().manual_seed(0)
    n = 11
    ids = torch.randint(0, 96, (2, n), generator=g)
    attend = torch.ones(n, n, dtype=torch.bool).tril().repeat(2, 1, 1)
    attend[1, :, :3] = False                        # row 1 left-padded by 3 slots
    attend[1, torch.arange(3), torch.arange(3)] = True
    pos = torch.stack([torch.arange(n), (torch.arange(n) - 3).clamp(min=0)])
    _step(adapter, fast, caches, ids, pos, attend)
    # a tree step: two siblings under the last token, then a child of the first
    past = n
    tree = torch.randint(0, 96, (2, 3), generator=g)
    tpos = pos[:, -1:] + torch.tensor([[1, 1, 2]])
    att = torch.cat([attend[:, -1:].repeat(1, 3, 1), torch.tensor([[1, 0, 0], [0, 1, 0], [1, 0, 1]],
                                                                   dtype=torch.bool).repeat(2, 1, 1)], 2)
    _step(adapter, fast, caches, tree, tpos, att)
    past += 3
    # the second sibling rejected: its slot stays as a hole; one-token steps slide past the window
    last = tpos[:, 2:]
    seen = torch.cat([att[:, 2], torch.zeros(2, 0, dtype=torch.bool)], 1)
    for i in range(12):
        tok = torch.randint(0, 96, (2, 1), generator=g)
        p = last + 1 + i
        row = torch.cat([seen, torch.ones(2, 1, dtype=torch.bool)], 1)
        _step(adapter, fast, caches, tok, p, row[:, None])
        seen = row
    # and a 4-token chain step
    chain = torch.randint(0, 96, (2, 4), generator=g)
    p = last + 13 + torch.arange(4)
    att = torch.cat([seen[:, None].repeat(1, 4, 1), torch.ones(4, 4, dtype=torch.bool).tril().repeat(2, 1, 1)], 2)
    _step(adapter, fast, caches, chain, p, att)


def test_other_models_are_not_taken() -> None:
    from decograph.models.tiny import tiny_llama

    assert not supports_gemma3_fast_path(tiny_llama())
    model = tiny_gemma3(2)
    model.config.attn_logit_softcapping = 50.0
    assert not supports_gemma3_fast_path(model)
