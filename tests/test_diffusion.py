"""Unmask strategies on masked-diffusion LMs: the runtime against an independent reference
loop, the unmask rules, EOS, blocks, the block-wise approximate caches, adapters and errors."""
from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import decograph
from decograph.runtime.unmask import select_unmask
from decograph.errors import InputError, ModelError, UnsupportedError
from decograph.models.diffusion import MDMAdapter, as_diffusion_adapter, load_diffusion_model
from decograph.frontends.strategies import load_strategy
from decograph.ir import ops as O
from decograph.ir import parse_program, print_program
from decograph.models.mdm import MDMTransformer, load_mdm, save_mdm, tiny_mdm

MASK = 1
PROMPTS = [[5, 6, 7, 8, 9], [11, 12], [20, 21, 22]]


def reference(model: MDMTransformer, prompt: list[int], n: int, block: int, eos: int | None = None,
              suffix: tuple[int, ...] | list[int] = ()) -> list[int]:
    """One token per step, lowest-confidence remasking, one prompt alone, whole-canvas forwards
    (over prompt + masks + ``suffix``: infilling, the suffix stays fixed)."""
    x = list(prompt) + [MASK] * n + list(suffix)
    p, k, limit = len(prompt), block or n, n
    while True:
        masked = [g for g in range(limit) if x[p + g] == MASK]
        if not masked:
            return x[p:p + limit + 1] if limit < n else x[p:p + n]
        s = masked[0] // k * k
        cand = [g for g in masked if g < s + k]
        with torch.no_grad():
            logits, _ = model(torch.tensor([x]), torch.arange(len(x))[None])
        lg = logits[0].float()
        lg[:, MASK] = float("-inf")
        conf, tok = torch.softmax(lg[[p + g for g in cand]], -1).max(-1)
        best = max(range(len(cand)), key=lambda i: (float(conf[i]), -i))
        g, t = cand[best], int(tok[best])
        x[p + g] = t
        if eos is not None and t == eos and g < limit:
            limit = g
            x[p + g + 1:p + n] = [t] * (n - g - 1)


def run(model, strategy="llada_semi_ar", n=20, prompts=PROMPTS, passes="none", **overrides):
    return decograph.generate(model, None, prompts, strategy=strategy, max_new_tokens=n, passes=passes,
                              overrides=overrides or None)


@pytest.fixture(scope="module")
def model2() -> MDMTransformer:
    return tiny_mdm(n_layers=2, seed=3)


@pytest.mark.parametrize("block", [0, 4, 7, 32])
@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS], ids=["batch1", "batch3"])
def test_one_token_per_step_equals_reference(model2, block, prompts) -> None:
    """topk_per_step(k=1), threshold 1.0 and a factor admitting one token are the same
    one-token-per-step decoding as the reference loop (k=7 does not divide 20; 32 > 20)."""
    ref = [reference(model2, p, 20, block) for p in prompts]
    assert len({tuple(r) for r in ref}) > 1 or len(prompts) == 1
    llada = run(model2, "llada_semi_ar", prompts=prompts, block=block, k=1)
    thr = run(model2, "fast_dllm", prompts=prompts, block=block, threshold=1.0, kv="recompute")
    fac = run(model2, "fast_dllm_factor", prompts=prompts, block=block, factor=1e-9, kv="recompute")
    for out in (llada, thr, fac):
        assert [r.new_token_ids for r in out] == ref
        assert all(r.stats.decode_steps == 20 and set(r.stats.accepted_per_step) == {1} for r in out)


def test_whole_generation_block_is_llada(model2) -> None:
    ref = [reference(model2, p, 16, 0) for p in PROMPTS]
    assert [r.new_token_ids for r in run(model2, "llada", n=16)] == ref


@pytest.mark.parametrize("strategy,over", [
    ("fast_dllm", {"threshold": 0.3}), ("fast_dllm_factor", {"factor": 3.0}), ("lud", {"threshold": 0.2}),
    ("llada", {"k": 3}), ("llada_semi_ar", {"k": 2, "block": 6})])
