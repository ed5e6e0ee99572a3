"""The base of the draft sources (``decograph.runtime.drafts``, ``decograph.runtime.heads``).

A source proposes, per row, chains of guessed tokens following the row's root (its last
committed token); ``observe`` then shows it what the step verified. Its per-row memory lives
in ``row.scratch[id(op)]``.
"""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np

from decograph.ir import ops as O
from decograph.passes.cost import DEFAULT_CURVE, CostCurve
from decograph.runtime.rows import DraftTree, Row

__all__ = ["DraftSource", "Drafted", "fit_drafts", "one_chain", "clock", "propose"]

UNIT_DECAY = 0.9        # the forward clock's average: each new step weighs 1 - UNIT_DECAY


class DraftSource(ABC):
    """Base of the draft sources. ``observes_all``: ``observe`` sees every draft of the forward.
    ``hidden_tail`` > 0: the source reads the model's final hidden states (``take_hidden``),
    the last ``hidden_tail`` positions of each prompt first."""

    observes_all = False
    hidden_tail = 0

    def __init__(self, op: O.Op) -> None:
        self.op = op
        self.cost: CostCurve = DEFAULT_CURVE      # the interpreter sets the model's measured curve
        self.rows = 1                             # rows in this step's forward (the interpreter sets it)
        self.max_query = 0                        # the backend's widest step (0: any; the interpreter sets it)
        self.min_query = 1                        # the query tokens a row's step computes at least (the engine's)
        self.queued = 0                           # draft tokens other drafts of this step proposed for the row
        self.chains_only = False                  # the backend verifies one chain per row (``Engine.chains_only``)
        self.unit = 0.0                           # seconds of one unit of ``cost`` (``clock``; 0: not timed yet)

    def step_cost(self, width: int) -> float:
        """The cost of this step's whole forward when each of its ``rows`` rows feeds ``width``
        query tokens: the batch's query tokens on the one-row curve (which includes the padding
        to the cheapest width). A batch already fills the matrix units, so a wider step costs
        nearly in proportion there: load-aware drafting drafts less, or not at all. A backend
        that computes at least ``min_query`` query tokens per row (an exact ONNX graph pads a
        one-token step to two) charges every row that many, so a draft token that fills the
        padding costs nothing at any batch size."""
        return self.cost(self.rows * max(width, self.min_query))

    def longest(self) -> int:
        """The longest chain this source can propose (a bound; a chain-only backend skips a
        source that cannot beat the chain it already has)."""
        return O.MAX_TREE

    def memory(self, row: Row) -> Any:
        key = id(self.op)
        if key not in row.scratch:
            row.scratch[key] = self.fresh(row)
        return row.scratch[key]

    def fresh(self, row: Row) -> Any:
        return None

    @abstractmethod
    def propose(self, row: Row, limit: int) -> list[list[int]]:
        """Chains of guessed tokens following the row's last token, each at most ``limit`` long."""

    def expected(self, row: Row, chain: list[int]) -> float:
        """The tokens ``chain`` (this step's first proposal for ``row``) is expected to commit: a
        chain-only backend verifies the draft with the most (default: its length, as if sure)."""
        return float(len(chain))

    def observe(self, row: Row, chains: list[list[int]], preds: list[list[int]], committed: int) -> None:
        """``preds[c]``: the model's argmax at the root, then after each node of chain ``c``;
        ``committed``: how many tokens the row committed this step (accepted drafts + bonus)."""

    def take_hidden(self, row: Row, hidden: np.ndarray, first: int) -> None:
        """Sources with ``hidden_tail``: the model's final hidden states [k, H] of ``row``'s
        committed positions ``first .. first + k - 1``, in order (a prompt's last positions,
        then each step's pending tokens and accepted nodes)."""


@dataclass
class Drafted:
    source: DraftSource
    chains: list[list[list[int]]]        # per active row: chains
    value: list[float] | None = None     # per active row: its first chain's expected tokens (chain-only backends)


def propose(src: DraftSource, row: Row, queued: dict[int, int]) -> list[list[int]]:
    """``row``'s chains from ``src`` this step, its time added to ``row.draft_s``. ``queued``
    (per row id): the draft tokens earlier drafts of this step added, which widen the same
    forward; updated. A ``chains_only`` source drafts one chain as if alone, and nothing when it
    cannot beat an earlier draft's chain."""
    t0 = time.perf_counter()
    if src.chains_only:
        src.queued = 0
        best = queued.get(id(row), 0)
        chains = src.propose(row, 0 if best >= src.longest() else row.remaining - 1)[:1]
        queued[id(row)] = max(best, len(chains[0]) if chains else 0)
    else:
        src.queued = queued.get(id(row), 0)
        chains = src.propose(row, row.remaining - 1)
        queued[id(row)] = src.queued + sum(map(len, chains))
    row.draft_s += time.perf_counter() - t0
    return chains


def fit_drafts(drafts: list[Drafted], room: list[int], dedup: bool) -> None:
    """Cut each row's chains (in draft order) so that its merged tree has at most ``room[b]``
    nodes: a chain keeps the nodes the tree already has and as many new ones as fit."""
    for b, left in enumerate(room):
        tree = DraftTree(dedup=dedup)
        for d in drafts:
            kept = []
            for chain in d.chains[b]:
                at, i = -1, 0
                while dedup and i < len(chain) and chain[i] in tree.children.get(at, {}):
                    at, i = tree.children[at][chain[i]], i + 1
                chain = chain[: i + max(0, left - len(tree))]
                if chain:
                    tree.add_chain(chain)
                    kept.append(chain)
            d.chains[b] = kept


def one_chain(drafts: list[Drafted], rows: int) -> None:
    """Keep one chain per row (``Engine.chains_only``): the one its source expects to commit the
    most tokens (``DraftSource.expected``), the earliest draft's (program order) on a tie."""
    for b in range(rows):
        best = max(((d.value[b] if d.value else len(c), -i) for i, d in enumerate(drafts) for c in d.chains[b][:1]),
                   default=None)
        for i, d in enumerate(drafts):
            d.chains[b] = d.chains[b][:1] if best is not None and i == -best[1] else []


def clock(unit: float, seconds: float, width: int, rows: int, engine: Any, curve: CostCurve,
          sources: Any) -> float:
    """The draft sources' clock, after a forward of ``rows`` rows ``width`` query tokens wide
    that took ``seconds``: seconds per unit of the cost curve (a one-token forward's time), a
    running average; every source gets it as ``unit``, to weigh its own work (a draft head's
    calls) against the forward's."""
    if seconds <= 0:
        return unit
    floor = int(getattr(engine, "min_query", 1) or 1)
    sample = seconds / max(1e-9, curve(rows * max(width, floor)))
    unit = sample if not unit else UNIT_DECAY * unit + (1 - UNIT_DECAY) * sample
    for src in sources:
        src.unit = unit
    return unit
