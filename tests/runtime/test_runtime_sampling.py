"""Lossless speculative sampling: with ``do_sample=True`` every drafting strategy must sample
exactly from the model's own distribution.

On a tiny Llama with 8 tokens the joint law of the first two new tokens, p(t1) p(t2 | t1), is
computed exactly from logits (64 cells); 3000 rows of one batched, seeded ``generate`` call are
compared with it by a chi-square test. Seeds are fixed, so the test is deterministic; the
significance level 1e-4 makes a false alarm on an implementation change unlikely, while the
power check below shows that a moderate distortion (temperature 0.7 instead of 1) is rejected
with p < 1e-9.
"""
from __future__ import annotations

import functools

import pytest
import torch
from runtime_helpers import model_draft_program, tiny

from decograph.api import generate
from decograph.errors import InputError

VOCAB = 8
PROMPT = [1, 2, 3, 4, 1, 2, 3]     # repeats, so prompt lookup and the lookahead pool draft at once
N = 3000
ALPHA = 1e-4


def target():
    return tiny(3, VOCAB, hidden=16, heads=2, kv_heads=1, init_std=0.1)


def other():
    return tiny(4, VOCAB, hidden=16, heads=2, kv_heads=1, init_std=0.1)


def _warp(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Probabilities after Hugging Face's own warpers (the independent reference)."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    procs = []
    if temperature != 1.0:
        procs.append(TemperatureLogitsWarper(temperature))
    if top_k:
        procs.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        procs.append(TopPLogitsWarper(top_p))
    x = LogitsProcessorList(procs)(torch.zeros(logits.shape[0], 1, dtype=torch.long), logits)
    return torch.softmax(x.double(), -1)


@functools.lru_cache(maxsize=None)
def exact_joint(temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """[V, V]: P(t1 = i, t2 = j) for the target model after ``PROMPT``."""
    model = target()
    with torch.no_grad():
        first = model(torch.tensor([PROMPT])).logits[:, -1]
        second = model(torch.tensor([PROMPT + [t] for t in range(VOCAB)])).logits[:, -1]
    p1 = _warp(first, temperature, top_k, top_p)[0]
    p2 = _warp(second, temperature, top_k, top_p)
    return p1[:, None] * p2


def joint_counts(results) -> torch.Tensor:
    counts = torch.zeros(VOCAB, VOCAB, dtype=torch.float64)
    for r in results:
        counts[r.new_token_ids[0], r.new_token_ids[1]] += 1
    return counts


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's test of ``counts`` against ``probs`` (cells with expectation < 5 pooled)."""
    counts, probs = counts.flatten().double(), probs.flatten().double()
    zero = probs <= 0
    assert counts[zero].sum() == 0, "a sample landed where the distribution has no mass"
    counts, probs = counts[~zero], probs[~zero]
    n = counts.sum()
    exp = probs / probs.sum() * n
    small = exp < 5
    obs_cells = torch.cat([counts[~small], counts[small].sum()[None]]) if small.any() else counts
    exp_cells = torch.cat([exp[~small], exp[small].sum()[None]]) if small.any() else exp
    stat = float(((obs_cells - exp_cells) ** 2 / exp_cells).sum())
    df = len(obs_cells) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2)))


STRATEGIES = {
    "greedy": lambda: ("greedy", {}),
    "ngram": lambda: ("ngram", {}),
    "jacobi": lambda: ("jacobi", {}),
    "lookahead": lambda: ("lookahead", {}),
    "draft_model": lambda: (model_draft_program(2), {"draft_models": {"draft": other()}}),
}


@functools.lru_cache(maxsize=None)
def sampled(name: str, seed: int = 0):
    strategy, kw = STRATEGIES[name]()
    return generate(target(), None, [PROMPT] * N, strategy=strategy, max_new_tokens=3, do_sample=True, seed=seed,
                    **kw)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_speculative_sampling_matches_the_model_distribution(name: str) -> None:
    results = sampled(name)
    assert all(len(r.new_token_ids) == 3 for r in results)
    p = chi2_pvalue(joint_counts(results), exact_joint())
    assert p > ALPHA, f"{name}: chi-square p-value {p:.2e}"
    if name != "greedy":
        # Both branches of the rule ran: first-step drafts were accepted and rejected.
        first = [r.stats.accepted_per_step[0] for r in results]
        assert 0.05 * N < sum(a > 0 for a in first) < 0.95 * N
        assert any(a >= 2 for a in first) or name == "draft_model"


def test_the_test_has_power() -> None:
    """The same samples (two strategies' pooled) are far from a moderately different distribution."""
    counts = joint_counts(sampled("lookahead")) + joint_counts(sampled("greedy"))
    assert chi2_pvalue(counts, exact_joint(temperature=0.7)) < 1e-9


@pytest.mark.parametrize("strategy", ["greedy", "lookahead"])
def test_temperature_top_k_top_p_distribution(strategy: str) -> None:
    cfg = {"temperature": 0.7, "top_k": 5, "top_p": 0.9}
    results = generate(target(), None, [PROMPT] * N, strategy=strategy, max_new_tokens=2, do_sample=True, seed=1,
                       **cfg)
    probs = exact_joint(cfg["temperature"], cfg["top_k"], cfg["top_p"])
    assert (probs == 0).any()                           # the filters removed some cells
    counts = joint_counts(results)
    p = chi2_pvalue(counts, probs)
    assert p > ALPHA, f"{strategy}: chi-square p-value {p:.2e}"
    # The filters really ran: temperature alone (no top-k / top-p) is rejected.
    assert chi2_pvalue(counts, exact_joint(0.7)) < 1e-9


@pytest.mark.parametrize("strategy", ["ngram", "lookahead", "draft_model"])
def test_seeded_sampling_is_deterministic(strategy: str) -> None:
    strat, kw = STRATEGIES[strategy]()
    prompts = [PROMPT, [5, 6], PROMPT[:4]] * 4

    def run(seed: int) -> list[list[int]]:
        out = generate(target(), None, prompts, strategy=strat, max_new_tokens=10, do_sample=True, seed=seed, **kw)
        return [r.new_token_ids for r in out]

    a = run(123)
    assert run(123) == a
    assert run(124) != a
    assert len({tuple(t) for t in a[::3]}) > 1          # identical prompts, independent rows


def test_out_of_vocabulary_prompt_ids_raise() -> None:
    for bad in (VOCAB, VOCAB + 100, -1):
        with pytest.raises(InputError, match=f"token id {bad} outside the vocabulary of {VOCAB}"):
            generate(target(), None, [[1, 2], [3, bad]], strategy="ngram", max_new_tokens=3, do_sample=True, seed=0)
