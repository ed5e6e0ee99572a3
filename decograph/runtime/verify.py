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

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from decograph.errors import InputError
from decograph.ir import ops as O
from decograph.runtime.rows import DraftTree

__all__ = ["greedy_walk", "sampling_walk", "threshold_walk", "process_logits", "softmax", "log_softmax",
           "RowSampling", "verify_tree"]


@dataclass
class RowSampling:
    """One row's own sampling parameters, in place of its program's verification rule: a
    server's requests with different temperatures and top-p decode in one batch. Temperature
    0 is greedy verification. ``seed``: the row draws from its own generator (else from the
    run's)."""

    temperature: float
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    _gen: np.random.Generator | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not (self.temperature >= 0 and np.isfinite(self.temperature)):
            raise InputError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InputError(f"top_k must be >= 0, got {self.top_k}")

    def generator(self, run: np.random.Generator) -> np.random.Generator:
        if self.seed is None:
            return run
        if self._gen is None:
            self._gen = np.random.default_rng(self.seed)
        return self._gen


def verify_tree(op: O.Op, tree: DraftTree, argmax: Callable[[], list[int]], logits: Callable[[], np.ndarray],
                sampling: RowSampling | None, gen: np.random.Generator) -> tuple[list[int], int]:
    """A row's accepted path and bonus token under ``op`` (``verify.greedy``, ``.sampling``,
    ``.threshold``), or under the row's own ``sampling`` parameters when it has them."""
    if sampling is not None:
        if sampling.temperature == 0:
            return greedy_walk(tree, argmax())
        probs = process_logits(logits(), sampling.temperature, sampling.top_k, sampling.top_p)
        return sampling_walk(tree, probs, sampling.generator(gen))
    if isinstance(op, O.VerifyGreedy):
        return greedy_walk(tree, argmax())
    if isinstance(op, O.VerifySampling):
        return sampling_walk(tree, process_logits(logits(), op.temperature, op.top_k, op.top_p), gen)
    return threshold_walk(tree, softmax(logits()), op.threshold)


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
