"""Draft heads (``draft.head``, ``decograph.runtime.heads``) on tiny random models: lossless
against Hugging Face greedy with random, all-accept and all-reject heads, batch 1 and > 1,
EOS and budgets; the calibrated node budget; n-gram and head drafts in one tree; the hidden
states the torch backend returns; the op's text form, verifier and strategy-file errors; and
the API's head binding and its missing-head error."""
from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import pytest
import torch

import decograph
from decograph.errors import ModelError, StrategyFileError, UnsupportedError, VerifyError
from decograph.frontends.strategies import load_strategy
from decograph.frontends.strategy_file import load_strategy_text
from decograph.heads.spec import WEIGHT_SHAPES, HeadConfig, HeadWeights, save_head
from decograph.heads.store import cached_head_path, model_fingerprint
from decograph.ir import parse_program, print_program, verify
from decograph.models.tiny import tiny_causal_lm, tiny_llama

pytestmark = pytest.mark.usefixtures("private_cache", "untimed_heads")

V, H, N_NEW, DEPTH = 64, 32, 24, 6
PROMPTS = [[3, 1, 4, 1, 5, 9, 2, 6, 5, 3], [7, 2, 7, 2, 8, 1], [11, 13, 17, 19, 23, 29, 31, 37, 41]]


def head_program(**attrs: Any) -> Any:
    """A strategy whose only draft is ``draft.head`` with ``attrs`` (YAML flow values)."""
    opts = "".join(f", {k}: {v}" for k, v in attrs.items())
    text = f"""strategy: head_test
description: "one draft head"
steps:
  - prefill
  - iterate:
      body:
        - draft: {{source: head{opts}}}
        - forward: {{mask: tree, dedup: true}}
        - verify: {{rule: greedy}}
        - commit: {{}}
"""
    return load_strategy_text(text, "head_test.yaml").program


def random_head(model: Any, seed: int = 0, **config: Any) -> Any:
    c = HeadConfig(hidden=H, heads=4, kv_heads=2, head_dim=8, intermediate=64, **config)
    rng = np.random.default_rng(seed)
    w = {k: rng.normal(0, 0.3, s).astype(np.float32) for k, s in WEIGHT_SHAPES(c).items()}
    for k in ("ln1.weight", "ln2.weight", "norm.weight"):
        w[k] = np.ones_like(w[k])
    return HeadWeights(c, w, rng.permutation(V)[:48].astype(np.int64))


def bound(model: Any, head: HeadWeights) -> Any:
    return head.bind(model.model.embed_tokens.weight.detach().numpy(), model.lm_head.weight.detach().numpy())


class OracleHead:
    """A head runner that knows each row's true continuation. Its keys encode (position,
    token) of every pair, so from the K/V the mask lets a query see it rebuilds the query's
    context, finds the reference sequence that context is a part of, and predicts the token
    after it (``wrong``: another token) with probability ~1. Features and logits: the
    predicted token in column 0, a one-hot of width 20 logits."""

    def __init__(self, sequences: list[list[int]], wrong: bool = False) -> None:
        self.sequences, self.wrong = sequences, wrong
        self.config = HeadConfig(hidden=H, heads=1, kv_heads=1, head_dim=2, intermediate=1)
        self.vocab_ids = np.arange(V, dtype=np.int64)
        self.calls: list[int] = []              # query rows per call

    def step(self, feats, tokens, positions, past_k, past_v, mask=None, logits_rows=0):
        q, P = len(tokens), len(past_k)
        assert feats.shape == (q, H) and past_k.shape[1:] == (1, 2) and past_v.shape == past_k.shape
        k = np.stack([positions.astype(np.float32), tokens.astype(np.float32)], -1)[:, None, :]
        if mask is None:
            mask = np.concatenate([np.ones((q, P), bool), np.tril(np.ones((q, q), bool))], 1)
        keys = np.concatenate([past_k, k])[:, 0]
        out = np.zeros((q, H), np.float32)
        for j in range(q):
            seen = {int(p) + 1: int(t) for p, t in keys[mask[j]]}        # pair i holds t_{i+1}
            nxt = int(positions[j]) + 2
            match = [s for s in self.sequences if len(s) > nxt and all(s[p] == t for p, t in seen.items())]
            tok = match[0][nxt] if match else 0
            out[j, 0] = (tok + 1) % V if self.wrong else tok
        self.calls.append(q)
        return out, k, np.zeros_like(k)

    def logits(self, feats):
        out = np.zeros((len(feats), V), np.float32)
        out[np.arange(len(feats)), feats[:, 0].astype(int)] = 20.0
        return out


