"""Models decograph ships: the embedded default model, tiny random Llamas, and the test oracle.

Names are loaded lazily, so ``import decograph.models`` does not import transformers (nor
torch until a name is used).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from decograph.models.default import (
        DEFAULT_MODEL_NAME,
        default_gguf_path,
        default_model_path,
        load_default_model,
    )
    from decograph.models.oracle import OracleCache, OracleLM
    from decograph.models.tiny import tiny_llama, tiny_model_dir, word_tokenizer

_EXPORTS = {
    "DEFAULT_MODEL_NAME": "default",
    "default_gguf_path": "default",
    "default_model_path": "default",
    "load_default_model": "default",
    "OracleCache": "oracle",
    "OracleLM": "oracle",
    "tiny_llama": "tiny",
    "tiny_model_dir": "tiny",
    "word_tokenizer": "tiny",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'decograph.models' has no attribute {name!r}")
    return getattr(importlib.import_module(f"decograph.models.{module}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
