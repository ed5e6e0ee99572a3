"""The torch backend's side of the step protocol (``decograph.runtime.protocol``).

``TorchEngine`` runs a causal-LM adapter (any Hugging Face model, the Llama fast path, the test
oracles, or another backend's adapter such as ONNX Runtime's ``ORTCausalLM``); its batches are
``BatchState`` s (the slot cache with per-row validity, rollback by marking slots invalid,
fork branches packed into their parent's cache row), and a forward runs in the layout the
plan's lowering selects (``layouts``). The backend's kernel slots accelerate protocol calls:
``verify.greedy`` computes the argmax and the walk's test on the device, ``attention`` and
``kv.compact`` are installed into adapters that take them.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from decograph.backends.torch_ref.batch import BatchState, DraftTree, StepLayout
from decograph.backends.torch_ref.layouts import Forwarded, collapse, run_forward
from decograph.passes.cost import DEFAULT_CURVE, CostCurve
from decograph.runtime.protocol import Batch, Engine, StepOutput, StepPlan
from decograph.runtime.rows import Row

__all__ = ["TorchEngine", "TorchBatch", "TorchOutput"]


class TorchOutput(StepOutput):
    """A forward's logits on the adapter's device; host copies only of what a rule reads."""

    def __init__(self, fwd: Forwarded, verify_kernel: Any = None) -> None:
        self.fwd, self.kernel = fwd, verify_kernel

    def argmax(self, b: int) -> list[int]:
        if self.kernel is None:
            return self.fwd.argmax_of(b)
        tree = self.fwd.trees[b]                     # the backend's fused argmax + compare
        toks = torch.tensor([0] + tree.tokens)
        parents = torch.tensor([-1] + [p + 1 for p in tree.parent])
        argmax, _ = self.kernel(self.fwd.rows_of(b), toks, parents)
        return [int(t) for t in argmax.tolist()]

    def logits(self, b: int) -> np.ndarray:
        return self.fwd.rows_of(b).float().cpu().numpy()

    def hidden(self, b: int) -> np.ndarray:
        if self.fwd.hidden is None:
            return super().hidden(b)
        return self.fwd.hidden_of(b).float().cpu().numpy()


class TorchBatch(BatchState, Batch):
    """``BatchState`` behind the step protocol."""

    def __init__(self, adapter: Any, rows: list[Row], curve: CostCurve, kernels: dict[str, Any]) -> None:
        super().__init__(adapter, rows)
        self.curve, self.kernels = curve, kernels
        if getattr(adapter, "supports_attention_kernel", False):
            self.attention = kernels.get("attention")
        if getattr(adapter, "supports_compact_kernel", False):
            self.compact = kernels.get("kv.compact")
        self._hidden: dict[int, np.ndarray] = {}     # id(row) -> its prompt's last hidden states

    def prefill_hidden(self, row: Row) -> np.ndarray:
        return self._hidden.pop(id(row), np.zeros((0, 0), np.float32))

    def prefill(self) -> None:
        if not self.active or max(len(r.tokens) for r in self.active) <= 1:
            return
        saved = [r.tokens for r in self.active]
        for r in self.active:
            r.tokens = r.tokens[:-1]      # the last prompt token is the first root
        width = max(len(r.pending) for r in self.active)
        out = self.run_layout(StepLayout(self.active, [DraftTree() for _ in self.active], width), 0, logits=False,
                              hidden=self.hidden_tail > 0)
        for b, r in enumerate(self.active):
            if self.hidden_tail > 0:       # row b's prompt sits at columns 0.. of its physical row b
                n = len(r.tokens)
                self._hidden[id(r)] = out[1][b, max(0, n - self.hidden_tail) : n].float().cpu().numpy()
            self.keep_slots(b, list(range(len(r.tokens))))
            r.cached = len(r.tokens)
            r.prefill_forwards = int(bool(r.tokens))
        for r, toks in zip(self.active, saved):
            r.tokens = toks
            r.forwards = r.prefill_forwards      # rows with nothing to prefill took no part
        self.settle()

    def admit(self, rows: list[Row]) -> None:
        """New rows join between two steps. Into an empty batch: a fresh cache and their
        prompts' forward (as ``prefill``). Into a running one: each gets a cache row of its own
        (no valid slot) and its prompt leads its next forward as pending tokens."""
        self.rows += rows
        new = [r for r in rows if not r.done]
        if not new:
            return
        assert not self._stack, "rows admitted into a forked batch"
        if not self.active:
            self.cache = self.adapter.new_cache(len(new))
            self.valid = torch.zeros((len(new), 0), dtype=torch.bool)
            self.active, self._owners = list(new), list(new)
            self.phys, self.n_phys = list(range(len(new))), len(new)
            self.prefill()
            return
        n = self.n_phys
        self._select_phys(list(range(n)) + [0] * len(new), [])      # rows to overwrite: no slot valid
        self.valid = torch.cat([self.valid, torch.zeros((len(new), self.valid.shape[1]), dtype=torch.bool)])
        self.phys += list(range(n, n + len(new)))
        self.active += new
        self._owners += new

    def forward(self, plan: StepPlan) -> TorchOutput:
        return TorchOutput(run_forward(plan, self, self.curve), self.kernels.get("verify.greedy"))

    def commit(self, out: StepOutput, paths: list[list[int]], keep_nodes: bool) -> None:
        assert isinstance(out, TorchOutput)
        fwd = out.fwd
        collapse(self, fwd, paths)
        for b, path in enumerate(paths):
            slots = list(fwd.pend_slots[b])
            if keep_nodes:
                slots += [fwd.node_slots[b][i] for i in path]
            self.keep_slots(b, slots)


class TorchEngine(Engine):
    """Batches over a causal-LM adapter, with a backend's optional kernel slots."""

    def __init__(self, adapter: Any, kernels: dict[str, Any] | None = None, cost_curve: CostCurve = DEFAULT_CURVE,
                 tokenizer: Any = None) -> None:
        self.adapter, self.kernels, self.cost_curve = adapter, dict(kernels or {}), cost_curve
        self.tokenizer = tokenizer if tokenizer is not None else getattr(adapter, "tokenizer", None)

    def start(self, rows: list[Row]) -> TorchBatch:
        return TorchBatch(self.adapter, rows, self.cost_curve, self.kernels)
