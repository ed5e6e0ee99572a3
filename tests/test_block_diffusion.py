"""The block-diffusion adaptation of a causal LM (decograph.models.block_diffusion), on tiny
random Llama models: the clean path is the causal LM itself, the noisy path reads what training
taught it to read, the block caches are exact for it (block-causal attention), every unmask
strategy runs on it, the delta round-trips, and a training step learns."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from decograph.api import generate
from decograph.apps.adapt_diffusion import complementary_masks, train_step
from decograph.errors import ModelError
from decograph.frontends.strategies import load_strategy
from decograph.models.block_diffusion import BlockDiffusionConfig, BlockDiffusionLM, load_delta, save_delta
from decograph.models.block_layout import block_index
from decograph.models.diffusion import BlockDiffusionAdapter, is_diffusion_dir
from decograph.models.tiny import tiny_llama

MASK = 3


def _lm(block: int = 4, seed: int = 0) -> BlockDiffusionLM:
    base = tiny_llama(vocab_size=64, hidden=32, layers=2, heads=4, kv_heads=2, seed=seed, eos_token_id=1)
    lm = BlockDiffusionLM(base, BlockDiffusionConfig(block=block, rank=4, mask_token_id=MASK))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():                       # a noisy path that differs from the base model
        for mods in lm.lora:
            for m in mods.values():                 # both factors: the model is the same in every process
                m.a.copy_(torch.randn(m.a.shape, generator=g) / m.a.shape[1] ** 0.5)
                m.b.copy_(torch.randn(m.b.shape, generator=g) * 0.3)
        lm.mask_embed.copy_(torch.randn(lm.mask_embed.shape, generator=g))
    return lm.eval()


def test_clean_path_is_the_causal_lm() -> None:
    lm = _lm()
    ids = torch.randint(4, 64, (2, 11), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(11).expand(2, -1)
    with torch.no_grad():
        ref = lm.base(ids).logits
        out, _ = lm(ids, pos, torch.zeros_like(ids, dtype=torch.bool), torch.ones(11, 11, dtype=torch.bool).tril()[None])
    assert torch.allclose(out, ref, atol=1e-5)
    noisy = torch.zeros_like(ids, dtype=torch.bool)
    noisy[:, 6:] = True
    with torch.no_grad():
        changed, _ = lm(ids, pos, noisy, torch.ones(11, 11, dtype=torch.bool).tril()[None])
    assert torch.allclose(changed[:, :6], ref[:, :6], atol=1e-5)
    assert not torch.allclose(changed[:, 6:], ref[:, 6:], atol=1e-3)   # the LoRA path is in use


def test_layout_blocks_from_the_answer_start() -> None:
    blk, end = block_index(np.array([[0, 1, 2, 3, 4, 5, 6, 7, 8]]), np.array([3]), 4)
    assert blk.tolist() == [[-1, -1, -1, 0, 0, 0, 0, 1, 1]]
    assert end.tolist() == [[1, 2, 3, 7, 7, 7, 7, 11, 11]]
    lm = _lm()
    ids = torch.tensor([[10, 11, 12, 20, 21, MASK, MASK, MASK, MASK]])   # block 0 half decoded, block 1 masked
    pos = torch.arange(9)[None]
    noisy, attend = lm.layout(ids, pos, torch.ones_like(ids, dtype=torch.bool), torch.tensor([3]))
    assert noisy.tolist() == [[False] * 3 + [True] * 6]
    assert attend[0, 1].tolist() == [True, True] + [False] * 7           # a clean query: causal
    assert attend[0, 4].tolist() == [True] * 7 + [False] * 2             # block 0: its whole block, bidirectional
    assert attend[0, 8].tolist() == [True] * 9
    done = torch.tensor([[10, 11, 12, 20, 21, 22, 23, MASK, MASK]])      # block 0 complete: clean again
    noisy, attend = lm.layout(done, pos, torch.ones_like(done, dtype=torch.bool), torch.tensor([3]))
    assert noisy.tolist() == [[False] * 7 + [True] * 2]
    assert attend[0, 5].tolist() == [True] * 6 + [False] * 3


def test_inference_reads_what_training_taught() -> None:
    """A fully masked block's logits from a canvas forward equal the training formulation's:
    the clean pass's KV before the block, the block's own positions."""
    lm = _lm()
    prompt, answer = [10, 11, 12, 13, 14], [20, 21, 22, 23, 24, 25, 26, 27]
    g, n = len(prompt), len(answer)
    seq = torch.tensor([prompt + answer])
    with torch.no_grad():
        _, ctx = lm(seq, torch.arange(g + n)[None], torch.zeros_like(seq, dtype=torch.bool),
                    torch.ones(g + n, g + n, dtype=torch.bool).tril()[None], return_kv=True)
        q = torch.tensor([answer[:4] + [MASK] * 4])                       # block 1 fully masked
        attend = torch.cat([torch.arange(g + n)[None, :].expand(4, -1) < g + 4,
                            torch.ones(4, 4, dtype=torch.bool)], 1)[None]
        ctx4 = [(k, v) for k, v in ctx]
        train_view, _ = lm(q[:, 4:], torch.arange(g + 4, g + n)[None], torch.ones(1, 4, dtype=torch.bool), attend,
                           context=ctx4)
        ad = BlockDiffusionAdapter(lm)
        canvas = torch.tensor([prompt + answer[:4] + [MASK] * 4])
        full, _ = ad.forward(canvas, torch.arange(g + n)[None], torch.ones_like(canvas, dtype=torch.bool),
                             gen_start=torch.tensor([g]))
    assert torch.allclose(full[:, g + 4:], train_view, atol=1e-5)


@pytest.mark.parametrize("runtime_block", [4, 8])
def test_block_caches_are_exact_for_a_block_causal_model(runtime_block: int) -> None:
    ad = BlockDiffusionAdapter(_lm(block=4))
    prompts = [[10, 11, 12, 13, 14, 15, 16], [20, 21, 22]]                # ragged: left padding in the canvas
    outs = {}
    for kv in ("recompute", "block_approx", "block_approx_dual"):
        prog = load_strategy("fast_dllm", overrides={"block": runtime_block, "threshold": 0.3, "kv": kv}).program
        rs = generate(ad, None, prompts, prog, 16, eos_token_id=[])
        outs[kv] = [r.new_token_ids for r in rs]
        assert all(len(o) == 16 and MASK not in o for o in outs[kv])
    assert outs["recompute"] == outs["block_approx"] == outs["block_approx_dual"]
    alone = [generate(ad, None, [p], load_strategy("fast_dllm", overrides={"block": runtime_block, "threshold": 0.3})
                      .program, 16, eos_token_id=[])[0].new_token_ids for p in prompts]
    assert alone == outs["block_approx_dual"]                             # batching changes nothing


def test_a_new_block_runs_only_the_block_just_completed_and_itself() -> None:
    """Block-causal: the kept KV of the prompt and of complete blocks is exact, so a block's first
    step runs the block just completed (now clean) and the new block against it, not the whole
    canvas; the tokens are the whole-canvas recompute's."""
    ad = BlockDiffusionAdapter(_lm(block=4))
    widths: list[tuple[int, int]] = []
    real = ad.model.forward

    def spy(ids, pos, noisy, attend, context=None, return_kv=False, logits_at=None):
        widths.append((ids.shape[1], 0 if context is None else context[0][0].shape[2]))
        return real(ids, pos, noisy, attend, context=context, return_kv=return_kv, logits_at=logits_at)

    ad.model.forward = spy
    prompts = [[10, 11, 12, 13, 14, 15, 16], [20, 21, 22]]
    outs = {}
    for kv in ("recompute", "block_approx_dual"):
        widths.clear()
        prog = load_strategy("lud", overrides={"block": 4, "threshold": 0.5, "kv": kv}).program
        outs[kv] = [r.new_token_ids for r in generate(ad, None, prompts, prog, 16, eos_token_id=[])]
        seen = list(widths)
    assert outs["recompute"] == outs["block_approx_dual"]
    assert seen[0] == (7 + 4, 0)                                  # the prompts (padded to 7) and block 0
    assert max(w for w, _ in seen[1:]) <= 4 + 4                    # then never the 23-column canvas
    assert (8, 23) in seen and (5, 23) in seen                    # refresh: blocks k-1 and k; a step: block k + 1


