"""Property tests of the tree mask that ``mask-fusion`` relies on.

Random draft trees (random chains merged by ``DraftTree(dedup=True)``) after a row with a
cached prefix: the materialized attend mask lets a node see exactly the valid cached slots,
the pending tokens, its ancestors and itself, at position root + depth; and on a tiny Llama one
tree-masked forward gives every node the logits of a plain causal forward over the prompt
plus the node's path, with rejected (invalid) slots left in the cache as holes.
"""
from __future__ import annotations

import functools

import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from decograph.backends.torch_ref.batch import BatchState, DraftTree, Row, StepLayout
from decograph.models.adapters import HFCausalLM
from decograph.models.tiny import tiny_llama

torch.set_num_threads(1)

VOCAB = 64
PAD = 0
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# chains over a 3-token alphabet, so that chains often share prefixes and the trie merges them
chains_st = st.lists(st.lists(st.integers(1, 3), min_size=1, max_size=5), min_size=1, max_size=4)


@st.composite
def cases(draw):
    prompt = draw(st.lists(st.integers(1, VOCAB - 1), min_size=1, max_size=9))
    cached = draw(st.integers(0, len(prompt) - 1))          # the root (last token) is always pending
    chains = draw(chains_st)
    pad = draw(st.integers(0, 2))                           # extra padded query columns
    return prompt, cached, chains, pad


def build(chains: list[list[int]]) -> tuple[DraftTree, list[list[int]]]:
    tree = DraftTree(dedup=True)
    return tree, [tree.add_chain(c) for c in chains]


def paths(chains: list[list[int]], ids: list[list[int]]) -> dict[int, list[int]]:
    """node id -> its token path from the root (independent of the tree's parent pointers)."""
    out: dict[int, list[int]] = {}
    for chain, nodes in zip(chains, ids):
        for m, node in enumerate(nodes):
            assert out.setdefault(node, chain[: m + 1]) == chain[: m + 1]
    return out


def ancestors(ids: list[list[int]]) -> dict[int, set[int]]:
    out: dict[int, set[int]] = {}
    for nodes in ids:
        for m, node in enumerate(nodes):
            out.setdefault(node, set(nodes[:m]))
    return out


@SETTINGS
@given(cases(), st.data())
def test_tree_mask_and_positions(case, data) -> None:
    prompt, cached, chains, pad = case
    tree, ids = build(chains)
    path = paths(chains, ids)
    anc = ancestors(ids)
    # the trie: one node per distinct non-empty chain prefix
    assert len(tree) == len({tuple(c[: m + 1]) for c in chains for m in range(len(c))}) == len(path)

    holes = data.draw(st.integers(0, 3))
    slots = cached + holes
    valid_list = data.draw(st.permutations([True] * cached + [False] * holes))
    valid = torch.tensor([valid_list], dtype=torch.bool).reshape(1, slots)
    row = Row(0, list(prompt), len(prompt), 32, cached=cached)
    r, n = len(prompt) - cached, len(tree)
    width = r + n + pad
    ids_t, pos, attend = StepLayout([row], [tree], width).inputs(valid, PAD)

    assert ids_t.shape == pos.shape == (1, width) and attend.shape == (1, width, slots + width)
    assert ids_t[0].tolist() == prompt[cached:] + tree.tokens + [PAD] * pad
    root = len(prompt) - 1
    want_pos = list(range(cached, len(prompt))) + [root + len(path[i]) for i in range(n)]
    assert pos[0, : r + n].tolist() == want_pos
    for q in range(width):
        old, new = attend[0, q, :slots].tolist(), attend[0, q, slots:].tolist()
        if q < r:                                   # pending token: the cache and earlier pending
            want_old, want_new = valid_list, [j <= q for j in range(width)]
        elif q < r + n:                             # node: the cache, all pending, ancestors, itself
            i = q - r
            want_old = valid_list
            want_new = [j < r or (j < r + n and (j - r == i or j - r in anc[i])) for j in range(width)]
        else:                                       # padding: only itself
            want_old, want_new = [False] * slots, [j == q for j in range(width)]
        assert old == want_old, q
        assert new == want_new, q


@functools.lru_cache(maxsize=None)
def model(seed: int) -> HFCausalLM:
    return HFCausalLM(tiny_llama(vocab_size=VOCAB, hidden=32, layers=2, heads=4, kv_heads=2, seed=seed))


@functools.lru_cache(maxsize=4096)
def causal_last_logits(seed: int, seq: tuple[int, ...]) -> torch.Tensor:
    with torch.no_grad():
        return model(seed).model(torch.tensor([list(seq)])).logits[0, -1].float()


@SETTINGS
@given(cases(), st.integers(0, 1), st.lists(st.integers(1, VOCAB - 1), max_size=3))
def test_tree_forward_matches_causal_forward_per_node(case, seed, garbage) -> None:
    prompt, cached, chains, pad = case
    adapter = model(seed)
    tree, ids = build(chains)
    path = paths(chains, ids)
    row = Row(0, list(prompt[:cached]), len(prompt), 32)
    state = BatchState(adapter, [row])
    if cached:                                      # prefill the cached prefix
        state.run_layout(StepLayout([row], [DraftTree()], cached), PAD)
        state.keep_slots(0, list(range(cached)))
    row.cached, row.tokens = cached, list(prompt)
    if garbage:                                     # a rejected draft: its slots stay, invalid
        junk = DraftTree()
        junk.add_chain(garbage)
        state.run_layout(StepLayout([row], [junk], len(row.pending) + len(junk)), PAD)
    r, n = len(row.pending), len(tree)
    logits = state.run_layout(StepLayout([row], [tree], r + n + pad), PAD)[0]

    torch.testing.assert_close(logits[r - 1], causal_last_logits(seed, tuple(prompt)), atol=1e-5, rtol=0)
    for i in range(n):
        want = causal_last_logits(seed, tuple(prompt + path[i]))
        torch.testing.assert_close(logits[r + i], want, atol=1e-5, rtol=0, msg=lambda m: f"node {i}: {m}")
