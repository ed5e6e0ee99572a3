"""``OracleLM``: a weightless, exactly predictable causal LM for testing decoding runtimes.

The oracle implements ``CausalLMAdapter`` to the letter (slots, explicit positions, explicit
``attend`` masks) but its "network" is a fixed rule, so a test knows the right answer without
running a reference model, and any mask, position or cache bug in the runtime shows up as a
wrong token instead of a 1e-6 logit drift.

The rule, for a query at position ``p``. Its *visible set* is every cached slot and every new
token it may attend to. Write ``x[q]`` for the token of the visible slot at position ``q``.

1. Consistency check. The visible positions, as a multiset, must be exactly ``{0, 1, ..., p}``
   (one slot per position, the query's own included). Otherwise the query predicts the
   *mismatch token* ``V - 1``, which the rule below never produces: a missing, extra,
   duplicated or mis-positioned slot therefore always changes the output.
2. Otherwise the text is cut into words of ``period`` tokens (positions ``k*period`` to
   ``k*period + period - 1``). Let ``c = (p + 1) % period``, the offset of the predicted token
   inside its word, ``a = x[p]``, ``b = x[p - 1]`` (0 when ``p == 0``) and ``V' = V - 1``:

   - word start (``c == 0``): ``next = (a*a + 2*b + 1) % V'``, depending on the order of the
     last two tokens;
   - inside a word (``c > 0``): ``next = (x[p + 1 - c] + c) % V'``, the word's first token
     plus the offset.

Why this shape: word starts make the continuation depend on the prompt, and the word-level
map falls into short cycles (8 to 12 tokens for ``V=32, period=4``), so n-gram drafting
finds repeats; inside a word the next token does not depend on the previous one, so Jacobi
iteration often fixes several tokens per step (about 2 on average for the defaults). The
price is that inside a word a wrong token at ``p`` goes unnoticed when the positions are
right; the consistency check catches every bug that changes the visible positions.

``period=1`` makes every position a word start (no Jacobi gains, fully order-sensitive).
Logits are ``confidence`` on the predicted token and 0 elsewhere, float32 [B, T, V].
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from decograph.errors import ModelError
from decograph.models.adapters import CausalLMAdapter

__all__ = ["OracleCache", "OracleLM"]


@dataclass
class OracleCache:
    """Per row and slot, the token id and position id the slot was written with ([B, S] each)."""

    tokens: torch.Tensor
    positions: torch.Tensor


class OracleLM(CausalLMAdapter):
    """The rule in the module docstring as an adapter; ``reference`` is its ground truth.

    Assumes token ids in ``[0, vocab_size)`` and position ids >= 0 (a negative position makes
    the query inconsistent, so it predicts the mismatch token). Guarantees: ``forward`` is
    deterministic and batch-independent (row ``b``'s logits depend only on row ``b``), and it
    follows the adapter contract (appends T slots; ``truncate``/``select_rows``/``gather_slots``
    edit the cache in place).
    """

    def __init__(
        self,
        vocab_size: int = 32,
        period: int = 4,
        eos_token_id: int | None = None,
        confidence: float = 10.0,
        max_positions: int | None = None,
    ) -> None:
        if vocab_size < 3:
            raise ModelError(f"OracleLM needs vocab_size >= 3, got {vocab_size}")
        if period < 1:
            raise ModelError(f"OracleLM needs period >= 1, got {period}")
        if eos_token_id is not None and not 0 <= eos_token_id < vocab_size - 1:
            raise ModelError(
                f"eos_token_id {eos_token_id} must be in [0, {vocab_size - 1}): "
                f"{vocab_size - 1} is the mismatch token"
            )
        self.vocab_size = vocab_size
        self.period = period
        self.confidence = confidence
        self.max_positions = max_positions
        self.eos_token_id = eos_token_id
        self.eos_token_ids = () if eos_token_id is None else (eos_token_id,)

    @property
    def mismatch_token(self) -> int:
        """The token predicted by a query whose visible positions are not ``0..p``."""
        return self.vocab_size - 1

    def next_token(self, tokens: Sequence[int]) -> int:
        """The rule applied to a whole sequence at positions ``0..len(tokens)-1`` (no cache)."""
        if not tokens:
            raise ModelError("the oracle needs at least one token to predict from")
        x = [int(t) for t in tokens]
        p, mod = len(x) - 1, self.vocab_size - 1
        c = (p + 1) % self.period
        if c == 0:
            b = x[p - 1] if p > 0 else 0
            return (x[p] * x[p] + 2 * b + 1) % mod
        return (x[p + 1 - c] + c) % mod

    def reference(self, prompt_ids: Sequence[int], n: int, stop_at_eos: bool = True) -> list[int]:
        """The greedy continuation of ``prompt_ids``: ``n`` new tokens, computed from the rule.

        Returns only the new tokens. With ``stop_at_eos`` the list ends at (and includes) the
        first end-of-sequence token, so it may be shorter than ``n``.
        """
        seq, out = [int(t) for t in prompt_ids], []
        for _ in range(n):
            nxt = self.next_token(seq)
            seq.append(nxt)
            out.append(nxt)
            if stop_at_eos and nxt in self.eos_token_ids:
                break
        return out

    def new_cache(self, batch_size: int) -> OracleCache:
        empty = torch.zeros(batch_size, 0, dtype=torch.long)
        return OracleCache(empty, empty.clone())

    def forward(
        self, cache: OracleCache, input_ids: torch.Tensor, position_ids: torch.Tensor, attend: torch.Tensor
    ) -> torch.Tensor:
        bsz, t = input_ids.shape
        past = self.cache_len(cache)
        if attend.shape != (bsz, t, past + t) or position_ids.shape != (bsz, t):
            raise ModelError(
                f"attend {tuple(attend.shape)} / position_ids {tuple(position_ids.shape)} do not match "
                f"input_ids {(bsz, t)} with {past} cached slots"
            )
        if cache.tokens.shape[0] != bsz:
            raise ModelError(f"cache has {cache.tokens.shape[0]} rows, input has {bsz}")
        if self.max_positions is not None and t and int(position_ids.max()) >= self.max_positions:
            raise ModelError(f"position {int(position_ids.max())} is past max_positions={self.max_positions}")
        tokens = torch.cat([cache.tokens, input_ids.long().cpu()], dim=1)
        positions = torch.cat([cache.positions, position_ids.long().cpu()], dim=1)
        nxt = self._predict(tokens, positions, attend.bool().cpu(), position_ids.long().cpu())
        cache.tokens, cache.positions = tokens, positions
        logits = torch.zeros(bsz, t, self.vocab_size, dtype=torch.float32)
        logits.scatter_(2, nxt[..., None], self.confidence)
        return logits.to(input_ids.device)

    def _predict(
        self, tokens: torch.Tensor, positions: torch.Tensor, attend: torch.Tensor, query_pos: torch.Tensor
    ) -> torch.Tensor:
        """The rule for every query at once: [B, T] next tokens.

        Works on a per-query table over positions: ``count[b, t, q]`` visible slots at position
        ``q`` and ``tok[b, t, q]`` their token sum (the token itself when the count is 1).
        """
        n_pos = int(max(positions.max().item() if positions.numel() else 0, 0)) + 2
        bad_slot = positions < 0  # a negative position can never be consistent
        onehot = torch.nn.functional.one_hot(positions.clamp(min=0), n_pos).double()  # [B, S, P]
        vis = attend.double()
        count = torch.einsum("bts,bsp->btp", vis, onehot)
        tok = torch.einsum("bts,bsp->btp", vis * tokens[:, None, :].double(), onehot).round().long()
        q = torch.arange(n_pos)
        p = query_pos.clamp(min=0)
        expected = (q[None, None, :] <= p[..., None]).double()
        ok = (count == expected).all(-1) & ~(attend & bad_slot[:, None, :]).any(-1) & (query_pos >= 0)

        def at(pos: torch.Tensor) -> torch.Tensor:
            return tok.gather(2, pos.clamp(min=0)[..., None])[..., 0]

        mod = self.vocab_size - 1
        c = (p + 1) % self.period
        a, b = at(p), torch.where(p > 0, at(p - 1), torch.zeros_like(p))
        start_rule = (a * a + 2 * b + 1) % mod
        word_rule = (at(p + 1 - c) + c) % mod
        nxt = torch.where(c == 0, start_rule, word_rule)
        return torch.where(ok, nxt, torch.full_like(nxt, self.mismatch_token))

    def cache_len(self, cache: OracleCache) -> int:
        return int(cache.tokens.shape[1])

    def truncate(self, cache: OracleCache, length: int) -> None:
        cache.tokens = cache.tokens[:, :length]
        cache.positions = cache.positions[:, :length]

    def select_rows(self, cache: OracleCache, rows: torch.Tensor) -> None:
        rows = rows.long().cpu()
        cache.tokens = cache.tokens.index_select(0, rows)
        cache.positions = cache.positions.index_select(0, rows)

    def gather_slots(self, cache: OracleCache, slots: torch.Tensor) -> None:
        slots = slots.long().cpu()
        cache.tokens = torch.gather(cache.tokens, 1, slots)
        cache.positions = torch.gather(cache.positions, 1, slots)
