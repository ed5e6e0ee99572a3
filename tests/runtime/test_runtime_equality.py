"""Lossless equality of the torch reference backend through ``decograph.api.generate``.

Every built-in strategy must return exactly greedy decoding's tokens: the oracle's ground truth
(exact, no numerics; any mask/position/cache slip changes a token) and Hugging Face
``generate(do_sample=False)`` on a tiny random Llama, at batch 1 and in ragged batches.
"""
from __future__ import annotations

import random

import pytest
import torch
from runtime_helpers import (
    BUILTINS,
    DRAFTING,
    draft_program,
    greedy_program,
    hf_greedy,
    lookahead_program,
    oracle_ref,
    tiny,
)

from decograph.api import generate
from decograph.backends.torch_ref.batch import DraftTree, Row, StepLayout
from decograph.models.adapters import HFCausalLM
from decograph.models.oracle import OracleLM

ORACLE_PROMPTS = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11], [4], [7, 3, 7, 3, 7, 3, 7, 3, 7, 3, 7, 3, 9]]
TINY_PROMPTS = [[1, 2, 3, 4], [9, 8, 7, 6, 5, 9, 8, 7, 6, 5, 9, 8], [17], [30, 31, 30, 31, 30, 31, 30]]
N_ORACLE = 40
N_TINY = 24


@pytest.mark.parametrize("strategy", BUILTINS)
@pytest.mark.parametrize("oracle", [OracleLM(), OracleLM(vocab_size=13, period=1), OracleLM(vocab_size=50, period=3)],
                         ids=["v32p4", "v13p1", "v50p3"])
def test_oracle_every_strategy_batch1_and_batch4(strategy: str, oracle: OracleLM) -> None:
    refs = [oracle.reference(p, N_ORACLE) for p in ORACLE_PROMPTS]
    for p, ref in zip(ORACLE_PROMPTS, refs):
        [r] = generate(oracle, None, p, strategy=strategy, max_new_tokens=N_ORACLE)
        assert r.new_token_ids == ref, (strategy, p)
        assert r.prompt_ids == p
    batch = generate(oracle, None, ORACLE_PROMPTS, strategy=strategy, max_new_tokens=N_ORACLE)
    assert [r.new_token_ids for r in batch] == refs
    assert oracle.mismatch_token not in sum(refs, [])


@pytest.mark.parametrize("strategy", DRAFTING)
def test_oracle_drafting_strategies_actually_speculate(strategy: str) -> None:
    """The oracle (period 4) is built so that every drafting strategy accepts drafts: fewer
    decode steps than tokens, and the acceptance statistics say the same."""
    oracle = OracleLM()
    rs = generate(oracle, None, ORACLE_PROMPTS, strategy=strategy, max_new_tokens=N_ORACLE)
    for r in rs:
        assert r.stats.new_tokens == N_ORACLE
        assert sum(r.stats.accepted_per_step) + r.stats.decode_steps == N_ORACLE
    assert sum(r.stats.decode_steps for r in rs) < len(rs) * N_ORACLE
    assert max(max(r.stats.accepted_per_step) for r in rs) >= 2


@pytest.mark.parametrize("strategy", BUILTINS)
def test_tiny_llama_every_strategy_equals_hf_generate(strategy: str) -> None:
    model = tiny(0)
    refs = [hf_greedy(p, N_TINY) for p in TINY_PROMPTS]
    assert len({tuple(r) for r in refs}) == len(refs)
    for p, ref in zip(TINY_PROMPTS[:2], refs):
        [r] = generate(model, None, [p], strategy=strategy, max_new_tokens=N_TINY)
        assert r.new_token_ids == ref, (strategy, p)
    batch = generate(model, None, TINY_PROMPTS, strategy=strategy, max_new_tokens=N_TINY)
    for p, ref, r in zip(TINY_PROMPTS, refs, batch):
        assert r.new_token_ids == ref, (strategy, p)


def test_tiny_llama_second_seed_and_adapter_input() -> None:
    """Another random model, passed as a ready-made adapter, for two drafting strategies."""
    adapter = HFCausalLM(tiny(5))
    prompts = TINY_PROMPTS[:3]
    refs = [hf_greedy(p, 20, seed=5) for p in prompts]
    for strategy in ("ngram", "lookahead"):
        out = generate(adapter, None, prompts, strategy=strategy, max_new_tokens=20)
        assert [r.new_token_ids for r in out] == refs, strategy


RECOMPUTE_PROGRAMS = {
    "greedy": lambda: greedy_program(kv="recompute"),
    "jacobi": lambda: draft_program("jacobi", kv="recompute", window=4),
    "ngram": lambda: draft_program("ngram", kv="recompute", k=5),
    "lookahead": lambda: lookahead_program(4, 3, 3, kv="recompute"),
}


