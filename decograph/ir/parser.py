"""Parser for the text form printed by ``decograph.ir.printer``.

``parse(print_program(p))`` is structurally equal to ``p`` and ``print_program(parse(t)) == t``
for canonical text. Errors are ``ParseError`` naming the line and column. Omitted attributes
take their defaults; result types, when written, are checked later by the verifier.
"""
from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

from decograph.errors import ParseError
from decograph.ir.ops import OPS, Block, Iterate, Op, Program, Value
from decograph.ir.types import TYPE_KINDS, Sym, Type, parse_dim

__all__ = ["parse_program", "PROMPT_TYPE"]

PROMPT_TYPE = Type("Tokens", (Sym("B"), Sym("P")))

_TOKEN = re.compile(
    r"""(?P<ws>[ \t\r]+)|(?P<nl>\n)|(?P<comment>\#[^\n]*)
    |(?P<value>%[A-Za-z0-9_]+)
    |(?P<string>"(?:[^"\\\n]|\\.)*")
    |(?P<number>-?(?:\d+\.\d*(?:[eE][-+]?\d+)?|\d+[eE][-+]?\d+|\d+))
    |(?P<name>[A-Za-z_][A-Za-z0-9_.]*)
    |(?P<punct>[()\[\]{}=,:^+\-*])""",
    re.VERBOSE,
)


class _Tokens:
    def __init__(self, text: str) -> None:
        self.items: list[tuple[str, str, int, int]] = []
        line, col, pos = 1, 1, 0
        while pos < len(text):
            m = _TOKEN.match(text, pos)
            if m is None:
                raise ParseError(f"line {line}, column {col}: unexpected character {text[pos]!r}")
            kind = m.lastgroup or ""
            if kind == "nl":
                line, col = line + 1, 1
            else:
                if kind not in ("ws", "comment"):
                    self.items.append((kind, m.group(), line, col))
                col += len(m.group())
            pos = m.end()
        self.i = 0

    def peek(self, k: int = 0) -> tuple[str, str, int, int]:
        j = self.i + k
        return self.items[j] if j < len(self.items) else ("eof", "", self.items[-1][2] if self.items else 1, 0)

    def error(self, msg: str) -> ParseError:
        _, text, line, col = self.peek()
        found = f"{text!r}" if text else "end of input"
        return ParseError(f"line {line}, column {col}: {msg} (found {found})")

    def take(self, value: str | None = None, kind: str | None = None) -> str:
        k, text, _, _ = self.peek()
        if (value is not None and text != value) or (kind is not None and k != kind) or k == "eof":
            want = repr(value) if value is not None else (kind or "a token")
            raise self.error(f"expected {want}")
        self.i += 1
        return text

    def accept(self, value: str) -> bool:
        if self.peek()[1] == value and self.peek()[0] in ("punct", "name"):
            self.i += 1
            return True
        return False


def _attr(t: _Tokens) -> Any:
    kind, text, _, _ = t.peek()
    if text == "[" and kind == "punct":
        t.take("[")
        items: list[Any] = []
        while not t.accept("]"):
            items.append(_attr(t))
            if not t.accept(","):
                t.take("]")
                break
        return tuple(items)
    if kind == "string":
        t.take()
        return json.loads(text)
    if kind == "number":
        t.take()
        return float(text) if any(c in text for c in ".eE") else int(text)
    if kind == "name":
        t.take()
        return {"true": True, "false": False, "none": None}.get(text, text)
    raise t.error("expected an attribute value")


def _type(t: _Tokens) -> Type:
    kind = t.take(kind="name")
    if kind not in TYPE_KINDS:
        raise ParseError(f"unknown type {kind!r}; types are {', '.join(TYPE_KINDS)}")
    dims: list[Any] = []
    if t.accept("["):
        while True:
            parts: list[str] = []
            depth = 0
            while True:
                k, text, _, _ = t.peek()
                if k == "eof" or (depth == 0 and text in (",", "]")):
                    break
                depth += text == "("
                depth -= text == ")"
                parts.append(text)
                t.i += 1
            try:
                dims.append(parse_dim(" ".join(parts)))
            except ValueError as exc:
                raise t.error(str(exc)) from None
            if t.accept("]"):
                break
            t.take(",")
    return Type(kind, tuple(dims))