@pytest.fixture(scope="module")
def model():
    return tiny_llama(vocab_size=V, hidden=H, seed=3, init_std=0.3)


@pytest.fixture(scope="module")
def refs(model, hf_greedy):
    """Each prompt's greedy continuation, DEPTH tokens past the budget (what an oracle head sees)."""
    return hf_greedy(model, PROMPTS, N_NEW + DEPTH + 2)


def run(model, prompts, program, n, heads, **kw):
    return decograph.generate(model, None, prompts, program, n, eos_token_id=kw.pop("eos", []),
                              draft_heads={"default": heads}, **kw)


def check_equal(model, refs, program, heads, **kw) -> list[Any]:
    """Batch 1 and the whole batch equal greedy; the batch's results."""
    for i, p in enumerate(PROMPTS[:2]):
        [r] = run(model, [p], program, N_NEW, heads, **kw)
        assert r.new_token_ids == refs[i][:N_NEW], ("batch 1", i)
    out = run(model, PROMPTS, program, N_NEW, heads, **kw)
    assert [r.new_token_ids for r in out] == [ref[:N_NEW] for ref in refs]
    return out


# ------------------------------------------------------------------------------ lossless


@pytest.mark.parametrize("nodes", [0, 10])
def test_random_head_is_lossless(model, refs, nodes) -> None:
    out = check_equal(model, refs, head_program(nodes=nodes), bound(model, random_head(model)))
    drafted = sum(sum(r.stats.drafted_per_step) for r in out)
    accepted = sum(sum(r.stats.accepted_per_step) for r in out)
    assert drafted > 0 and accepted < drafted / 4                # it drafts, and mostly wrong


def test_all_accept_head_takes_depth_plus_one_tokens_per_forward(model, refs) -> None:
    seqs = [p + r for p, r in zip(PROMPTS, refs)]
    out = check_equal(model, refs, head_program(depth=DEPTH), OracleHead(seqs))
    for r in out:
        a, d = r.stats.accepted_per_step, r.stats.drafted_per_step
        # every draft accepted, DEPTH deep, until the budget cuts the last ones
        assert all(x == min(DEPTH, N_NEW - 1 - i * (DEPTH + 1)) for i, x in enumerate(a)), a
        assert a == d and r.stats.decode_steps == math.ceil(N_NEW / (DEPTH + 1))
        assert r.stats.tokens_per_forward >= N_NEW / math.ceil(N_NEW / (DEPTH + 1))


def test_recomputed_accepted_tokens_feed_the_head_again(model, refs) -> None:
    """Without the passes the commit recomputes accepted drafts: they come back as pending
    tokens, whose hidden states the head has already; the head still drafts DEPTH deep."""
    seqs = [p + r for p, r in zip(PROMPTS, refs)]
    out = check_equal(model, refs, head_program(depth=DEPTH), OracleHead(seqs), passes="none")
    assert all(r.stats.accepted_per_step[:3] == (DEPTH,) * 3 for r in out)


def test_fixed_budget_tree_accepts_its_true_branch(model, refs) -> None:
    seqs = [p + r for p, r in zip(PROMPTS, refs)]
    out = check_equal(model, refs, head_program(nodes=20, topk=3, depth=4), OracleHead(seqs))
    for r in out:
        assert r.stats.accepted_per_step[0] == 4 and max(r.stats.drafted_per_step) <= 20