def test_every_step_unmasks_in_its_block_and_decoding_ends(model2, strategy, over) -> None:
    n = 22
    out = decograph.generate(model2, None, PROMPTS, strategy=strategy, max_new_tokens=n, passes="none",
                             overrides=over, eos_token_id=[])
    for r in out:
        acc = r.stats.accepted_per_step
        assert min(acc) >= 1 and sum(acc) == n and len(acc) == r.stats.decode_steps <= n
        assert len(r.new_token_ids) == n and MASK not in r.new_token_ids
    assert any(max(r.stats.accepted_per_step) > 1 for r in out)       # parallel rules do go parallel


def _rows(model, strategy, n=20, prompts=PROMPTS, **over):
    from decograph.api import _setup

    interp, ids, _ = _setup(model, None, prompts, strategy, n, False, False, 1.0, 0, 1.0, None, None, (), None,
                            over or None, "none")
    with torch.inference_mode():
        list(interp.run(ids))
    return interp.state.rows


@pytest.mark.parametrize("block", [4, 6, 0])
def test_blocks_are_decoded_left_to_right(model2, block) -> None:
    for r in _rows(model2, "fast_dllm", 22, block=block, threshold=0.5, kv="recompute"):
        k = block or 22
        blocks = [{g // k for g in step} for step in r.order]
        assert all(len(b) == 1 for b in blocks)
        seq = [next(iter(b)) for b in blocks]
        assert seq == sorted(seq)
        assert sorted(g for step in r.order for g in step) == list(range(22))


def test_lud_commits_a_contiguous_run_from_the_first_masked(model2) -> None:
    for r in _rows(model2, "lud", 20, threshold=0.3, kv="recompute"):
        done: set[int] = set()
        for step in r.order:
            first = min(set(range(20)) - done)
            assert step == list(range(first, first + len(step)))
            done.update(step)


def test_select_unmask_rules() -> None:
    conf = torch.tensor([0.5, 0.95, 0.2, 0.92, 0.99])
    thr = O.UnmaskThreshold((O.Value(None),), None, None, threshold=0.9)   # type: ignore[arg-type]
    assert select_unmask(thr, conf) == [1, 3, 4]
    lud = O.UnmaskThreshold((O.Value(None),), None, None, threshold=0.9, contiguous=True)  # type: ignore[arg-type]
    assert select_unmask(lud, conf) == [0]
    assert select_unmask(lud, torch.tensor([0.93, 0.95, 0.91, 0.2, 0.99])) == [0, 1, 2]
    fac = O.UnmaskFactor((O.Value(None),), None, None, factor=0.25)  # type: ignore[arg-type]
    # sorted: .99 (2*.01=.02) .95 (3*.05=.15) .92 (4*.08=.32) -> n=2
    assert select_unmask(fac, conf) == [1, 4]
    top = O.UnmaskTopkPerStep((O.Value(None),), None, None, k=2)  # type: ignore[arg-type]
    assert select_unmask(top, conf) == [1, 4]
    assert select_unmask(thr, torch.tensor([0.1, 0.3])) == [1]
    assert select_unmask(thr, torch.tensor([])) == []


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 50), n=st.integers(1, 24), block=st.integers(0, 9),
       threshold=st.floats(0.0, 1.0), rule=st.sampled_from(["fast_dllm", "lud", "fast_dllm_factor"]))
def test_property_every_step_commits_and_ends(seed, n, block, threshold, rule) -> None:
    model = tiny_mdm(n_layers=1, seed=seed, d_model=16)
    over = {"block": block, "kv": "recompute"}
    over.update({"factor": 0.1 + 4 * threshold} if rule == "fast_dllm_factor" else {"threshold": threshold})
    out = decograph.generate(model, None, PROMPTS[:2], strategy=rule, max_new_tokens=n, passes="none",
                             overrides=over, eos_token_id=[])
    for r in out:
        assert min(r.stats.accepted_per_step) >= 1 and sum(r.stats.accepted_per_step) == n
        assert len(r.new_token_ids) == n and MASK not in r.new_token_ids


def _eos_case(model, prompt, n):
    plain = reference(model, prompt, n, 4)
    for p, t in enumerate(plain):
        if 2 <= p < n - 4 and t not in plain[:p]:
            return t, p
    pytest.fail("the test model produced no fresh token mid-way: pick another seed")


