"""Passes keep lossless strategies lossless: every built-in greedy strategy returns exactly the
tokens of plain greedy decoding with no pass, with each pass alone, with the default pipeline
and with a batch-layout pipeline, on the oracle (exact) and on a tiny random Llama, for a
ragged batch of prompts with repetitions (so n-gram drafts fire)."""
from __future__ import annotations

import functools

import pytest
import torch

from decograph.api import generate
from decograph.models.adapters import HFCausalLM
from decograph.frontends.strategies import load_strategy
from decograph.ir import ops as O
from decograph.models.oracle import OracleLM
from decograph.models.tiny import tiny_llama
from decograph.passes import run_pipeline

torch.set_num_threads(1)

STRATEGIES = ("greedy", "ngram", "anpd", "jacobi", "gs_jacobi", "lookahead")
PIPELINES = ("none", "canonicalize", "speculative-batching", "mask-fusion", "cache-reuse", "auto-tune",
             "default", "speculative-batching,mask-fusion{layout=batch},cache-reuse")
N_NEW = 24

ORACLE = OracleLM(vocab_size=32, period=4)
ORACLE_PROMPTS = [[1, 2, 3, 1, 2, 3, 1, 2, 3, 1], [5, 6, 7, 8, 5, 6], [4, 9, 4, 9, 4, 9, 4, 9, 4, 9, 4, 9, 4]]
TINY_PROMPTS = [[9, 8, 7, 6, 5, 9, 8, 7, 6, 5, 9, 8], [30, 31, 30, 31, 30, 31, 30], [1, 2, 3, 4, 1, 2, 3, 4, 1]]


@functools.lru_cache(maxsize=None)
def tiny() -> HFCausalLM:
    return HFCausalLM(tiny_llama(vocab_size=64, seed=0))


@functools.lru_cache(maxsize=None)
def tiny_reference(prompt: tuple[int, ...]) -> list[int]:
    """Greedy decoding by full causal forwards, no cache: the plain definition."""
    model = tiny().model
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(N_NEW):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt):]


def _tokens(model, prompts: list[list[int]], strategy: str, pipeline: str) -> list[list[int]]:
    out = generate(model, None, prompts, strategy=strategy, max_new_tokens=N_NEW, passes=pipeline)
    return [r.new_token_ids for r in out]


@pytest.mark.parametrize("pipeline", PIPELINES)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_oracle_tokens_unchanged_by_passes(strategy: str, pipeline: str) -> None:
    refs = [ORACLE.reference(p, N_NEW) for p in ORACLE_PROMPTS]
    assert ORACLE.mismatch_token not in sum(refs, [])
    assert _tokens(ORACLE, ORACLE_PROMPTS, strategy, pipeline) == refs


@pytest.mark.parametrize("pipeline", PIPELINES)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_tiny_llama_tokens_unchanged_by_passes(strategy: str, pipeline: str) -> None:
    refs = [tiny_reference(tuple(p)) for p in TINY_PROMPTS]
    assert _tokens(tiny(), TINY_PROMPTS, strategy, pipeline) == refs


@pytest.mark.parametrize("strategy", ["ngram", "anpd", "lookahead"])
def test_batch_layout_pipeline_really_runs_tree_forwards_and_accepts_drafts(strategy: str) -> None:
    """The batch-layout pipeline is not vacuous: its program has a tree forward laid out as
    batch rows, and on the oracle it accepts drafts (fewer steps than tokens)."""
    pipeline = "speculative-batching,mask-fusion{layout=batch},cache-reuse"
    program, _ = run_pipeline(load_strategy(strategy).program, pipeline)
    [fwd] = [op for op in program.walk() if isinstance(op, O.Forward)]
    assert (fwd.mask, fwd.layout, fwd.dedup) == ("tree", "batch", True)
    out = generate(ORACLE, None, ORACLE_PROMPTS, strategy=program, max_new_tokens=N_NEW, passes="none")
    assert [r.new_token_ids for r in out] == [ORACLE.reference(p, N_NEW) for p in ORACLE_PROMPTS]
    assert sum(sum(r.stats.accepted_per_step) for r in out) > 0
    assert sum(r.stats.decode_steps for r in out) < len(out) * N_NEW


LAYOUT_AND_CACHE = ("canonicalize", "cache-reuse", "mask-fusion", "mask-fusion{layout=batch}",
                    "mask-fusion{layout=batch},cache-reuse")
SOFT_ORACLE = OracleLM(vocab_size=32, period=4, confidence=3.0)     # the top token has p ~ 0.4


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("model", ["oracle", "tiny"])
def test_sampling_with_a_seed_unchanged_by_layout_and_cache_passes(strategy: str, model: str) -> None:
    """These passes change where KV lives and how many forwards run, not the draft tree that
    speculative sampling walks, so with one seed they draw exactly the same tokens."""
    adapter, prompts = (SOFT_ORACLE, ORACLE_PROMPTS) if model == "oracle" else (tiny(), TINY_PROMPTS)

    def run(pipeline: str) -> list[list[int]]:
        out = generate(adapter, None, prompts, strategy=strategy, max_new_tokens=N_NEW, passes=pipeline,
                       do_sample=True, seed=0)
        return [r.new_token_ids for r in out]

    base = run("none")
    if model == "oracle":
        assert base != [SOFT_ORACLE.reference(p, N_NEW) for p in prompts]      # it really samples
    for pipeline in LAYOUT_AND_CACHE:
        assert run(pipeline) == base, pipeline
