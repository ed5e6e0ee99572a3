"""Verification rules over a row's draft tree.

Each rule walks the tree from the root, choosing at every node one child to accept or
stopping; it returns the accepted node ids and the bonus token that follows them.

- greedy: accept the child equal to the argmax (lossless: exactly greedy decoding).
- sampling: multi-candidate speculative sampling for point-mass drafts: try the children in
  order, accepting child c with probability p'(c) under the residual p' (p with the rejected
  children removed, renormalized); if none is accepted, sample the bonus from the residual.
  Every emitted token is then distributed exactly as a sample from p (lossless).
- threshold: accept the most probable child if its probability is >= the threshold (lossy).
"""
from __future__ import annotations

import torch

from decograph.backends.torch_ref.batch import DraftTree
from decograph.errors import InputError

__all__ = ["greedy_walk", "sampling_walk", "threshold_walk", "process_logits"]


def greedy_walk(tree: DraftTree, argmax: list[int]) -> tuple[list[int], int]:
    """``argmax[0]`` is the prediction at the root, ``argmax[1 + i]`` after node i."""
    path: list[int] = []
    at, pred = -1, argmax[0]
    kids = tree.children
    while True:
        nxt = kids.get(at, {}).get(pred)
        if nxt is None:
            return path, pred
        path.append(nxt)
        at, pred = nxt, argmax[1 + nxt]


def process_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Probabilities after temperature, top-k and top-p (nucleus) filtering, in that order."""
    x = logits.float() / temperature
    if top_k and top_k < x.shape[-1]:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        cum = torch.softmax(sorted_x, dim=-1).cumsum(-1)
        drop = cum - torch.softmax(sorted_x, dim=-1) >= top_p
        x = x.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.softmax(x, dim=-1)


def sampling_walk(tree: DraftTree, probs: torch.Tensor, gen: torch.Generator) -> tuple[list[int], int]:
    """``probs[0]`` at the root, ``probs[1 + i]`` after node i (rows of processed probabilities)."""
    vocab = probs.shape[-1]
    path: list[int] = []
    at = -1
    while True:
        p = probs[0 if at < 0 else 1 + at].clone()
        moved = False
        for tok, node in tree.children.get(at, {}).items():
            if not 0 <= tok < vocab:
                raise InputError(f"draft token id {tok} is outside the vocabulary of {vocab}")
            total = float(p.sum())
            if total <= 0:
                break
            if float(torch.rand((), generator=gen)) < float(p[tok]) / total:
                path.append(node)
                at, moved = node, True
                break
            p[tok] = 0.0
        if not moved:
            if float(p.sum()) <= 0:
                p = probs[0 if at < 0 else 1 + at]
            return path, int(torch.multinomial(p / p.sum(), 1, generator=gen))


def threshold_walk(tree: DraftTree, probs: torch.Tensor, threshold: float) -> tuple[list[int], int]:
    """Greedy bonus; drafts accepted while their probability reaches ``threshold``."""
    path: list[int] = []
    at = -1
    while True:
        p = probs[0 if at < 0 else 1 + at]
        best, best_p = None, -1.0
        for tok, node in tree.children.get(at, {}).items():
            if float(p[tok]) >= threshold and float(p[tok]) > best_p:
                best, best_p = node, float(p[tok])
        if best is None:
            return path, int(p.argmax())
        path.append(best)
        at = best