@pytest.mark.parametrize("model_block,strategy_block", [(4, 2), (4, 3), (8, 5), (4, 8)])
def test_the_narrow_refresh_gives_the_whole_canvas_refresh_tokens(model_block: int, strategy_block: int,
                                                                   monkeypatch) -> None:
    """Strategy blocks that are not the model's (shorter, misaligned, longer; a budget that is
    not a multiple): the narrow refresh computes the model's whole block, so the tokens are
    those of refreshing the whole canvas, with both caches."""
    from decograph.backends.torch_ref.canvas import TorchCanvas

    ad = BlockDiffusionAdapter(_lm(block=model_block))
    prompts = [[10, 11, 12, 13, 14, 15, 16], [20, 21, 22]]
    for kv in ("block_approx", "block_approx_dual"):
        prog = load_strategy("fast_dllm", overrides={"block": strategy_block, "threshold": 0.3, "kv": kv}).program
        narrow = [r.new_token_ids for r in generate(ad, None, prompts, prog, 13, eos_token_id=[])]
        with monkeypatch.context() as m:
            real = TorchCanvas.__init__

            def whole(self, *a, **k):
                real(self, *a, **k)
                self.block_causal = 0

            m.setattr(TorchCanvas, "__init__", whole)
            ref = [r.new_token_ids for r in generate(ad, None, prompts, prog, 13, eos_token_id=[])]
        assert narrow == ref, kv


