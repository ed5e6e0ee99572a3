"""The example backend plugin (tests/plugin_example, installed with ``pip install --no-deps -e
tests/plugin_example``): a numpy Llama forward behind the step protocol, checked against the
torch model and the torch backend, the way a backend author would test theirs.

- the forward: logits equal the torch model's (GQA, MQA with biases and a wider head, tied
  embeddings and another rotary base);
- the protocol calls one by one: prefill, a tree forward (each node's logits equal the torch
  model's on the prompt plus the node's path), commit (the kept slots equal a fresh prefill),
  settle, fork and join;
- whole runs: every lossless built-in strategy and fork/join programs give the torch backend's
  tokens, batch 1 and 3 with ragged prompts, budgets 0/1/7/24, EOS honoured; sampling is
  reproducible; other models fall back to the torch engine with a warning.
"""
from __future__ import annotations

import functools
import warnings
from typing import Any

import numpy as np
import pytest
import torch

import decograph
from decograph.backends import BackendFallbackWarning, get_backend, registry
from decograph.cli import main
from decograph.errors import UnsupportedError
from decograph.models.adapters import HFCausalLM
from decograph.ir.builder import Builder
from decograph.models.oracle import OracleLM
from decograph.models.tiny import tiny_llama, word_tokenizer
from decograph.runtime.branches import Branch
from decograph.runtime.interp import RunConfig
from decograph.runtime.protocol import StepPlan
from decograph.runtime.rows import DraftTree, Row

from decograph_example_backend import NumpyBackend
from decograph_example_backend.engine import NumpyBatch
from decograph_example_backend.llama import LlamaWeights, RowCache, Segment, run

torch.set_num_threads(1)

LOSSLESS = ("greedy", "ngram", "anpd", "jacobi", "gs_jacobi", "lookahead")
PROMPTS = [[1, 5, 9, 5, 9, 5, 9, 5], [3], [3, 4, 3, 4, 3, 4, 12, 7, 3, 4, 3]]
# gqa: decograph's tiny Llama; mqa_bias: one KV head, q/k/v/o and MLP biases, head_dim 16 (q
# wider than the hidden size), three layers; mha_tied: tied embeddings, rope_theta 5e5.
CONFIGS = {
    "gqa": {},
    "mqa_bias": dict(num_attention_heads=4, num_key_value_heads=1, head_dim=16, attention_bias=True,
                     mlp_bias=True, num_hidden_layers=3),
    "mha_tied": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True, rope_theta=5e5),
}


@functools.lru_cache(maxsize=None)
def model(kind: str) -> Any:
    """A tiny random Llama of ``CONFIGS[kind]``, deterministic, float32, eval mode."""
    if kind == "gqa":
        return tiny_llama()
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, max_position_embeddings=512,
              initializer_range=0.2, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    cfg = LlamaConfig(**{**kw, **CONFIGS[kind]})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        m = LlamaForCausalLM(cfg).to(torch.float32).eval()
        if cfg.attention_bias:           # biases start at zero: make them count
            with torch.no_grad():
                for name, p in m.named_parameters():
                    if name.endswith("bias"):
                        p.normal_(0, 0.2)
    return m


