"""ONNX Runtime's draft runner for ``draft.model`` (``decograph.runtime.drafts.ModelDraft``):
the draft model's own step graph (``export.export_step``), torch-free, so an exported decoder
drafts with it too.

Each row keeps its own cache of the draft graph holding the KV of a prefix of the row's
committed tokens; a proposal first feeds the committed tokens the cache lacks (one forward),
then ``k - 1`` one-token steps, and cuts the cache back to the committed prefix, so drafted
tokens never stay.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from decograph.backends.onnxruntime.kv import StepSession, causal_mask

__all__ = ["OrtDraftRunner"]


class OrtDraftRunner:
    """Greedy drafts from a step graph (``StepSession``)."""

    def __init__(self, step: StepSession) -> None:
        self.step = step
        self.vocab_size = step.vocab_size

    def new_state(self) -> dict[str, Any]:
        return {"kv": self.step.new_kv(1), "have": 0}

    def _feed(self, mem: dict[str, Any], toks: list[int], start: int) -> int:
        kv = mem["kv"]
        new = toks[start:]
        t = len(new)
        ids = np.array([new], np.int64)
        pos = np.arange(start, start + t, dtype=np.int64)[None]
        logits = self.step.run(kv, ids, pos, causal_mask(t, kv.length), keep=1)
        return int(logits[0, -1].argmax())

    def greedy(self, mem: dict[str, Any], toks: list[int], k: int) -> list[int]:
        out = [self._feed(mem, toks, mem["have"])]
        mem["have"] = len(toks)
        for _ in range(k - 1):
            out.append(self._feed(mem, toks + out, len(toks) + len(out) - 1))
        mem["kv"].length = len(toks)             # the drafted tokens' slots are scratch again
        return out