@pytest.mark.parametrize("strategy", ["llada_semi_ar", "fast_dllm"])
def test_eos_inside_a_block_ends_the_row(model2, strategy) -> None:
    n = 20
    eos, _ = _eos_case(model2, PROMPTS[0], n)
    over = {"block": 4} if strategy == "llada_semi_ar" else {"block": 4, "threshold": 1.0, "kv": "recompute"}
    [r] = decograph.generate(model2, None, [PROMPTS[0]], strategy=strategy, max_new_tokens=n, passes="none",
                             overrides=over, eos_token_id=eos)
    ref = reference(model2, PROMPTS[0], n, 4, eos=eos)
    assert r.new_token_ids == ref
    assert r.new_token_ids[-1] == eos and eos not in r.new_token_ids[:-1]
    assert r.stats.finish_reason == "eos" and len(ref) < n
    # positions after EOS's block are never decoded (inside its block, some may be, before EOS was)
    assert r.stats.decode_steps == sum(r.stats.accepted_per_step) <= -(-len(ref) // 4) * 4 < n


def test_no_tokens_and_prompt_errors(model2) -> None:
    out = run(model2, n=0)
    assert all(r.new_token_ids == [] and r.stats.decode_steps == 0 for r in out)
    with pytest.raises(InputError, match="mask token"):
        run(model2, prompts=[[3, MASK, 4]])
    with pytest.raises(InputError, match="positions"):
        run(model2, n=300)
    with pytest.raises(InputError, match="sampling"):
        decograph.generate(model2, None, PROMPTS, strategy="fast_dllm", max_new_tokens=4, do_sample=True)


def test_streaming_concatenates_to_the_output(model2) -> None:
    full = run(model2, "fast_dllm", kv="block_approx", threshold=0.4)
    chunks = list(decograph.generate_stream(model2, None, PROMPTS, strategy="fast_dllm", max_new_tokens=20,
                                            passes="none", overrides={"kv": "block_approx", "threshold": 0.4}))
    for i, r in enumerate(full):
        ids = [t for c in chunks if c.row == i for t in c.token_ids]
        assert ids == r.new_token_ids
        assert [c.done for c in chunks if c.row == i][-1]


# -- block-wise approximate KV cache ---------------------------------------------------------

@pytest.mark.parametrize("block", [0, 4, 7])
@pytest.mark.parametrize("strategy,over", [("fast_dllm", {"threshold": 0.7}), ("lud", {"threshold": 0.3}),
                                           ("llada_semi_ar", {})])
def test_caches_exact_by_construction_give_the_same_tokens(block, strategy, over) -> None:
    """One layer: every cached K/V is a function of its own token and position only, so the
    prefix and dual caches are exact and must give the tokens of full recomputation."""
    model = tiny_mdm(n_layers=1, seed=5)
    base = _recompute(load_strategy(strategy, overrides={**over, "block": block}).program)
    outs = {}
    for kv in ("recompute", "block_approx", "block_approx_dual"):
        from decograph.passes import run_pipeline
        from decograph.passes.manager import PassContext

        prog = base
        if kv != "recompute":
            prog, _ = run_pipeline(base, f"cache-reuse{{approximate=true,dual={str(kv.endswith('dual')).lower()}}}",
                                   PassContext("torch", None, None))
        outs[kv] = decograph.generate(model, None, PROMPTS, strategy=prog, max_new_tokens=20, passes="none")
    toks = {kv: [r.new_token_ids for r in o] for kv, o in outs.items()}
    assert toks["block_approx"] == toks["recompute"] == toks["block_approx_dual"]
    q = {kv: sum(r.stats.query_tokens for r in o) for kv, o in outs.items()}
    steps = sum(r.stats.decode_steps for r in outs["recompute"])
    if block and steps > len(PROMPTS) * -(-20 // block):     # some block took several steps
        assert q["block_approx_dual"] < q["block_approx"] < q["recompute"]


def _recompute(program: O.Program) -> O.Program:
    from decograph.passes.rewrite import map_ops, rebuild

    return map_ops(program, lambda op, vmap: [rebuild(op, vmap, kv="recompute") if isinstance(op, O.Commit) else op])


class _Spy(MDMAdapter):
    def __init__(self, model: MDMTransformer) -> None:
        super().__init__(model)
        self.calls: list[tuple[int, bool]] = []

    def forward(self, ids, positions, key_valid, context=None, context_valid=None, return_kv=False, logits_at=None):
        self.calls.append((ids.shape[1], context is not None))
        return super().forward(ids, positions, key_valid, context, context_valid, return_kv, logits_at)


@pytest.mark.parametrize("kv,width", [("block_approx_dual", 4), ("block_approx", None)])
def test_cache_refreshes_once_per_block(model2, kv, width) -> None:
    spy = _Spy(model2)
    [r] = decograph.generate(spy, None, [PROMPTS[0]], strategy="fast_dllm", max_new_tokens=12, passes="none",
                             overrides={"block": 4, "kv": kv, "threshold": 0.99})
    full = [c for c in spy.calls if not c[1]]
    assert len(full) == 3 and all(w == 17 for w, _ in full)               # one refresh per block
    cached = [w for w, c in spy.calls if c]
    assert len(cached) == r.stats.decode_steps - 3
    if width:
        assert set(cached) == {width}
    else:
        assert set(cached) <= {12, 8, 4}


def test_multi_layer_caches_are_approximate_but_complete(model2) -> None:
    for kv in ("block_approx", "block_approx_dual"):
        out = run(model2, "fast_dllm", n=24, kv=kv, threshold=0.5)
        assert all(len(r.new_token_ids) == 24 and MASK not in r.new_token_ids for r in out)


def test_model_context_kv_matches_the_full_forward(model2) -> None:
    ids = torch.tensor([[5, 6, 7, 8, 9, 1, 1, 1, 1, 10]])
    pos = torch.arange(10)[None]
    with torch.no_grad():
        full, kv = model2(ids, pos, return_kv=True)
        q = torch.tensor([3, 4, 5])
        ctx = [(k[:, :, [0, 1, 2, 6, 7, 8, 9]], v[:, :, [0, 1, 2, 6, 7, 8, 9]]) for k, v in kv]
        part, _ = model2(ids[:, q], pos[:, q], context=ctx)
        some, _ = model2(ids, pos, logits_at=torch.tensor([[7, 2]]))
    assert torch.allclose(part, full[:, q], atol=1e-5)
    assert torch.allclose(some, full[:, [7, 2]], atol=1e-6)


# -- adapters --------------------------------------------------------------------------------

class _Shifted(torch.nn.Module):
    """Dream's convention: the logits at position i predict the token at i + 1."""

    def __init__(self, inner: MDMTransformer) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, ids, positions, logits_at=None, **kw):
        logits, kv = self.inner(ids, positions, **kw)
        logits = torch.cat([logits[:, 1:], logits[:, :1]], 1)
        if logits_at is not None:
            logits = logits.gather(1, logits_at[..., None].expand(-1, -1, logits.shape[-1]))
        return logits, kv


def test_dream_shifted_logits(model2) -> None:
    shifted = MDMAdapter(model2, shift_logits=True)
    shifted.model = _Shifted(model2)
    for kv in ("recompute", "block_approx", "block_approx_dual"):
        plain = run(model2, "fast_dllm", kv=kv, threshold=0.5, block=4)
        dream = run(shifted, "fast_dllm", kv=kv, threshold=0.5, block=4)
        assert [r.new_token_ids for r in dream] == [r.new_token_ids for r in plain]


def _bert_dir(tmp_path, with_mask: bool):
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + (["[MASK]"] if with_mask else []) + [f"w{i}" for i in range(40)]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"), mask_token="[MASK]" if with_mask else None)
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=64, max_position_embeddings=64))
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    return tmp_path, tok


