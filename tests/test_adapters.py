"""HFCausalLM on a tiny random Llama: every cache and mask path against plain causal forwards."""
from __future__ import annotations

import functools
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from decograph.errors import ModelError
from decograph.models.adapters import HFCausalLM
from decograph.models.tiny import tiny_llama

ATOL = 1e-5
VOCAB = 64


@functools.lru_cache(maxsize=1)
def _adapter() -> HFCausalLM:
    # One shared model: hypothesis re-runs the test body, and the adapter holds no state.
    return HFCausalLM(tiny_llama(vocab_size=VOCAB, seed=1))


def causal(t: int, past: int = 0, rows: int = 1) -> torch.Tensor:
    """attend for T new tokens after ``past`` fully visible slots: [rows, T, past + T]."""
    new = torch.tril(torch.ones(t, t, dtype=torch.bool))
    return torch.cat([torch.ones(t, past, dtype=torch.bool), new], 1).expand(rows, t, past + t).clone()


def run_causal(ad: HFCausalLM, ids: list[int]) -> tuple[torch.Tensor, object]:
    """A fresh cache and one causal forward over ``ids``: (logits [T, V], cache)."""
    cache = ad.new_cache(1)
    t = len(ids)
    logits = ad.forward(cache, torch.tensor([ids]), torch.arange(t)[None], causal(t))
    return logits[0], cache


def test_block_forward_equals_token_by_token() -> None:
    ad = _adapter()
    ids = [5, 17, 3, 42, 8, 11, 60]
    block, block_cache = run_causal(ad, ids)
    cache, steps = ad.new_cache(1), []
    for t, tok in enumerate(ids):
        steps.append(ad.forward(cache, torch.tensor([[tok]]), torch.tensor([[t]]), causal(1, past=t))[0, 0])
    torch.testing.assert_close(torch.stack(steps), block, atol=ATOL, rtol=0)
    assert ad.cache_len(cache) == ad.cache_len(block_cache) == len(ids)
    for (k1, v1), (k2, v2) in zip(ad.slot_tensors(cache), ad.slot_tensors(block_cache)):
        assert k1.shape[2] == len(ids)
        torch.testing.assert_close(k1, k2, atol=ATOL, rtol=0)
        torch.testing.assert_close(v1, v2, atol=ATOL, rtol=0)


def test_forward_is_gradient_free_and_quiet() -> None:
    # The cache is written in place every step: an autograd graph there would grow forever.
    ad = _adapter()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        logits, cache = run_causal(ad, [1, 2, 3])
    assert not logits.requires_grad
    assert all(not k.requires_grad for k, _ in ad.slot_tensors(cache))


def test_left_padded_batch_equals_rows_alone() -> None:
    ad = _adapter()
    rows = [[7, 8, 9], [1, 2, 3, 4, 5]]
    pad = 2
    ids = torch.tensor([[0, 0, *rows[0]], rows[1]])
    pos = torch.tensor([[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]])
    valid = torch.tensor([[False, False, True, True, True], [True] * 5])
    attend = causal(5, rows=2) & valid[:, None, :]
    attend |= torch.eye(5, dtype=torch.bool)  # pad queries see themselves only: no empty softmax rows
    cache = ad.new_cache(2)
    batch = ad.forward(cache, ids, pos, attend)
    alone0, _ = run_causal(ad, rows[0])
    alone1, _ = run_causal(ad, rows[1])
    torch.testing.assert_close(batch[0, pad:], alone0, atol=ATOL, rtol=0)
    torch.testing.assert_close(batch[1], alone1, atol=ATOL, rtol=0)
    # Two decode steps on the padded batch keep matching the rows decoded alone.
    seqs = [list(r) for r in rows]
    for step in range(2):
        nxt = batch[:, -1].argmax(-1)
        for r in range(2):
            seqs[r].append(int(nxt[r]))
        s = ad.cache_len(cache)
        valid = torch.cat([valid, torch.ones(2, 1, dtype=torch.bool)], 1)
        new_pos = torch.tensor([[len(rows[0]) + step], [len(rows[1]) + step]])
        batch = ad.forward(cache, nxt[:, None], new_pos, valid[:, None, : s + 1])
        for r in range(2):
            torch.testing.assert_close(batch[r, 0], run_causal(ad, seqs[r])[0][-1], atol=ATOL, rtol=0)


@st.composite
def trees(draw: st.DrawFn) -> tuple[list[int], list[int], list[int]]:
    """(prefix ids, node ids, parent pointers) with ``parent[i] < i`` (-1: child of the prefix)."""
    prefix = draw(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=5))
    n = draw(st.integers(1, 8))
    parents = [draw(st.integers(-1, i - 1)) for i in range(n)]
    nodes = draw(st.lists(st.integers(0, VOCAB - 1), min_size=n, max_size=n))
    return prefix, nodes, parents


@settings(max_examples=25, deadline=None)
@given(trees())
def test_tree_mask_equals_path_forward(tree: tuple[list[int], list[int], list[int]]) -> None:
    prefix, nodes, parents = tree
    ad = _adapter()
    _, cache = run_causal(ad, prefix)
    p, n = len(prefix), len(nodes)
    attend = torch.zeros(1, n, p + n, dtype=torch.bool)
    attend[0, :, :p] = True
    paths, depth = [], []
    for i in range(n):
        path, j = [], i
        while j >= 0:
            attend[0, i, p + j] = True
            path.append(nodes[j])
            j = parents[j]
        paths.append(path[::-1])
        depth.append(len(path) - 1)
    logits = ad.forward(cache, torch.tensor([nodes]), torch.tensor([[p + d for d in depth]]), attend)
    for i in range(n):
        expected, _ = run_causal(ad, prefix + paths[i])
        torch.testing.assert_close(logits[0, i], expected[-1], atol=ATOL, rtol=0)


