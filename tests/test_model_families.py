"""Model families beyond Llama on tiny random-weight models: sliding windows, hybrid caches.

Every lossless built-in strategy equals Hugging Face ``generate(do_sample=False)`` on Qwen2
(one full, one sliding layer), Gemma 3 (sliding and global layers, its hybrid cache), Phi-3,
Mistral (every layer sliding) and Gemma 2 (soft-capping on top of alternating windows), at
batch 1 and batch 4, with prompts several times longer than the 8-token window, so drafts are
verified, accepted and rolled back across it. The slot cache's positions follow every cache
edit, and a cache rolled back and compacted gives the logits of one rebuilt from scratch.
A recurrent hybrid (LFM2's short-convolution state) is refused with a clear error.
"""
from __future__ import annotations

import functools

import pytest
import torch

from decograph.api import generate
from decograph.errors import ModelError
from decograph.frontends.strategies import list_strategies, load_strategy
from decograph.models.adapters import HFCausalLM
from decograph.models.sliding import attention_layout
from decograph.models.tiny import TINY_FAMILIES, tiny_causal_lm, tiny_llama

# One intra-op thread: tiny models gain nothing from more (see tests/runtime/runtime_helpers.py).
torch.set_num_threads(1)

FAMILIES = ["qwen2", "gemma3", "phi3", "mistral", "gemma2"]
# strategies with draft heads need a head trained for the model (tests/test_draft_heads.py binds test heads)
LOSSLESS = [name for name, _ in list_strategies() if load_strategy(name).lossless and not load_strategy(name).heads]
WINDOW = 8
N_NEW = 24
PROMPTS = [
    [3, 9, 27, 17, 51, 25, 11, 33, 35, 41, 59, 49, 19, 57, 43, 1, 3, 9, 27, 17],
    [9, 8, 7, 6, 5, 9, 8, 7, 6, 5, 9, 8, 7, 6, 5, 9, 8, 7, 6, 5, 9, 8, 7, 6, 5, 9, 8],
    [17, 2, 40],
    [30, 31, 30, 31, 30, 31, 30, 31, 30, 31, 30, 31, 30, 31, 30, 31, 30],
]


@functools.lru_cache(maxsize=None)
def _model(family: str):
    return tiny_causal_lm(family, seed=1)


@functools.lru_cache(maxsize=None)
def _refs(family: str) -> tuple[tuple[int, ...], ...]:
    model = _model(family)
    out = []
    with torch.inference_mode():
        for ids in PROMPTS:
            x = torch.tensor([ids])
            y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=N_NEW, do_sample=False)
            out.append(tuple(y[0, len(ids):].tolist()))
    return tuple(out)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_layouts(family: str) -> None:
    layout = HFCausalLM(_model(family)).layout
    assert layout.window == (None if family == "phi3" else WINDOW)
    assert layout.keyed == (family in ("qwen2", "gemma3", "gemma2"))
    refs = _refs(family)
    assert all(len(r) == N_NEW for r in refs) and len(set(refs)) == len(refs)


@pytest.mark.parametrize("strategy", LOSSLESS)
@pytest.mark.parametrize("family", FAMILIES)
def test_every_lossless_strategy_equals_hf_greedy(family: str, strategy: str) -> None:
    model, refs = _model(family), _refs(family)
    program = load_strategy(strategy).program
    # "none" as well: on tiny models the auto-tuner drops some strategies' drafts (lookahead's)
    for passes in ("default", "none"):
        for ids, ref in zip(PROMPTS[:2], refs):
            [r] = generate(model, None, [ids], strategy=program, max_new_tokens=N_NEW, passes=passes)
            assert tuple(r.new_token_ids) == ref, (family, strategy, passes, "batch 1", ids)
        batch = generate(model, None, PROMPTS, strategy=program, max_new_tokens=N_NEW, passes=passes)
        for ids, ref, r in zip(PROMPTS, refs, batch):
            assert tuple(r.new_token_ids) == ref, (family, strategy, passes, "batch 4", ids)


@pytest.mark.parametrize("family", ["gemma3", "mistral"])
def test_drafts_are_accepted_and_rejected_past_the_window(family: str) -> None:
    """Not a vacuous pass: the speculative strategies do accept some drafts and reject others,
    at positions beyond the window."""
    model = _model(family)
    accepted = rejected = 0
    for strategy in ("ngram", "jacobi", "lookahead"):
        for r in generate(model, None, PROMPTS, strategy=strategy, max_new_tokens=N_NEW, passes="none"):
            accepted += sum(r.stats.accepted_per_step)
            rejected += sum(d - a for a, d in zip(r.stats.accepted_per_step, r.stats.drafted_per_step))
    assert accepted > 0 and rejected > 0


