"""The IR's building blocks: SSA values, region blocks, the op base class and operand fields.

``decograph.ir.ops`` defines every op on top of these (and re-exports them).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from decograph.ir.types import Type

__all__ = ["Value", "Block", "Op", "operand"]


class Value:
    """An SSA value: defined once, immutable, compared by identity."""

    __slots__ = ("type",)

    def __init__(self, type: Type) -> None:
        self.type = type

    def __repr__(self) -> str:
        return f"<Value {self.type} @{id(self):x}>"


@dataclass(frozen=True, eq=False)
class Block:
    """A region body: block parameters, then ops; the last op is a terminator (``yield``)."""

    params: tuple[Value, ...]
    ops: tuple[Op, ...]


@dataclass(frozen=True, eq=False)
class Op:
    """Base of all ops. ``results`` are the values this op defines."""

    results: tuple[Value, ...]
    NAME: ClassVar[str] = ""

    @classmethod
    def operand_fields(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("operand"))

    @classmethod
    def attr_fields(cls) -> tuple[dataclasses.Field[Any], ...]:
        return tuple(
            f for f in dataclasses.fields(cls)
            if f.name not in ("results", "body") and not f.metadata.get("operand")
        )

    @property
    def operands(self) -> tuple[Value, ...]:
        out: list[Value] = []
        for name in self.operand_fields():
            v = getattr(self, name)
            out.extend(v if isinstance(v, tuple) else (v,))
        return tuple(out)

    def attrs(self) -> dict[str, Any]:
        """Attributes by name, sorted (so printing is deterministic)."""
        return {f.name: getattr(self, f.name) for f in sorted(self.attr_fields(), key=lambda f: f.name)}

    @property
    def result(self) -> Value:
        return self.results[0]


def operand(variadic: bool = False) -> Any:
    return field(default=() if variadic else None, metadata={"operand": True, "variadic": variadic})
