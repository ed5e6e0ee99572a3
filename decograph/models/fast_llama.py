"""A lean forward for Llama-architecture models (SmolLM2 among them), over the slot cache.

transformers' Llama computation in the same order (RMSNorm in fp32, the model's own rotary
embedding, SDPA), called functionally: no module dispatch, no mask preprocessing, no cache
bookkeeping. The q/k/v projections run as one matmul over concatenated weights, and so do
the MLP's gate and up projections (4 matmuls per layer instead of 7).

Matmul kernels (``kernels``), fp32 both, chosen once per adapter:
- ``onednn``: oneDNN's linear, one row on the ``[N, K]`` weights, 2+ rows on a copy reordered
  once into oneDNN's blocked layout (``ONEDNN_PACK_ROWS``; the plain call reorders on every
  call, the same sums bit for bit). SmolLM2-135M, 2 cores of this project's AMD EPYC, context
  300: one-token forward ~35 ms; 4 query tokens 33 ms (45 plain), 8 tokens 36 ms (50 plain),
  16 tokens 45 ms (62 plain), so a draft tree of a few tokens costs about what one token does.
- ``mkl``: ``x @ W.T`` with ``W.T`` stored contiguously. Its rounding equals ``F.linear``'s bit
  for bit; there a one-token forward ~29 ms, 8 query tokens ~1.8x that; on an AVX-512 VNNI
  Xeon a 128-token greedy decode 3.2 s against oneDNN's 4.8 s (Hugging Face's own: 4.3 s).
The default is whichever is faster on the machine (``default_kernels``: measured once, cached).
With ``mkl``, products of 2 to 16 rows (draft steps) run MKL's packed GEMM over weights packed
once (``_Proj``; bit for bit the same products): a draft step of 8 query tokens then costs ~1.5x a
one-token forward instead of ~2.0x (4 tokens ~1.3x instead of ~1.6x), which is what decides
how many draft tokens pay.
Against HF's own ``F.linear`` both differ only in fp32 rounding (oneDNN: ~5e-6 absolute on
the logits); the real-model equality tests hold the tokens to HF greedy's.

Attention paths, each the one transformers itself takes for the same situation:
- no holes and a single query (plain decoding): no mask, grouped-query SDPA;
- an empty cache and a causal block (prefill of equal-length rows): ``is_causal``;
- anything else (drafts, trees, padding, rolled-back slots): an additive mask.
"""
from __future__ import annotations

import functools
import os
import time
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["LlamaFastPath", "supports_fast_path", "KERNELS", "default_kernels", "measure_kernels", "rms_norm",
           "rotate_half"]

KERNELS = ("onednn", "mkl")
# MKL's packed GEMM: the weights packed once for this many rows serve products of 2 to
# ``PACKED_MAX`` rows (SmolLM2-135M, 2 cores of an AVX-512 VNNI Xeon, all 211 projections of a
# forward: 2 rows 28 ms against 32 ms plain, 8 rows 39 against 52, 16 rows 45 against 65; one
# row stays plain: MKL's GEMV, 23 ms, is the fastest there is). Up to 16 rows the packed
# products equal the plain ones bit for bit; from 17 rows on, plain MKL blocks a 1536-wide
# product differently (ulps apart), and a prompt's forward must keep Hugging Face's rounding
# (a prefill in packed form flipped a first token whose top-2 logits were 1.9e-6 apart).
PACK_ROWS = 64
PACKED_MAX = 16
PACK_SHARE = 8              # packed copies only while they take at most 1/8 of the machine's memory
# oneDNN's linear on a plain ``[N, K]`` weight reorders the weight into its blocked layout on
# every call of 2+ rows (one row takes a matrix-vector path that reads it as it is); reordered
# once (``_reorder_linear_weight``, tuned for this many rows), the same products run from the
# blocked copy, bit for bit the same sums (``tests/test_fast_llama.py``). SmolLM2-135M, 2 cores
# of this project's AMD EPYC, all 121 products of a forward: 4 rows 24-28 ms against 34-36
# plain, 8 rows 27-32 against 41-47, 16 rows 34-39 against 49-56; one row stays plain.
ONEDNN_PACK_ROWS = 16


