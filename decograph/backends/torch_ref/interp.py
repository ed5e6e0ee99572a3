"""The torch reference backend's entry point: the runtime's one interpreter
(``decograph.runtime.interp``) on a ``TorchEngine`` over a causal-LM adapter.

``Interpreter(program, adapter, config)`` keeps the signature callers know; the control flow,
drafting, verification and fork/join rules are the runtime's, the forward and the cache are
``decograph.backends.torch_ref.step``'s.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

from decograph.backends.torch_ref.step import TorchEngine
from decograph.runtime import interp as runtime
from decograph.runtime.interp import Event, RunConfig

__all__ = ["Event", "RunConfig", "Interpreter", "draft_runners"]


def draft_runners(models: dict[str, Any]) -> dict[str, Any]:
    """``draft.model`` runners: torch models wrapped in ``TorchDraftRunner`` (runners pass)."""
    from decograph.backends.torch_ref.draft_model import TorchDraftRunner

    return {name: m if hasattr(m, "greedy") else TorchDraftRunner(m) for name, m in models.items()}


class Interpreter(runtime.Interpreter):
    """Runs one program for one batch of prompts on a torch causal-LM adapter."""

    def __init__(self, program: Any, adapter: Any, config: RunConfig) -> None:
        self.adapter = adapter
        config = replace(config, draft_models=draft_runners(config.draft_models))
        engine = TorchEngine(adapter, config.kernels, config.cost_curve, config.tokenizer)
        super().__init__(program, engine, config)