def test_packed_inference_projections_equal_the_training_form() -> None:
    """Inference groups q/k/v and gate/up into one packed product each and the LoRA updates into
    one A and one block-diagonal B product; the logits and KV are the training form's. A
    parameter changed in place (an optimizer step) rebuilds the packed copy."""
    from decograph.models.block_diffusion_fast import LoRAProjections, PackedProjections

    lm = _lm()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(4, 64, (2, 9), generator=g)
    ids[:, 6:] = MASK
    noisy = torch.zeros(2, 9, dtype=torch.bool)
    noisy[:, 4:] = True
    pos, attend = torch.arange(9).expand(2, -1), torch.rand(2, 9, 14, generator=g) < 0.7
    attend[:, torch.arange(9), 5 + torch.arange(9)] = True
    ctx = [(torch.randn(2, 2, 5, 8, generator=g), torch.randn(2, 2, 5, 8, generator=g)) for _ in range(2)]
    for n in (noisy, torch.ones_like(noisy), torch.zeros_like(noisy)):     # mixed, all noisy, all clean
        with torch.no_grad():
            assert isinstance(lm.projections(), PackedProjections)
            fast, kf = lm(ids, pos, n, attend, context=ctx, return_kv=True)
        with torch.enable_grad():
            assert isinstance(lm.projections(), LoRAProjections)
            slow, ks = lm(ids, pos, n, attend, context=ctx, return_kv=True)
        assert torch.allclose(fast, slow.detach(), atol=1e-4)
        assert all(torch.allclose(a, b.detach(), atol=1e-4) for x, y in zip(kf, ks) for a, b in zip(x, y))
    with torch.no_grad():
        before, _ = lm(ids, pos, noisy, attend, context=ctx)
        lm.lora[0]["q_proj"].b.add_(1.0)
        after, _ = lm(ids, pos, noisy, attend, context=ctx)
        with torch.enable_grad():
            slow, _ = lm(ids, pos, noisy, attend, context=ctx)
    assert not torch.allclose(before, after, atol=1e-3) and torch.allclose(after, slow.detach(), atol=1e-4)


@pytest.mark.parametrize("name", ["llada", "llada_semi_ar", "fast_dllm", "fast_dllm_factor", "lud"])
def test_every_unmask_strategy_runs(name: str) -> None:
    ad = BlockDiffusionAdapter(_lm())
    over = {"block": 8} if name != "llada" else {}
    [r] = generate(ad, None, [[10, 11, 12, 13]], load_strategy(name, overrides=over).program, 12, eos_token_id=[])
    assert len(r.new_token_ids) == 12 and MASK not in r.new_token_ids
    assert r.stats.forward_passes >= 1


def test_eos_ends_the_answer() -> None:
    """Once EOS is unmasked the positions after it are EOS padding, which the block's bidirectional
    attention sees: a run with an EOS set equals the free run only up to the step that unmasked
    the EOS. Pick a token that the free run unmasks at its first position after every earlier
    position is decoded: with it as EOS, the answer is the free run's prefix through it, ended
    there. Any other EOS still ends the answer at its first occurrence, decoded before it."""
    ad = BlockDiffusionAdapter(_lm())
    prog = load_strategy("fast_dllm", overrides={"block": 4, "threshold": 0.3}).program
    [free] = generate(ad, None, [[10, 11, 12]], prog, 16, eos_token_id=[], trace=True)
    toks = free.new_token_ids
    step_of = {g: e["step"] for e in free.trace if e["kind"] == "unmask" for g in e["positions"]}
    first_step = {t: min(step_of[g] for g, u in enumerate(toks) if u == t) for t in set(toks)}
    clean = [t for t in dict.fromkeys(toks) if toks.index(t) >= 1 and step_of[toks.index(t)] == first_step[t]
             and all(step_of[g] <= first_step[t] for g in range(toks.index(t)))]
    assert clean, (toks, step_of)
    stop = clean[-1]
    [r] = generate(ad, None, [[10, 11, 12]], prog, 16, eos_token_id=[stop])
    assert r.new_token_ids == toks[:toks.index(stop) + 1]
    assert r.stats.finish_reason == "eos"
    for stop in set(toks) - set(clean):
        [r] = generate(ad, None, [[10, 11, 12]], prog, 16, eos_token_id=[stop])
        assert r.new_token_ids[-1] == stop and stop not in r.new_token_ids[:-1] and MASK not in r.new_token_ids
        assert r.stats.finish_reason == "eos"


