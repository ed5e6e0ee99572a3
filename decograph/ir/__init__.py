"""The decoding IR: typed SSA ops, a verifier, a text form that round-trips, and a JSON form."""
from __future__ import annotations

from decograph.ir.builder import Builder
from decograph.ir.jsonform import from_json, to_json
from decograph.ir.ops import OPS, Block, Op, Program, Value
from decograph.ir.parser import parse_program
from decograph.ir.printer import print_program
from decograph.ir.types import Sym, Type
from decograph.ir.verify import verify

__all__ = ["Builder", "OPS", "Block", "Op", "Program", "Value", "Sym", "Type",
           "parse_program", "print_program", "verify", "to_json", "from_json", "structurally_equal"]


def structurally_equal(a: Program, b: Program) -> bool:
    """Two programs are structurally equal when they print the same text."""
    return print_program(a) == print_program(b)