def packing_available() -> bool:
    """MKL's packed-GEMM ops exist in this torch build (x86 builds with MKL)."""
    try:
        return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear") and \
            hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight")
    except (AttributeError, RuntimeError):
        return False


@functools.lru_cache(maxsize=1)
def onednn_packing_available() -> bool:
    """oneDNN's weight reorder for its linear exists in this torch build and works (checked once)."""
    try:
        if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
                and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
            return False
        w, x = torch.arange(24.0).reshape(4, 6) / 7, torch.arange(12.0).reshape(2, 6) / 5
        blocked = torch.ops.mkldnn._reorder_linear_weight(w, ONEDNN_PACK_ROWS)
        return torch.equal(torch.ops.mkldnn._linear_pointwise(x, blocked, None, "none", [], ""),
                           torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def _memory_bytes() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return 0


def should_pack(model: Any, kernels: str) -> bool:
    """Pack the weights (``_Proj``'s packed path): MKL's packed GEMM or oneDNN's blocked layout,
    fp32, the ops available, and a packed copy of every linear weight within 1/``PACK_SHARE`` of
    the machine's memory (a 135M-parameter model: 0.54 GB)."""
    if not (kernels == "mkl" and packing_available() or kernels == "onednn" and onednn_packing_available()):
        return False
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if not weights or any(w.dtype != torch.float32 for w in weights):
        return False
    size = sum(w.numel() * w.element_size() for w in weights)
    return size * PACK_SHARE <= _memory_bytes()


def default_kernels() -> str:
    """The faster kernel on this machine: ``mkl`` where this torch build has no oneDNN linear
    op, else whichever of the two multiplies one and four rows faster (``measure_kernels``),
    measured once per machine, torch version and thread count and cached (the choice can go
    either way: oneDNN was faster on this project's first AMD EPYC; MKL 1.5x faster end to end
    on an AVX-512 VNNI Xeon)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return "mkl"
    import json
    import platform

    from decograph.measure_cache import cached, cpu_name

    key = json.dumps(["kernels-2", torch.__version__, platform.machine(), cpu_name(), os.cpu_count(),
                      torch.get_num_threads()])
    got = cached("kernels.json", key, measure_kernels, what="the faster fp32 matmul kernel (oneDNN or MKL)",
                 eta="about 1 s", check=lambda v: None if v in KERNELS else f"not a kernel: {v!r}")
    return got if got in KERNELS else "mkl"


def measure_kernels(shapes: tuple[tuple[int, int], ...] = ((1024, 3072), (3072, 1024), (1024, 1024)),
                    rows: tuple[int, ...] = (1, 4), reps: int = 30) -> str:
    """``onednn`` or ``mkl``: the smaller summed time (best of ``reps``) of fp32 products of
    ``rows`` query rows with weights of ``shapes`` (in, out), a decoder layer's."""
    gen = torch.Generator().manual_seed(0)
    total = {k: 0.0 for k in KERNELS}
    for k_in, n_out in shapes:
        lin = torch.nn.Linear(k_in, n_out, bias=False)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(n_out, k_in, generator=gen))
        for kern in KERNELS:
            proj = _Proj(kern, lin, packed=True)           # each kernel as the fast path runs it
            for m in rows:
                x = torch.randn(1, m, k_in, generator=gen)
                best = float("inf")
                with torch.inference_mode():
                    for _ in range(reps):
                        t = time.perf_counter()
                        proj(x)
                        best = min(best, time.perf_counter() - t)
                total[kern] += best
    return min(total, key=total.get)


