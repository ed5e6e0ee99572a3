"""``to-sampling``: turn greedy verification into lossless speculative sampling.

    %4 = verify.greedy(%2, %3, %1) : Tokens[B, A]
becomes
    %4 = verify.sampling(%2, %3, %1, temperature=0.7, top_k=0, top_p=1.0) : Tokens[B, A]

Result values keep their identity, so every user of the verify result stays valid.
"""
from __future__ import annotations

import dataclasses

from decograph.ir import ops as O
from decograph.ir.verify import verify

__all__ = ["to_sampling"]


def _block(block: O.Block, temperature: float, top_k: int, top_p: float) -> O.Block:
    out: list[O.Op] = []
    for op in block.ops:
        if isinstance(op, O.VerifyGreedy):
            op = O.VerifySampling(op.results, op.state, op.logits, op.drafts, float(temperature), int(top_k), float(top_p))
        elif isinstance(op, O.Iterate):
            op = dataclasses.replace(op, body=_block(op.body, temperature, top_k, top_p))
        out.append(op)
    return O.Block(block.params, tuple(out))


def to_sampling(p: O.Program, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> O.Program:
    """A new program where every ``verify.greedy`` samples; the input is untouched."""
    return verify(dataclasses.replace(p, body=_block(p.body, temperature, top_k, top_p)))
