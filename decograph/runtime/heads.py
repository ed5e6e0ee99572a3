"""``draft.head``: a trained draft head (EAGLE) drafts a token tree from the model's hidden states.

The head (``decograph.heads.spec``) reads pairs ``(f_i, t_{i+1})``: the model's final hidden
state at position ``i`` and the token that followed. It predicts ``f_{i+1}``, whose logits over
the head's vocabulary guess ``t_{i+2}``. Per row the source keeps the head's K/V over the
committed pairs (a window of the last ``CONTEXT`` positions), fed from the prompt's last hidden
states (``Batch.prefill_hidden``) and then from each step's pending tokens and accepted nodes
(``StepOutput.hidden``). A step:

1. one head call over the pairs committed since the last step (causal); its last output is
   the root's predicted feature, whose ``topk`` most probable tokens form the first level;
2. EAGLE-2's dynamic tree: per level, the ``topk`` newest nodes with the highest cumulative
   draft probability are expanded (one head call per level: each node attends to the
   committed K/V and its ancestors' and is fed its parent's predicted feature), each into its
   ``topk`` most probable children;
3. the best nodes by cumulative probability (ancestor-closed) are kept: ``nodes`` of them, or
   with ``nodes=0`` the count with the most expected tokens per unit of cost, a node's
   expected acceptance being its draft probability calibrated on this row against what verify
   accepted (decayed, so a head that is often wrong drafts less, and is tried again later).

The head's own calls are charged too (``nodes=0``), timed against the forward
(``DraftSource.unit``, the interpreter's clock): a level is expanded only while its parents'
expected acceptance could pay for its call, and a row skips the head on steps where its
running gain does not pay for the head's running time beside the forward without it (then
tries it again after 1, 2, 4, ... steps). SmolLM2-135M on 2 cores: a head call and its logits
over 8192 tokens take ~1-2 ms, 5-15% of a one-token forward; uncharged, trees were drafted
that cost more than they returned. A node's prior acceptance is its draft probability.

The kept nodes go out as root-to-leaf chains (the forward's trie merges them). Draft nodes'
K/V never stays: accepted ones come back as committed pairs with the model's own hidden
states. The runner is opaque (``NumpyHead``'s interface: ``config``, ``vocab_ids``, ``step``,
``logits``), so an ONNX head runs here as well as the numpy one.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from decograph.ir import ops as O
from decograph.runtime.rows import Row
from decograph.runtime.source import DraftSource

__all__ = ["HeadDraft", "CONTEXT", "BINS", "DECAY", "DRIFT"]

CONTEXT = 512           # committed positions whose head K/V a row keeps (and prompt positions read)
BINS = 10               # calibration bins over a node's cumulative draft probability
DECAY = 0.95            # a bin's evidence decays as new evidence comes in (as ANPD's rates)
DRIFT = 0.99            # ... and drifts back to the prior while unused, so a bin that failed is tried again
PRIOR_WEIGHT = 1.0      # the prior (acceptance = draft probability) counts as this many bin-middle nodes
BACKOFF = 16            # a row that found its head not paying skips it 1, 2, 4, ... up to this many steps, then tries it


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    """The column indices of each row's ``k`` largest scores, largest first (ties: the smaller
    index first): ``k`` passes of argmax, several times faster than a partition for a few of
    thousands."""
    if k == 1:
        return scores.argmax(axis=1)[:, None]
    work, rows = scores.copy(), np.arange(len(scores))
    out = np.empty((len(scores), k), dtype=np.int64)
    for c in range(k):
        out[:, c] = work.argmax(axis=1)
        work[rows, out[:, c]] = -np.inf
    return out


@dataclass
class _Node:
    token: int
    parent: int             # index of the parent node, -1: a child of the root
    depth: int              # 1 for the root's children
    logp: float             # cumulative log draft probability
    feat: np.ndarray        # the feature its pair is fed: its parent's predicted one
    slot: int = -1          # its K/V's index among the step's draft K/V, once expanded


@dataclass
class _Memory:
    """One row's head state: K/V of the pairs at positions ``start .. end - 1``, the model's
    hidden states of positions ``end ..`` not fed yet, and the acceptance calibration."""

    k: np.ndarray
    v: np.ndarray
    start: int = 0
    feats: list[np.ndarray] = field(default_factory=list)
    root: np.ndarray | None = None          # the last fed pair's output: position ``end``'s feature
    hits: np.ndarray = field(default_factory=lambda: np.zeros(BINS))
    drawn: np.ndarray = field(default_factory=lambda: np.zeros(BINS))     # the tried nodes' summed p
    drafted: list[tuple[tuple[int, ...], float]] = field(default_factory=list)   # last step: path, p
    gain: float = -1.0      # expected tokens the head's kept nodes added a step (running; < 0: untried)
    width: float = 1.0      # nodes kept a step (running)
    wait: int = 0           # steps left to skip the head
    backoff: int = 0        # the last skip's length
    trial: bool = False     # the next step tries the head again (after a skip)

    @property
    def end(self) -> int:
        return self.start + len(self.k)

    def restart(self, start: int) -> None:
        self.k, self.v, self.start, self.feats, self.root = self.k[:0], self.v[:0], start, [], None

    def acceptance(self, p: float) -> float:
        """The chance a node of draft probability ``p`` is accepted, as measured on this row:
        ``p`` scaled by its bin's hits over the summed ``p`` of the bin's tried nodes (decayed),
        so within a bin a node of 0.005 counts a tenth of one of 0.05."""
        b = min(BINS - 1, int(p * BINS))
        mid = (b + 0.5) / BINS           # the prior: as likely as drafted, worth PRIOR_WEIGHT nodes
        return min(1.0, p * float((self.hits[b] + PRIOR_WEIGHT * mid) / (self.drawn[b] + PRIOR_WEIGHT * mid)))


class HeadDraft(DraftSource):
    """``draft.head``'s source over a head runner (see the module docstring)."""

    hidden_tail = CONTEXT
    timed = True            # charge the head's measured time (False: the forward's cost only, deterministic)

    def __init__(self, op: O.Op, runner: Any) -> None:
        super().__init__(op)
        self.runner = runner
        self.vocab = np.asarray(runner.vocab_ids, dtype=np.int64)
        c = runner.config
        self.kv_shape = (int(c.kv_heads), int(c.head_dim))
        self.t_step = 0.0       # seconds of a drafting step's head calls (running)
        self.t_level = 0.0      # seconds of one tree level's head call and logits (running)
        self._rate = 0.0        # ``_keep``'s best expected tokens per unit of cost, this step

    def _head_cost(self, seconds: float) -> float:
        """``seconds`` of head calls in units of the forward's cost (0 until the forward is timed)."""
        return seconds / self.unit if self.timed and self.unit > 0 else 0.0

    @staticmethod
    def _average(old: float, new: float) -> float:
        return new if not old else 0.8 * old + 0.2 * new

    def fresh(self, row: Row) -> _Memory:
        empty = np.zeros((0, *self.kv_shape), np.float32)
        return _Memory(empty, empty.copy())

    # -- feeding the committed pairs -------------------------------------------------------

    def take_hidden(self, row: Row, hidden: np.ndarray, first: int) -> None:
        mem: _Memory = self.memory(row)
        n = min(len(hidden), len(row.tokens) - 1 - first)   # pairs need the token after them
        if n <= 0:
            return
        known = mem.end + len(mem.feats)
        if first > known or (not len(mem.k) and not mem.feats):
            mem.restart(first)            # a gap (a join, an admitted row): the window starts here
            known = first
        if known - first < n:
            mem.feats.extend(np.asarray(hidden[known - first : n], dtype=np.float32))
        if len(mem.feats) > CONTEXT:
            last = mem.end + len(mem.feats)
            feats = mem.feats[-CONTEXT:]
            mem.restart(last - CONTEXT)
            mem.feats = feats

    def _feed(self, row: Row, mem: _Memory) -> None:
        """One causal head call over the pairs not fed yet."""
        if not mem.feats:
            return
        n, end = len(mem.feats), mem.end
        tokens = np.asarray(row.tokens[end + 1 : end + 1 + n], dtype=np.int64)
        out, k, v = self.runner.step(np.stack(mem.feats), tokens, np.arange(end, end + n), mem.k, mem.v,
                                     logits_rows=1)
        mem.k = np.concatenate([mem.k, np.asarray(k, np.float32)])
        mem.v = np.concatenate([mem.v, np.asarray(v, np.float32)])
        mem.feats, mem.root = [], np.asarray(out[-1], dtype=np.float32)
        if len(mem.k) > CONTEXT:
            cut = len(mem.k) - CONTEXT
            mem.k, mem.v, mem.start = mem.k[cut:], mem.v[cut:], mem.start + cut

    # -- drafting ----------------------------------------------------------------------------

    def longest(self) -> int:
        return int(self.op.depth)

    def propose(self, row: Row, limit: int) -> list[list[int]]:
        mem: _Memory = self.memory(row)
        mem.drafted = []
        depth = min(int(self.op.depth), limit)
        if depth <= 0:
            return []
        pending = len(row.pending) + self.queued      # other drafts' tokens widen the same forward
        cap = int(self.op.nodes) or O.MAX_TREE
        if self.max_query:
            cap = min(cap, self.max_query - pending)
        if cap <= 0 or self._skip(mem, pending):
            return []
        start = time.perf_counter()
        self._feed(row, mem)
        if mem.root is None or mem.end != len(row.tokens) - 1:
            return []                     # the root's feature is not predicted (yet): no hidden states
        nodes, spent = self._grow(row, mem, depth, cap, pending, start)
        kept = self._keep(mem, nodes, cap, pending)
        self.t_step = self._average(self.t_step, spent)
        expected = sum(mem.acceptance(math.exp(nodes[i].logp)) for i in kept)
        if mem.gain < 0:
            mem.gain, mem.width = expected, float(len(kept))
        else:
            mem.gain, mem.width = 0.5 * mem.gain + 0.5 * expected, 0.5 * mem.width + 0.5 * len(kept)
        return self._chains(mem, nodes, kept)

    def _skip(self, mem: _Memory, pending: int) -> bool:
        """Whether the row skips the head this step: when its calls cost more than its tokens
        are expected to save (the row's running gain, the expected tokens its kept nodes added,
        against the head's running time plus the wider forward, beside the forward without
        it). A row that skips waits 1, 2, 4, ... steps (up to ``BACKOFF``), then tries the
        head once more to measure its gain anew. (A fixed ``nodes`` count drafts every step.)"""
        if self.op.nodes or not self.timed or not self.unit or not self.t_step or mem.gain < 0:
            return False
        if mem.wait > 0:
            mem.wait -= 1
            return True
        if mem.trial:
            mem.trial = False
            return False
        with_head = (1.0 + mem.gain) / (self.step_cost(pending + max(1, round(mem.width))) +
                                        self._head_cost(self.t_step))
        if with_head >= 1.0 / self.step_cost(pending):
            mem.backoff = 0
            return False
        mem.backoff = min(BACKOFF, max(1, 2 * mem.backoff))
        mem.wait, mem.trial = mem.backoff - 1, True
        return True

    def _children(self, nodes: list[_Node], parents: list[int], feats: list[np.ndarray], logits: np.ndarray,
                  depth: int) -> list[int]:
        """Append the ``topk`` most probable children of each of ``parents`` (-1: the root),
        whose logits are the rows of ``logits`` and whose children are fed ``feats``; their
        indices, parent by parent, each parent's most probable first."""
        logits = np.asarray(logits, dtype=np.float32).reshape(len(parents), -1)
        k = min(1 if self.chains_only else int(self.op.topk), logits.shape[1])    # one chain: the head's greedy path
        top_logit = logits.max(axis=1, keepdims=True)
        lse = top_logit.astype(np.float64) + np.log(np.exp(logits - top_logit).sum(axis=1, keepdims=True,
                                                                                     dtype=np.float64))
        top = _top(logits, k)
        lp = np.take_along_axis(logits, top, axis=1).astype(np.float64) - lse      # their log-probabilities
        first = len(nodes)
        for r, parent in enumerate(parents):
            base = nodes[parent].logp if parent >= 0 else 0.0
            nodes.extend(_Node(int(self.vocab[j]), parent, depth, base + float(p), feats[r])
                         for j, p in zip(top[r], lp[r]))
        return list(range(first, len(nodes)))

    def _grow(self, row: Row, mem: _Memory, depth: int, cap: int, pending: int,
              start: float) -> tuple[list[_Node], float]:
        """The dynamic tree: the root's children, then per level the best ``topk`` new nodes
        expanded by one head call, until ``depth``, until no expansion could be kept, or until
        a level's call costs more than the most its nodes' children could add (their parents'
        expected acceptance, at the step's best tokens per unit of cost so far). Returns the
        nodes and the seconds the head's calls took (from ``start``, the first call's)."""
        assert mem.root is not None
        nodes: list[_Node] = []
        frontier = self._children(nodes, [-1], [mem.root], self.runner.logits(mem.root[None]), 1)
        spent = time.perf_counter() - start
        base = len(row.tokens) - 2          # the last committed pair's position
        dk, dv = mem.k[:0], mem.v[:0]       # the draft nodes' K/V, this step only
        for d in range(1, depth):
            kept = set(self._keep(mem, nodes, cap, pending))
            frontier = [i for i in frontier if i in kept]     # a child scores no better than its parent
            if not frontier or not self._pays(mem, nodes, frontier):
                break
            level = time.perf_counter()
            q, P, D = len(frontier), len(mem.k), len(dk)
            mask = np.zeros((q, P + D + q), dtype=bool)
            mask[:, :P] = True
            for j, i in enumerate(frontier):
                a = nodes[i].parent
                while a >= 0:
                    mask[j, P + nodes[a].slot] = True
                    a = nodes[a].parent
                mask[j, P + D + j] = True
                nodes[i].slot = D + j
            out, k, v = self.runner.step(np.stack([nodes[i].feat for i in frontier]),
                                         np.asarray([nodes[i].token for i in frontier], dtype=np.int64),
                                         np.full(q, base + d), np.concatenate([mem.k, dk]),
                                         np.concatenate([mem.v, dv]), mask)
            dk, dv = np.concatenate([dk, np.asarray(k, np.float32)]), np.concatenate([dv, np.asarray(v, np.float32)])
            logits = self.runner.logits(out)
            new = self._children(nodes, frontier, list(np.asarray(out, np.float32)), logits, d + 1)
            frontier = sorted(new, key=lambda i: -nodes[i].logp)[: int(self.op.topk)]
            took = time.perf_counter() - level
            spent += took
            self.t_level = self._average(self.t_level, took)
        return nodes, spent

    def _pays(self, mem: _Memory, nodes: list[_Node], frontier: list[int]) -> bool:
        """Whether one more level can pay for its head call: its children add at most their
        parents' expected acceptance, worth that many tokens at ``_keep``'s best rate."""
        if self.op.nodes or not self.timed or not self.t_level or not self.unit:
            return True
        bound = sum(mem.acceptance(math.exp(nodes[i].logp)) for i in frontier)
        return bound * self._rate >= self._head_cost(self.t_level)

    def _keep(self, mem: _Memory, nodes: list[_Node], cap: int, pending: int) -> list[int]:
        """The nodes to draft, best first (a parent before its children): the ``cap`` most
        probable, cut (``nodes=0``) to the count with the most expected tokens per unit of the
        forward's cost (the head's calls this step are spent whatever is kept: a node pays when
        its expected acceptance beats the step's rate on its marginal cost). Sets ``_rate``:
        that best rate, tokens per unit of cost."""
        order = sorted(range(len(nodes)), key=lambda i: (-nodes[i].logp, nodes[i].depth))
        kept: list[int] = []
        inside: set[int] = set()
        for i in order:
            if len(kept) >= cap:
                break
            if nodes[i].parent < 0 or nodes[i].parent in inside:
                kept.append(i)
                inside.add(i)
        if self.op.nodes:
            return kept
        best, best_ratio, expected = 0, 1.0 / self.step_cost(pending), 1.0
        for c, i in enumerate(kept, 1):
            expected += mem.acceptance(math.exp(nodes[i].logp))
            ratio = expected / self.step_cost(pending + c)
            if ratio > best_ratio + 1e-12:
                best, best_ratio = c, ratio
        self._rate = best_ratio
        return kept[:best]

    def _chains(self, mem: _Memory, nodes: list[_Node], kept: list[int]) -> list[list[int]]:
        """Root-to-leaf chains of the kept nodes, the most probable leaf first."""
        paths: dict[int, tuple[int, ...]] = {}
        for i in kept:                      # parents come first
            n = nodes[i]
            paths[i] = (paths[n.parent] if n.parent >= 0 else ()) + (n.token,)
        mem.drafted = [(paths[i], math.exp(nodes[i].logp)) for i in kept]
        inner = {nodes[i].parent for i in kept}
        return [list(paths[i]) for i in kept if i not in inner]

    def expected(self, row: Row, chain: list[int]) -> float:
        """The chain's nodes' calibrated chances of acceptance, summed."""
        mem: _Memory = self.memory(row)
        return sum(mem.acceptance(p) for path, p in mem.drafted if list(path) == chain[: len(path)])

    def observe(self, row: Row, chains: list[list[int]], preds: list[list[int]], committed: int) -> None:
        """Calibration: each drafted node was accepted iff its path is what the row committed."""
        mem: _Memory = self.memory(row)
        used = np.zeros(BINS, dtype=bool)
        used[[min(BINS - 1, int(p * BINS)) for _, p in mem.drafted]] = True
        scale = np.where(used, DECAY, DRIFT)
        mem.hits *= scale
        mem.drawn *= scale
        new = row.tokens[len(row.tokens) - committed:]
        for path, p in mem.drafted:
            hit = list(path) == new[: len(path)]
            if hit and len(path) >= committed:
                continue                  # not verified (a chain-only step verified another draft's chain)
            b = min(BINS - 1, int(p * BINS))
            mem.drawn[b] += p
            mem.hits[b] += float(hit)
        mem.drafted = []