def torch_logits(m: Any, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return m(input_ids=torch.tensor([ids])).logits[0].float().numpy()


def tokens(results: list[Any]) -> list[list[int]]:
    return [r.new_token_ids for r in results]


# ----------------------------------------------------------------------------- discovery


def test_found_through_its_entry_point_and_listed(capsys: pytest.CaptureFixture[str]) -> None:
    reg = registry(refresh=True)
    assert reg.origin["numpy_example"] == "plugin from decograph-example-backend", \
        "pip install --no-deps -e tests/plugin_example (CI does)"
    backend = get_backend("numpy_example")
    assert isinstance(backend, NumpyBackend) and {"forward", "verify.greedy", "verify.sampling"} <= backend.ops
    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    assert f"numpy_example  {NumpyBackend.description}" in out and "plugin from decograph-example-backend" in out


# ----------------------------------------------------------------------------- the forward


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_logits_equal_the_torch_models(kind: str) -> None:
    m = model(kind)
    w = LlamaWeights.from_model(m)
    ids = [1, 5, 9, 5, 9, 5, 9, 5, 40, 2, 63, 0, 17]
    cache = RowCache.empty(w, capacity=4)            # grown during the forward
    hidden = run(w, np.array(ids), np.arange(len(ids)), [Segment(0, len(ids), cache, np.tri(len(ids), dtype=bool))])
    np.testing.assert_allclose(w.logits(hidden), torch_logits(m, ids), atol=1e-4, rtol=0)


def test_scaled_rotary_embeddings_are_refused_by_name() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, rope_scaling={"rope_type": "linear", "factor": 2.0})
    with pytest.raises(UnsupportedError, match="rope_scaling=.*linear"):
        decograph.generate(LlamaForCausalLM(cfg).eval(), None, [[1, 2]], "greedy", 2, backend="numpy_example")


def test_other_models_run_on_the_torch_engine_with_a_warning() -> None:
    oracle = OracleLM(vocab_size=32, period=3)
    ref = decograph.generate(oracle, None, [[3, 1, 4]], "anpd", 12)
    with pytest.warns(BackendFallbackWarning, match="forwards Llama causal LMs; .* runs on the torch reference"):
        out = decograph.generate(oracle, None, [[3, 1, 4]], "anpd", 12, backend="numpy_example")
    assert tokens(out) == tokens(ref)


# ----------------------------------------------------------------------------- the protocol calls


def _fresh_cache(w: LlamaWeights, toks: list[int]) -> RowCache:
    """The cache a prefill of ``toks`` (all of them) gives."""
    batch = NumpyBatch(w, [Row(0, list(toks) + [0], len(toks) + 1, 1)])
    batch.prefill()
    return batch.caches[0]