def test_all_reject_head_drafts_less_after_a_few_steps(model, refs) -> None:
    seqs = [p + r for p, r in zip(PROMPTS, refs)]
    head = OracleHead(seqs, wrong=True)
    out = check_equal(model, refs, head_program(), head)
    for r in out:
        d = r.stats.drafted_per_step
        assert r.stats.accepted_per_step == (0,) * N_NEW and r.stats.decode_steps == N_NEW
        # confident at first, then calibrated down (on the default curve a batch of 3 pays ~3% for a
        # node more: one node at the calibration's floor of ~4% still pays)
        assert d[0] >= DEPTH and max(d[8:]) <= 1, d
    [r] = run(model, [PROMPTS[0]], head_program(), N_NEW, OracleHead(seqs, wrong=True))
    assert r.stats.drafted_per_step[0] >= DEPTH and sum(r.stats.drafted_per_step[6:]) == 0, r.stats.drafted_per_step
    [r] = run(model, [PROMPTS[0]], head_program(nodes=5), N_NEW, OracleHead(seqs, wrong=True))
    assert set(r.stats.drafted_per_step[:-5]) == {5}             # a fixed budget stays fixed


class SlowHead:
    """A runner that takes ``delay`` seconds a call (a head dearer than the model's forward)."""

    def __init__(self, inner: Any, delay: float) -> None:
        self.inner, self.delay = inner, delay
        self.config, self.vocab_ids = inner.config, inner.vocab_ids

    def step(self, *a: Any, **k: Any) -> Any:
        time.sleep(self.delay)
        return self.inner.step(*a, **k)

    def logits(self, feats: Any) -> Any:
        time.sleep(self.delay)
        return self.inner.logits(feats)


def test_a_head_dearer_than_what_it_saves_is_skipped_and_tried_again(model, refs, monkeypatch) -> None:
    """The timed budget charges the head's own calls against the forward's measured time: a
    head whose calls take 40 ms beside a tiny model's ~1 ms forward does not pay even when it
    is always right, so rows skip it on most steps (trying it again now and then); the same
    head without the delay drafts every step. Lossless both ways."""
    from decograph.runtime.heads import HeadDraft

    monkeypatch.setattr(HeadDraft, "timed", True)
    seqs = [p + r for p, r in zip(PROMPTS, refs)]
    fast = run(model, [PROMPTS[0]], head_program(), N_NEW, OracleHead(seqs))[0]
    slow = run(model, [PROMPTS[0]], head_program(), N_NEW, SlowHead(OracleHead(seqs), 0.04))[0]
    assert fast.new_token_ids == refs[0][:N_NEW] and slow.new_token_ids == refs[0][:N_NEW]
    assert all(d > 0 for d in fast.stats.drafted_per_step[:-1]), fast.stats.drafted_per_step
    d = slow.stats.drafted_per_step
    skipped = sum(1 for x in d if x == 0)
    assert d[0] > 0 and skipped >= len(d) // 2 and any(x > 0 for x in d[2:]), d


@pytest.mark.parametrize("n", [0, 1, 2, DEPTH, DEPTH + 1, DEPTH + 2])
def test_budget_is_exact(model, refs, n) -> None:
    seqs = [p + r for p, r in zip(PROMPTS, refs)]
    out = run(model, PROMPTS, head_program(), n, OracleHead(seqs))
    assert [r.new_token_ids for r in out] == [ref[:n] for ref in refs]


def test_eos_inside_an_accepted_block_ends_there(model, refs) -> None:
    seqs = [p + r for p, r in zip(PROMPTS, refs)]
    eos = refs[0][4]                                             # inside the first accepted block
    want = [ref[: ref.index(eos) + 1] if eos in ref[:N_NEW] else ref[:N_NEW] for ref in refs]
    out = run(model, PROMPTS, head_program(), N_NEW, OracleHead(seqs), eos=eos)
    assert [r.new_token_ids for r in out] == want
    assert out[0].stats.finish_reason == "eos" and out[0].stats.decode_steps == 1


