"""Shared helpers of the torch-reference runtime tests (models, references, Builder programs).

Imported by the ``test_runtime_*.py`` files next to it (pytest puts this folder on sys.path).
"""
from __future__ import annotations

import functools
from typing import Any

import torch

from decograph.models.adapters import CausalLMAdapter
from decograph.ir.builder import Builder
from decograph.models.oracle import OracleLM
from decograph.models.tiny import tiny_llama

# One intra-op thread: tiny models gain nothing from more, and on a busy 2-core machine the
# OpenMP barrier of every op waited for a descheduled worker (~15 ms per op instead of ~10 us).
torch.set_num_threads(1)

BUILTINS = ("greedy", "jacobi", "gs_jacobi", "ngram", "anpd", "lookahead")
DRAFTING = tuple(s for s in BUILTINS if s != "greedy")
TINY_VOCAB = 64


# ----------------------------------------------------------------------------- programs


def draft_program(source: str, *, kv: str = "keep_accepted", max_steps: int = 0, **attrs: Any):
    """prefill; iterate { draft.<source>(**attrs); forward; verify.greedy; commit(kv) }; emit."""
    b = Builder(f"test_{source}")
    s = b.prefill()
    with b.iterate(s, max_steps=max_steps) as loop:
        d = b.draft(source, loop.state, **attrs)
        logits = b.forward(loop.state, d)
        acc = b.verify("greedy", loop.state, logits, d)
        loop.next(b.commit(loop.state, acc, kv=kv))
    b.emit(loop.result)
    return b.build()


def greedy_program(*, kv: str = "keep_accepted", max_steps: int = 0):
    b = Builder("test_greedy")
    s = b.prefill()
    with b.iterate(s, max_steps=max_steps) as loop:
        logits = b.forward(loop.state)
        acc = b.verify("greedy", loop.state, logits)
        loop.next(b.commit(loop.state, acc, kv=kv))
    b.emit(loop.result)
    return b.build()


def lookahead_program(window: int = 4, n: int = 4, candidates: int = 3, *, kv: str = "keep_accepted",
                      max_steps: int = 0):
    """Jacobi window + n-gram pool in one tree-masked forward (the built-in lookahead, tunable)."""
    b = Builder("test_lookahead")
    s = b.prefill()
    with b.iterate(s, max_steps=max_steps) as loop:
        guess = b.draft("jacobi", loop.state, window=window)
        pool = b.draft("ngram_pool", loop.state, n=n, candidates=candidates)
        logits = b.forward(loop.state, guess, pool, mask="tree")
        acc = b.verify("greedy", loop.state, logits, guess, pool)
        loop.next(b.commit(loop.state, acc, kv=kv))
    b.emit(loop.result)
    return b.build()


def model_draft_program(k: int, **kw: Any):
    return draft_program("model", k=k, model="draft", **kw)


# ----------------------------------------------------------------------------- models


@functools.lru_cache(maxsize=None)
def tiny(seed: int = 0, vocab: int = TINY_VOCAB, **kw: Any):
    """A cached tiny random Llama (deterministic for its arguments)."""
    return tiny_llama(vocab_size=vocab, seed=seed, **kw)


@functools.lru_cache(maxsize=None)
def _hf_greedy(seed: int, vocab: int, prompt: tuple[int, ...], n: int, eos: Any) -> tuple[int, ...]:
    model = tiny(seed, vocab)
    if n == 0:
        return ()
    with torch.no_grad():
        out = model.generate(
            torch.tensor([list(prompt)]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False, max_new_tokens=n, pad_token_id=0,
            eos_token_id=list(eos) if isinstance(eos, tuple) else eos,
        )
    return tuple(out[0, len(prompt):].tolist())


def hf_greedy(prompt: list[int], n: int, *, seed: int = 0, vocab: int = TINY_VOCAB, eos: Any = None) -> list[int]:
    """Hugging Face ``generate(do_sample=False)`` on ``tiny(seed, vocab)``, batch 1: the new tokens."""
    key = tuple(eos) if isinstance(eos, (list, tuple)) else eos
    return list(_hf_greedy(seed, vocab, tuple(prompt), n, key))


def oracle_ref(oracle: OracleLM, prompt: list[int], n: int, eos: Any = ()) -> list[int]:
    """The oracle's greedy continuation, cut at (and including) the first token of ``eos``."""
    out = oracle.reference(prompt, n, stop_at_eos=False)
    eos = set(eos) if isinstance(eos, (list, tuple, set)) else {eos}
    for i, t in enumerate(out):
        if t in eos:
            return out[: i + 1]
    return out


def first_new_at(ref: list[int], lo: int = 1) -> int:
    """The first index j >= lo whose token does not occur earlier in ``ref`` (a usable EOS)."""
    for j in range(lo, len(ref)):
        if ref[j] not in ref[:j]:
            return j
    raise AssertionError(f"no fresh token after index {lo} in {ref}")


class ShiftedOracle(OracleLM):
    """An oracle whose greedy token is always the true oracle's plus one: a draft model that is
    always wrong (every draft rejected at its first token) when drafting for ``OracleLM``."""

    def forward(self, cache, input_ids, position_ids, attend):  # type: ignore[override]
        return super().forward(cache, input_ids, position_ids, attend).roll(1, dims=-1)


class SuccessorLM(CausalLMAdapter):
    """A cheap weightless draft model: greedy next token = (current token + 1) % vocab."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def new_cache(self, batch_size: int) -> list[int]:
        return [batch_size, 0]

    def forward(self, cache, input_ids, position_ids, attend):  # type: ignore[override]
        cache[1] += input_ids.shape[1]
        nxt = (input_ids.long() + 1) % self.vocab_size
        return torch.nn.functional.one_hot(nxt, self.vocab_size).float() * 5.0

    def cache_len(self, cache) -> int:  # type: ignore[override]
        return cache[1]

    def truncate(self, cache, length: int) -> None:  # type: ignore[override]
        cache[1] = min(cache[1], length)

    def select_rows(self, cache, rows) -> None:  # type: ignore[override]
        cache[0] = len(rows)

    def gather_slots(self, cache, slots) -> None:  # type: ignore[override]
        cache[1] = slots.shape[1]


def expected_accepts_all(budget: int, k: int) -> list[int]:
    """accepted_per_step when every draft of size min(k, remaining - 1) is accepted."""
    out, rem = [], budget
    while rem > 0:
        a = min(k, rem - 1)
        out.append(a)
        rem -= a + 1
    return out