def _assert_cache_is(w: LlamaWeights, cache: RowCache, toks: list[int]) -> None:
    fresh = _fresh_cache(w, toks)
    assert cache.length == len(toks)
    for got, want in zip(cache.k + cache.v, fresh.k + fresh.v):
        np.testing.assert_allclose(got[:, :len(toks)], want[:, :len(toks)], atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_prefill_forward_commit_settle_fork_join(kind: str) -> None:
    m = model(kind)
    batch = NumpyBackend().engine(HFCausalLM(m), RunConfig()).start(
        [Row(0, [3, 1, 4, 1, 5], 5, 9), Row(1, [9], 1, 9), Row(2, [2, 7, 1, 8], 4, 9), Row(3, [6, 6], 2, 0, done=True)])
    rows = list(batch.rows)
    batch.prefill()
    assert len(batch.active) == 3
    assert [r.cached for r in rows[:3]] == [4, 0, 3] and [r.prefill_forwards for r in rows[:3]] == [1, 0, 1]
    # Row 0: a trie of the chains 6 6 2 and 6 3 (node 1 and node 3 both under node 0); row 1:
    # nothing drafted; row 2: one node.
    chains = [[[6, 6, 2], [6, 3]], [], [[5]]]
    trees = [DraftTree() for _ in chains]
    nodes = [[t.add_chain(c) for c in cs] for t, cs in zip(trees, chains)]
    assert nodes[0] == [[0, 1, 2], [0, 3]]
    out = batch.forward(StepPlan("tree", "sequence", trees, chains, nodes))
    for b, (row, tree) in enumerate(zip(rows, trees)):
        want = [torch_logits(m, row.tokens)[-1]]
        for i in range(len(tree)):
            path, at = [], i
            while at >= 0:
                path, at = [tree.tokens[at]] + path, tree.parent[at]
            want.append(torch_logits(m, row.tokens + path)[-1])
        np.testing.assert_allclose(out.logits(b), np.array(want), atol=1e-4, rtol=0)
        assert out.argmax(b) == np.array(want).argmax(-1).tolist()
    # Commit as the runtime does: row 0 keeps 6 3 (nodes 0, 3: slots move), row 2 its node.
    paths = [[0, 3], [], [0]]
    batch.commit(out, paths, keep_nodes=True)
    for row, tree, path in zip(rows, trees, paths):
        row.cached += len(row.pending) + len(path)
        row.tokens += [tree.tokens[i] for i in path] + [11]
    for row, cache in zip(batch.active, batch.caches):
        _assert_cache_is(batch.w, cache, row.tokens[:row.cached])
    assert rows[0].kv_bytes_copied > 0 and rows[2].kv_bytes_copied == 0
    rows[1].done = True
    batch.settle()
    assert batch.active == [rows[0], rows[2]] and len(batch.caches) == 2
    # Fork: row 0 into two branch rows, row 2 into one; a branch's cache is a copy of its parent's.
    branches = [[Row(0, rows[0].tokens + [7], 8, 4, cached=rows[0].cached, branch=i, parent=rows[0]) for i in range(2)],
                [Row(2, rows[2].tokens + [8, 9], 8, 4, cached=rows[2].cached, branch=0, parent=rows[2])]]
    parent_caches = list(batch.caches)
    batch.fork(branches)
    assert batch.forked and batch.active == [*branches[0], *branches[1]]
    assert all(c.k[0] is not parent_caches[0].k[0] for c in batch.caches)
    out = batch.forward(StepPlan("causal", "sequence", [DraftTree() for _ in batch.active], [[]] * 3, [[]] * 3))
    for b, row in enumerate(batch.active):
        np.testing.assert_allclose(out.logits(b)[0], torch_logits(m, row.tokens)[-1], atol=1e-4, rtol=0)
    assert batch.join() == branches and not batch.forked
    assert batch.caches == parent_caches and rows[0].forwards == 3 and rows[2].forwards == 3


# ----------------------------------------------------------------------------- whole runs


@pytest.mark.parametrize("kind", sorted(CONFIGS))
@pytest.mark.parametrize("strategy", LOSSLESS)
def test_lossless_strategies_give_the_torch_backends_tokens(kind: str, strategy: str) -> None:
    m = model(kind)
    for prompts in (PROMPTS[:1], PROMPTS):
        for n in (0, 1, 7, 24):
            ref = decograph.generate(m, None, prompts, strategy, n, eos_token_id=[])
            out = decograph.generate(m, None, prompts, strategy, n, eos_token_id=[], backend="numpy_example")
            assert tokens(out) == tokens(ref), (prompts, n)
            assert [len(t) for t in tokens(out)] == [n] * len(prompts)
    # EOS: a token greedy produces on row 2 (and maybe earlier on the others) ends each row there.
    [_, _, ref_row] = tokens(decograph.generate(m, None, PROMPTS, "greedy", 24, eos_token_id=[]))
    eos = ref_row[5]
    ref = decograph.generate(m, None, PROMPTS, strategy, 24, eos_token_id=eos)
    out = decograph.generate(m, None, PROMPTS, strategy, 24, eos_token_id=eos, backend="numpy_example")
    assert tokens(out) == tokens(ref)
    assert out[2].new_token_ids[-1] == eos and out[2].stats.finish_reason == "eos"
    assert [r.stats.forward_passes for r in out] == [r.stats.forward_passes for r in ref]


def _provider(row: Any) -> list[Branch]:
    """Branch prompts that differ per row: three, none, four."""
    ids = {0: [[1], [2, 3], [4, 4, 4]], 1: [], 2: [[5], [6, 2], [7], [8, 8]]}[row.index]
    return [Branch(f"b{i}", tuple(x), {"i": i}) for i, x in enumerate(ids)]


def _fork_program(mask: str, layout: str, rule: str, draft: str) -> Any:
    """prefill; fork (the provider's branches, 9 tokens each); iterate {draft?; forward;
    verify.greedy; commit}; join(rule); then greedy for the rest; emit."""
    b = Builder("fork_test")
    s = b.prefill()
    fk = b.fork(s, b.draft("branches", s, provider="test", max_tokens=9))
    with b.iterate(fk) as loop:
        st = loop.state
        drafts = (b.draft(draft, st, k=4),) if draft else ()
        logits = b.forward(st, *drafts, mask=mask, layout=layout)
        loop.next(b.commit(st, b.verify("greedy", st, logits, *drafts), kv="keep_accepted"))
    out = b.join(loop.result, rule=rule)
    with b.iterate(out) as loop2:
        st = loop2.state
        loop2.next(b.commit(st, b.verify("greedy", st, b.forward(st)), kv="keep_accepted"))
    b.emit(loop2.result)
    return b.build()


@pytest.mark.parametrize("mask,layout,rule,draft", [("causal", "sequence", "collect", ""),
                                                    ("packed", "sequence", "concat", "ngram"),
                                                    ("packed", "batch", "collect", "adaptive_ngram")])
def test_fork_join_gives_the_torch_backends_tokens(mask: str, layout: str, rule: str, draft: str) -> None:
    m = model("gqa")
    program = _fork_program(mask, layout, rule, draft)
    for n in (0, 1, 7, 30):
        ref = decograph.generate(m, None, [[3, 1, 4, 1, 5], [2, 7], [9, 2, 6, 5, 3, 5, 8]], program, n,
                                 eos_token_id=[], branch_providers={"test": _provider})
        out = decograph.generate(m, None, [[3, 1, 4, 1, 5], [2, 7], [9, 2, 6, 5, 3, 5, 8]], program, n,
                                 eos_token_id=[], branch_providers={"test": _provider}, backend="numpy_example")
        assert tokens(out) == tokens(ref), n
        got = [[(b.tokens, b.finish_reason) for b in r.branches[0]] for r in out if r.branches]
        assert got == [[(b.tokens, b.finish_reason) for b in r.branches[0]] for r in ref if r.branches]
        for r, w in zip(out, ref):
            for b, want in zip(r.branches[0] if r.branches else [], w.branches[0] if w.branches else []):
                assert b.logprob == pytest.approx(want.logprob, abs=1e-3)


def test_parallel_reasoning_gives_the_torch_backends_tokens() -> None:
    """The built-in fork strategy with a word tokenizer: its text is one line, so with the
    delimiter ``t`` every row forks one branch (the whole text), then joins and goes on."""
    m, tok = model("gqa"), word_tokenizer()
    prompts = ["t3 t1 t4 t1 t5", "t2 t7", "t9 t2 t6 t5 t3 t5 t8 t9 t7"]
    kw = dict(overrides={"delimiter": "t", "branch_tokens": 6, "conclusion_steps": 4}, eos_token_id=[])
    ref = decograph.generate(m, tok, prompts, "parallel_reasoning", 20, **kw)
    out = decograph.generate(m, tok, prompts, "parallel_reasoning", 20, backend="numpy_example", **kw)
    assert tokens(out) == tokens(ref) and all(len(t) > 6 for t in tokens(out))


def test_sampling_runs_and_is_reproducible() -> None:
    m = model("mha_tied")
    for strategy in ("greedy", "anpd", "lookahead"):
        runs = [tokens(decograph.generate(m, None, PROMPTS, strategy, 16, do_sample=True, seed=0, eos_token_id=[],
                                          backend="numpy_example")) for _ in range(2)]
        assert runs[0] == runs[1] and [len(t) for t in runs[0]] == [16] * 3
        assert all(0 <= t < 64 for row in runs[0] for t in row)
    with warnings.catch_warnings():
        warnings.simplefilter("error", BackendFallbackWarning)     # nothing falls back on a Llama
        other = decograph.generate(m, None, PROMPTS, "anpd", 16, do_sample=True, seed=1, eos_token_id=[],
                                   backend="numpy_example")
    assert [len(t) for t in tokens(other)] == [16] * 3
