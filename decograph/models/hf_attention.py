"""A backend's attention kernel installed into a Hugging Face model, unchanged.

transformers looks an attention function up by name (``config._attn_implementation``) in its
attention-function registry at every forward. decograph registers ``decograph_structured``:
an attention function that calls the kernel of the running backend with the step's
``StructuredMask`` (parent pointers and segment ids, never a dense T x T mask), and a mask
function that builds no mask at all. ``structured_attention`` switches a model to it for one
forward and back.
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Callable, Iterator

import torch

from decograph.errors import ModelError

__all__ = ["NAME", "structured_attention"]

NAME = "decograph_structured"
_CURRENT: ContextVar[tuple[Callable[..., torch.Tensor], Any] | None] = ContextVar("decograph_attention", default=None)
_registered = False


def _attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any,
               dropout: float = 0.0, scaling: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    ctx = _CURRENT.get()
    if ctx is None:
        raise ModelError(f"the {NAME!r} attention runs only inside a decograph forward")
    kernel, structure = ctx
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = kernel(query, key, value, structure, scale)          # [B, H, T, D]
    return out.transpose(1, 2).contiguous(), None


def _no_mask(*args: Any, **kwargs: Any) -> None:
    return None


def _register() -> None:
    global _registered
    if not _registered:
        from transformers import AttentionInterface, AttentionMaskInterface

        AttentionInterface.register(NAME, _attention)
        AttentionMaskInterface.register(NAME, _no_mask)
        _registered = True


@contextmanager
def structured_attention(model: Any, structure: Any, kernel: Callable[..., torch.Tensor]) -> Iterator[None]:
    """Within the block, ``model``'s attention layers run ``kernel`` under ``structure``."""
    _register()
    token = _CURRENT.set((kernel, structure))
    configs = {id(c): c for c in (model.config, model.config.get_text_config(decoder=True))}.values()
    old = [c._attn_implementation for c in configs]
    try:
        for c in configs:
            c._attn_implementation = NAME
        yield
    finally:
        for c, o in zip(configs, old):
            c._attn_implementation = o
        _CURRENT.reset(token)