@pytest.mark.parametrize("name", sorted(RECOMPUTE_PROGRAMS))
def test_kv_recompute_equals_reference(name: str) -> None:
    """commit(kv=recompute): accepted drafts' KV is dropped and recomputed next step."""
    program = RECOMPUTE_PROGRAMS[name]()
    oracle = OracleLM()
    out = generate(oracle, None, ORACLE_PROMPTS, strategy=program, max_new_tokens=30)
    assert [r.new_token_ids for r in out] == [oracle.reference(p, 30) for p in ORACLE_PROMPTS]
    out = generate(tiny(0), None, TINY_PROMPTS, strategy=program, max_new_tokens=16)
    assert [r.new_token_ids for r in out] == [hf_greedy(p, 16) for p in TINY_PROMPTS]
    if name != "greedy":
        assert any(sum(r.stats.accepted_per_step) for r in out) or name == "jacobi"


def test_lookahead_trees_branch_and_stay_exact() -> None:
    """Many pool candidates: the forward carries real trees (more nodes than the Jacobi
    window), and the output is still exactly greedy on both models."""
    program = lookahead_program(window=3, n=3, candidates=6)
    oracle = OracleLM(vocab_size=16)
    rs = generate(oracle, None, ORACLE_PROMPTS, strategy=program, max_new_tokens=60)
    assert [r.new_token_ids for r in rs] == [oracle.reference(p, 60) for p in ORACLE_PROMPTS]
    assert max(max(r.stats.drafted_per_step) for r in rs) > 3 + 2  # window + more than one pool branch
    rs = generate(tiny(0), None, TINY_PROMPTS, strategy=program, max_new_tokens=30)
    assert [r.new_token_ids for r in rs] == [hf_greedy(p, 30) for p in TINY_PROMPTS]
    assert max(max(r.stats.drafted_per_step) for r in rs) > 3 + 2


def _random_tree(rng: random.Random, vocab: int, nodes: int) -> DraftTree:
    tree = DraftTree()
    while len(tree) < nodes:
        at = rng.randrange(-1, len(tree))
        chain = [] if at < 0 else _path_tokens(tree, at)
        tree.add_chain(chain + [rng.randrange(vocab) for _ in range(rng.randint(1, 3))])
    return tree


def _ancestors(tree: DraftTree, i: int) -> list[int]:
    out = []
    while i >= 0:
        out.append(i)
        i = tree.parent[i]
    return out[::-1]


def _path_tokens(tree: DraftTree, i: int) -> list[int]:
    return [tree.tokens[j] for j in _ancestors(tree, i)]


@pytest.mark.parametrize("seed", range(4))
def test_random_tree_masks_positions_and_logits(seed: int) -> None:
    """Tree layout: node i attends to j iff j is i or an ancestor (plus every pending token);
    its position is prefix length + depth - 1; its logits equal a causal forward over its path."""
    rng = random.Random(seed)
    adapter = HFCausalLM(tiny(0))
    vocab = adapter.vocab_size
    prompt = [rng.randrange(vocab) for _ in range(rng.randint(2, 6))]
    tree = _random_tree(rng, vocab, rng.randint(3, 9))
    row = Row(0, list(prompt), len(prompt), 100)
    layout = StepLayout([row], [tree], len(prompt) + len(tree))
    ids, pos, attend = layout.inputs(torch.zeros(1, 0, dtype=torch.bool), 0)
    r = len(prompt)
    for i in range(len(tree)):
        anc = set(_ancestors(tree, i))
        for j in range(len(tree)):
            assert bool(attend[0, r + i, r + j]) == (j in anc), (i, j)
        assert bool(attend[0, r + i, :r].all())
        assert int(pos[0, r + i]) == r - 1 + tree.depth[i]
        assert tree.depth[i] == len(anc)
    cache = adapter.new_cache(1)
    logits = adapter.forward(cache, ids, pos, attend)[0]
    for i in range(len(tree)):
        seq = prompt + _path_tokens(tree, i)
        with torch.no_grad():
            ref = tiny(0)(torch.tensor([seq])).logits[0, -1]
        torch.testing.assert_close(logits[r + i], ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("config", [{"attn_implementation": "eager"}, {"heads": 4, "kv_heads": 4},
                                    {"layers": 3, "hidden": 48, "heads": 6, "kv_heads": 3}],
                         ids=["eager", "mha", "3layers"])
def test_other_tiny_architectures_equal_hf_generate(config: dict) -> None:
    """Eager attention, no grouped-query attention, other shapes: the same exact tokens."""
    model = tiny(2, **config)
    prompts = [[5], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [40, 41, 40, 41]]
    refs = []
    with torch.no_grad():
        for p in prompts:
            out = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                 do_sample=False, max_new_tokens=16, pad_token_id=0)
            refs.append(out[0, len(p):].tolist())
    for strategy in ("greedy", "lookahead", "jacobi"):
        rs = generate(model, None, prompts, strategy=strategy, max_new_tokens=16)
        assert [r.new_token_ids for r in rs] == refs, strategy