def test_eagle_anpd_mixes_ngram_and_head_nodes(model, refs) -> None:
    out = check_equal(model, refs, "eagle_anpd", bound(model, random_head(model, seed=1)), trace=True,
                      overrides={"nodes": 6})
    sources = {n for r in out for step in r.trace if step["kind"] == "step" for n in step["draft"]["source"]}
    assert {0, 2} <= sources                    # n-gram nodes (0) and head nodes (2; 1: the corpus, none here)
    seqs = [p + r for p, r in zip(PROMPTS, refs)]
    out = check_equal(model, refs, "eagle_anpd", OracleHead(seqs))
    assert all(r.stats.accepted_per_step[0] == DEPTH for r in out)


def test_gemma3_fast_path_and_hf_path_are_lossless(hf_greedy) -> None:
    from decograph.models.adapters import HFCausalLM

    gemma = tiny_causal_lm("gemma3", vocab_size=V, hidden=H, init_std=0.3)
    want = hf_greedy(gemma, PROMPTS, N_NEW)
    head = random_head(gemma, embed_scale=float(H) ** 0.5)
    emb = gemma.model.embed_tokens.weight.detach().numpy()
    runner = head.bind(emb, emb)
    for m in (gemma, HFCausalLM(gemma, fast=False)):
        out = run(m, PROMPTS, head_program(nodes=8), N_NEW, runner)
        assert [r.new_token_ids for r in out] == want


# ------------------------------------------------------------------------------ hidden states


def _hf_hidden(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0].numpy()


@pytest.mark.parametrize("family", ["llama", "llama-hf", "gemma3"])
@pytest.mark.parametrize("mask, layout", [("tree", "sequence"), ("tree", "batch"), ("causal", "sequence")])
def test_hidden_states_equal_hf(family, mask, layout) -> None:
    from decograph.backends.torch_ref.step import TorchEngine
    from decograph.models.adapters import HFCausalLM
    from decograph.runtime.protocol import StepPlan
    from decograph.runtime.rows import DraftTree, Row

    m = tiny_causal_lm("gemma3", vocab_size=V, hidden=H) if family == "gemma3" else tiny_llama(vocab_size=V, hidden=H)
    adapter = HFCausalLM(m, fast=family != "llama-hf")
    assert (adapter.fast is None) == (family != "llama") and (adapter.fast_masked is not None) == (family == "gemma3")
    rows = [Row(0, list(PROMPTS[0]), len(PROMPTS[0]), 8), Row(1, list(PROMPTS[1]), len(PROMPTS[1]), 8)]
    batch = TorchEngine(adapter).start(rows)
    batch.hidden_tail = 4
    batch.prefill()
    for r, p in zip(rows, PROMPTS):
        np.testing.assert_allclose(batch.prefill_hidden(r), _hf_hidden(m, p)[len(p) - 5 : len(p) - 1], atol=1e-4)
    chains = [[[5, 6, 7], [5, 8], [9]], [[1, 2]]]
    trees = [DraftTree(dedup=True), DraftTree(dedup=True)]
    nodes = [[t.add_chain(c) for c in cs] for t, cs in zip(trees, chains)]
    out = batch.forward(StepPlan(mask, layout, trees, chains, nodes, hidden=True))
    for b, (r, tree) in enumerate(zip(rows, trees)):
        got = out.hidden(b)
        assert got.shape == (1 + len(tree), H)
        np.testing.assert_allclose(got[0], _hf_hidden(m, r.tokens)[-1], atol=1e-4)          # the root
        for i in range(len(tree)):
            path, a = [], i
            while a >= 0:
                path, a = [tree.tokens[a]] + path, tree.parent[a]
            np.testing.assert_allclose(got[1 + i], _hf_hidden(m, r.tokens + path)[-1], atol=1e-4)


