"""Triton kernels for the kernel slots (see ``decograph.backends.base``).

They run on a GPU, or on the CPU under ``TRITON_INTERPRET=1`` (Triton's interpreter; slow,
for tests). Each one matches ``decograph.backends.torch_ref.kernels`` (tests: fp32, the
tolerances stated there).

- ``tree_attention``: flash-style attention of T tree nodes over a KV cache plus the nodes,
  online softmax over key blocks; the tree mask is computed in the kernel from the ancestor
  table (``anc[i, depth[j]] == j``; O(T * depth) memory), never a dense T x T tensor.
- ``verify_greedy``: argmax per node fused with the draft comparison and the accepted flags.
- ``unmask_confidence``: max softmax probability and argmax per row, mask token excluded
  (two passes over the vocabulary, nothing of size V written).
- ``kv_compact``: moves the kept slots of one cache row to its front, in place.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from decograph.backends.torch_ref.kernels import StructuredMask, ancestors

__all__ = ["tree_attention", "verify_greedy", "unmask_confidence", "kv_compact"]


@triton.jit
def _row_argmax(x_ptr, arg_ptr, conf_ptr, V, stride, mask_id, BLOCK_V: tl.constexpr, CONF: tl.constexpr):
    row = tl.program_id(0)
    base = x_ptr + row * stride
    best = tl.full([BLOCK_V], float("-inf"), tl.float32)
    best_i = tl.zeros([BLOCK_V], tl.int32)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        x = tl.load(base + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        if CONF:
            x = tl.where(offs == mask_id, float("-inf"), x)
        upd = x > best                      # strict: each lane keeps its first maximum
        best = tl.where(upd, x, best)
        best_i = tl.where(upd, offs, best_i)
    m = tl.max(best, 0)
    idx = tl.min(tl.where(best == m, best_i, V), 0)      # the first maximum overall (torch's)
    tl.store(arg_ptr + row, idx)
    if CONF:
        total = tl.zeros([BLOCK_V], tl.float32)
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            x = tl.load(base + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
            x = tl.where(offs == mask_id, float("-inf"), x)
            total += tl.exp(x - m)
        tl.store(conf_ptr + row, 1.0 / tl.sum(total, 0))


@triton.jit
def _accept(arg_ptr, tok_ptr, par_ptr, ok_ptr, N):
    tl.store(ok_ptr, 1)
    for i in range(1, N):
        p = tl.load(par_ptr + i)
        matched = (tl.load(tok_ptr + i) == tl.load(arg_ptr + p)) & (tl.load(ok_ptr + p) == 1)
        tl.store(ok_ptr + i, matched.to(tl.int8))
        tl.debug_barrier()


@triton.jit
def _compact(c_ptr, keep_ptr, K, W, stride_s, BLOCK_W: tl.constexpr):
    offs = tl.program_id(0) * BLOCK_W + tl.arange(0, BLOCK_W)
    m = offs < W
    for j in range(0, K):                   # in order: keep[j] >= j, so no source is overwritten early
        src = tl.load(keep_ptr + j)
        x = tl.load(c_ptr + src * stride_s + offs, mask=m)
        tl.store(c_ptr + j * stride_s + offs, x, mask=m)
        tl.debug_barrier()


@triton.jit
def _tree_attn(q_ptr, k_ptr, v_ptr, o_ptr, pv_ptr, seg_ptr, depth_ptr, anc_ptr, H, GROUPS, S, T, D, G, A, scale,
               sqb, sqh, sqt, skb, skh, skt, sob, soh, sot,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    kh = h // GROUPS
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    rmask = rows < T
    dmask = dims < D
    q = tl.load(q_ptr + b * sqb + h * sqh + rows[:, None] * sqt + dims[None, :],
                mask=rmask[:, None] & dmask[None, :], other=0.0)
    q = q.to(tl.float32) * scale
    seg = tl.load(seg_ptr + b * T + rows, mask=rmask, other=0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, S + T, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        kmask = cols < S + T
        kv_off = b * skb + kh * skh + cols[:, None] * skt + dims[None, :]
        k = tl.load(k_ptr + kv_off, mask=kmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        v = tl.load(v_ptr + kv_off, mask=kmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
        is_prefix = cols < S
        pv = tl.load(pv_ptr + b * G * S + seg[:, None] * S + cols[None, :],
                     mask=rmask[:, None] & is_prefix[None, :], other=0)
        node = cols - S
        is_node = (~is_prefix) & kmask
        dep = tl.load(depth_ptr + b * T + node, mask=is_node, other=0)
        anc = tl.load(anc_ptr + (b * T + rows[:, None]) * A + dep[None, :], mask=rmask[:, None] & is_node[None, :],
                      other=-1)
        visible = tl.where(is_prefix[None, :], pv != 0, anc == node[None, :]) & kmask[None, :]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - safe[:, None])
        alpha = tl.exp(m_i - safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]      # padding rows (past T) see nothing
    tl.store(o_ptr + b * sob + h * soh + rows[:, None] * sot + dims[None, :], out, mask=rmask[:, None] & dmask[None, :])


def _vblock(v: int) -> int:
    return min(1024, triton.next_power_of_2(v))


def verify_greedy(logits: torch.Tensor, tokens: torch.Tensor, parents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = logits.contiguous()
    n, v = logits.shape
    arg = torch.empty(n, dtype=torch.int32, device=logits.device)
    _row_argmax[(n,)](logits, arg, arg, v, logits.stride(0), -1, BLOCK_V=_vblock(v), CONF=False)
    ok = torch.empty(n, dtype=torch.int8, device=logits.device)
    tok = tokens.to(device=logits.device, dtype=torch.int32).contiguous()
    par = parents.to(device=logits.device, dtype=torch.int32).clamp_min(0).contiguous()
    _accept[(1,)](arg, tok, par, ok, n)
    return arg.long(), ok.bool()


def unmask_confidence(logits: torch.Tensor, mask_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    logits = logits.contiguous()
    m, v = logits.shape
    arg = torch.empty(m, dtype=torch.int32, device=logits.device)
    conf = torch.empty(m, dtype=torch.float32, device=logits.device)
    if m:
        _row_argmax[(m,)](logits, arg, conf, v, logits.stride(0), int(mask_id), BLOCK_V=_vblock(v), CONF=True)
    return conf, arg.long()


def kv_compact(cache: torch.Tensor, row: int, keep: torch.Tensor) -> None:
    if not cache.is_contiguous():
        raise ValueError("kv_compact needs a contiguous cache")
    w = cache[row, 0].numel()
    block = min(1024, triton.next_power_of_2(max(1, w)))
    keep32 = keep.to(device=cache.device, dtype=torch.int32).contiguous()
    _compact[(triton.cdiv(w, block),)](cache[row], keep32, len(keep32), w, cache.stride(1), BLOCK_W=block)


def tree_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: StructuredMask,
                   scale: float) -> torch.Tensor:
    """``q [B, H, T, D]`` over ``k, v [B, Hkv, S + T, D]`` under ``mask``; returns ``[B, H, T, D]``."""
    b, h, t, d = q.shape
    s = k.shape[2] - t
    dev = q.device
    tables = [ancestors(mask.parents[i].cpu()) for i in range(b)]
    width = max(a.shape[1] for _, a in tables)
    depth = torch.stack([dp for dp, _ in tables]).to(dev).contiguous()
    anc = torch.full((b, t, width), -1, dtype=torch.int32)
    for i, (_, a) in enumerate(tables):
        anc[i, :, : a.shape[1]] = a
    anc = anc.to(dev).contiguous()
    g = mask.prefix_valid.shape[1]
    pv = mask.prefix_valid.to(device=dev, dtype=torch.int8).contiguous() if s else torch.zeros(b, g, 1, dtype=torch.int8, device=dev)
    seg = mask.seg.to(device=dev, dtype=torch.int32).contiguous()
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty(b, h, t, d, dtype=torch.float32, device=dev)
    bm, bn = 16, 32
    _tree_attn[(b * h, triton.cdiv(t, bm))](
        q, k, v, out, pv, seg, depth, anc, h, h // k.shape[1], s, t, d, g, width, float(scale),
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=max(16, triton.next_power_of_2(d)))
    return out.to(q.dtype)
