"""A thin recorder that builds IR programs from Python (like onnx-ir's ``Tape``).

    b = Builder("ngram", "prompt lookup")
    s = b.prefill()
    with b.iterate(s) as loop:
        d = b.draft("ngram", loop.state, k=8)
        logits = b.forward(loop.state, d)
        a = b.verify("greedy", loop.state, logits, d)
        loop.next(b.commit(loop.state, a))
    b.emit(loop.result)
    program = b.build()          # verified
"""
from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from typing import Any, Iterator

from decograph.ir import ops as O
from decograph.ir.parser import PROMPT_TYPE
from decograph.ir.verify import verify

__all__ = ["Builder", "Loop"]


class Loop:
    """Handle of an ``iterate`` under construction: ``state`` is the loop-carried value."""

    def __init__(self, state: O.Value) -> None:
        self.state = state
        self.result: O.Value | None = None
        self._next: O.Value | None = None

    def next(self, value: O.Value) -> None:
        """Set the value the next iteration starts from (emits the ``yield``)."""
        self._next = value


class Builder:
    """Records ops into a program. Every method returns the op's (first) result value."""

    def __init__(self, name: str, description: str = "", **params: Any) -> None:
        self.name, self.description = name, description
        self.params = tuple(sorted(params.items()))
        self.prompt = O.Value(PROMPT_TYPE)
        self._blocks: list[list[O.Op]] = [[]]

    def _add(self, cls: type[O.Op], *operands: O.Value, **attrs: Any) -> O.Value:
        op = O.make(cls, *operands, **attrs)
        self._blocks[-1].append(op)
        return op.results[0] if op.results else None  # type: ignore[return-value]

    def prefill(self) -> O.Value:
        return self._add(O.Prefill, self.prompt)

    def draft(self, source: str, state: O.Value, **attrs: Any) -> O.Value:
        return self._add(O.op_class(f"draft.{source}"), state, **attrs)

    def forward(self, state: O.Value, *drafts: O.Value, mask: str = "causal", **attrs: Any) -> O.Value:
        return self._add(O.Forward, state, *drafts, mask=mask, **attrs)

    def verify(self, rule: str, state: O.Value, logits: O.Value, *drafts: O.Value, **attrs: Any) -> O.Value:
        return self._add(O.op_class(f"verify.{rule}"), state, logits, *drafts, **attrs)

    def unmask(self, rule: str, state: O.Value, logits: O.Value, **attrs: Any) -> O.Value:
        return self._add(O.op_class(f"unmask.{rule}"), state, logits, **attrs)

    def commit(self, state: O.Value, accepted: O.Value, kv: str = "recompute", **attrs: Any) -> O.Value:
        return self._add(O.Commit, state, accepted, kv=kv, **attrs)

    def fork(self, state: O.Value, branches: O.Value) -> O.Value:
        return self._add(O.Fork, state, branches)

    def join(self, state: O.Value, rule: str = "concat") -> O.Value:
        return self._add(O.Join, state, rule=rule)

    @contextmanager
    def iterate(self, init: O.Value, until: tuple[str, ...] = ("eos", "max_new_tokens"), max_steps: int = 0) -> Iterator[Loop]:
        param = O.Value(init.type)
        loop = Loop(param)
        self._blocks.append([])
        yield loop
        body_ops = self._blocks.pop()
        if loop._next is None:
            raise ValueError("iterate body ended without loop.next(state)")
        body_ops.append(O.make(O.Yield, loop._next))
        op = O.make(O.Iterate, init, until=tuple(until), max_steps=max_steps)
        op = dataclasses.replace(op, body=O.Block((param,), tuple(body_ops)))
        self._blocks[-1].append(op)
        loop.result = op.results[0]

    def emit(self, state: O.Value) -> O.Value:
        return self._add(O.Emit, state)

    def build(self) -> O.Program:
        """The recorded program, verified (raises ``VerifyError``)."""
        if len(self._blocks) != 1:
            raise ValueError("build() called inside an unfinished iterate")
        p = O.Program(self.name, O.Block((self.prompt,), tuple(self._blocks[0])), self.params, self.description)
        return verify(p)
