"""JSON form of IR programs (for tools and exported decoders). Round-trips like the text form.

    {"strategy": "greedy", "params": {}, "description": "",
     "ops": [{"op": "prefill", "operands": ["%prompt"], "attrs": {},
              "results": [{"name": "%0", "type": "State"}]}, ...]}
"""
from __future__ import annotations

from typing import Any

from decograph.errors import ParseError
from decograph.ir.ops import Block, Iterate, Op, Program, Value
from decograph.ir.parser import PROMPT_TYPE, build_op, parse_type
from decograph.ir.printer import Namer

__all__ = ["to_json", "from_json"]


def _plain(v: Any) -> Any:
    return [_plain(x) for x in v] if isinstance(v, tuple) else v


def _tupled(v: Any) -> Any:
    return tuple(_tupled(x) for x in v) if isinstance(v, list) else v


def to_json(p: Program) -> dict[str, Any]:
    """A JSON-serializable dict of ``p`` (value names as in the text form)."""
    namer = Namer()
    namer.names[id(p.prompt)] = "%prompt"

    def block(b: Block) -> list[dict[str, Any]]:
        return [op_json(op) for op in b.ops]

    def op_json(op: Op) -> dict[str, Any]:
        d: dict[str, Any] = {
            "op": op.NAME,
            "operands": [namer(v) for v in op.operands],
            "attrs": {k: _plain(v) for k, v in op.attrs().items()},
            "results": [{"name": namer.define(r), "type": str(r.type)} for r in op.results],
        }
        if isinstance(op, Iterate) and op.body is not None:
            params = [{"name": namer.define(v), "type": str(v.type)} for v in op.body.params]
            d["body"] = {"params": params, "ops": block(op.body)}
        return d

    return {"strategy": p.name, "description": p.description,
            "params": {k: _plain(v) for k, v in p.params}, "ops": block(p.body)}


def from_json(d: dict[str, Any]) -> Program:
    """Inverse of ``to_json``; raises ``ParseError`` naming the op index on malformed input."""
    prompt = Value(PROMPT_TYPE)
    scope: dict[str, Value] = {"%prompt": prompt}

    def block(items: list[dict[str, Any]], path: str) -> tuple[Op, ...]:
        out = []
        for i, item in enumerate(items):
            where = f"{path}[{i}]"
            try:
                out.append(op(item, where))
            except (KeyError, TypeError, ValueError) as exc:
                raise ParseError(f"JSON program, {where}: {exc}") from None
        return tuple(out)

    def op(item: dict[str, Any], where: str) -> Op:
        from decograph.ir.ops import OPS

        name = item["op"]
        if name not in OPS:
            raise ParseError(f"JSON program, {where}: unknown op {name!r}")
        operands = []
        for ref in item.get("operands", []):
            if ref not in scope:
                raise ParseError(f"JSON program, {where}: use of undefined value {ref}")
            operands.append(scope[ref])
        results = tuple(Value(parse_type(r["type"])) for r in item.get("results", []))
        body = None
        if "body" in item:
            params = tuple(Value(parse_type(p["type"])) for p in item["body"]["params"])
            for p, v in zip(item["body"]["params"], params):
                scope[p["name"]] = v
            body = Block(params, block(item["body"]["ops"], where + ".body"))
        built = build_op(OPS[name].cls, operands, {k: _tupled(v) for k, v in item.get("attrs", {}).items()}, results, body)
        for r, v in zip(item.get("results", []), results):
            scope[r["name"]] = v
        return built

    ops = block(d["ops"], "ops")
    params = tuple((k, _tupled(v)) for k, v in d.get("params", {}).items())
    return Program(d["strategy"], Block((prompt,), ops), params, d.get("description", ""))
