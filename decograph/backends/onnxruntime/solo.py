"""The ONNX Runtime engine (``OrtEngine``: the step protocol's ``Engine`` over a step graph's
session) and ``SoloBatch``, a batch whose rows each step alone, for machines whose kernels give
a row in a batch other arithmetic than the row alone. numpy and onnxruntime only.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from decograph.backends.onnxruntime.engine import MIN_ROWS, OrtBatch, OrtOutput
from decograph.backends.onnxruntime.kv import StepSession
from decograph.runtime.protocol import Batch, Engine, StepOutput, StepPlan
from decograph.runtime.rows import Row

__all__ = ["OrtEngine", "SoloBatch", "SoloOutput"]


class OrtEngine(Engine):
    """Batches over a step graph's session (``kv.StepSession``); ``max_query``: the most query
    tokens a row may feed in one step (the widths checked exact on this machine), or None.
    ``chains_only`` on quantized graphs: their int8 activations keep k query rows equal to k
    one-token steps for a dense causal chain only (``decograph.backends.onnxruntime.graph``); a
    branching tree's masked holes move the attention's sums by an ulp, which an activation's
    rounding turns into another token now and then. So each row verifies one draft chain per step
    there. fp32 graphs verify trees (an ulp, as torch's tree masks against Hugging Face's)."""

    def __init__(self, step: StepSession, tokenizer: Any = None, cost_curve: Any = None,
                 max_query: int | None = None, solo: bool = False, batch_filler: bool = True,
                 max_rows: int = 16, bounds: Any = None) -> None:
        self.step, self.tokenizer, self.cost_curve, self.max_query = step, tokenizer, cost_curve, max_query
        self.bounds = bounds        # the graph's ``runner.KeyBoundaries`` here, or None: steps cut there
        self.solo = solo            # every row in a batch of its own (kernels not batch-invariant here)
        self.batch_filler = batch_filler    # see GraphRunner.batch_shape
        self.max_rows = 1 if solo else max_rows     # the most rows one product keeps exact
        # every row's step computes at least this many query tokens: a lone row's and (with the
        # filler) a batch's get a filler row from the batch, others the graph's own padding row
        self.min_query = MIN_ROWS if batch_filler else step.min_query
        self.chains_only = bool(getattr(step, "quantized", False))

    def query_caps(self, batch: Batch) -> list[int] | None:
        """Each active row's most query tokens this step (pending and drafts), or None for
        ``max_query`` alone: with ``bounds``, no row's step straddles a boundary, and in a batch no
        row's step is wider than another row's room (its filler rows count)."""
        if self.bounds is None:
            return None
        rooms = [self.bounds.room(int(n)) for n in batch.key_lengths()]
        widest = min((w for _, w in rooms), default=0)
        cap = self.max_query or widest
        if isinstance(batch, SoloBatch):                # each row steps alone: its own room only
            return [max(1, min(cap, n)) for n, _ in rooms]
        return [max(1, min(cap, n, widest)) for n, _ in rooms]

    def start(self, rows: list[Row]) -> Batch:
        if (self.solo or len(rows) > self.max_rows) and len(rows) != 1:
            return SoloBatch(self.step, rows)
        return OrtBatch(self.step, rows, filler=self.batch_filler, spare_rows=self.max_rows)


class SoloOutput(StepOutput):
    """Each row's own step's output."""

    def __init__(self, outs: list[OrtOutput]) -> None:
        self.outs = outs

    def argmax(self, b: int) -> list[int]:
        return self.outs[b].argmax(0)

    def logits(self, b: int) -> np.ndarray:
        return self.outs[b].logits(0)

    def hidden(self, b: int) -> np.ndarray:
        return self.outs[b].hidden(0)


class SoloBatch(Batch):
    """Every row in a batch of its own (a one-row ``OrtBatch``): for machines whose kernels
    give a row in a batch other arithmetic than the row alone (``GraphRunner.exact``), where
    batching would change tokens. Forks give each branch row its own copy of the cache."""

    def __init__(self, step: StepSession, rows: list[Row]) -> None:
        self.step, self.rows = step, rows
        self.active = [r for r in rows if not r.done]
        self.subs = {id(r): OrtBatch(step, [r]) for r in self.active}
        self._stack: list[tuple[list[Row], list[Row], dict[int, OrtBatch], list[list[Row]]]] = []

    @property
    def forked(self) -> bool:
        return bool(self._stack)

    def prefill(self) -> None:
        for r in self.active:
            self.subs[id(r)].hidden_tail = self.hidden_tail
            self.subs[id(r)].prefill()

    def prefill_hidden(self, row: Row) -> np.ndarray:
        return self.subs[id(row)].prefill_hidden(row)

    def key_lengths(self) -> list[int]:
        return [int(self.subs[id(r)].lengths[0]) for r in self.active]

    def forward(self, plan: StepPlan) -> SoloOutput:
        outs = []
        for b, r in enumerate(self.active):
            one = StepPlan(plan.mask, plan.layout, [plan.trees[b]], [plan.chains[b]], [plan.chain_nodes[b]],
                           plan.pad_id, plan.hidden)
            outs.append(self.subs[id(r)].forward(one))
        return SoloOutput(outs)

    def commit(self, out: StepOutput, paths: list[list[int]], keep_nodes: bool) -> None:
        assert isinstance(out, SoloOutput)
        for b, r in enumerate(self.active):
            self.subs[id(r)].commit(out.outs[b], [paths[b]], keep_nodes)

    def settle(self, copy: bool = False) -> None:
        self.active = [r for r in self.active if not r.done]
        self.subs = {id(r): self.subs[id(r)] for r in self.active}

    def fork(self, branches: list[list[Row]]) -> None:
        self._stack.append((self.rows, self.active, self.subs, branches))
        subs: dict[int, OrtBatch] = {}
        for parent, mine in zip(self.active, branches):
            src = self.subs[id(parent)]
            for r in mine:
                if not r.done:
                    src.fork([[r]])                 # a copy of the parent's cache row, for r alone
                    child = OrtBatch(self.step, [r])
                    child.kv, child.lengths, child.roots = src.kv, src.lengths, src.roots
                    subs[id(r)] = child
                    src.join()
        self.rows = [r for bs in branches for r in bs]
        self.active = [r for r in self.rows if not r.done]
        self.subs = subs

    def join(self) -> list[list[Row]]:
        self.rows, self.active, self.subs, branches = self._stack.pop()
        return branches

    def admit(self, rows: list[Row]) -> None:
        self.rows += rows
        for r in rows:
            if not r.done:
                self.subs[id(r)] = sub = OrtBatch(self.step, [r])
                sub.hidden_tail = self.hidden_tail
                sub.prefill()
                self.active.append(r)
