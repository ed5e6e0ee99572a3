"""Each Triton kernel against the torch reference kernel, under TRITON_INTERPRET=1 (fp32):
argmax and accepted flags exactly, confidences to rtol 1e-5, attention to atol 2e-5."""
from __future__ import annotations

import random

import pytest
import torch

from decograph.backends.torch_ref import kernels as R
from decograph.backends.triton import kernels as T


def random_tree(rng: random.Random, n: int, roots: int = 1) -> torch.Tensor:
    parents = [-1] * min(roots, n)
    for i in range(len(parents), n):
        parents.append(rng.randrange(-1 if rng.random() < 0.1 else 0, i))
    return torch.tensor(parents)


@pytest.mark.parametrize("seed", range(6))
def test_verify_greedy_matches(seed: int) -> None:
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    n, v = rng.randrange(1, 14), rng.choice([7, 100, 1000, 3001])
    logits = torch.randn(n, v, generator=g)
    parents = random_tree(rng, n)
    parents[0] = -1
    argmax = logits.argmax(-1)
    tokens = torch.tensor([int(argmax[max(p, 0)]) if rng.random() < 0.7 else rng.randrange(v) for p in parents.tolist()])
    a1, ok1 = T.verify_greedy(logits, tokens, parents)
    a2, ok2 = R.verify_greedy(logits, tokens, parents)
    assert torch.equal(a1, a2) and torch.equal(ok1, ok2)
    assert bool(ok1[0])


def test_verify_greedy_ties_take_the_first_maximum() -> None:
    logits = torch.zeros(3, 2000)
    logits[0, [5, 1500]] = 3.0
    logits[1, [1999, 1024, 1025]] = 2.0
    a, _ = T.verify_greedy(logits, torch.tensor([0, 5, 1]), torch.tensor([-1, 0, 0]))
    assert a.tolist() == [5, 1024, 0] == logits.argmax(-1).tolist()


@pytest.mark.parametrize("seed", range(5))
def test_unmask_confidence_matches(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    m, v = [1, 5, 17, 3, 32][seed], [10, 257, 4096, 999, 64][seed]
    logits = torch.randn(m, v, generator=g) * (1 + seed)
    mask_id = seed % v
    logits[:, mask_id] = 50.0                       # the mask token must never win
    c1, t1 = T.unmask_confidence(logits, mask_id)
    c2, t2 = R.unmask_confidence(logits, mask_id)
    assert torch.equal(t1, t2) and (t1 != mask_id).all()
    assert torch.allclose(c1, c2, rtol=1e-5, atol=0)
    c0, t0 = T.unmask_confidence(torch.empty(0, 8), 1)
    assert c0.shape == t0.shape == (0,)


@pytest.mark.parametrize("seed", range(5))
def test_kv_compact_matches(seed: int) -> None:
    rng = random.Random(seed)
    r, s, w = 3, rng.randrange(2, 40), rng.choice([1, 8, 300, 2048])
    cache = torch.randn(r, s, w, generator=torch.Generator().manual_seed(seed))
    keep = torch.tensor(sorted(rng.sample(range(s), rng.randrange(1, s + 1))))
    row = rng.randrange(r)
    ref = cache.clone()
    T.kv_compact(cache, row, keep)
    R.kv_compact(ref, row, keep)
    assert torch.equal(cache, ref)


def random_mask(rng: random.Random, g: torch.Generator, b: int, t: int, s: int) -> R.StructuredMask:
    parents = torch.stack([random_tree(rng, t, roots=rng.choice([1, 3])) for _ in range(b)])  # roots: segments
    seg = torch.zeros(b, t, dtype=torch.long)
    for i in range(b):
        for j, p in enumerate(parents[i].tolist()):
            seg[i, j] = (seg[i, p] if p >= 0 else int(seg[i, :j].max()) + 1 if j else 0)
    groups = int(seg.max()) + 1
    return R.StructuredMask(parents, seg, torch.rand(b, groups, s, generator=g) > 0.3)


@pytest.mark.parametrize("seed", range(8))
def test_tree_attention_matches(seed: int) -> None:
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    b, hkv, t, s, d = rng.choice([1, 2]), rng.choice([1, 2]), rng.randrange(1, 40), rng.choice([0, 1, 13, 70]), rng.choice([8, 24, 64])
    h = hkv * rng.choice([1, 3])                                   # grouped-query attention
    q = torch.randn(b, h, t, d, generator=g)
    k, v = torch.randn(b, hkv, s + t, d, generator=g), torch.randn(b, hkv, s + t, d, generator=g)
    mask = random_mask(rng, g, b, t, s)
    dense = mask.dense()
    assert dense.shape == (b, t, s + t) and dense[:, :, s:].diagonal(dim1=1, dim2=2).all()
    out = T.tree_attention(q, k, v, mask, d ** -0.5)
    ref = R.tree_attention(q, k, v, mask, d ** -0.5)
    assert (out - ref).abs().max() < 2e-5


def test_tree_attention_is_causal_attention_on_a_chain() -> None:
    g = torch.Generator().manual_seed(0)
    b, h, t, s, d = 1, 2, 9, 5, 16
    q, k, v = torch.randn(b, h, t, d, generator=g), torch.randn(b, h, s + t, d, generator=g), torch.randn(b, h, s + t, d, generator=g)
    mask = R.StructuredMask(torch.arange(-1, t - 1)[None], torch.zeros(1, t, dtype=torch.long), torch.ones(1, 1, s, dtype=torch.bool))
    out = T.tree_attention(q, k, v, mask, d ** -0.5)
    causal = torch.ones(t, s + t, dtype=torch.bool).tril(s)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=causal)
    assert (out - ref).abs().max() < 2e-5


def test_ancestor_table_rejects_bad_parents() -> None:
    with pytest.raises(ValueError, match="precede"):
        R.ancestors(torch.tensor([-1, 2, 0]))
