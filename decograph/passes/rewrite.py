"""Rewriting helpers shared by the passes: operand remapping and rule lists.

A rule is ``(pattern, fn)``: ``pattern`` an op class (or tuple of classes), ``fn(op, ctx)``
returning ``None`` (no match), a replacement op, or a list of ops (empty: delete). Rule lists
compose with ``+`` and ``apply_rules`` runs them to a fixed point. Nothing is mutated: every
changed op is a new op, and an op whose result type changes gets new result values, to which
all later uses are remapped.

    %5 = forward(%2, %3, mask=tree) : Logits[B, 5, V]      # one chain: a tree is causal
becomes
    %5 = forward(%2, %3, mask=causal) : Logits[B, 5, V]
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Union

from decograph.ir import ops as O

__all__ = ["Rule", "Rules", "RewriteContext", "rebuild", "apply_rules", "users", "map_ops"]

Pattern = Union[type, tuple[type, ...]]
Replacement = Union[O.Op, list[O.Op], None]
Rule = tuple[Pattern, Callable[[Any, "RewriteContext"], Replacement]]


def rebuild(op: O.Op, vmap: dict[int, O.Value], **attrs: Any) -> O.Op:
    """``op`` with operands mapped through ``vmap`` and ``attrs`` replaced.

    The result values are kept when their types do not change (so users need no update);
    otherwise new values are made and ``vmap`` maps the old ones to them. Returns ``op``
    itself when nothing changes.
    """
    kwargs: dict[str, Any] = {}
    for name in op.operand_fields():
        v = getattr(op, name)
        new = tuple(vmap.get(id(x), x) for x in v) if isinstance(v, tuple) else vmap.get(id(v), v)
        if new is not v and new != v:
            kwargs[name] = new
    kwargs.update({k: v for k, v in attrs.items() if getattr(op, k) != v})
    if not kwargs:
        return op
    probe = dataclasses.replace(op, **kwargs)
    types = O.OPS[op.NAME].result(probe)
    if len(types) == len(op.results) and all(t == v.type for t, v in zip(types, op.results)):
        return probe
    out = dataclasses.replace(probe, results=tuple(O.Value(t) for t in types))
    for old, new_v in zip(op.results, out.results):
        vmap[id(old)] = new_v
    return out


def users(program: O.Program) -> dict[int, list[O.Op]]:
    """id(value) -> the ops that use it as an operand (computed, never stored on values)."""
    out: dict[int, list[O.Op]] = {}
    for op in program.walk():
        for v in op.operands:
            out.setdefault(id(v), []).append(op)
    return out


@dataclass
class RewriteContext:
    """What a rule may look at: the program being rewritten, its uses, its definitions."""

    program: O.Program
    uses: dict[int, list[O.Op]] = field(default_factory=dict)
    defs: dict[int, O.Op] = field(default_factory=dict)
    vmap: dict[int, O.Value] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.uses = users(self.program)
        self.defs = {id(v): op for op in self.program.walk() for v in op.results}

    def used(self, v: O.Value) -> bool:
        return bool(self.uses.get(id(v)))

    def replace(self, old: O.Value, new: O.Value) -> None:
        """Every later use of ``old`` becomes a use of ``new``."""
        self.vmap[id(old)] = new


class Rules:
    """An ordered list of rules; ``a + b`` tries ``a``'s rules first."""

    def __init__(self, *rules: Rule) -> None:
        self.rules = tuple(rules)

    def __add__(self, other: Rules) -> Rules:
        return Rules(*self.rules, *other.rules)

    def first_match(self, op: O.Op, ctx: RewriteContext) -> tuple[bool, Replacement]:
        for pattern, fn in self.rules:
            if isinstance(op, pattern):
                out = fn(op, ctx)
                if out is not None:
                    return True, out
        return False, None


def map_ops(program: O.Program, fn: Callable[[O.Op, dict[int, O.Value]], list[O.Op]]) -> O.Program:
    """A new program: every op (nested ones too) is first remapped, then replaced by ``fn(op, vmap)``."""
    vmap: dict[int, O.Value] = {}

    def block(b: O.Block) -> O.Block:
        out: list[O.Op] = []
        for op in b.ops:
            op = rebuild(op, vmap)
            if isinstance(op, O.Iterate):
                body = block(op.body)
                if body is not op.body:
                    op = dataclasses.replace(op, body=body)
            out.extend(fn(op, vmap))
        if len(out) == len(b.ops) and all(x is y for x, y in zip(out, b.ops)):
            return b
        return O.Block(b.params, tuple(out))

    body = block(program.body)
    return program if body is program.body else dataclasses.replace(program, body=body)


def apply_rules(program: O.Program, rules: Rules, max_rounds: int = 32) -> tuple[O.Program, int]:
    """Apply ``rules`` until none fires; returns the new program and how many rewrites ran."""
    fired = 0
    for _ in range(max_rounds):
        ctx = RewriteContext(program)
        count = 0

        def step(op: O.Op, vmap: dict[int, O.Value]) -> list[O.Op]:
            nonlocal count
            ctx.vmap = vmap
            hit, out = rules.first_match(op, ctx)
            if not hit:
                return [op]
            count += 1
            new = [out] if isinstance(out, O.Op) else list(out or [])
            if new and len(new[-1].results) == len(op.results):
                for old, nv in zip(op.results, new[-1].results):
                    if old is not nv:
                        vmap[id(old)] = nv
            return new

        program = map_ops(program, step)
        if not count:
            break
        fired += count
    return program, fired