@pytest.mark.parametrize("family", ["gemma3", "mistral", "qwen2"])
def test_the_window_changes_the_logits(family: str) -> None:
    """The adapter applies the window: without it (a huge window) the logits past it differ."""
    ids = torch.tensor([PROMPTS[0]])
    t = ids.shape[1]
    attend = torch.ones(t, t, dtype=torch.bool).tril()[None]
    windowed = HFCausalLM(_model(family))
    wide = HFCausalLM(tiny_causal_lm(family, seed=1, sliding_window=10_000))
    a = windowed.forward(windowed.new_cache(1), ids, torch.arange(t)[None], attend)
    b = wide.forward(wide.new_cache(1), ids, torch.arange(t)[None], attend)
    torch.testing.assert_close(a[0, :WINDOW], b[0, :WINDOW], atol=1e-5, rtol=0)
    assert float((a[0, WINDOW:] - b[0, WINDOW:]).abs().max()) > 1e-3


def _step(ad: HFCausalLM, cache, ids: list[list[int]], pos: list[list[int]], attend: torch.Tensor) -> torch.Tensor:
    return ad.forward(cache, torch.tensor(ids), torch.tensor(pos), attend)


def test_slot_positions_follow_truncate_select_and_gather() -> None:
    ad = HFCausalLM(_model("gemma3"))
    cache = ad.new_cache(2)
    # two rows, the second left-padded by two slots (position 0 repeated, masked)
    _step(ad, cache, [[1, 2, 3, 4], [0, 0, 5, 6]], [[0, 1, 2, 3], [0, 0, 0, 1]], torch.ones(2, 4, 4, dtype=torch.bool))
    assert cache.positions.tolist() == [[0, 1, 2, 3], [0, 0, 0, 1]]
    _step(ad, cache, [[7, 8], [9, 10]], [[4, 5], [2, 3]], torch.ones(2, 2, 6, dtype=torch.bool))
    assert cache.positions.tolist() == [[0, 1, 2, 3, 4, 5], [0, 0, 0, 1, 2, 3]]
    ad.truncate(cache, 5)
    assert cache.positions.tolist() == [[0, 1, 2, 3, 4], [0, 0, 0, 1, 2]] and ad.cache_len(cache) == 5
    ad.gather_slots(cache, torch.tensor([[0, 1, 2, 4], [2, 3, 4, 4]]))
    assert cache.positions.tolist() == [[0, 1, 2, 4], [0, 1, 2, 2]] and ad.cache_len(cache) == 4
    ad.select_rows(cache, torch.tensor([1, 1, 0]))
    assert cache.positions.tolist() == [[0, 1, 2, 2], [0, 1, 2, 2], [0, 1, 2, 4]]
    ad.truncate(cache, 0)
    assert cache.positions.shape == (3, 0) and ad.cache_len(cache) == 0


@pytest.mark.parametrize("family", ["gemma3", "mistral"])
def test_rolled_back_windowed_cache_equals_a_rebuilt_one(family: str) -> None:
    """Reject a draft that crossed the window, compact the cache, decode on: the logits and
    the kept keys equal a cache rebuilt from the committed tokens alone (TESTING.md 5)."""
    ad = HFCausalLM(_model(family))
    prompt, draft, keep = PROMPTS[1][:12], [44, 45, 46, 47, 48], 2     # accept 2 draft tokens of 5
    n = len(prompt)
    cache = ad.new_cache(1)
    ad.forward(cache, torch.tensor([prompt]), torch.arange(n)[None], torch.ones(n, n, dtype=torch.bool).tril()[None])
    d = len(draft)
    attend = torch.cat([torch.ones(d, n, dtype=torch.bool), torch.ones(d, d, dtype=torch.bool).tril()], 1)[None]
    ad.forward(cache, torch.tensor([draft]), torch.arange(n, n + d)[None], attend)
    # Slots of the rejected drafts stay, masked out, for one more step; then compaction drops them.
    nxt = 50
    valid = torch.tensor([True] * (n + keep) + [False] * (d - keep) + [True])
    got = ad.forward(cache, torch.tensor([[nxt]]), torch.tensor([[n + keep]]), valid[None, None])
    ad.gather_slots(cache, torch.tensor([list(range(n + keep)) + [n + d]]))
    full = prompt + draft[:keep] + [nxt]
    ref_cache = ad.new_cache(1)
    m = len(full)
    ref = ad.forward(ref_cache, torch.tensor([full]), torch.arange(m)[None], torch.ones(m, m, dtype=torch.bool).tril()[None])
    torch.testing.assert_close(got[0, 0], ref[0, -1], atol=1e-5, rtol=0)
    assert cache.positions.tolist() == ref_cache.positions.tolist() == [list(range(m))]
    for (k1, v1), (k2, v2) in zip(ad.slot_tensors(cache), ad.slot_tensors(ref_cache)):
        torch.testing.assert_close(k1, k2, atol=1e-5, rtol=0)
        torch.testing.assert_close(v1, v2, atol=1e-5, rtol=0)


