"""The torch reference backend: an interpreter over a causal-LM adapter (see ``interp``)."""
from __future__ import annotations

from decograph.backends.torch_ref.interp import Event, Interpreter, RunConfig

__all__ = ["Event", "Interpreter", "RunConfig"]