def supports_fast_path(model: Any) -> bool:
    """True for transformers Llama causal LMs with SDPA or eager attention and a SiLU MLP."""
    cfg = getattr(model, "config", None)
    return (
        type(model).__name__ == "LlamaForCausalLM"
        and getattr(cfg, "model_type", "") == "llama"
        and getattr(cfg, "hidden_act", "") == "silu"
        and getattr(cfg, "_attn_implementation", "sdpa") in ("sdpa", "eager")
        and not getattr(cfg, "pretraining_tp", 1) > 1
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' ``LlamaRMSNorm``: in float32, then the weight. For float32 ``x`` and weight,
    torch's own ``rms_norm`` (one dispatch for seven; the same values bit for bit,
    ``tests/test_fast_llama.py``)."""
    dtype = x.dtype
    if dtype == torch.float32 and weight.dtype == torch.float32:
        return torch.rms_norm(x, (x.shape[-1],), weight, eps)
    x = x.to(torch.float32)
    var = x.pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(var + eps)
    return weight * x.to(dtype)


class _Proj:
    """``x @ cat(W_1, W_2, ...).T (+ b)``: one matmul for several linears sharing an input.

    ``onednn`` with ``packed``: products of 2+ rows run from a copy of the weights reordered once
    into oneDNN's blocked layout (``ONEDNN_PACK_ROWS``), one row from the plain weights; the same
    products as the plain call bit for bit, without its reorder per call.
    ``mkl`` with ``packed``: products of 2 to ``PACKED_MAX`` query rows run MKL's packed GEMM
    over a copy of the weights packed once (``cblas_sgemm_pack``); plain ``x @ W.T`` there
    repacks the weights on every call, which makes a few rows cost far more than one. Same
    products, same rounding (bit for bit, ``tests/test_fast_llama.py``)."""

    __slots__ = ("w", "bias", "onednn", "sizes", "packed", "orig", "blocked")

    def __init__(self, kernels: str, *linears: Any, packed: bool = False) -> None:
        w = torch.cat([lin.weight.detach() for lin in linears]) if len(linears) > 1 else linears[0].weight.detach()
        biases = [lin.bias for lin in linears]
        self.bias = None if all(b is None for b in biases) else torch.cat([
            b.detach() if b is not None else torch.zeros(lin.weight.shape[0], dtype=w.dtype)
            for b, lin in zip(biases, linears)])
        self.onednn = kernels == "onednn"
        self.w = w.contiguous() if self.onednn else w.t().contiguous()
        self.sizes = [int(lin.weight.shape[0]) for lin in linears]
        self.packed = self.orig = self.blocked = None
        if packed and self.onednn and w.dtype == torch.float32 and onednn_packing_available():
            self.blocked = torch.ops.mkldnn._reorder_linear_weight(self.w, ONEDNN_PACK_ROWS)
        if packed and not self.onednn and w.dtype == torch.float32 and packing_available():
            self.orig = w.contiguous()
            self.packed = torch.ops.mkl._mkl_reorder_linear_weight(self.orig, PACK_ROWS)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.onednn:
            w = self.blocked if self.blocked is not None and x.numel() > x.shape[-1] else self.w
            return torch.ops.mkldnn._linear_pointwise(x, w, self.bias, "none", [], "")
        if self.packed is not None:
            m = x.numel() // x.shape[-1]
            if 1 < m <= PACKED_MAX:      # the bias added after, as below (fused, it rounds otherwise)
                y = torch.ops.mkl._mkl_linear(x, self.packed, self.orig, None, m)
                return y if self.bias is None else y + self.bias
        y = torch.matmul(x, self.w)
        return y if self.bias is None else y + self.bias


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LlamaFastPath:
    """Functional forward of a ``LlamaForCausalLM`` writing into ``_SlotLayer`` caches."""

    def __init__(self, model: Any, kernels: str | None = None, packed: bool | None = None) -> None:
        kernels = kernels or default_kernels()
        if kernels not in KERNELS:
            raise ValueError(f"kernels must be one of {', '.join(KERNELS)}, not {kernels!r}")
        self.kernels = kernels
        able = packing_available() if kernels == "mkl" else onednn_packing_available()
        self.packed = should_pack(model, kernels) if packed is None else bool(packed and able)
        # widths packed (the cost curve's key has it)
        self.packed_rows = (PACKED_MAX if kernels == "mkl" else ONEDNN_PACK_ROWS) if self.packed else 0
        pk = {"packed": self.packed}
        inner = model.model
        cfg = model.config
        self.embed = inner.embed_tokens.weight
        self.rotary = inner.rotary_emb
        self.norm_w, self.norm_eps = inner.norm.weight, inner.norm.variance_epsilon
        self.lm_head = _Proj(kernels, model.lm_head, **pk)
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.layers = []
        for layer in inner.layers[: cfg.num_hidden_layers]:
            at, mlp = layer.self_attn, layer.mlp
            self.layers.append((
                layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon,
                _Proj(kernels, at.q_proj, at.k_proj, at.v_proj, **pk), _Proj(kernels, at.o_proj, **pk), at.scaling,
                layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon,
                _Proj(kernels, mlp.gate_proj, mlp.up_proj, **pk), _Proj(kernels, mlp.down_proj, **pk),
            ))

    def forward(self, cache: Any, ids: torch.Tensor, pos: torch.Tensor, attend: torch.Tensor,
                logits_to_keep: int = 0, hidden: bool = False) -> Any:
        """Logits (float32) [B, T, V] (``logits_to_keep`` > 0: of the last that many positions);
        with ``hidden``, ``(logits, h)``: ``h`` the final hidden states [B, T, H] (after the
        final norm, every position)."""
        b, t = ids.shape
        past = cache.layers[0].length
        mask, causal = self._mask(attend, past, self.embed.dtype)
        h = F.embedding(ids, self.embed)
        cos, sin = self.rotary(h, position_ids=pos)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        gqa = self.heads != self.kv_heads
        nq, nk, d = self.heads, self.kv_heads, self.head_dim
        half = d // 2
        # rotate_half(x) * sin == cat(x2, x1) * cat(-sin1, sin2), bit for bit (a sign flip is exact)
        sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        for slot, (w1, e1, qkv_p, o_p, scale, w2, e2, gu_p, d_p) in zip(cache.layers, self.layers):
            x = rms_norm(h, w1, e1)
            qkv = qkv_p(x).view(b, t, nq + 2 * nk, d).transpose(1, 2)
            qk = qkv[:, : nq + nk]                 # Q and K rotated together: one set of ops
            qk = qk * cos + torch.cat((qk[..., half:], qk[..., :half]), dim=-1) * sin
            keys, values = slot.update(qk[:, nq:], qkv[:, nq + nk:])
            a = F.scaled_dot_product_attention(qk[:, :nq], keys, values, attn_mask=mask, scale=scale,
                                               is_causal=causal, enable_gqa=gqa)
            h = o_p(a.transpose(1, 2).reshape(b, t, -1)).add_(h)      # h + o(a): the same sum, no new tensor
            x = rms_norm(h, w2, e2)
            gate, up = gu_p(x).split(gu_p.sizes, dim=-1)
            h = d_p(F.silu(gate).mul_(up)).add_(h)
        if hidden:
            h = rms_norm(h, self.norm_w, self.norm_eps)
            return self.lm_head(h[:, -logits_to_keep:] if logits_to_keep else h).float(), h
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        h = rms_norm(h, self.norm_w, self.norm_eps)
        return self.lm_head(h).float()

    @staticmethod
    def _mask(attend: torch.Tensor, past: int, dtype: torch.dtype) -> tuple[torch.Tensor | None, bool]:
        t = attend.shape[1]
        if bool(attend.all()):
            return None, False                       # every query sees every slot
        if past == 0 and t > 1 and bool((attend == torch.ones(t, t, dtype=torch.bool).tril()).all()):
            return None, True
        mask = torch.zeros(attend.shape, dtype=dtype)
        mask.masked_fill_(~attend, torch.finfo(dtype).min)
        return mask[:, None], False