def test_windowed_models_take_neither_fast_path_nor_attention_kernel() -> None:
    for family in ("gemma3", "mistral", "qwen2"):
        ad = HFCausalLM(_model(family))
        assert ad.fast is None and not ad.supports_attention_kernel
    llama = HFCausalLM(tiny_llama())
    assert llama.supports_attention_kernel and attention_layout(llama.model.config).window is None


def test_recurrent_hybrid_is_refused() -> None:
    assert "lfm2" in TINY_FAMILIES
    with pytest.raises(ModelError, match=r"layer types \['conv'\].*plain transformers generate"):
        HFCausalLM(tiny_causal_lm("lfm2"))
    with pytest.raises(ModelError, match="unknown tiny model family"):
        tiny_causal_lm("nope")


def test_sliding_layers_without_a_window_are_refused() -> None:
    with pytest.raises(ModelError, match="no sliding_window size"):
        attention_layout(tiny_causal_lm("gemma2", sliding_window=None).config)


def test_the_cost_curve_times_the_lm_head_and_is_keyed_per_model() -> None:
    """The measured forward-cost curve times whole forwards, logits of every query token over
    the whole vocabulary included (Gemma 3's 262k-row head makes each query token dear), and
    its cache key tells families and vocabulary sizes apart."""
    from decograph.backends.torch_ref import cost
    from decograph.passes.cost import POINTS

    ad = HFCausalLM(tiny_causal_lm("gemma3", vocab_size=512))
    shapes: list[tuple[int, ...]] = []
    real = ad.forward

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        shapes.append(tuple(out.shape))
        return out

    ad.forward = spy  # type: ignore[method-assign]
    cost.measure_cost_curve(ad, context=12, reps=1)
    assert shapes[0] == (1, 12, 512) and {s for s in shapes[1:]} == {(1, q, 512) for q in POINTS}
    keys = {cost._key(HFCausalLM(m)) for m in (tiny_causal_lm("gemma3"), tiny_causal_lm("gemma3", vocab_size=512),
                                               tiny_llama(), tiny_causal_lm("qwen2"))}
    assert len(keys) == 4 and None not in keys


def test_a_superlinear_cost_curve_is_implausible_and_remeasured(tmp_path, monkeypatch) -> None:
    """Two tokens timed at 2.38 one-token forwards (Gemma 3 270M under load) cannot be right:
    two one-token forwards would do. Such a cached curve is measured again."""
    import json

    from decograph.backends.torch_ref import cost
    from decograph.passes.cost import CostCurve

    loaded = {1: 1.0, 2: 2.38, 3: 2.45, 4: 2.36, 6: 2.85, 8: 3.74, 12: 3.85, 16: 4.11, 24: 4.85, 32: 5.16}
    idle = {1: 1.0, 2: 1.3, 3: 1.4, 4: 1.5, 6: 1.7, 8: 1.9, 12: 2.4, 16: 2.9, 24: 3.9, 32: 4.8}
    assert "2 tokens cost 2.38 of one token (more than 2 one-token forwards)" in cost._why_implausible(loaded)
    assert cost._why_implausible(idle) is None and cost._defect(loaded) > cost._defect(idle) == 0
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    ad = HFCausalLM(tiny_causal_lm("gemma3"))
    path = tmp_path / "decograph" / "cost_curves.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({cost._key(ad): {str(q): c for q, c in loaded.items()}}))
    monkeypatch.setattr(cost, "measure_cost_curve", lambda adapter: CostCurve(idle))
    assert cost.cached_cost_curve(ad).points == idle
    assert json.loads(path.read_text())[cost._key(ad)] == {str(q): c for q, c in idle.items()}