def test_truncate_forgets_appended_slots() -> None:
    ad = _adapter()
    prefix, junk, cont = [3, 1, 4, 1], [5, 9, 2], [6, 5]
    _, cache = run_causal(ad, prefix)
    ad.forward(cache, torch.tensor([junk]), torch.arange(4, 7)[None], causal(3, past=4))
    ad.truncate(cache, len(prefix))
    assert ad.cache_len(cache) == len(prefix)
    got = ad.forward(cache, torch.tensor([cont]), torch.arange(4, 6)[None], causal(2, past=4))
    expected, _ = run_causal(ad, prefix + cont)
    torch.testing.assert_close(got[0], expected[len(prefix):], atol=ATOL, rtol=0)


def test_gather_slots_compaction_keeps_logits() -> None:
    ad = _adapter()
    # Two rows; each has rejected draft slots (masked out) between accepted ones.
    ids = torch.tensor([[10, 11, 12, 13, 14, 15], [20, 21, 22, 23, 24, 25]])
    keep = torch.tensor([[True, True, False, False, True, True], [True, False, True, True, False, True]])
    pos = (keep.long().cumsum(1) - 1).clamp(min=0)
    attend = causal(6, rows=2) & keep[:, None, :]
    attend |= torch.eye(6, dtype=torch.bool)
    cache = ad.new_cache(2)
    ad.forward(cache, ids, pos, attend)
    nxt, nxt_pos = torch.tensor([[7], [8]]), torch.tensor([[4], [4]])
    before = ad.forward(cache, nxt, nxt_pos, torch.cat([keep, torch.ones(2, 1, dtype=torch.bool)], 1)[:, None])
    ad.truncate(cache, 6)
    slots = torch.stack([torch.nonzero(k)[:, 0] for k in keep])
    ad.gather_slots(cache, slots)
    assert ad.cache_len(cache) == 4
    after = ad.forward(cache, nxt, nxt_pos, torch.ones(2, 1, 5, dtype=torch.bool))
    torch.testing.assert_close(after, before, atol=ATOL, rtol=0)
    for r in range(2):
        expected, _ = run_causal(ad, ids[r][keep[r]].tolist() + [int(nxt[r])])
        torch.testing.assert_close(after[r, 0], expected[-1], atol=ATOL, rtol=0)


def test_select_rows_keeps_the_right_rows() -> None:
    ad = _adapter()
    prompts = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    cache = ad.new_cache(3)
    ad.forward(cache, prompts, torch.arange(3).expand(3, 3), causal(3, rows=3))
    ad.select_rows(cache, torch.tensor([2, 0]))
    got = ad.forward(cache, torch.tensor([[11], [12]]), torch.tensor([[3], [3]]), causal(1, past=3, rows=2))
    for out_row, (src, tok) in enumerate([(2, 11), (0, 12)]):
        expected, _ = run_causal(ad, prompts[src].tolist() + [tok])
        torch.testing.assert_close(got[out_row, 0], expected[-1], atol=ATOL, rtol=0)


def test_wrong_attend_shape_is_a_model_error() -> None:
    ad = _adapter()
    with pytest.raises(ModelError, match="attend has shape"):
        ad.forward(ad.new_cache(1), torch.tensor([[1, 2]]), torch.arange(2)[None], causal(3))


def _tiny_config(cls_name: str, **kw: object) -> object:
    import transformers

    base = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)
    return getattr(transformers, cls_name)(**base, **kw)


@pytest.mark.parametrize(
    ("config_cls", "model_cls", "kw", "window"),
    [
        ("Qwen2Config", "Qwen2ForCausalLM", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 0}, 8),
        ("MistralConfig", "MistralForCausalLM", {"sliding_window": 16}, 16),
        # sliding layers, but use_sliding_window=False leaves no window size (transformers fails too)
        ("Qwen2Config", "Qwen2ForCausalLM", {"layer_types": ["full_attention", "sliding_attention"], "sliding_window": 8}, None),
    ],
)
def test_sliding_window_models_are_masked_or_refused(config_cls: str, model_cls: str, kw: dict[str, object],
                                                     window: int | None) -> None:
    """Sliding windows are supported (tests/test_model_families.py checks the tokens); a
    config that names sliding layers without a window is refused, never decoded unwindowed."""
    import transformers

    model = getattr(transformers, model_cls)(_tiny_config(config_cls, **kw))
    if window is None:
        with pytest.raises(ModelError, match="no sliding_window size"):
            HFCausalLM(model)
    else:
        assert HFCausalLM(model).layout.window == window


def test_full_attention_qwen2_and_mistral_are_accepted() -> None:
    import transformers

    HFCausalLM(transformers.Qwen2ForCausalLM(_tiny_config("Qwen2Config")))
    HFCausalLM(transformers.MistralForCausalLM(_tiny_config("MistralConfig", sliding_window=None)))
