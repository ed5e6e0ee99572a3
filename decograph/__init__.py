"""decograph: a compiler for LLM decoding algorithms.

The public API is loaded lazily, so ``import decograph`` stays light (no torch, no
transformers) until one of these names is used::

    import decograph
    model, tok = decograph.load_default_model()
    [r] = decograph.generate(model, tok, ["Write a haiku."], strategy="anpd", chat=True)
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> module that defines it; imported on first attribute access (PEP 562).
_LAZY = {
    "generate": "decograph.api",
    "generate_stream": "decograph.api",
    "list_strategies": "decograph.api",
    "GenerationResult": "decograph.api",
    "Stats": "decograph.api",
    "StreamChunk": "decograph.api",
    "load_strategy": "decograph.frontends.strategies",
    "load_default_model": "decograph.models.default",
}

__all__ = ["__version__", *_LAZY]

if TYPE_CHECKING:
    from decograph.api import GenerationResult, Stats, StreamChunk, generate, generate_stream, list_strategies
    from decograph.frontends.strategies import load_strategy
    from decograph.models.default import load_default_model


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'decograph' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
