"""Text form of IR programs. Deterministic: values are numbered in definition order at print
time and attributes are sorted, so the same program always prints the same text.

    strategy greedy {
      %0 = prefill(%prompt) : State
      %1 = iterate(%0, max_steps=0, until=[eos, max_new_tokens]) : State {
      ^(%2: State):
        %3 = forward(%2, mask=causal) : Logits[B, 1, V]
        %4 = verify.greedy(%2, %3) : Tokens[B, A]
        %5 = commit(%2, %4, kv=keep_accepted) : State
        yield(%5)
      }
      %6 = emit(%1) : Tokens[B, G]
    }

Every op prints in the one generic form ``name(operands, attr=value) : result types``, so a
new op needs no syntax of its own.
"""
from __future__ import annotations

import json
import math
import re
from typing import Any

from decograph.ir.ops import Block, Iterate, Op, Program, Value

__all__ = ["print_program", "format_attr", "Namer"]

_BARE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")
_RESERVED = {"true", "false", "none", "inf", "nan"}


def format_attr(v: Any) -> str:
    """One attribute value in text form (inverse of the parser's attribute rule)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "none"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"  # printable so the verifier can quote it; it rejects non-finite values
        return repr(v) if math.isfinite(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, str):
        return v if _BARE.match(v) and v not in _RESERVED else json.dumps(v)
    if isinstance(v, (tuple, list)):
        return "[" + ", ".join(format_attr(x) for x in v) + "]"
    raise TypeError(f"cannot print attribute value of type {type(v).__name__}")


class Namer:
    """Assigns ``%0, %1, ...`` to values in the order they are first defined."""

    def __init__(self, prompt: Value | None = None) -> None:
        self.names: dict[int, str] = {}
        if prompt is not None:
            self.names[id(prompt)] = "%prompt"
        self.count = 0

    def define(self, v: Value) -> str:
        name = f"%{self.count}"
        self.count += 1
        self.names[id(v)] = name
        return name

    def __call__(self, v: Value) -> str:
        return self.names.get(id(v), "%<undefined>")


def print_op(op: Op, namer: Namer, indent: str, lines: list[str], where: dict[int, int] | None = None) -> None:
    """Append ``op`` (and its body) to ``lines``; record its line index in ``where``."""
    args = [namer(v) for v in op.operands]
    args += [f"{k}={format_attr(v)}" for k, v in op.attrs().items()]
    call = f"{op.NAME}({', '.join(args)})"
    if op.results:
        lhs = ", ".join(namer.define(r) for r in op.results)
        types = ", ".join(str(r.type) for r in op.results)
        text = f"{indent}{lhs} = {call} : {types}"
    else:
        text = f"{indent}{call}"
    if where is not None:
        where[id(op)] = len(lines)
    if isinstance(op, Iterate) and op.body is not None:
        lines.append(text + " {")
        _print_block(op.body, namer, indent, lines, where)
        lines.append(indent + "}")
    else:
        lines.append(text)


def _print_block(block: Block, namer: Namer, indent: str, lines: list[str], where: dict[int, int] | None) -> None:
    params = ", ".join(f"{namer.define(p)}: {p.type}" for p in block.params)
    lines.append(f"{indent}^({params}):")
    for op in block.ops:
        print_op(op, namer, indent + "  ", lines, where)


def print_program(p: Program, where: dict[int, int] | None = None, namer: Namer | None = None) -> str:
    """The canonical text of ``p``; ``where`` (if given) receives op id -> line index and
    ``namer`` (if given, fresh) the value names used."""
    head = f"strategy {p.name}"
    if p.params:
        head += "(" + ", ".join(f"{k}={format_attr(v)}" for k, v in p.params) + ")"
    if p.description:
        head += " " + json.dumps(p.description)
    lines = [head + " {"]
    namer = namer if namer is not None else Namer()
    if p.body.params:
        namer.names[id(p.prompt)] = "%prompt"
    for op in p.body.ops:
        print_op(op, namer, "  ", lines, where)
    lines.append("}")
    return "\n".join(lines) + "\n"
