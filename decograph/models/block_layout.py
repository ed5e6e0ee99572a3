"""The attention layout of a block-diffusion LM adapted from a causal one (numpy only, so the
ONNX Runtime canvas and the exported decoder compute it without torch).

Blocks of ``block`` tokens count from each row's answer start (``gen_start``, a position). A
query position of the answer is *noisy* from the block of the row's first queried mask on
(semi-autoregressive decoding completes blocks in order, so the blocks before it are clean);
every other position is clean. A clean query reads the keys at or before its position (the
causal LM's attention); a noisy one reads every key before its block's end (the clean prefix
and its own block, bidirectionally). Every query reads itself, so no row of the mask is empty.
"""
from __future__ import annotations

import numpy as np

__all__ = ["block_index", "block_causal_layout"]


def block_index(pos: np.ndarray, gen_start: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """The block of each position ``pos [B, T]`` (-1 before the answer) and the position just
    past its block's end (``pos + 1`` before the answer)."""
    rel = pos - gen_start[:, None]
    blk = np.where(rel >= 0, np.floor_divide(rel, block), -1)
    end = np.where(rel >= 0, gen_start[:, None] + (blk + 1) * block, pos + 1)
    return blk, end


def block_causal_layout(ids: np.ndarray, pos: np.ndarray, key_valid: np.ndarray, gen_start: np.ndarray,
                        block: int, mask_id: int, context_pos: np.ndarray | None = None,
                        context_valid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(noisy [B, T], attend [B, T, C + T])`` for queries ``ids`` at ``pos`` (keys: the
    context's ``C`` at ``context_pos`` where ``context_valid``, then the queries where
    ``key_valid``)."""
    blk, end = block_index(pos, gen_start, block)
    far = np.iinfo(np.int64).max
    first = np.where((ids == mask_id) & (blk >= 0), blk, far).min(1, initial=far)[:, None]
    noisy = (blk >= 0) & (blk >= first)
    limit = np.where(noisy, end, pos + 1)
    keys_pos, keys_ok = pos, key_valid.astype(bool)
    if context_pos is not None:
        cv = np.ones(context_pos.shape, bool) if context_valid is None else context_valid.astype(bool)
        keys_pos, keys_ok = np.concatenate([context_pos, pos], 1), np.concatenate([cv, keys_ok], 1)
    attend = (keys_pos[:, None, :] < limit[:, :, None]) & keys_ok[:, None, :]
    t = ids.shape[1]
    own = np.arange(t)
    attend[:, own, own + attend.shape[2] - t] = True
    return noisy, attend