def test_hugging_face_masked_lm_from_a_directory(tmp_path) -> None:
    d, tok = _bert_dir(tmp_path, with_mask=True)
    adapter = load_diffusion_model(d)
    assert adapter.mask_token_id == tok.mask_token_id and not adapter.supports_kv
    out = decograph.generate(str(d), None, [[5, 6, 7], [8, 9]], strategy="fast_dllm", max_new_tokens=6,
                             overrides={"kv": "recompute", "threshold": 0.5}, eos_token_id=[])
    assert all(len(r.new_token_ids) == 6 and tok.mask_token_id not in r.new_token_ids for r in out)
    with pytest.raises(UnsupportedError, match="KV interface"):
        decograph.generate(adapter, None, [[5, 6]], strategy="fast_dllm", max_new_tokens=4)


def test_model_without_a_mask_token_fails_before_loading(tmp_path, monkeypatch) -> None:
    d, _ = _bert_dir(tmp_path, with_mask=False)
    import transformers

    def boom(*a, **k):  # pragma: no cover - must not be reached
        raise AssertionError("weights loaded before the mask-token check")

    monkeypatch.setattr(transformers.AutoModelForMaskedLM, "from_pretrained", boom)
    with pytest.raises(ModelError, match="mask token"):
        load_diffusion_model(d)
    with pytest.raises(ModelError, match="no mask token"):
        as_diffusion_adapter(transformers.BertForMaskedLM(transformers.BertConfig(
            vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8)))


