"""Types of IR values, with symbolic dims backed by sympy.

A dim is an ``int`` or a ``Sym``. ``Sym`` wraps a sympy expression over short uppercase
symbols (``B`` batch, ``V`` vocabulary, ``A`` accepted length, ``G`` generated length, ...)
and supports ``+ - *`` and ``evaluate(bindings)``:

    >>> (Sym("T") + 1).evaluate({"T": 4})
    5
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Union

import sympy

__all__ = ["Sym", "Dim", "Type", "TYPE_KINDS", "dim_str", "dim_add", "dim_mul", "parse_dim"]


class Sym:
    """A symbolic dimension: an immutable sympy expression with integer symbols."""

    __slots__ = ("expr",)

    def __init__(self, expr: str | sympy.Expr | int) -> None:
        if isinstance(expr, str):
            expr = sympy.Symbol(expr, integer=True, nonnegative=True)
        object.__setattr__(self, "expr", sympy.sympify(expr))

    def __setattr__(self, key: str, value: object) -> None:
        raise AttributeError("Sym is immutable")

    def __add__(self, other: Dim) -> Dim:
        return _wrap(self.expr + _expr(other))

    __radd__ = __add__

    def __sub__(self, other: Dim) -> Dim:
        return _wrap(self.expr - _expr(other))

    def __rsub__(self, other: Dim) -> Dim:
        return _wrap(_expr(other) - self.expr)

    def __neg__(self) -> Dim:
        return _wrap(-self.expr)

    def __mul__(self, other: Dim) -> Dim:
        return _wrap(self.expr * _expr(other))

    __rmul__ = __mul__

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (Sym, int)):
            return sympy.simplify(self.expr - _expr(other)) == 0
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.expr)

    def __str__(self) -> str:
        return str(self.expr)

    def __repr__(self) -> str:
        return f"Sym({str(self.expr)!r})"

    def evaluate(self, bindings: Mapping[str, int]) -> int:
        """The integer value of this dim once every symbol in it is bound."""
        value = self.expr.subs({sympy.Symbol(k, integer=True, nonnegative=True): v for k, v in bindings.items()})
        if not value.is_Integer:
            free = ", ".join(sorted(str(s) for s in value.free_symbols))
            raise KeyError(f"dim {self} has unbound symbols: {free}")
        return int(value)


Dim = Union[int, Sym]


def _expr(d: Dim) -> sympy.Expr:
    return d.expr if isinstance(d, Sym) else sympy.Integer(d)


def _wrap(e: sympy.Expr) -> Dim:
    e = sympy.expand(e)
    return int(e) if e.is_Integer else Sym(e)


def dim_add(*dims: Dim) -> Dim:
    """Sum of dims, folded to an ``int`` when constant."""
    return _wrap(sum((_expr(d) for d in dims), sympy.Integer(0)))


def dim_mul(*dims: Dim) -> Dim:
    """Product of dims, folded to an ``int`` when constant."""
    out = sympy.Integer(1)
    for d in dims:
        out = out * _expr(d)
    return _wrap(out)


def dim_str(d: Dim) -> str:
    return str(d)


TYPE_KINDS = ("Tokens", "Logits", "Mask", "KV", "State")


@dataclass(frozen=True)
class Type:
    """The type of an IR value: a kind and a shape.

    ``State`` values carry no shape, except a forked state ``State[N]`` (N branches per row).
    """

    kind: str
    shape: tuple[Dim, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in TYPE_KINDS:
            raise ValueError(f"unknown type kind {self.kind!r}; expected one of {', '.join(TYPE_KINDS)}")

    def __str__(self) -> str:
        if not self.shape:
            return self.kind
        return f"{self.kind}[{', '.join(dim_str(d) for d in self.shape)}]"

    @property
    def rank(self) -> int:
        return len(self.shape)


_B, _V = Sym("B"), Sym("V")


def parse_dim(text: str) -> Dim:
    """Parse a dim expression: integers, uppercase symbols, ``+ - *``, ``**`` with an integer
    exponent (as ``str(Sym)`` prints products like ``T**2``) and parentheses.

    A tiny recursive-descent parser: no ``eval`` and no ``sympify`` of user text.
    """
    toks = _tokenize_dim(text)
    pos = 0

    def peek() -> str | None:
        return toks[pos] if pos < len(toks) else None

    def take() -> str:
        nonlocal pos
        pos += 1
        return toks[pos - 1]

    def atom() -> sympy.Expr:
        t = peek()
        if t is None:
            raise ValueError(f"dim {text!r} ends early")
        take()
        if t == "(":
            e = expr()
            if peek() != ")":
                raise ValueError(f"dim {text!r}: missing ')'")
            take()
            return e
        if t.isdigit():
            return sympy.Integer(int(t))
        if t[0].isalpha() or t[0] == "_":
            return sympy.Symbol(t, integer=True, nonnegative=True)
        raise ValueError(f"dim {text!r}: unexpected {t!r}")

    def power() -> sympy.Expr:
        e = atom()
        if peek() == "**":
            take()
            t = peek()
            if t is None or not t.isdigit():
                raise ValueError(f"dim {text!r}: '**' needs an integer exponent")
            e = e ** int(take())
        return e

    def unary() -> sympy.Expr:
        if peek() == "-":
            take()
            return -unary()
        return power()

    def term() -> sympy.Expr:
        e = unary()
        while peek() == "*":
            take()
            e = e * unary()
        return e

    def expr() -> sympy.Expr:
        e = term()
        while peek() in ("+", "-"):
            op = take()
            e = e + term() if op == "+" else e - term()
        return e

    result = expr()
    if pos != len(toks):
        raise ValueError(f"dim {text!r}: unexpected {toks[pos]!r}")
    return _wrap(result)


def _tokenize_dim(text: str) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c.isspace():
            i += 1
        elif c.isdigit():
            j = i
            while j < len(text) and text[j].isdigit():
                j += 1
            out.append(text[i:j])
            i = j
        elif c.isalpha() or c == "_":
            j = i
            while j < len(text) and (text[j].isalnum() or text[j] == "_"):
                j += 1
            out.append(text[i:j])
            i = j
        elif text.startswith("**", i):
            out.append("**")
            i += 2
        elif c in "+-*()":
            out.append(c)
            i += 1
        else:
            raise ValueError(f"dim {text!r}: unexpected character {c!r}")
    return out
