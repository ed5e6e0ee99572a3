"""``canonicalize``: local clean-ups to a fixed point, dead steps included.

Rules (each a ``(pattern, fn)`` pair):
- ``cse-drafts``: two identical draft ops on the same state become one;
- ``drop-unused-draft-operand``: a verify loses a draft operand its forward does not have
  (a rewrite that drops a draft from the forward only; the verifier rejects such IR);
- ``one-chain-is-causal``: a forward whose drafts hold at most one chain is a causal forward
  (``mask=tree``, ``layout=batch`` and ``dedup`` mean nothing for a single chain);
- ``dce``: a draft, forward, verify or unmask whose result nobody uses is removed.

    %3 = draft.jacobi(%2, init=repeat, window=4) : Tokens[B, 4]
    %4 = forward(%2, %3, dedup=true, layout=sequence, mask=tree) : Logits[B, 5, V]
becomes
    %3 = draft.jacobi(%2, init=repeat, window=4) : Tokens[B, 4]
    %4 = forward(%2, %3, dedup=false, layout=sequence, mask=causal) : Logits[B, 5, V]
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from decograph.ir import ops as O
from decograph.passes.analysis import AnalysisManager
from decograph.passes.manager import Pass, PassResult
from decograph.passes.rewrite import RewriteContext, Rules, apply_rules, rebuild

__all__ = ["Canonicalize", "CANONICAL_RULES"]

_PURE = O.DRAFT_OPS + (O.Forward,) + O.VERIFY_OPS + O.UNMASK_OPS


def _cse_drafts(op: O.Op, ctx: RewriteContext) -> list[O.Op] | None:
    for other in ctx.program.walk():
        if other is op:
            return None
        if type(other) is type(op) and other.operands == op.operands and other.attrs() == op.attrs():
            ctx.replace(op.result, other.result)
            return []
    return None


def _chains(op: O.Forward) -> int:
    total = 0
    for d in op.drafts:
        c = O.draft_chains(d.type)
        total += c if isinstance(c, int) else 2
    return total


def _one_chain_is_causal(op: O.Forward, ctx: RewriteContext) -> O.Op | None:
    if op.mask in ("block", "packed") or _chains(op) > 1 or op.state.type.shape:
        return None         # (over a forked state, causal means one forward per branch)
    if (op.mask, op.layout, op.dedup) == ("causal", "sequence", False):
        return None
    return rebuild(op, ctx.vmap, mask="causal", layout="sequence", dedup=False)


def _drop_operand(op: O.Op, ctx: RewriteContext) -> O.Op | None:
    """verify.* keeps exactly the drafts its forward ran."""
    fwd = ctx.defs.get(id(op.logits))
    if not isinstance(fwd, O.Forward):
        return None
    keep = tuple(d for d in op.drafts if any(d is f for f in fwd.drafts))
    if len(keep) == len(op.drafts):
        return None
    return rebuild(op, ctx.vmap, drafts=keep)


def _dce(op: O.Op, ctx: RewriteContext) -> list[O.Op] | None:
    return [] if op.results and not any(ctx.used(v) for v in op.results) else None


CANONICAL_RULES = (
    Rules((O.DRAFT_OPS, _cse_drafts))
    + Rules((O.VERIFY_OPS, _drop_operand))
    + Rules((O.Forward, _one_chain_is_causal))
    + Rules((_PURE, _dce))
)


@dataclass(frozen=True)
class Canonicalize(Pass):
    """Applies ``CANONICAL_RULES`` to a fixed point."""

    name: ClassVar[str] = "canonicalize"

    def run(self, program: O.Program, am: AnalysisManager) -> PassResult:
        out, fired = apply_rules(program, CANONICAL_RULES)
        return PassResult(out, fired > 0, {"rewrites": fired} if fired else {})
