"""Prompts as the runtime takes them, and stop strings.

    encode_prompts(["Hi."], tok, chat=True)                      # text, through the chat template
    encode_prompts(torch.tensor([[0, 0, 5, 6], [7, 8, 9, 4]]), tok, False,
                   attention_mask=torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]]))   # [[5, 6], [7, 8, 9, 4]]

``attention_mask`` drops padding the way a Hugging Face batch carries it (left or right), so
every row decodes as if alone. ``StopStrings`` applies transformers' own ``StopStringCriteria``
to each row as its tokens commit, so a row ends exactly where ``generate(stop_strings=...)``
ends it: after the token that completes a stop string.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from decograph.errors import InputError
from decograph.ir import ops as O
from decograph.runtime import Admission, Event, Interpreter
from decograph.text import check_utf8

__all__ = ["StopStrings", "Stopper", "encode_prompts"]


def encode_prompts(prompts: Any, tokenizer: Any, chat: bool, attention_mask: Any = None) -> list[list[int]]:
    """Token-id lists, one per prompt. ``prompts``: a string, a list of strings, a token-id list,
    a list of them, or a 1-D/2-D tensor; with ``attention_mask`` (same shape as the ids), the
    positions it marks 0 are dropped (left or right padding only). ``InputError`` names the
    argument or the prompt at fault."""
    if attention_mask is not None:
        return _unpad(prompts, attention_mask)
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() not in (1, 2):
            raise InputError(f"input_ids must be 1-D (one prompt) or 2-D (a batch), got shape {tuple(prompts.shape)}")
        prompts = prompts.tolist()      # first: a 1-D tensor is one prompt, a 2-D tensor a batch
    if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    out: list[list[int]] = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            p = check_utf8(p, f"prompt {i}")        # a lone surrogate would fail inside the tokenizer
            if tokenizer is None:
                raise InputError(f"prompt {i} is text but no tokenizer was given; pass tokenizer= or token ids")
            if chat:
                ids = tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                    tokenize=True)
                ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
            else:
                ids = tokenizer(p)["input_ids"]
            p = list(ids)
        p = [int(t) for t in p]
        if not p:
            raise InputError(f"prompt {i} is empty: give at least one token")
        out.append(p)
    if not out:
        raise InputError("no prompts given")
    return out


def _matrix(value: Any, name: str) -> list[list[int]]:
    """``value`` (a tensor, an array or nested lists of numbers) as rows; one row if 1-D."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise InputError(f"{name} must be token ids (a 1-D or 2-D tensor or list) with attention_mask, "
                         f"got {type(value).__name__}")
    rows = [value] if value and not isinstance(value[0], Sequence) else list(value)
    if not rows:
        raise InputError(f"{name} is empty: give at least one prompt")
    for i, row in enumerate(rows):
        if isinstance(row, (str, bytes)) or not isinstance(row, Sequence) or \
                any(isinstance(v, (str, bytes, Sequence)) for v in row):
            raise InputError(f"{name} must be 1-D or 2-D numbers; row {i} is not a list of numbers")
        if len(row) != len(rows[0]):
            raise InputError(f"{name} is ragged (row 0 has {len(rows[0])} entries, row {i} {len(row)}): "
                             "pad it to a rectangle, as a tokenizer with padding=True does")
    return rows


def _unpad(input_ids: Any, attention_mask: Any) -> list[list[int]]:
    ids, mask = _matrix(input_ids, "input_ids"), _matrix(attention_mask, "attention_mask")
    if (len(ids), len(ids[0])) != (len(mask), len(mask[0])):
        raise InputError(f"attention_mask has shape {(len(mask), len(mask[0]))} but input_ids "
                         f"{(len(ids), len(ids[0]))}: they must match")
    out = []
    for i, (row, m) in enumerate(zip(ids, mask)):
        if any(v not in (0, 1) for v in m):
            raise InputError(f"attention_mask row {i} holds values other than 0 and 1")
        kept = [j for j, v in enumerate(m) if v]
        if not kept:
            raise InputError(f"attention_mask row {i} masks every position: prompt {i} is empty")
        if kept[-1] - kept[0] + 1 != len(kept):
            raise InputError(f"attention_mask row {i} has padding between tokens; only left or right padding "
                             "is supported")
        out.append([int(row[j]) for j in kept])
    return out


class StopStrings:
    """Where each row's stop string ends. ``check(row, new, start)`` looks at the tokens
    ``new[start:]`` just committed to ``row`` (``new``: all its new tokens so far) and returns
    how many new tokens to keep (up to and including the token completing a stop string), or
    None. A row that stopped is in ``cut`` (row -> tokens kept)."""

    def __init__(self, tokenizer: Any, stop_strings: str | Sequence[str], prompts: list[list[int]]) -> None:
        from transformers.generation.stopping_criteria import StopStringCriteria

        strings = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings)
        bad = [s for s in strings if not isinstance(s, str) or not s]
        if bad:
            raise InputError(f"stop_strings must be non-empty strings, got {bad[0]!r}")
        if tokenizer is None:
            raise InputError("stop_strings need the model's tokenizer: pass tokenizer=")
        self.criteria = StopStringCriteria(tokenizer, strings)
        self.prompts = prompts
        self.cut: dict[int, int] = {}

    def check(self, row: int, new: list[int], start: int) -> int | None:
        if row in self.cut:
            return self.cut[row]
        prompt = self.prompts[row]
        for n in range(start + 1, len(new) + 1):
            # The criteria reads only the tail, so a bounded window keeps each call cheap.
            seq = (prompt + new[:n])[-(self.criteria.maximum_token_len + 2):]
            if bool(self.criteria(torch.tensor([seq]), None)[0]):
                self.cut[row] = n
                return n
        return None


class Stopper:
    """Ends rows at their stop strings (``StopStrings``): ``filter(event)`` gives the event's
    tokens up to the stop. A causal program without forks also cancels a stopped row at the
    next step boundary (the runtime's continuous-batching cancel), so it decodes no further;
    ``rows`` then keeps every row, as the runtime forgets finished ones."""

    def __init__(self, interp: Interpreter, stops: StopStrings) -> None:
        if interp.unmask is not None:
            raise InputError("stop_strings: unmask strategies fill blocks out of order; use them with causal LMs")
        self.interp, self.stops = interp, stops
        self.rows: list[Any] | None = None
        self.pending: list[int] = []
        self.new: dict[int, list[int]] = {}
        if not any(isinstance(op, O.Fork) for op in interp.program.walk()):
            interp.cfg.admit = self._admit

    def _admit(self, idle: bool) -> Any:
        if self.rows is None:
            assert self.interp.state is not None
            self.rows = list(self.interp.state.rows)
        cancel, self.pending = self.pending, []
        return Admission(cancel=cancel)

    def filter(self, event: Event) -> tuple[int, ...]:
        new = self.new.setdefault(event.row, [])
        start = len(new)
        new.extend(event.tokens)
        if event.row in self.stops.cut:
            return ()
        n = self.stops.check(event.row, new, start)
        if n is None:
            return event.tokens
        self.pending.append(event.row)
        return tuple(new[start:n])
