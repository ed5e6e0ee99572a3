"""The torch backend's draft runner for ``draft.model`` (``decograph.runtime.drafts.ModelDraft``).

Each row keeps its own draft-model cache holding the KV of a prefix of the row's committed
tokens; before proposing, the cache is brought up to date with the committed tokens it lacks,
and afterwards it is cut back to the committed prefix (drafted tokens never stay).
"""
from __future__ import annotations

from typing import Any

import torch

from decograph.models.adapters import as_adapter

__all__ = ["TorchDraftRunner"]


class TorchDraftRunner:
    """Greedy drafts from a torch causal LM (any model ``as_adapter`` takes)."""

    def __init__(self, model: Any) -> None:
        self.adapter = as_adapter(model)

    def new_state(self) -> dict[str, Any]:
        return {"cache": self.adapter.new_cache(1), "have": 0}

    def _feed(self, mem: dict[str, Any], toks: list[int], start: int) -> torch.Tensor:
        new = toks[start:]
        t, past = len(new), self.adapter.cache_len(mem["cache"])
        ids = torch.tensor([new])
        pos = torch.arange(start, start + t)[None]
        attend = torch.cat([torch.ones(t, past, dtype=torch.bool), torch.ones(t, t, dtype=torch.bool).tril()], 1)[None]
        return self.adapter.forward(mem["cache"], ids, pos, attend)[0, -1]

    def greedy(self, mem: dict[str, Any], toks: list[int], k: int) -> list[int]:
        logits = self._feed(mem, toks, mem["have"])
        mem["have"] = len(toks)
        out = [int(logits.argmax())]
        for _ in range(k - 1):
            logits = self._feed(mem, toks + out, len(toks) + len(out) - 1)
            out.append(int(logits.argmax()))
        self.adapter.truncate(mem["cache"], len(toks))
        return out