def test_strategy_model_mismatch_errors(model2) -> None:
    with pytest.raises(UnsupportedError, match="needs a causal LM"):
        run(model2, "anpd")
    from decograph.models.tiny import tiny_llama

    with pytest.raises(UnsupportedError, match="needs a masked-diffusion model"):
        decograph.generate(tiny_llama(), None, [[1, 2, 3]], strategy="fast_dllm", max_new_tokens=4)
    with pytest.raises(UnsupportedError, match="keep_accepted"):
        run(model2, "fast_dllm", kv="keep_accepted")
    for kv in ("block_approx", "block_approx_dual"):      # a causal program asking for a diffusion cache
        greedy_kv = load_strategy("greedy").program
        text = print_program(greedy_kv).replace("kv=recompute", f"kv={kv}")
        with pytest.raises(UnsupportedError, match=f"kv={kv}\\) applies to masked-diffusion models only"):
            decograph.generate(tiny_llama(), None, [[1, 2, 3]], strategy=parse_program(text), max_new_tokens=4,
                               passes="none")


def test_save_and_load_round_trip(tmp_path, model2) -> None:
    save_mdm(model2, tmp_path / "m")
    again = load_mdm(tmp_path / "m")
    a, b = run(model2, "fast_dllm", threshold=0.5), run(again, "fast_dllm", threshold=0.5)
    assert [r.new_token_ids for r in a] == [r.new_token_ids for r in b]
    out = decograph.generate(str(tmp_path / "m"), None, PROMPTS, strategy="fast_dllm", max_new_tokens=20,
                             passes="none", overrides={"threshold": 0.5})
    assert [r.new_token_ids for r in out] == [r.new_token_ids for r in a]
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(ModelError, match="model_type"):
        load_mdm(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "mask_token_id": 10_000}))
    with pytest.raises(ModelError, match="mask_token_id"):
        load_mdm(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "d_model": 64}))
    with pytest.raises(ModelError, match="do not match"):
        load_mdm(tmp_path / "m")


def test_infilling_with_suffixes(model2) -> None:
    suffixes = [[30, 31, 32], [], [40, 41, 42, 43, 44]]
    ref = [reference(model2, p, 12, 4, suffix=sfx) for p, sfx in zip(PROMPTS, suffixes)]
    out = decograph.generate(model2, None, PROMPTS, "llada_semi_ar", 12, passes="none", overrides={"block": 4},
                             suffixes=suffixes, eos_token_id=[])
    assert [r.new_token_ids for r in out] == ref
    assert ref[0] != reference(model2, PROMPTS[0], 12, 4)          # the suffix is seen
    one = tiny_mdm(n_layers=1, seed=5)                               # exact caches with a suffix too
    outs = [[r.new_token_ids for r in decograph.generate(one, None, PROMPTS, "fast_dllm", 12, passes="none",
                                                         overrides={"block": 4, "kv": kv, "threshold": 0.6},
                                                         suffixes=suffixes, eos_token_id=[])]
            for kv in ("recompute", "block_approx", "block_approx_dual")]
    assert outs[0] == outs[1] == outs[2]
    with pytest.raises(InputError, match="one per prompt"):
        decograph.generate(model2, None, PROMPTS, "fast_dllm", 4, suffixes=[[1]])
    with pytest.raises(InputError, match="masked-diffusion"):
        from decograph.models.tiny import tiny_llama

        decograph.generate(tiny_llama(), None, [[1, 2]], "greedy", 4, suffixes=[[3]])
