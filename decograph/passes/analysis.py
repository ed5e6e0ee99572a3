"""Analyses the passes share: uses, per-forward shapes and a symbolic cost model.

The cost model describes one iteration step of every ``forward`` as sympy expressions in the
draft sizes (``K`` draft length, ``W`` Jacobi window, ``C`` candidate count, ``N`` n-gram
size), the context length ``S`` and the tokens accepted per step ``A``:

    forwards per step      F = C                (mask=causal, C chains)      else 1
    query tokens per step  Q = C*P + C*K        (separate)   P + C*K (packed)  C*(P + K) (batch)
    KV bytes copied        X = 2*C*S*b (batch layout) + S*b (rollback=copy)   b: bytes per slot
    forked (R branches)    F = R (causal) else 1;  Q = R*(P + C*K);  X = (R - 1)*S*b once (batch)
    pending tokens         P = 1 + A (kv=recompute: accepted drafts are fed again)  else 1

A pass binds the symbols from the program's attributes (``bindings``), evaluates the
expressions, and prices a forward of ``q`` queries with the model's measured cost curve.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import sympy

from decograph.ir import ops as O
from decograph.passes.rewrite import users

__all__ = ["ForwardCost", "cost_model", "AnalysisManager", "ANALYSES", "SYMBOLS", "draft_size"]

K, W, C, N, S, A, P, R = sympy.symbols("K W C N S A P R", positive=True)
SYMBOLS = {"K": K, "W": W, "C": C, "N": N, "S": S, "A": A, "P": P, "R": R}


def draft_size(op: O.Op) -> tuple[sympy.Expr, sympy.Expr, dict[sympy.Symbol, int]]:
    """(chains, tokens per chain, bindings) of a draft op, symbolically."""
    if isinstance(op, (O.DraftJacobi, O.DraftGaussSeidelJacobi)):
        w = op.window if isinstance(op, O.DraftJacobi) else op.block
        return sympy.Integer(1), W, {W: w}
    if isinstance(op, O.DraftNgramPool):
        return C, N - 1, {C: op.candidates, N: op.n}
    if isinstance(op, (O.DraftNgram, O.DraftAdaptiveNgram)):
        return C, K, {C: op.candidates, K: op.k}
    if isinstance(op, O.DraftHead):
        # A tree, not C chains of K: its node count (``nodes``, or the runtime's choice, about
        # a full level per depth) spread over its leaves, so chains * tokens counts its nodes.
        chains = 1 if op.topk == 1 or op.nodes == 1 else min(op.topk, op.nodes or op.topk)
        total = op.nodes or op.topk * op.depth
        return sympy.Integer(chains), sympy.Rational(total, chains), {}
    k = getattr(op, "k", 1)
    return sympy.Integer(1), K, {K: k}


@dataclass(frozen=True)
class ForwardCost:
    """One forward's per-step expressions and the bindings that evaluate them."""

    forwards: sympy.Expr
    queries: sympy.Expr
    kv_copied: sympy.Expr
    chains: sympy.Expr
    bindings: dict[sympy.Symbol, int]

    def evaluate(self, expr: sympy.Expr, **extra: float) -> float:
        subs = dict(self.bindings)
        subs.update({SYMBOLS[k]: v for k, v in extra.items()})
        return float(expr.subs(subs))


def _forward_cost(fwd: O.Forward, defs: dict[int, O.Op], commit: O.Commit | None) -> ForwardCost:
    chains, nodes, binds = sympy.Integer(0), sympy.Integer(0), {}
    for d in fwd.drafts:
        src = defs.get(id(d))
        c, k, b = draft_size(src) if src is not None else (sympy.Integer(1), K, {K: 1})
        chains, nodes = chains + c, nodes + c * k
        binds.update(b)
    pend = 1 + A if commit is not None and commit.kv == "recompute" else sympy.Integer(1)
    slot = sympy.Symbol("b", positive=True)
    many = bool(chains.subs(binds) > 1)
    if fwd.state.type.shape:                 # a forked state: R branches per row
        n = fwd.state.type.shape[0]
        binds[R] = n if isinstance(n, int) else 8
        per = pend + nodes
        if fwd.mask == "causal":
            forwards, queries, copied = R, R * per, sympy.Integer(0)
        elif fwd.layout == "batch":
            forwards, queries, copied = sympy.Integer(1), R * per, (R - 1) * S * slot
        else:
            forwards, queries, copied = sympy.Integer(1), R * per, sympy.Integer(0)
        return ForwardCost(forwards, queries, copied, R, binds)
    if fwd.mask == "causal" and many:
        forwards, queries, copied = chains, chains * pend + nodes, sympy.Integer(0)
    elif fwd.mask == "tree" and fwd.layout == "batch" and many:
        forwards, queries, copied = sympy.Integer(1), chains * pend + nodes, 2 * chains * S * slot
    else:
        forwards, queries, copied = sympy.Integer(1), pend + nodes, sympy.Integer(0)
    if commit is not None and commit.rollback == "copy":
        copied = copied + S * slot
    return ForwardCost(forwards, queries, copied, chains, binds)


def cost_model(program: O.Program) -> dict[int, ForwardCost]:
    """id(forward op) -> its per-step cost expressions."""
    defs = {id(v): op for op in program.walk() for v in op.results}
    uses = users(program)
    out: dict[int, ForwardCost] = {}
    for op in program.walk():
        if isinstance(op, O.Forward):
            commit = None
            for check in uses.get(id(op.result), []):        # verify.* / unmask.*
                for u in uses.get(id(check.result), []) if check.results else []:
                    if isinstance(u, O.Commit):
                        commit = u
            out[id(op)] = _forward_cost(op, defs, commit)
    return out


ANALYSES: dict[str, Callable[[O.Program], Any]] = {"users": users, "cost": cost_model}


class AnalysisManager:
    """Caches analyses per program; a pass that changes the program invalidates them.

    ``context`` carries what the passes may consult beyond the IR (the cost curve, the
    acceptance observed, the backend). ``hits``/``misses`` count cache use.
    """

    def __init__(self, context: Any = None) -> None:
        self.context = context
        self._cache: dict[str, tuple[O.Program, Any]] = {}
        self.hits = self.misses = 0

    def get(self, name: str, program: O.Program) -> Any:
        got = self._cache.get(name)
        if got is not None and got[0] is program:
            self.hits += 1
            return got[1]
        self.misses += 1
        value = ANALYSES[name](program)
        self._cache[name] = (program, value)
        return value

    def invalidate(self, preserved: tuple[str, ...] = ()) -> None:
        self._cache = {k: v for k, v in self._cache.items() if k in preserved}
