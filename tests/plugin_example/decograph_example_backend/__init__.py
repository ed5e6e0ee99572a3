"""An example decograph backend plugin, and a template for writing one: a backend that runs the
model on its own, out of the decograph package on purpose (found only through its entry point
in the group ``decograph.backends``, as a third-party backend would be).

- ``llama.py``: the model, a pure-numpy forward of Hugging Face Llama-family causal LMs
  (weights read once from the torch model) over dense per-row KV caches;
- ``engine.py``: the step protocol (``decograph.runtime.protocol``): ``NumpyEngine`` starts a
  ``NumpyBatch``, which prefills, forwards a step's pending tokens and draft trees, commits
  the accepted slots, drops finished rows, forks and joins;
- here: ``NumpyBackend``, which picks the engine for a model.

The runtime owns everything else (drafting, verification, the loop, fork/join rules), so every
strategy runs here unchanged. Models this forward does not compute (not a ``LlamaForCausalLM``)
run on the torch engine, with a ``BackendFallbackWarning``; decograph's masked-diffusion
models always do (the diffusion interpreter), accelerated by the ``unmask.confidence`` slot.
"""
from __future__ import annotations

import warnings
import weakref
from typing import Any, Callable

import numpy as np

from decograph.backends import Backend, BackendFallbackWarning

__all__ = ["NumpyBackend"]


def verify_greedy(logits: Any, tokens: Any, parents: Any) -> tuple[Any, Any]:
    """The ``verify.greedy`` kernel slot (torch tensors in and out), for the torch engine."""
    import torch

    argmax = logits.detach().float().cpu().numpy().argmax(-1)
    tok, par = tokens.cpu().numpy(), parents.cpu().numpy()
    ok = np.ones(len(tok), dtype=bool)
    for i in range(1, len(tok)):
        ok[i] = ok[par[i]] and tok[i] == argmax[par[i]]
    return torch.from_numpy(argmax).long(), torch.from_numpy(ok)


def unmask_confidence(logits: Any, mask_id: int) -> tuple[Any, Any]:
    """The ``unmask.confidence`` kernel slot, for the masked-diffusion interpreter."""
    import torch

    lg = logits.detach().float().cpu().numpy().copy()
    lg[:, mask_id] = -np.inf
    top = lg.max(-1, keepdims=True)
    conf = 1.0 / np.exp(lg - top).sum(-1)
    return torch.from_numpy(conf.astype(np.float32)), torch.from_numpy(lg.argmax(-1)).long()


def runs_in_numpy(adapter: Any) -> bool:
    """True for a Hugging Face ``LlamaForCausalLM`` adapter (what ``llama.py`` computes)."""
    model = getattr(adapter, "model", None)
    return (type(model).__name__ == "LlamaForCausalLM"
            and getattr(getattr(model, "config", None), "model_type", "") == "llama")


class NumpyBackend(Backend):
    """Llama causal LMs forwarded in numpy through the step protocol; anything else on the
    torch engine with this backend's two kernel slots."""

    name = "numpy_example"
    description = "example plugin: Llama causal LMs forwarded in numpy (step protocol); others on torch"
    devices = ("cpu",)

    def __init__(self) -> None:
        self._weights: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()

    def kernels(self) -> dict[str, Callable[..., Any]]:
        return {"verify.greedy": verify_greedy, "unmask.confidence": unmask_confidence}

    @property
    def ops(self) -> frozenset[str]:
        """The forward runs here, verification on the host (the runtime's numpy rules)."""
        return super().ops | {"forward", "verify.greedy", "verify.sampling", "verify.threshold"}

    def engine(self, adapter: Any, config: Any) -> Any:
        """A ``NumpyEngine`` for a Llama causal LM (its weights read once per model object;
        ``UnsupportedError`` for a Llama setting the forward lacks, such as scaled rotary
        embeddings); any other causal LM runs on the torch engine (``Backend.engine``), with a
        ``BackendFallbackWarning``."""
        if not runs_in_numpy(adapter):
            kind = type(getattr(adapter, "model", adapter)).__name__
            warnings.warn(f"backend {self.name!r} forwards Llama causal LMs; {kind} runs on the torch reference",
                          BackendFallbackWarning, stacklevel=2)
            return super().engine(adapter, config)
        from decograph_example_backend.engine import NumpyEngine
        from decograph_example_backend.llama import LlamaWeights

        weights = self._weights.get(adapter.model)
        if weights is None:
            weights = self._weights[adapter.model] = LlamaWeights.from_model(adapter.model)
        return NumpyEngine(weights, config.tokenizer or getattr(adapter, "tokenizer", None), config.cost_curve)
