"""DiffusionGemma (transformers' ``DiffusionGemmaForBlockDiffusion``) in decograph: the built-in
``diffusion_gemma`` strategy (``draft.noise``, ``forward(mask=block)``,
``unmask.entropy_bound``, ``commit``) gives exactly the tokens of transformers' own
``generate`` under the same ``torch.manual_seed``, on tiny random-weight models built from
transformers' own config classes: several seeds, batch 1 and 2 (equal and left-padded ragged
prompts), EOS ending one row of a batch while the other goes on, the adaptive stop (stable and
confident), the entropy bound and temperature schedule as parameters; the forward counts
transformers reports; and the errors: a diffusion strategy on the wrong kind of model, bad
fields, sampling flags."""
from __future__ import annotations

import pytest
import torch

import decograph
from decograph.errors import InputError, StrategyFileError, UnsupportedError

pytestmark = pytest.mark.usefixtures("private_cache")

EOS, PAD = 1, 0


def tiny_diffusion_gemma(seed: int = 0, canvas: int = 8, init_std: float = 0.02):
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    text = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, global_head_dim=16, sliding_window=8,
                layer_types=["sliding_attention", "full_attention", "full_attention"], max_position_embeddings=256,
                pad_token_id=PAD, eos_token_id=EOS, bos_token_id=2, num_experts=4, top_k_experts=2,
                moe_intermediate_size=16)
    cfg = DiffusionGemmaConfig(text_config=text, canvas_length=canvas, vision_config=None, initializer_range=init_std)
    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion(cfg).eval()
    model.generation_config.pad_token_id = PAD      # a finished row's later canvases: pad (both read it here)
    return model


@pytest.fixture(scope="module")
def model():
    return tiny_diffusion_gemma()


@pytest.fixture(scope="module")
def peaked():
    """Weights large enough for confident, stable canvases (the adaptive stop triggers; with
    std 0.6 it did on one CPU and not on another: the argmax's stability is rounding-sensitive)."""
    return tiny_diffusion_gemma(seed=1, init_std=1.0)


def hf(model, prompts, seed, n, **kw):
    """transformers' generate on left-padded ``prompts``: each row's new tokens, through its first
    EOS, at most ``n``; and its decoder forwards."""
    width = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    torch.manual_seed(seed)
    extra = {"attention_mask": mask} if any(len(p) != width for p in prompts) else {}
    out = model.generate(ids, max_new_tokens=n, eos_token_id=EOS, **extra, **kw)
    rows, forwards = [], []
    for r, tpf in zip(out.sequences[:, width:].tolist(), out.tokens_per_forward.tolist()):
        valid = sum(1 for t in r if t != PAD)
        forwards.append(round(valid / tpf))
        rows.append((r[: r.index(EOS) + 1] if EOS in r else r)[:n])
    return rows, forwards


def ours(model, prompts, seed, n, **over):
    torch.manual_seed(seed)
    return decograph.generate(model, None, prompts, "diffusion_gemma", max_new_tokens=n, eos_token_id=[EOS],
                              overrides=over or None)


P1 = [2, 5, 9, 11, 3]
P2 = [2, 7, 7, 8, 40]
P3 = [2, 30, 31]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("prompts", [[P1], [P1, P2], [P3, P1]], ids=["batch1", "batch2", "ragged"])
def test_equals_transformers_generate(model, seed, prompts) -> None:
    want, forwards = hf(model, prompts, seed, 24, max_denoising_steps=6)
    got = ours(model, prompts, seed, 24, steps=6)
    assert [r.new_token_ids for r in got] == want
    assert [r.stats.decode_steps for r in got] == forwards
    assert all(r.stats.finish_reason == ("eos" if r.new_token_ids[-1:] == [EOS] else "max_new_tokens") for r in got)


def test_a_budget_inside_a_canvas_cuts_it(model) -> None:
    """transformers appends whole canvases (24 tokens for 20); decograph stops at 20, the same
    tokens; 0 new tokens: none."""
    want, _ = hf(model, [P1, P2], 3, 20, max_denoising_steps=4)
    got = ours(model, [P1, P2], 3, 20, steps=4)
    assert [r.new_token_ids for r in got] == want and all(len(w) <= 20 for w in want)
    assert [r.new_token_ids for r in ours(model, [P1], 3, 0, steps=4)] == [[]]


def test_eos_ends_one_row_while_the_other_goes_on(model) -> None:
    """A row whose canvas holds EOS ends there; its next canvases are pad for the encoder (as in
    transformers), and the other row's tokens are still transformers'."""
    for seed in range(12):
        want, _ = hf(model, [P1, P2], seed, 32, max_denoising_steps=4)
        if sum(EOS in w for w in want) == 1 and any(len(w) < 24 and EOS in w for w in want):
            break
    else:
        pytest.fail("no seed ends exactly one row early")
    got = ours(model, [P1, P2], seed, 32, steps=4)
    assert [r.new_token_ids for r in got] == want
    assert sorted(r.stats.finish_reason for r in got) == ["eos", "max_new_tokens"]