def test_hidden_states_are_not_computed_unless_asked(model) -> None:
    from decograph.backends.torch_ref.step import TorchEngine
    from decograph.models.adapters import HFCausalLM
    from decograph.runtime.protocol import StepPlan
    from decograph.runtime.rows import DraftTree, Row

    rows = [Row(0, list(PROMPTS[0]), len(PROMPTS[0]), 8)]
    batch = TorchEngine(HFCausalLM(model)).start(rows)
    batch.prefill()
    assert batch.prefill_hidden(rows[0]).size == 0
    out = batch.forward(StepPlan("causal", "sequence", [DraftTree()], [[]], [[]]))
    assert out.fwd.hidden is None
    with pytest.raises(UnsupportedError, match="hidden states"):
        out.hidden(0)


# ------------------------------------------------------------------------------ IR, files, errors


def test_ir_round_trip_and_types() -> None:
    p = verify(parse_program(print_program(head_program(nodes=0, depth=5, topk=4))))
    text = print_program(p)
    assert "draft.head(%2, depth=5, head=default, nodes=0, topk=4) : Tokens[B, N, 5]" in text
    assert "forward(%2, %3, dedup=true, layout=sequence, mask=tree) : Logits[B, 5*N + 1, V]" in text
    assert print_program(parse_program(text)) == text
    assert "Tokens[B, 12, 3]" in print_program(head_program(nodes=12, depth=3))
    assert "Tokens[B, 1, 6]" in print_program(head_program(topk=1))
    assert load_strategy("eagle").heads == ("default",) and load_strategy("anpd").heads == ()


@pytest.mark.parametrize("edit, msg", [
    ("depth=6", "field 'depth': 0 is out of range [1, 64]"),
    ("topk=8", "field 'topk': 65 is out of range [1, 64]"),
    ("nodes=0", "field 'nodes': 257 is out of range [0, 256]"),
    ("head=default", "field 'head': names no head"),
])
def test_verifier_errors(edit, msg) -> None:
    bad = {"depth=6": "depth=0", "topk=8": "topk=65", "nodes=0": "nodes=257", "head=default": 'head=" "'}[edit]
    text = print_program(head_program()).replace(edit, bad)      # attributes are checked before types
    with pytest.raises(VerifyError) as e:
        verify(parse_program(text))
    assert f"op `draft.head`, {msg}" in str(e.value)


@pytest.mark.parametrize("opts, where", [
    ("depth: 0", "draft.depth: 0 is out of range [1, 64]"),
    ("nodes: -1", "draft.nodes: -1 is out of range [0, 256]"),
    ("topk: two", "draft.topk: must be an integer, got 'two'"),
    ("head: 3", "draft.head: must be a string, got 3"),
    ("width: 3", "draft.width: unknown key 'width'; valid keys: as, depth, head, nodes, source, topk"),
])
def test_strategy_file_errors_name_the_field(opts, where) -> None:
    text = f"""strategy: bad
description: "x"
steps:
  - prefill
  - iterate:
      body:
        - draft: {{source: head, {opts}}}
        - forward: {{}}
        - verify: {{rule: greedy}}
        - commit: {{}}
"""
    with pytest.raises(StrategyFileError) as e:
        load_strategy_text(text, "bad.yaml")
    assert str(e.value).startswith(f"bad.yaml:7: steps[1].iterate.body[0].{where}")


