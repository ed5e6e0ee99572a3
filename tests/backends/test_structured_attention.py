"""The structural mask the runtime hands an attention kernel is exactly the dense pattern the
reference forward uses, for every forward of every kind of step; and the Triton attention,
installed into an unchanged Hugging Face model, gives the reference's tokens on the real
default model."""
from __future__ import annotations

import warnings

import pytest
import torch

import decograph
from decograph.backends.torch_ref import kernels as R
from decograph.models.adapters import HFCausalLM
from decograph.models.tiny import tiny_llama


class _Check(HFCausalLM):
    """Runs the reference kernel through the attention hook and checks the structure."""

    def __init__(self, model) -> None:
        super().__init__(model, fast=False)
        self.checked = 0

    def forward(self, cache, input_ids, position_ids, attend, structure=None, attention=None, logits_to_keep=0):
        assert structure is not None and torch.equal(structure.dense(), attend)
        self.checked += 1
        return super().forward(cache, input_ids, position_ids, attend, structure, attention, logits_to_keep)


class _RefBackend(decograph.backends.Backend):
    name = "reference_attention"

    def kernels(self):
        return {"attention": R.tree_attention}


def _fork_program():
    from decograph.ir.builder import Builder

    b = Builder("fork_packed")
    s = b.prefill()
    fk = b.fork(s, b.draft("branches", s, provider="test", max_tokens=6))
    with b.iterate(fk) as loop:
        st = loop.state
        d = b.draft("ngram", st, k=3)
        loop.next(b.commit(st, b.verify("greedy", st, b.forward(st, d, mask="packed"), d), kv="keep_accepted"))
    b.emit(b.join(loop.result, rule="collect"))
    return b.build()


def _provider(row):
    from decograph.runtime.branches import Branch

    items = {0: [[1], [2, 3], [4, 4, 4]], 1: [], 2: [[5], [6, 2], [7], [8, 8]]}[row.index]
    return [Branch(f"b{i}", tuple(ids), {"i": i}) for i, ids in enumerate(items)]


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", decograph.backends.BackendFallbackWarning)   # verify: the reference
        yield


@pytest.mark.parametrize("strategy,passes", [("anpd", "default"), ("lookahead", "default"), ("lookahead", "none"),
                                             ("jacobi", "none"), ("fork", "none")])
def test_structure_equals_the_dense_pattern(strategy: str, passes: str) -> None:
    model = tiny_llama()
    adapter = _Check(model)
    prompts = [[3, 1, 4, 1, 5], [2, 7], [9, 2, 6, 5, 3, 5, 8]]
    kw = dict(eos_token_id=[], passes=passes)
    if strategy == "fork":            # packed branches: several segments per physical row, ragged
        program, kw["branch_providers"] = _fork_program(), {"test": _provider}
    else:
        program = strategy
    ref = decograph.generate(model, None, prompts, program, 12, **kw)
    out = decograph.generate(adapter, None, prompts, program, 12, backend=_RefBackend(), **kw)
    assert [r.new_token_ids for r in out] == [r.new_token_ids for r in ref]
    if strategy == "fork":
        assert [[b.tokens for b in r.branches[0]] for r in out] == [[b.tokens for b in r.branches[0]] for r in ref]
    assert adapter.checked > 3


@pytest.mark.real_model
def test_triton_backend_on_the_default_model_gives_the_reference_tokens() -> None:
    model, tok = decograph.load_default_model()
    prompts = ["Repeat exactly: red, green, blue, red, green, blue."]
    # the interpreter is slow (30 layers of interpreted attention per forward): one prompt, a
    # few tokens (batches are covered on the tiny model above)
    ref = decograph.generate(model, tok, prompts, "anpd", 5, chat=True)
    out = decograph.generate(model, tok, prompts, "anpd", 5, chat=True, backend="triton")
    assert [r.new_token_ids for r in out] == [r.new_token_ids for r in ref]


@pytest.mark.parametrize("strategy", ["ngram", "lookahead"])
def test_triton_kv_compact_runs_in_the_slot_cache_and_keeps_the_tokens(strategy: str, monkeypatch) -> None:
    """With the unoptimized rollback (``rollback=copy``, passes none) every step with rejected
    drafts compacts the slot cache: on the Triton backend through its ``kv.compact`` kernel, in
    place, with the reference's tokens for every row of a ragged batch."""
    pytest.importorskip("triton")
    from decograph.backends.triton import kernels as T

    calls, kernel = [], T.kv_compact

    def spy(cache, row, keep):
        calls.append(len(keep))
        return kernel(cache, row, keep)

    monkeypatch.setattr(T, "kv_compact", spy)
    model = tiny_llama()
    prompts = [[3, 1, 4, 1, 5, 3, 1, 4], [2, 7], [9, 2, 6, 5, 3, 5, 8, 9, 2]]
    kw = dict(eos_token_id=[], passes="none")
    ref = decograph.generate(model, None, prompts, strategy, 10, **kw)
    out = decograph.generate(model, None, prompts, strategy, 10, backend="triton", **kw)
    assert [r.new_token_ids for r in out] == [r.new_token_ids for r in ref]
    assert calls, "the slot cache never called the backend's kv.compact"
    assert sum(r.stats.kv_bytes_copied for r in out) == sum(r.stats.kv_bytes_copied for r in ref) > 0