@pytest.mark.parametrize("over,kw", [
    ({"stable": 1, "confident": 50.0}, {"stability_threshold": 1, "confidence_threshold": 50.0}),
    ({"stable": 2, "confident": 50.0}, {"stability_threshold": 2, "confidence_threshold": 50.0}),
    ({"stable": 0, "confident": 1.0}, {"stability_threshold": 0, "confidence_threshold": 1.0}),
    ({"bound": 2.0, "t_min": 0.2, "t_max": 1.5}, {"entropy_bound": 2.0, "t_min": 0.2, "t_max": 1.5}),
])
def test_rule_parameters_are_transformers(peaked, over, kw) -> None:
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig

    if "entropy_bound" in kw:
        kw["sampler_config"] = EntropyBoundSamplerConfig(entropy_bound=kw.pop("entropy_bound"))
    every = []
    for seed in (0, 5, 1, 2, 3, 7):
        want, forwards = hf(peaked, [P1, P2], seed, 24, max_denoising_steps=10, **kw)
        got = ours(peaked, [P1, P2], seed, 24, steps=10, **over)
        assert [r.new_token_ids for r in got] == want
        assert [r.stats.decode_steps for r in got] == forwards
        every += forwards
    if "stability_threshold" in kw:             # the adaptive stop ended some canvases before their 10 steps
        assert min(every) < 10 * 3            # 3 canvases of 10 steps for 24 tokens


def test_a_model_directory_and_the_trace(model, tmp_path) -> None:
    """A saved model loads by its directory (``config.model_type``); the trace records each
    committed canvas; the stats count the positions kept per step."""
    model.save_pretrained(tmp_path / "dg")
    torch.manual_seed(4)
    [a] = decograph.generate(str(tmp_path / "dg"), None, [P1], "diffusion_gemma", 16, eos_token_id=[EOS],
                             overrides={"steps": 5}, trace=True)
    [b] = ours(model, [P1], 4, 16, steps=5)
    assert a.new_token_ids == b.new_token_ids
    canvases = [t for t in a.trace if t["kind"] == "denoise"]
    assert [t["committed"] for t in canvases] and sum((t["committed"] for t in canvases), []) == a.new_token_ids
    assert len(a.stats.accepted_per_step) == a.stats.decode_steps and all(k >= 1 for k in a.stats.accepted_per_step)


def test_wrong_models_and_bad_fields_are_named(model) -> None:
    from decograph.models.tiny import tiny_llama

    llama = tiny_llama(vocab_size=64, hidden=32, seed=0)
    with pytest.raises(UnsupportedError, match=r"draft\.noise needs a uniform-noise diffusion model"):
        decograph.generate(llama, None, [P1], "diffusion_gemma", 4)
    with pytest.raises(UnsupportedError, match=r"`draft\.mask` is masked diffusion.*diffusion_gemma"):
        decograph.generate(model, None, [P1], "fast_dllm", 4)
    with pytest.raises(UnsupportedError, match=r"step `verify\.greedy` cannot run on .*uniform-noise diffusion model"):
        decograph.generate(model, None, [P1], "greedy", 4)
    with pytest.raises(UnsupportedError, match=r"draft\.noise\(k=5\).*canvases of 8"):
        decograph.generate(model, None, [P1], program("source: noise, k: 5", "rule: entropy_bound, steps: 2"), 4)
    with pytest.raises(StrategyFileError, match=r"custom\.yaml:9: .*`unmask\.entropy_bound` needs a forward with mask=block over a draft\.noise"):
        program("source: mask, k: 4", "rule: entropy_bound")
    with pytest.raises(StrategyFileError, match=r"diffusion_gemma\.yaml:11: .*t_max: 0\.5 is below t_min 0\.9"):
        decograph.generate(model, None, [P1], "diffusion_gemma", 4, overrides={"t_min": 0.9, "t_max": 0.5})
    with pytest.raises(StrategyFileError, match=r"unmask\.steps: 0 is out of range"):
        decograph.generate(model, None, [P1], "diffusion_gemma", 4, overrides={"steps": 0})
    with pytest.raises(InputError, match=r"do_sample"):
        decograph.generate(model, None, [P1], "diffusion_gemma", 4, do_sample=True)


def program(draft: str, unmask: str):
    from decograph.frontends.strategy_file import load_strategy_text

    text = f"""strategy: custom
description: "a custom diffusion loop"
steps:
  - prefill
  - iterate:
      body:
        - draft: {{{draft}}}
        - forward: {{mask: block}}
        - unmask: {{{unmask}}}
        - commit: {{}}
  - emit
"""
    return load_strategy_text(text, "custom.yaml").program


# ------------------------------------------------------------------ Fast-dLLM's rules on its canvases


def test_fast_dllm_threshold_rule_on_uniform_noise(model) -> None:
    """``diffusion_gemma_fast``: threshold 0 keeps the whole first canvas at its first step, so
    one canvas is transformers' argmax after one denoising step (the same first noise draw);
    threshold 1 keeps exactly one position a step (the most confident), so a canvas of 8 takes
    8 steps; every run is reproducible under its seed, and every canvas ends fully kept."""
    L = model.config.canvas_length
    want, _ = hf(model, [P1, P2], 7, L, max_denoising_steps=1)
    torch.manual_seed(7)
    got = decograph.generate(model, None, [P1, P2], "diffusion_gemma_fast", L, eos_token_id=[EOS],
                             overrides={"threshold": 0.0})
    assert [r.new_token_ids for r in got] == want
    assert [r.stats.accepted_per_step for r in got] == [(L,), (L,)]
    for threshold, per_step in ((1.0, 1), (0.05, None)):
        runs = []
        for _ in range(2):
            torch.manual_seed(3)
            runs.append(decograph.generate(model, None, [P1, P2], "diffusion_gemma_fast", 3 * L, eos_token_id=[],
                                           overrides={"threshold": threshold}))
        a, b = runs
        assert [r.new_token_ids for r in a] == [r.new_token_ids for r in b]
        for r in a:
            assert len(r.new_token_ids) == 3 * L and min(r.stats.accepted_per_step) >= 1
            assert sum(r.stats.accepted_per_step) == 3 * L            # each canvas ends fully kept
            if per_step:
                assert set(r.stats.accepted_per_step) == {per_step} and r.stats.decode_steps == 3 * L