def test_missing_head_names_the_model_and_train_draft(model, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.raises(ModelError) as e:
        decograph.generate(model, None, PROMPTS[:1], "eagle", 4)
    assert "no draft head for LlamaForCausalLM" in str(e.value) and "decograph train-draft" in str(e.value)
    with pytest.raises(ModelError, match="nowhere.npz: not a decograph draft head"):
        decograph.generate(model, None, PROMPTS[:1], "eagle", 4, overrides={"head": "nowhere.npz"})


def test_a_runtime_without_a_runner_names_the_op(model) -> None:
    from decograph.backends.torch_ref.interp import Interpreter
    from decograph.models.adapters import HFCausalLM
    from decograph.runtime import RunConfig

    with pytest.raises(UnsupportedError, match=r"draft.head\(head=default\) has no head runner.*train-draft"):
        Interpreter(head_program(), HFCausalLM(model), RunConfig())


def test_torch_head_equals_the_numpy_reference(model) -> None:
    from decograph.backends.torch_ref.head import TorchHead, bind_torch_head

    head = random_head(model, seed=4, embed_scale=1.5)
    ref, th = bound(model, head), bind_torch_head(head, model)
    assert isinstance(th, TorchHead) and (th.vocab_ids == ref.vocab_ids).all()
    rng = np.random.default_rng(0)
    q, P = 5, 7
    feats, tokens, pos = rng.normal(0, 1, (q, H)).astype(np.float32), rng.integers(0, V, q), np.arange(P, P + q)
    pk, pv = rng.normal(0, 1, (2, P, 2, 8)).astype(np.float32)
    mask = rng.random((q, P + q)) < 0.6
    mask[np.arange(q), P + np.arange(q)] = True
    for m in (None, mask):
        for a, b in zip(ref.step(feats, tokens, pos, pk, pv, m), th.step(feats, tokens, pos, pk, pv, m)):
            np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_allclose(ref.logits(feats), th.logits(feats), atol=1e-5)


def test_the_int8_torch_head_stays_near_the_float32_math(model, tmp_path) -> None:
    """What the API binds on torch: int8 weights, the same interface, close to float32 (drafts
    only; the outputs' exactness is the lossless tests' business)."""
    from decograph.api.heads import model_head
    from decograph.backends.torch_ref.head import bind_torch_head, int8_available
    from decograph.models.adapters import HFCausalLM

    head = random_head(model, seed=4, embed_scale=1.5)
    fp32, int8 = bind_torch_head(head, model), bind_torch_head(head, model, quant="int8")
    assert int8.quant == ("int8" if int8_available() else "none") and fp32.quant == "none" and not fp32.packed
    rng = np.random.default_rng(1)
    q, P = 6, 9
    feats, tokens, pos = rng.normal(0, 1, (q, H)).astype(np.float32), rng.integers(0, V, q), np.arange(P, P + q)
    pk, pv = rng.normal(0, 1, (2, P, 2, 8)).astype(np.float32)
    for a, b in zip(fp32.step(feats, tokens, pos, pk, pv), int8.step(feats, tokens, pos, pk, pv)):
        assert a.shape == b.shape and b.dtype == np.float32
        assert np.abs(a - b).max() <= 0.08 * np.abs(a).max(), np.abs(a - b).max()
    la, lb = fp32.logits(feats), int8.logits(feats)
    assert np.abs(la - lb).max() <= 0.05 * np.abs(la).max()
    assert (la.argmax(-1) == lb.argmax(-1)).mean() >= 0.8
    with pytest.raises(ValueError, match="float32 \\(none\\) or int8"):
        bind_torch_head(head, model, quant="int4")
    adapter = HFCausalLM(model)
    path = save_head(head, tmp_path / "h.npz")
    assert model_head(adapter, str(path)).quant == int8.quant            # the API binds the int8 runner


def test_the_api_binds_the_cached_and_a_named_head(model, refs, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    head = random_head(model, seed=2)
    fp = model_fingerprint(model.config, model.model.embed_tokens.weight.detach().numpy())
    save_head(head, cached_head_path(fp))                        # as train-draft leaves it
    for strategy, kw in (("eagle", {}), ("eagle_anpd", {"overrides": {"head": str(save_head(head, tmp_path / "h.npz"))}})):
        out = decograph.generate(model, None, PROMPTS, strategy, N_NEW, eos_token_id=[], **kw)
        assert [r.new_token_ids for r in out] == [ref[:N_NEW] for ref in refs]
    other = HeadWeights(head.config.__class__(**{**head.config.__dict__, "model": "0123456789ab"}), head.weights,
                        head.vocab_ids)
    with pytest.raises(ModelError, match="trained for another model"):
        decograph.generate(model, None, PROMPTS[:1], "eagle", 4,
                           overrides={"head": str(save_head(other, tmp_path / "other.npz"))})


def test_rows_joining_a_running_batch_get_their_tokens(model, refs) -> None:
    """Continuous batching: a row admitted into a running batch has no prefilled hidden
    states; its head starts from its first forward's and drafts from its second step on."""
    from decograph.api import Decoder
    from decograph.runtime import Admission, RunConfig

    seqs = [p + r for p, r in zip(PROMPTS, refs)]
    dec = Decoder(model, None, head_program(), draft_heads={"default": OracleHead(seqs)})
    waiting, got = list(range(len(PROMPTS))), {i: [] for i in range(len(PROMPTS))}

    def admit(idle: bool) -> Admission:         # one prompt joins at each step boundary
        return Admission(new=[(i, PROMPTS[i], N_NEW) for i in [waiting.pop(0)]]) if waiting else Admission()

    interp = dec.interpreter(RunConfig(admit=admit, trace=[]))
    interp.eos = set()
    for ev in interp.run([]):
        got[ev.row] += ev.tokens
    assert [got[i] for i in range(len(PROMPTS))] == [ref[:N_NEW] for ref in refs]
    for i in range(len(PROMPTS)):
        accepted = [len(t["accepted"]["nodes"]) for t in interp.cfg.trace if t["kind"] == "step" and t["row"] == i]
        assert accepted[0] == (DEPTH if i == 0 else 0) and accepted[1] == DEPTH, (i, accepted)


# ------------------------------------------------------------------------------ chain-only backends


@pytest.fixture
def chains_only(monkeypatch):
    """The torch engine verifying one chain a step, as ONNX Runtime's exact graphs need."""
    from decograph.backends.torch_ref.step import TorchEngine

    monkeypatch.setattr(TorchEngine, "chains_only", True)


def _chains(out: list[Any]) -> list[dict[str, Any]]:
    steps = [s for r in out for s in r.trace if s["kind"] == "step"]
    for s in steps:             # every step's tree is one chain: node i's parent is i - 1
        assert s["draft"]["parent"] == list(range(-1, len(s["draft"]["tokens"]) - 1)), s["draft"]
    return steps


def test_a_chain_only_engine_verifies_one_chain_of_the_most_expected_draft(model, refs, chains_only) -> None:
    """``Engine.chains_only``: each step verifies one chain per row, never a branching tree —
    the one its source expects to commit the most tokens (``DraftSource.expected``): the oracle
    head's DEPTH-long chain over the n-gram's shorter ones, all accepted; with random heads still
    lossless, the n-gram's and the head's chains each verified on some steps."""
    seqs = [p + r for p, r in zip(PROMPTS, refs)]
    out = check_equal(model, refs, "eagle_anpd", OracleHead(seqs), trace=True, overrides={"k": DEPTH - 2})
    steps = _chains(out)
    assert all(r.stats.accepted_per_step[0] == DEPTH for r in out)
    assert {tuple(s["draft"]["source"]) for s in steps if len(s["draft"]["tokens"]) == DEPTH} == {(2,) * DEPTH}
    out = check_equal(model, refs, "eagle_anpd", bound(model, random_head(model, seed=1)), trace=True,
                      overrides={"nodes": 6})
    sources = [set(s["draft"]["source"]) for s in _chains(out)]
    assert {0} in sources and {2} in sources            # n-gram chains (0) and head chains (2), never both
    out = check_equal(model, refs, head_program(topk=4), OracleHead(seqs), trace=True)
    _chains(out)
    assert all(r.stats.accepted_per_step[0] == DEPTH for r in out)   # the head's greedy path, DEPTH deep


def test_a_levels_top_children_are_each_rows_largest_scores_in_order():
    """``heads._top`` (k argmax passes) picks what a full stable sort picks: each row's k
    largest scores, largest first, ties to the smaller index."""
    from decograph.runtime.heads import _top

    rng = np.random.default_rng(0)
    scores = rng.integers(0, 40, size=(6, 300)).astype(np.float32)      # many ties
    for k in (1, 3, 8):
        want = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        assert np.array_equal(_top(scores, k), want), k