def test_delta_round_trip_and_errors(tmp_path) -> None:
    lm = _lm()
    save_delta(lm, tmp_path / "d", half=False)
    assert is_diffusion_dir(tmp_path / "d")
    again = load_delta(tmp_path / "d", tiny_llama(vocab_size=64, hidden=32, layers=2, heads=4, kv_heads=2, seed=0,
                                                  eos_token_id=1))
    ids = torch.tensor([[10, 11, 12, MASK, MASK]])
    pos = torch.arange(5)[None]
    with torch.no_grad():
        a, _ = lm(ids, pos, torch.ones_like(ids, dtype=torch.bool), torch.ones(5, 5, dtype=torch.bool)[None])
        b, _ = again(ids, pos, torch.ones_like(ids, dtype=torch.bool), torch.ones(5, 5, dtype=torch.bool)[None])
    assert torch.equal(a, b)
    cfg = json.loads((tmp_path / "d" / "config.json").read_text())
    (tmp_path / "d" / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(ModelError, match="model_type"):
        load_delta(tmp_path / "d", lm.base)
    with pytest.raises(ModelError, match="Llama"):
        BlockDiffusionLM(torch.nn.Linear(2, 2), BlockDiffusionConfig())


def test_complementary_masks_cover_every_token_once() -> None:
    m = complementary_masks(37, 8, torch.Generator().manual_seed(0))
    assert m.shape == (2, 37) and bool((m[0] ^ m[1]).all())


def test_a_training_step_learns() -> None:
    lm = _lm()
    lm.train()
    opt = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(0)
    prompt, answer = [10, 11, 12, 13], [20, 30, 40, 50, 21, 31, 41, 51]
    losses = []
    for _ in range(60):
        loss = train_step(lm, prompt, answer, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    assert all(not p.requires_grad for p in lm.base.parameters())


@pytest.mark.usefixtures("private_cache")
@pytest.mark.parametrize("name,kv", [("llada_semi_ar", None), ("fast_dllm", "recompute"),
                                     ("fast_dllm", "block_approx"), ("fast_dllm", "block_approx_dual"),
                                     ("lud", "block_approx_dual")])
def test_onnxruntime_gives_the_torch_tokens(name: str, kv: str | None, monkeypatch) -> None:
    """The model as an ONNX Runtime graph (LoRA gated by the host's layout, grouped-query heads
    repeated): every unmask strategy gives the torch backend's tokens, ragged batch of two."""
    ad = BlockDiffusionAdapter(_lm(block=4))
    over = {"block": 4, **({"kv": kv, "threshold": 0.3} if kv else {})}
    prog = load_strategy(name, overrides=over).program
    prompts = [[10, 11, 12, 13, 14, 15, 16], [20, 21, 22]]
    ref = [r.new_token_ids for r in generate(ad, None, prompts, prog, 12, eos_token_id=[])]
    from decograph.backends.onnxruntime.block_diffusion import BDSession

    calls = []
    real = BDSession.forward
    monkeypatch.setattr(BDSession, "forward", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    got = [r.new_token_ids for r in generate(ad, None, prompts, prog, 12, eos_token_id=[], backend="onnxruntime")]
    assert got == ref and calls


@pytest.mark.usefixtures("private_cache")
def test_the_exported_decoder_runs_the_block_diffusion_graph(tmp_path) -> None:
    from decograph.export import export_decoder
    from decograph.exported import ExportedDecoder
    from decograph.models.tiny import word_tokenizer

    ad = BlockDiffusionAdapter(_lm(block=4), word_tokenizer(64, 1))
    prog = load_strategy("fast_dllm", overrides={"block": 4, "threshold": 0.3}).program
    prompts = [[10, 11, 12, 13, 14, 15, 16], [20, 21, 22]]
    ref = [r.new_token_ids for r in generate(ad, None, prompts, prog, 12, eos_token_id=[1])]
    out = export_decoder(prog, tmp_path / "bd", model=ad, progress=lambda *_: None)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["graphs"]["target"]["graph"] == "bd-1"
    dec = ExportedDecoder(out)
    assert [ids for ids, _ in dec.generate_batch(prompts, 12)] == ref
