"""Symbolic dims (``Sym``), ``Type`` and ``parse_dim``."""
from __future__ import annotations

import sympy
import pytest
from hypothesis import given, settings, strategies as st

from decograph.ir.types import Sym, Type, dim_add, dim_mul, dim_str, parse_dim

B, T, K = Sym("B"), Sym("T"), Sym("K")


def test_sym_arithmetic_folds_and_compares() -> None:
    assert T + 1 == 1 + T
    assert T + T == 2 * T == T * 2
    assert (T + 1) - T == 1 and isinstance((T + 1) - T, int)
    assert T - T == 0 and isinstance(T - T, int)
    assert 3 - T == -(T - 3)
    assert (T + 1) * (T - 1) == T * T - 1
    assert B * (T + K) == B * T + B * K
    assert T != B and T != T + 1
    assert T == Sym("T")
    assert Sym("T") + 0 == T and hash(Sym("T") + 0) == hash(T)
    assert str(2 * T + B) == "B + 2*T"
    assert repr(T + 1) == "Sym('T + 1')"
    assert (T == "T") is False


def test_sym_is_immutable() -> None:
    with pytest.raises(AttributeError):
        T.expr = sympy.Integer(1)  # type: ignore[misc]


def test_dim_helpers_fold_constants() -> None:
    assert dim_add(1, 2, 3) == 6 and isinstance(dim_add(1, 2, 3), int)
    assert dim_add() == 0
    assert dim_add(T, 1, T) == 2 * T + 1
    assert dim_mul(2, 3) == 6 and dim_mul() == 1
    assert dim_mul(B, T + 1) == B * T + B
    assert dim_str(5) == "5" and dim_str(B * T) == "B*T"


def test_evaluate_bound() -> None:
    assert (T + 1).evaluate({"T": 4}) == 5
    assert (B * T - K).evaluate({"B": 2, "T": 3, "K": 1, "unused": 9}) == 5
    assert isinstance((T * T).evaluate({"T": 3}), int)


def test_evaluate_unbound_names_the_symbol() -> None:
    with pytest.raises(KeyError, match=r"dim B \+ T has unbound symbols: B"):
        (T + B).evaluate({"T": 1})
    with pytest.raises(KeyError, match=r"unbound symbols: K, T"):
        (T * K).evaluate({})


def test_type_str_and_kinds() -> None:
    assert str(Type("Logits", (B, T + 1, Sym("V")))) == "Logits[B, T + 1, V]"
    assert str(Type("State")) == "State" and Type("State").rank == 0
    assert Type("Tokens", (B, 2 * T)) == Type("Tokens", (B, T + T))
    with pytest.raises(ValueError, match="unknown type kind 'Tensor'; expected one of Tokens, Logits"):
        Type("Tensor")


@pytest.mark.parametrize(("text", "want"), [
    ("7", 7),
    ("1+2*3", 7),
    ("(1+2)*3", 9),
    ("B", B),
    ("B * (T + 1)", B * T + B),
    ("T - 1", T - 1),
    ("-T + 3", 3 - T),
    ("2*-3", -6),
    ("--3", 3),
    ("T**2 - 1", T * T - 1),
    ("-T**2", -(T * T)),
    ("(T+1)**2", T * T + 2 * T + 1),
    ("  K  ", K),
    ("_x1", Sym("_x1")),
])
def test_parse_dim_valid(text: str, want: object) -> None:
    got = parse_dim(text)
    assert got == want
    assert type(got) is type(want)


@pytest.mark.parametrize(("text", "message"), [
    ("", "dim '' ends early"),
    ("(B", "dim '(B': missing ')'"),
    ("B B", "dim 'B B': unexpected 'B'"),
    ("B+)", "dim 'B+)': unexpected ')'"),
    ("B+", "dim 'B+' ends early"),
    ("B/2", "dim 'B/2': unexpected character '/'"),
    ("1.5", "dim '1.5': unexpected character '.'"),
    ("T**B", "dim 'T**B': '**' needs an integer exponent"),
    ("__import__('os')", "dim \"__import__('os')\": unexpected character \"'\""),
    ("__import__('os').system('true')", "unexpected character"),
    ("B; import os", "unexpected character ';'"),
    ("lambda: 1", "unexpected character ':'"),
    ("B.__class__", "unexpected character '.'"),
    ("[B]", "unexpected character '['"),
])
def test_parse_dim_invalid(text: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_dim(text)
    assert message in str(info.value)


def test_parse_dim_never_evaluates(monkeypatch: pytest.MonkeyPatch) -> None:
    real_sympify = sympy.sympify

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("parse_dim must not eval user text")

    def sympify(a: object, *args: object, **kwargs: object) -> object:
        if isinstance(a, str):
            raise AssertionError("parse_dim must not sympify user text")
        return real_sympify(a, *args, **kwargs)

    monkeypatch.setattr(sympy, "sympify", sympify)
    monkeypatch.setattr("builtins.eval", boom)
    assert parse_dim("B * (T + 1) - 2") == B * T + B - 2
    with pytest.raises(ValueError):
        parse_dim("__import__('os')")


_leaf = st.one_of(st.integers(-9, 9), st.sampled_from([B, T, K]))
_dims = st.recursive(
    _leaf,
    lambda inner: st.one_of(
        st.tuples(inner, inner).map(lambda p: p[0] + p[1]),
        st.tuples(inner, inner).map(lambda p: p[0] - p[1]),
        st.tuples(inner, inner).map(lambda p: p[0] * p[1]),
    ),
    max_leaves=6,
)


@settings(max_examples=60, deadline=None)
@given(_dims)
def test_printed_dims_parse_back(d: object) -> None:
    got = parse_dim(dim_str(d))  # type: ignore[arg-type]
    assert got == d
    assert dim_str(got) == dim_str(d)  # type: ignore[arg-type]
