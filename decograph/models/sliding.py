"""Sliding-window attention over the slot cache: which layers slide, and their masks.

The runtime hands an adapter one boolean pattern ``attend`` [B, T, S] over cache slots. A
full-attention layer uses it as is. A sliding-window layer of window ``W`` additionally hides
every slot whose *position* ``q`` is too old for the query's position ``p``; transformers'
rule (``masking_utils.sliding_window_overlay``) keeps ``q > p - W``, i.e. the query itself and
the ``W - 1`` positions before it::

    W = 3, query at position 5:   positions 0 1 2 3 4 5
                                  visible   . . . x x x

Positions, not slot indices: rejected drafts stay in the cache as masked slots, and rows of a
batch sit at different positions, so a slot's index says nothing about its distance.

Two ways transformers configures windows, both read here:
- ``layer_types`` (Gemma 2/3, Qwen2/3, Cohere2, ...): each layer is ``full_attention`` or
  ``sliding_attention``; the model takes ``attention_mask`` as a dict ``{layer_type: 4D mask}``.
  Qwen2's ``use_sliding_window=False`` sets ``sliding_window`` to None and its config makes
  layers ``i >= max_window_layers`` sliding only when a window is set.
- no ``layer_types`` but ``sliding_window`` (Mistral, Phi-3, Starcoder2): every layer slides
  (unless ``use_sliding_window`` is False) and the model takes one 4D mask.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from decograph.errors import ModelError

__all__ = ["AttentionLayout", "FULL", "SLIDING", "attention_layout", "layer_attend", "model_mask", "window_ok"]

FULL = "full_attention"
SLIDING = "sliding_attention"


@dataclass(frozen=True)
class AttentionLayout:
    """How a model's layers attend.

    ``window``: the sliding window in tokens, or None when no layer slides. ``keyed``: the
    model takes a dict of masks keyed by layer type (its config has ``layer_types``).
    ``types``: the distinct layer types, sorted.
    """

    window: int | None
    keyed: bool
    types: tuple[str, ...]

    @property
    def slides(self) -> bool:
        """Whether any layer attends through a window."""
        return self.window is not None


def _text_config(config: Any) -> Any:
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def attention_layout(config: Any) -> AttentionLayout:
    """The layout of the model configured by ``config``.

    Raises ``ModelError`` for what the slot cache cannot roll back or mask exactly: layer types
    other than full and sliding attention (recurrent, linear-attention, mamba-style, chunked),
    encoder-decoder and bidirectional models, and sliding layers without a window size.
    """
    text = _text_config(config)
    if getattr(text, "is_encoder_decoder", False) or getattr(config, "is_encoder_decoder", False):
        raise ModelError("an encoder-decoder architecture")
    if getattr(text, "use_bidirectional_attention", False):
        raise ModelError("bidirectional attention (not a causal LM)")
    layer_types = getattr(text, "layer_types", None)
    window = getattr(text, "sliding_window", None)
    if layer_types:
        other = sorted(set(layer_types) - {FULL, SLIDING})
        if other:
            raise ModelError(f"layer types {other} (only full and sliding-window attention can be rolled back)")
        if SLIDING not in layer_types:
            return AttentionLayout(None, True, (FULL,))
        if not window:
            raise ModelError("sliding-attention layers but no sliding_window size in its config")
        return AttentionLayout(int(window), True, tuple(sorted(set(layer_types))))
    # Mistral-style configs have a window but no use_sliding_window switch: a window set is a window used.
    if getattr(text, "use_sliding_window", True) and window:
        return AttentionLayout(int(window), False, (SLIDING,))
    return AttentionLayout(None, False, (FULL,))


def window_ok(query_pos: torch.Tensor, slot_pos: torch.Tensor, window: int) -> torch.Tensor:
    """bool [B, T, S]: slot ``s`` (at ``slot_pos[b, s]``) is inside the window of query ``t``
    (at ``query_pos[b, t]``), by transformers' rule ``slot > query - window``."""
    return slot_pos[:, None, :] > query_pos[:, :, None] - window


def layer_attend(layout: AttentionLayout, attend: torch.Tensor, query_pos: torch.Tensor,
                 slot_pos: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per layer type, the boolean pattern its layers use: ``attend`` for full attention,
    ``attend`` within the window for sliding attention. ``slot_pos`` [B, S] holds every slot's
    position, the T new ones included (S = attend.shape[2])."""
    out: dict[str, torch.Tensor] = {}
    for kind in layout.types:
        if kind == SLIDING:
            assert layout.window is not None
            out[kind] = attend & window_ok(query_pos.to(slot_pos.device), slot_pos, layout.window)
        else:
            out[kind] = attend
    return out


def _additive(attend: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    mask = torch.zeros(attend.shape, dtype=dtype, device=device)
    mask.masked_fill_(~attend.to(device), torch.finfo(dtype).min)
    return mask[:, None]


def model_mask(layout: AttentionLayout, attend: torch.Tensor, query_pos: torch.Tensor, slot_pos: torch.Tensor,
               dtype: torch.dtype, device: torch.device) -> torch.Tensor | dict[str, torch.Tensor]:
    """The ``attention_mask`` a transformers model takes for ``attend``: one additive 4D mask
    [B, 1, T, S] (windowed when every layer slides), or a dict of them keyed by layer type."""
    if not layout.slides:
        return _additive(attend, dtype, device)
    masks = {k: _additive(a, dtype, device) for k, a in layer_attend(layout, attend, query_pos, slot_pos).items()}
    return masks if layout.keyed else masks[SLIDING]
