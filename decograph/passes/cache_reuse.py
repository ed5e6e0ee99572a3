"""``cache-reuse``: keep the KV a step computed instead of recomputing or copying it.

- ``commit(kv=recompute)`` feeds the accepted draft tokens again at the next forward; when
  their KV was computed under a causal or tree mask (each node saw exactly its accepted
  ancestors), it is already the KV a plain decode would have, so it is kept
  (``kv=keep_accepted``): no query token is computed twice.
- ``commit(rollback=copy)`` rebuilds the cache from the kept slots after every rejection;
  ``rollback=in_place`` only marks rejected slots invalid and crops the tail (no KV moves).
- A prefix is shared across draft branches by the tree mask (``layout=sequence``): every
  branch attends to the same prefix slots, none is copied.
- The hook for approximate caches: ``KV_RULES`` maps the mask a step's forward used to the
  KV policy that is exact for it. Under ``mask=block`` (bidirectional, masked diffusion) no
  policy is exact; with ``approximate=true`` the pass picks ``block_approx``, Fast-dLLM's
  block-wise approximate prefix cache (``dual=true``: ``block_approx_dual``, the dual cache
  that also keeps the KV after the block), which the diffusion runtime implements.

    %7 = commit(%2, %6, kv=recompute, rollback=copy) : State
becomes
    %7 = commit(%2, %6, kv=keep_accepted, rollback=in_place) : State
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from decograph.ir import ops as O
from decograph.passes.analysis import AnalysisManager
from decograph.passes.manager import Pass, PassResult
from decograph.passes.rewrite import map_ops, rebuild

__all__ = ["CacheReuse", "KV_RULES", "kv_policy"]

# mask of the forward whose logits were verified/unmasked -> (exact policy, approximate policy)
KV_RULES: dict[str, tuple[str | None, str | None]] = {
    "causal": ("keep_accepted", None),
    "tree": ("keep_accepted", None),
    "packed": ("keep_accepted", None),
    "block": (None, "block_approx"),
}


def kv_policy(mask: str, approximate: bool, dual: bool = False) -> str | None:
    """The KV policy to keep a ``mask`` forward's accepted entries, or None (recompute)."""
    exact, approx = KV_RULES.get(mask, (None, None))
    if exact or not approximate or approx is None:
        return exact
    return f"{approx}_dual" if dual else approx


@dataclass(frozen=True)
class CacheReuse(Pass):
    """Keeps accepted KV where exact (or approximate, when allowed); rolls back in place."""

    name: ClassVar[str] = "cache-reuse"
    approximate: bool = False
    dual: bool = False

    def run(self, program: O.Program, am: AnalysisManager) -> PassResult:
        defs = {id(v): op for op in program.walk() for v in op.results}
        stats: dict[str, int] = {}

        def reuse(op: O.Op, vmap: dict[int, O.Value]) -> list[O.Op]:
            if not isinstance(op, O.Commit):
                return [op]
            check = defs.get(id(op.accepted))
            fwd = defs.get(id(getattr(check, "logits", None)))
            kv = op.kv
            if op.kv == "recompute" and isinstance(fwd, O.Forward):
                kv = kv_policy(fwd.mask, self.approximate, self.dual) or "recompute"
            if kv != op.kv:
                stats[f"kv_{kv}"] = stats.get(f"kv_{kv}", 0) + 1
            if op.rollback != "in_place":
                stats["rollback_in_place"] = stats.get("rollback_in_place", 0) + 1
            return [rebuild(op, vmap, kv=kv, rollback="in_place")]

        out = map_ops(program, reuse)
        return PassResult(out, out is not program, stats)
