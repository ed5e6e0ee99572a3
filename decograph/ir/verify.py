"""The IR verifier. ``verify(program)`` raises ``VerifyError`` and never returns a bool.

It checks structure (a top-level ``emit`` last, ``iterate`` bodies ending in ``yield``),
define-before-use and single definition, operand kinds, attribute types and ranges, declared
result types against each op's type rule, and the data flow between steps (a verify rule sees
the logits of the forward that ran its drafts). Each message names the op and its line, the
operand or field at fault, quotes the IR around it, and says what would fix it:

    verify error at line 6, op `forward`, its result type: declared Logits[B, 7, V], the type rule gives Logits[B, 9, V]
        4 |   ^(%2: State):
        5 |     %3 = draft.ngram(%2, candidates=1, k=8, max_n=3, min_n=1) : Tokens[B, 8]
    >   6 |     %4 = forward(%2, %3, dedup=false, layout=sequence, mask=causal) : Logits[B, 7, V]
        7 |     %5 = verify.greedy(%2, %4, %3) : Tokens[B, A]
    fix: declare `: Logits[B, 9, V]`
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from decograph.errors import VerifyError
from decograph.ir import ops as O
from decograph.ir.printer import Namer, format_attr, print_program

__all__ = ["verify"]

_RANGES: dict[str, tuple[float, float]] = {
    "window": (1, O.MAX_DRAFT), "block": (1, O.MAX_DRAFT), "k": (1, O.MAX_DRAFT),
    "candidates": (1, O.MAX_DRAFT), "n": (2, 16), "max_n": (1, 16), "min_n": (1, 16),
    "max_branches": (1, O.MAX_DRAFT), "max_tokens": (0, 1 << 20), "threshold": (0.0, 1.0), "top_p": (1e-9, 1.0),
    "temperature": (1e-6, 1e6), "top_k": (0, 1 << 30), "factor": (1e-9, 1e6), "max_steps": (0, 1 << 30),
    "nodes": (0, O.MAX_TREE), "depth": (1, O.MAX_DRAFT), "topk": (1, O.MAX_DRAFT),
}
_RANGES.update({"steps": (1, 1 << 16), "stable": (0, 1 << 16), "bound": (1e-12, 1e6), "confident": (1e-12, 1e6),
                "t_min": (1e-6, 1e6), "t_max": (1e-6, 1e6)})       # unmask.entropy_bound's
_RANGES_BY_OP = {("draft.mask", "k"): (0, 1 << 16), ("draft.noise", "k"): (0, 1 << 16),
                 ("draft.corpus", "max_n"): (1, 8), ("draft.corpus", "min_n"): (1, 8)}     # corpus.DEPTH
_CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    ("forward", "mask"): O.MASKS, ("commit", "kv"): O.KV_POLICIES,
    ("commit", "rollback"): O.ROLLBACKS, ("forward", "layout"): O.LAYOUTS,
    ("draft.jacobi", "init"): ("repeat", "pad"), ("draft.gauss_seidel_jacobi", "init"): ("repeat", "pad"),
}
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")
_OPERAND_KIND = {"state": "State", "init": "State", "prompt": "Tokens", "logits": "Logits",
                 "accepted": "Tokens", "branches": "Tokens", "drafts": "Tokens"}


class _Checker:
    def __init__(self, program: O.Program) -> None:
        self.program = program
        self.header()  # before printing: the text form must be able to hold the name and params
        self.where: dict[int, int] = {}
        self.namer = Namer()
        self.lines = print_program(program, self.where, self.namer).splitlines()
        self.defs: dict[int, O.Op] = {}
        self.defined: set[int] = set()  # visible here: a body's values go out of scope after it
        self.seen: set[int] = set()  # defined anywhere so far (single definition)

    def fail(self, op: O.Op | None, what: str, msg: str, fix: str) -> VerifyError:
        if op is None:
            return VerifyError(f"verify error in strategy {self.program.name!r}, {what}: {msg}\nfix: {fix}")
        i = self.where.get(id(op), 0)
        quote = [f"{'>' if j == i else ' '} {j + 1:3d} | {self.lines[j]}" for j in range(max(0, i - 2), min(len(self.lines), i + 2))]
        head = f"verify error at line {i + 1}, op `{op.NAME}`, {what}: {msg}"
        return VerifyError(head + "\n" + "\n".join(quote) + f"\nfix: {fix}")

    def run(self) -> None:
        body = self.program.body
        if len(body.params) != 1 or body.params[0].type.kind != "Tokens":
            raise self.fail(None, "the prompt", "a strategy takes exactly one prompt of type Tokens[B, P]",
                            "build the program with one prompt parameter")
        self.defined.add(id(body.params[0]))
        self.seen.add(id(body.params[0]))
        if not body.ops or not isinstance(body.ops[-1], O.Emit):
            raise self.fail(body.ops[-1] if body.ops else None, "the program",
                            "a strategy must end with `emit`", "add `%n = emit(%state) : Tokens[B, G]` last")
        self.block(body, top=True)

    def header(self) -> None:
        p = self.program
        if not isinstance(p.name, str) or not _NAME.match(p.name):
            raise self.fail(None, "its name", f"{p.name!r} is not a name the text form can hold",
                            "use letters, digits, '_' and '.', starting with a letter or '_'")
        keys = [k for k, _ in p.params]
        for key, value in p.params:
            if not isinstance(key, str) or not _NAME.match(key) or keys.count(key) > 1:
                raise self.fail(None, f"param {key!r}", "is not a unique name the text form can hold",
                                "give each param once, named with letters, digits and '_'")
            try:
                format_attr(value)
            except (TypeError, ValueError):
                raise self.fail(None, f"param {key!r}", f"{value!r} cannot be written in the text form",
                                "use a bool, int, float, str, none or a list of them") from None

    def block(self, block: O.Block, top: bool, owner: O.Op | None = None) -> None:
        for i, op in enumerate(block.ops):
            last = i == len(block.ops) - 1
            if isinstance(op, O.Yield) and (top or not last):
                raise self.fail(op, "the terminator", "`yield` may only end an iterate body",
                                "move it to the end of the iterate body")
            if isinstance(op, O.Emit) and not (top and last):
                raise self.fail(op, "the terminator", "`emit` may only end the strategy",
                                "keep one emit, as the last op of the strategy")
            self.op(op)
        if not top and not (block.ops and isinstance(block.ops[-1], O.Yield)):
            raise self.fail(block.ops[-1] if block.ops else owner, "the iterate body",
                            "an iterate body must end with `yield(%state)`", "add a yield of the next state")

    def op(self, op: O.Op) -> None:
        for name in op.operand_fields():
            vals = getattr(op, name)
            for j, v in enumerate(vals if isinstance(vals, tuple) else (vals,)):
                self.operand(op, name, j, v)
        self.attrs(op)
        expected = O.OPS[op.NAME].result(op)
        got = tuple(r.type for r in op.results)
        if got != expected:
            raise self.fail(op, "its result type", f"declared {', '.join(map(str, got)) or 'nothing'}, "
                            f"the type rule gives {', '.join(map(str, expected)) or 'nothing'}",
                            f"declare `: {', '.join(map(str, expected))}`")
        if isinstance(op, O.Iterate):
            self.iterate(op)
        self.dataflow(op)
        for r in op.results:
            if id(r) in self.seen:
                raise self.fail(op, "its result", "this value is defined twice", "give every result a fresh name")
            self.defined.add(id(r))
            self.seen.add(id(r))
            self.defs[id(r)] = op

    def operand(self, op: O.Op, field: str, j: int, v: Any) -> None:
        label = f"operand '{field}'" + (f"[{j}]" if field == "drafts" else "")
        if not isinstance(v, O.Value):
            raise self.fail(op, label, "is missing", f"pass a value as {field}")
        if id(v) in self.seen and id(v) not in self.defined:
            raise self.fail(op, label, f"{self.namer(v)} is defined inside an iterate body and is not visible here",
                            "use the iterate's result, or yield the value from the body")
        if id(v) not in self.defined:
            raise self.fail(op, label, f"{self.namer(v)} is used before it is defined",
                            "define the value earlier in this block or an enclosing one")
        kind = _OPERAND_KIND.get(field)
        if kind and v.type.kind != kind:
            src = self.defs.get(id(v))
            origin = f" from `{src.NAME}`" if src is not None else ""
            raise self.fail(op, label, f"must be {kind}, got {v.type}{origin}", f"pass a {kind} value")

    def attrs(self, op: O.Op) -> None:
        hints = {f.name: f.type for f in dataclasses.fields(type(op))}
        for name, value in op.attrs().items():
            hint = str(hints[name])
            field = f"field '{name}'"
            ok = {"int": isinstance(value, int) and not isinstance(value, bool),
                  "float": isinstance(value, (int, float)) and not isinstance(value, bool),
                  "bool": isinstance(value, bool), "str": isinstance(value, str),
                  "tuple[str, ...]": isinstance(value, tuple) and all(isinstance(x, str) for x in value)}.get(hint, True)
            if not ok:
                raise self.fail(op, field, f"must be {hint}, got {value!r}", f"give {name} a value of type {hint}")
            if isinstance(value, float) and not math.isfinite(value):
                raise self.fail(op, field, f"must be finite, got {value!r}", f"give {name} a finite number")
            if name in _RANGES and not isinstance(value, bool):
                lo, hi = _RANGES_BY_OP.get((op.NAME, name), _RANGES[name])
                if not lo <= value <= hi:
                    raise self.fail(op, field, f"{value!r} is out of range [{lo:g}, {hi:g}]", f"choose {name} within [{lo:g}, {hi:g}]")
            choices = _CHOICES.get((op.NAME, name))
            if (op.NAME, name) == ("join", "rule") and not (isinstance(value, str) and _NAME.match(value)):
                raise self.fail(op, field, f"{value!r} is not a rule name", f"use {', '.join(O.JOIN_RULES)} or a "
                                f"registered rule's name")
            if choices and value not in choices:
                raise self.fail(op, field, f"{value!r} is not one of {', '.join(choices)}", f"use one of {', '.join(choices)}")
        if isinstance(op, (O.DraftNgram, O.DraftAdaptiveNgram, O.DraftCorpus)) and op.min_n > op.max_n:
            raise self.fail(op, "field 'min_n'", f"min_n={op.min_n} exceeds max_n={op.max_n}", "make min_n <= max_n")
        if isinstance(op, O.DraftHead) and not op.head.strip():
            raise self.fail(op, "field 'head'", "names no head", "use head=default (the model's shipped or trained "
                            "head) or the path of a head file")
        if isinstance(op, O.DraftCorpus) and not op.corpus.strip():
            raise self.fail(op, "field 'corpus'", "names no corpus", "use corpus=default (the model's shipped or "
                            "trained corpus) or the path of a corpus file")
        if isinstance(op, O.Iterate):
            bad = [u for u in op.until if u not in O.UNTIL]
            if not op.until:
                raise self.fail(op, "field 'until'", f"is empty; it needs at least one of {', '.join(O.UNTIL)}",
                                f"use until=[{', '.join(O.UNTIL[:2])}]")
            if bad:
                raise self.fail(op, "field 'until'", f"{bad[0]!r} is not one of {', '.join(O.UNTIL)}",
                                f"use until=[{', '.join(O.UNTIL[:2])}]")
        if isinstance(op, O.DraftBranches):
            if sum(map(bool, (op.prompts, op.delimiter, op.provider))) != 1:
                raise self.fail(op, "field 'prompts'", "needs exactly one of branch prompts, a delimiter or a provider",
                                "set one of prompts=[...], delimiter=... or provider=...")
            if op.delimiter:
                try:
                    re.compile(op.delimiter)
                except re.error as exc:
                    raise self.fail(op, "field 'delimiter'", f"{op.delimiter!r} is not a valid regex: {exc}",
                                    "give a Python regular expression matching the start of each item") from None

    def iterate(self, op: O.Iterate) -> None:
        body = op.body
        if body is None or len(body.params) != 1:
            raise self.fail(op, "its body", "an iterate body takes exactly one state parameter", "write `^(%s: State):`")
        if body.params[0].type != op.init.type:
            raise self.fail(op, "its body parameter", f"has type {body.params[0].type}, the loop carries {op.init.type}",
                            f"declare the parameter as {op.init.type}")
        outer = set(self.defined)
        self.defined.add(id(body.params[0]))
        self.seen.add(id(body.params[0]))
        self.block(body, top=False, owner=op)
        self.defined = outer
        term = body.ops[-1]
        assert isinstance(term, O.Yield)
        if term.value.type != op.init.type:
            raise self.fail(term, "operand 'value'", f"yields {term.value.type}, the loop carries {op.init.type}",
                            "yield the committed state")

    def dataflow(self, op: O.Op) -> None:
        if isinstance(op, O.Forward):
            self.forward(op)
        elif isinstance(op, (O.VerifyGreedy, O.VerifySampling, O.VerifyThreshold)):
            fwd = self.producer(op, "logits", op.logits, O.Forward, "pass the logits of the forward that ran these drafts")
            if tuple(map(id, op.drafts)) != tuple(map(id, fwd.drafts)):
                raise self.fail(op, "operand 'drafts'", "must be exactly the drafts its forward ran, in the same order",
                                "pass the forward's drafts to the verify step")
            if fwd.mask == "block":
                raise self.fail(op, "operand 'logits'", "comes from a block (bidirectional) forward",
                                "use unmask.* after a block forward, verify.* after causal or tree forwards")
        elif isinstance(op, O.UNMASK_OPS):
            fwd = self.producer(op, "logits", op.logits, O.Forward, "pass the logits of a block forward")
            want = (O.DraftNoise,) if isinstance(op, O.NOISE_RULES) else (O.DraftMask, O.DraftNoise)
            if fwd.mask != "block" or not any(isinstance(self.defs.get(id(d)), want) for d in fwd.drafts):
                names = " or ".join(w.NAME for w in want)
                raise self.fail(op, "operand 'logits'", f"`{op.NAME}` needs a forward with mask=block over a "
                                f"{names}", f"forward a {want[0].NAME} with mask=block first")
            if isinstance(op, O.UnmaskEntropyBound) and op.t_max < op.t_min:
                raise self.fail(op, "field 't_max'", f"{op.t_max} is below t_min {op.t_min}: the temperature "
                                "schedule falls from t_max to t_min", "set t_max >= t_min")
        elif isinstance(op, O.Commit):
            src = self.defs.get(id(op.accepted))
            if not isinstance(src, O.VERIFY_OPS + O.UNMASK_OPS):
                got = f"`{src.NAME}`" if src is not None else "a block parameter"
                raise self.fail(op, "operand 'accepted'", f"must come from a verify or unmask step, comes from {got}",
                                "commit the result of verify.* or unmask.*")
        elif isinstance(op, O.Fork):
            self.producer(op, "branches", op.branches, O.DraftBranches, "pass the result of draft.branches")
        elif isinstance(op, O.Join) and not op.state.type.shape:
            raise self.fail(op, "operand 'state'", "is not a forked state (State[N])", "join the state a fork produced")

    def forward(self, op: O.Forward) -> None:
        kinds = [self.defs.get(id(d)) for d in op.drafts]
        if op.layout == "batch" and op.mask not in ("tree", "packed"):
            raise self.fail(op, "field 'layout'", f"'batch' lays out the chains or branches of a tree or packed "
                            f"forward, not mask={op.mask}", "use mask=tree or packed with layout=batch, or layout=sequence")
        has_mask = any(isinstance(k, (O.DraftMask, O.DraftNoise)) for k in kinds)
        if op.mask == "block" and not has_mask:
            raise self.fail(op, "field 'mask'", "'block' (bidirectional) needs a draft.mask or draft.noise",
                            "forward a draft.mask or use mask=causal")
        if has_mask and op.mask != "block":
            raise self.fail(op, "field 'mask'", "a diffusion canvas needs mask=block",
                            "use mask=block for draft.mask and draft.noise")
        if op.mask == "packed" and not op.state.type.shape:
            raise self.fail(op, "field 'mask'", "'packed' needs a forked state", "fork before a packed forward")

    def producer(self, op: O.Op, field: str, v: O.Value, cls: type[O.Op], fix: str) -> Any:
        src = self.defs.get(id(v))
        if not isinstance(src, cls):
            got = f"`{src.NAME}`" if src is not None else "a block parameter"
            raise self.fail(op, f"operand '{field}'", f"must come from `{cls.NAME}`, comes from {got}", fix)
        return src


def verify(program: O.Program) -> O.Program:
    """Check ``program``; return it unchanged or raise ``VerifyError``."""
    if not isinstance(program, O.Program):
        raise VerifyError(f"expected a Program, got {type(program).__name__}")
    _Checker(program).run()
    return program

