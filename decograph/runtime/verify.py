"""Verification rules over a row's draft tree (numpy only).

Each rule walks the tree from the root, choosing at every node one child to accept or
stopping; it returns the accepted node ids and the bonus token that follows them.

- greedy: accept the child equal to the argmax (lossless: exactly greedy decoding).
- sampling: multi-candidate speculative sampling for point-mass drafts: try the children in
  order, accepting child c with probability p'(c) under the residual p' (p with the rejected
  children removed, renormalized); if none is accepted, sample the bonus from the residual.
  Every emitted token is then distributed exactly as a sample from p (lossless).
- threshold: accept the most probable child if its probability is >= the threshold (lossy).

Rows of logits or probabilities are ``[1 + nodes, V]``: row 0 at the root, row ``1 + i`` after
node ``i``.
"""
from __future__ import annotations

import numpy as np

from decograph.errors import InputError
from decograph.runtime.rows import DraftTree

__all__ = ["greedy_walk", "sampling_walk", "threshold_walk", "process_logits", "softmax", "log_softmax"]


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


def softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def process_logits(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """Probabilities after temperature, top-k and top-p (nucleus) filtering, in that order."""
    x = np.asarray(logits, np.float64) / temperature
    if top_k and top_k < x.shape[-1]:
        kth = np.sort(x, axis=-1)[..., -top_k][..., None]
        x = np.where(x < kth, -np.inf, x)
    if top_p < 1.0:
        order = np.argsort(-x, axis=-1, kind="stable")
        sorted_x = np.take_along_axis(x, order, -1)
        p = softmax(sorted_x)
        drop = (p.cumsum(-1) - p) >= top_p
        mask = np.zeros_like(drop)
        np.put_along_axis(mask, order, drop, -1)
        x = np.where(mask, -np.inf, x)
    return softmax(x)


def sampling_walk(tree: DraftTree, probs: np.ndarray, gen: np.random.Generator) -> tuple[list[int], int]:
    """``probs[0]`` at the root, ``probs[1 + i]`` after node i (rows of processed probabilities)."""
    vocab = probs.shape[-1]
    path: list[int] = []
    at = -1
    while True:
        p = probs[0 if at < 0 else 1 + at].copy()
        moved = False
        for tok, node in tree.children.get(at, {}).items():
            if not 0 <= tok < vocab:
                raise InputError(f"draft token id {tok} is outside the vocabulary of {vocab}")
            total = float(p.sum())
            if total <= 0:
                break
            if gen.random() < float(p[tok]) / total:
                path.append(node)
                at, moved = node, True
                break
            p[tok] = 0.0
        if not moved:
            if float(p.sum()) <= 0:
                p = probs[0 if at < 0 else 1 + at]
            return path, int(gen.choice(vocab, p=p / p.sum()))


def threshold_walk(tree: DraftTree, probs: np.ndarray, threshold: float) -> tuple[list[int], int]:
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