class _Parser:
    def __init__(self, text: str) -> None:
        self.t = _Tokens(text)
        self.scopes: list[dict[str, Value]] = []

    def lookup(self, name: str) -> Value:
        for scope in reversed(self.scopes):
            if name in scope:
                return scope[name]
        raise self.t.error(f"use of undefined value {name}")

    def define(self, name: str, v: Value) -> None:
        if any(name in s for s in self.scopes):
            raise self.t.error(f"value {name} is defined twice")
        self.scopes[-1][name] = v

    def program(self) -> Program:
        t = self.t
        t.take("strategy")
        name = t.take(kind="name")
        params: list[tuple[str, Any]] = []
        if t.accept("("):
            while not t.accept(")"):
                key = t.take(kind="name")
                t.take("=")
                params.append((key, _attr(t)))
                if not t.accept(","):
                    t.take(")")
                    break
        desc = json.loads(t.take()) if t.peek()[0] == "string" else ""
        t.take("{")
        prompt = Value(PROMPT_TYPE)
        self.scopes.append({"%prompt": prompt})
        ops = self.ops()
        t.take("}")
        if t.peek()[0] != "eof":
            raise t.error("expected end of input after the strategy")
        return Program(name, Block((prompt,), tuple(ops)), tuple(params), desc)

    def ops(self) -> list[Op]:
        out: list[Op] = []
        while self.t.peek()[0] != "eof" and self.t.peek()[1] != "}":
            out.append(self.op())
        return out

    def op(self) -> Op:
        t = self.t
        lhs: list[str] = []
        if t.peek()[0] == "value":
            lhs.append(t.take())
            while t.accept(","):
                lhs.append(t.take(kind="value"))
            t.take("=")
        _, opname, line, col = t.peek()
        t.take(kind="name")
        if opname not in OPS:
            raise ParseError(f"line {line}, column {col}: unknown op {opname!r}; known ops: {', '.join(sorted(OPS))}")
        cls = OPS[opname].cls
        operands, attrs = self.args(cls)
        types: list[Type] = []
        if t.accept(":"):
            types.append(_type(t))
            while t.accept(","):
                types.append(_type(t))
        if len(types) != len(lhs):
            raise ParseError(f"line {line}: {opname} names {len(lhs)} results but gives {len(types)} types")
        results = tuple(Value(ty) for ty in types)
        body = None
        if cls is Iterate:
            t.take("{")
            body = self.block()
            t.take("}")
        try:
            op = self.build(cls, operands, attrs, results, body)
        except TypeError as exc:
            raise ParseError(f"line {line}, column {col}: {opname}: {exc}") from None
        for name, v in zip(lhs, results):
            self.define(name, v)
        return op

    def args(self, cls: type[Op]) -> tuple[list[Value], dict[str, Any]]:
        t = self.t
        operands: list[Value] = []
        attrs: dict[str, Any] = {}
        t.take("(")
        while not t.accept(")"):
            if t.peek()[0] == "value":
                if attrs:
                    raise t.error("operands must come before attributes")
                operands.append(self.lookup(t.take()))
            else:
                key = t.take(kind="name")
                t.take("=")
                if key in attrs:
                    raise t.error(f"attribute {key!r} given twice")
                attrs[key] = _attr(t)
            if not t.accept(","):
                t.take(")")
                break
        return operands, attrs

    def block(self) -> Block:
        t = self.t
        t.take("^")
        t.take("(")
        self.scopes.append({})
        params: list[Value] = []
        while not t.accept(")"):
            name = t.take(kind="value")
            t.take(":")
            v = Value(_type(t))
            self.define(name, v)
            params.append(v)
            if not t.accept(","):
                t.take(")")
                break
        t.take(":")
        ops = self.ops()
        self.scopes.pop()
        return Block(tuple(params), tuple(ops))

    @staticmethod
    def build(cls: type[Op], operands: list[Value], attrs: dict[str, Any], results: tuple[Value, ...], body: Any) -> Op:
        names = [f for f in dataclasses.fields(cls) if f.metadata.get("operand")]
        known = {f.name for f in cls.attr_fields()}
        for key in attrs:
            if key not in known:
                raise TypeError(f"unknown attribute {key!r}; {cls.NAME} takes {', '.join(sorted(known)) or 'none'}")
        kwargs: dict[str, Any] = dict(attrs)
        rest = list(operands)
        for f in names:
            if f.metadata.get("variadic"):
                kwargs[f.name], rest = tuple(rest), []
            elif rest:
                kwargs[f.name] = rest.pop(0)
            else:
                raise TypeError(f"missing operand {f.name!r}")
        if rest:
            raise TypeError(f"takes {len(names)} operands, got {len(operands)}")
        if body is not None:
            kwargs["body"] = body
        return cls(results=results, **kwargs)


def parse_program(text: str) -> Program:
    """Parse IR text into a ``Program`` (unverified: call ``verify`` next)."""
    return _Parser(text).program()
