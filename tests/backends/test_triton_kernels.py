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


@pytest.mark.parametrize("seed", range(8))
def test_tree_attention_matches(seed: int) -> None:
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    h, t, s, d = rng.choice([1, 2, 4]), rng.randrange(1, 40), rng.choice([0, 1, 13, 70]), rng.choice([8, 24, 64])
    q, k, v = torch.randn(h, t, d, generator=g), torch.randn(h, s + t, d, generator=g), torch.randn(h, s + t, d, generator=g)
    prefix_valid = torch.rand(s, generator=g) > 0.3
    parents = random_tree(rng, t, roots=rng.choice([1, 3]))       # several roots: packed segments
    out = T.tree_attention(q, k, v, prefix_valid, parents, d ** -0.5)
    ref = R.tree_attention(q, k, v, prefix_valid, parents, d ** -0.5)
    assert (out - ref).abs().max() < 2e-5


def test_tree_attention_is_causal_attention_on_a_chain() -> None:
    g = torch.Generator().manual_seed(0)
    h, t, s, d = 2, 9, 5, 16
    q, k, v = torch.randn(h, t, d, generator=g), torch.randn(h, s + t, d, generator=g), torch.randn(h, s + t, d, generator=g)
    chain = torch.arange(-1, t - 1)
    out = T.tree_attention(q, k, v, torch.ones(s, dtype=torch.bool), chain, d ** -0.5)
    causal = torch.ones(t, s + t, dtype=torch.bool).tril(s)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=causal)
    assert (out - ref).abs().max() < 2e-5


def test_ancestor_table_rejects_bad_parents() -> None:
    with pytest.raises(ValueError, match="precede"):
        R.ancestors(torch.tensor([-1, 2, 0]))
