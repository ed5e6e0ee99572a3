"""Parser for the text form printed by ``decograph.ir.printer``.

``parse(print_program(p))`` is structurally equal to ``p`` and ``print_program(parse(t)) == t``
for canonical text. Errors are ``ParseError``: the first line names the line, column, op and
operand or field, then the source line is quoted with a ``>`` marker and a ``fix:`` line follows:

    parse error at line 3, column 13, op `emit`, operand 'state': use of undefined value %9 (found '%9')
    >   3 |   %2 = emit(%9) : Tokens[B, G]
    fix: define %9 before this op, in this block or an enclosing one

Omitted attributes take their defaults; result types, when written, are checked later by the
verifier.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
from typing import Any

from decograph.errors import ParseError
from decograph.ir.ops import OPS, Block, Iterate, Op, Program, Value
from decograph.ir.types import TYPE_KINDS, Sym, Type, parse_dim

__all__ = ["parse_program", "parse_type", "build_op", "PROMPT_TYPE"]

PROMPT_TYPE = Type("Tokens", (Sym("B"), Sym("P")))

_TOKEN = re.compile(
    r"""(?P<ws>[ \t\r]+)|(?P<nl>\n)|(?P<comment>\#[^\n]*)
    |(?P<value>%[A-Za-z0-9_]+)
    |(?P<string>"(?:[^"\\\n]|\\.)*")
    |(?P<number>-?(?:\d+\.\d*(?:[eE][-+]?\d+)?|\d+[eE][-+]?\d+|\d+))
    |(?P<name>[A-Za-z_][A-Za-z0-9_.]*)
    |(?P<punct>\*\*|[()\[\]{}=,:^+\-*])""",
    re.VERBOSE,
)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _close(word: str, choices: Any) -> str:
    near = difflib.get_close_matches(word, sorted(choices), n=1)
    return f" (did you mean {near[0]}?)" if near else ""


class _Tokens:
    def __init__(self, text: str) -> None:
        self.items: list[tuple[str, str, int, int]] = []
        self.lines = text.split("\n")
        self.context = ""  # ", op `name`" while an op is being parsed
        line, col, pos = 1, 1, 0
        while pos < len(text):
            m = _TOKEN.match(text, pos)
            if m is None:
                raise self.fail(line, col, f"unexpected character {text[pos]!r}",
                                "remove it; strings go in double quotes")
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

    def fail(self, line: int, col: int, msg: str, fix: str, what: str = "") -> ParseError:
        """A located error: the position, op and operand or field, the quoted line and a fix."""
        head = f"parse error at line {line}, column {col}{self.context}{what}: {msg}"
        quote = [f"{'>' if j == line else ' '} {j:3d} | {self.lines[j - 1]}"
                 for j in range(max(1, line - 1), min(len(self.lines), line + 1) + 1)]
        return ParseError("\n".join([head, *quote, f"fix: {fix}"]))

    def error(self, msg: str, fix: str = "", what: str = "") -> ParseError:
        _, text, line, col = self.peek()
        found = f"{text!r}" if text else "end of input"
        return self.fail(line, col, f"{msg} (found {found})",
                         fix or "write the canonical form that print_program prints", what)

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


_NAMES: dict[str, Any] = {"true": True, "false": False, "none": None, "inf": math.inf, "nan": math.nan}


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
        return _NAMES.get(text, text)
    if text == "-" and t.peek(1)[1] == "inf":
        t.take()
        t.take()
        return -math.inf
    raise t.error("expected an attribute value")


def _type(t: _Tokens) -> Type:
    _, kind, line, col = t.peek()
    t.take(kind="name")
    if kind not in TYPE_KINDS:
        raise t.fail(line, col, f"unknown type {kind!r}; types are {', '.join(TYPE_KINDS)}",
                     f"use one of {', '.join(TYPE_KINDS)}{_close(kind, TYPE_KINDS)}")
    dims: list[Any] = []
    if t.accept("["):
        while True:
            parts: list[str] = []
            depth = 0
            _, _, dline, dcol = t.peek()
            while True:
                k, text, _, _ = t.peek()
                # a dim never holds brackets, braces or values: stop there even inside '(' so an
                # unbalanced dim reports itself instead of swallowing the rest of the program
                if k in ("eof", "value", "string") or text in ("]", "[", "{", "}", "=", ":") or (depth == 0 and text == ","):
                    break
                depth += text == "("
                depth -= text == ")"
                parts.append(text)
                t.i += 1
            try:
                dims.append(parse_dim(" ".join(parts)))
            except ValueError as exc:
                raise t.fail(dline, dcol, str(exc), "write dims as integers and symbols joined by + - * ** and ( )") from None
            if t.accept("]"):
                break
            t.take(",")
    return Type(kind, tuple(dims))


def _operand_label(cls: type[Op], i: int) -> str:
    """``operand 'name'`` (``'drafts'[j]`` for the variadic one) of the ``i``-th operand of ``cls``."""
    fields = [f for f in dataclasses.fields(cls) if f.metadata.get("operand")]
    for j, f in enumerate(fields):
        if f.metadata.get("variadic"):
            return f"operand '{f.name}'[{i - j}]"
        if j == i:
            return f"operand '{f.name}'"
    return f"operand {i}"


class _Parser:
    def __init__(self, text: str) -> None:
        self.t = _Tokens(text)
        self.scopes: list[dict[str, Value]] = []

    def lookup(self, name: str, what: str) -> Value:
        for scope in reversed(self.scopes):
            if name in scope:
                return scope[name]
        raise self.t.error(f"use of undefined value {name}",
                           f"define {name} before this op, in this block or an enclosing one", what)

    def define(self, name: str, v: Value, at: tuple[int, int], what: str) -> None:
        if any(name in s for s in self.scopes):
            raise self.t.fail(*at, f"value {name} is defined twice", "give every result a fresh name", what)
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
            raise t.error("expected end of input after the strategy", "remove the text after the closing '}'")
        return Program(name, Block((prompt,), tuple(ops)), tuple(params), desc)

    def ops(self) -> list[Op]:
        out: list[Op] = []
        while self.t.peek()[0] != "eof" and self.t.peek()[1] != "}":
            out.append(self.op())
        return out

    def op(self) -> Op:
        t = self.t
        lhs: list[tuple[str, int, int]] = []
        if t.peek()[0] == "value":
            while True:
                _, vname, vline, vcol = t.peek()
                t.take(kind="value")
                lhs.append((vname, vline, vcol))
                if not t.accept(","):
                    break
            t.take("=")
        _, opname, line, col = t.peek()
        t.take(kind="name")
        if opname not in OPS:
            raise t.fail(line, col, f"unknown op; known ops: {', '.join(sorted(OPS))}",
                         f"use one of the known ops{_close(opname, OPS)}", f", op `{opname}`")
        cls = OPS[opname].cls
        outer, t.context = t.context, f", op `{opname}`"
        operands, attrs = self.args(cls)
        types: list[Type] = []
        if t.accept(":"):
            types.append(_type(t))
            while t.accept(","):
                types.append(_type(t))
        if len(types) != len(lhs):
            raise t.fail(line, col, f"names {_count(len(lhs), 'result')} but declares {_count(len(types), 'type')}",
                         "write one type per result after ':'", ", its results")
        results = tuple(Value(ty) for ty in types)
        body = None
        if cls is Iterate:
            t.take("{")
            t.context = outer
            body = self.block()
            t.context = f", op `{opname}`"
            t.take("}")
        try:
            op = build_op(cls, operands, attrs, results, body)
        except TypeError as exc:
            raise t.fail(line, col, str(exc), "write the operands the op takes, in order") from None
        for (name, vline, vcol), v in zip(lhs, results):
            self.define(name, v, (vline, vcol), f", result {name}")
        t.context = outer
        return op

    def args(self, cls: type[Op]) -> tuple[list[Value], dict[str, Any]]:
        t = self.t
        operands: list[Value] = []
        attrs: dict[str, Any] = {}
        known = sorted(f.name for f in cls.attr_fields())
        t.take("(")
        while not t.accept(")"):
            if t.peek()[0] == "value":
                what = f", {_operand_label(cls, len(operands))}"
                if attrs:
                    raise t.error("operands must come before attributes", "move the operand before the attributes", what)
                operands.append(self.lookup(t.peek()[1], what))
                t.take()
            else:
                _, key, kline, kcol = t.peek()
                t.take(kind="name")
                what = f", field '{key}'"
                if key not in known:
                    takes = ", ".join(known) or "no attributes"
                    raise t.fail(kline, kcol, f"unknown attribute; {cls.NAME} takes {takes}",
                                 f"remove {key}" + (f" or use one of {takes}{_close(key, known)}" if known else ""), what)
                t.take("=")
                if key in attrs:
                    raise t.fail(kline, kcol, "attribute given twice", "give each attribute once", what)
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
            _, name, line, col = t.peek()
            t.take(kind="value")
            t.take(":")
            v = Value(_type(t))
            self.define(name, v, (line, col), f", block parameter {name}")
            params.append(v)
            if not t.accept(","):
                t.take(")")
                break
        t.take(":")
        ops = self.ops()
        self.scopes.pop()
        return Block(tuple(params), tuple(ops))


def build_op(cls: type[Op], operands: list[Value], attrs: dict[str, Any], results: tuple[Value, ...], body: Any) -> Op:
    """An op of class ``cls`` from its operands in order (the variadic one takes the rest), its
    attributes by name, its result values and its body (``Iterate``, else None). ``TypeError``
    names an unknown attribute or a missing or extra operand; the text and JSON parsers both
    build ops through it."""
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


def parse_type(text: str) -> Type:
    """A type as the text form writes it (``Tokens[B, K + 1]``); ``ParseError`` if malformed."""
    t = _Tokens(text)
    ty = _type(t)
    if t.peek()[0] != "eof":
        raise ParseError(f"bad type {text!r}")
    return ty


def parse_program(text: str) -> Program:
    """Parse IR text into a ``Program`` (unverified: call ``verify`` next)."""
    return _Parser(text).program()
