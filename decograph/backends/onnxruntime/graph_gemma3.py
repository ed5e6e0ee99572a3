"""The decoding step of a Gemma 3 causal LM (``Gemma3ForCausalLM``) as an ONNX graph of ONNX
Runtime's fused CPU operators, written directly from the weights like the Llama step
(``graph.build_step``: the same inputs and outputs, the same ``exact`` padding row, the same
``cache_lengths`` per row, so every runner of a step graph runs it unchanged).

What differs from Llama, each as transformers' ``modeling_gemma3`` computes it:

- the embedding is scaled by ``sqrt(hidden)`` (a ``Mul`` after the ``Gather``: the table stays
  the tied LM head's);
- RMSNorm multiplies by ``1 + w`` (folded into the weights: the same float32 product) and a
  layer has four: input, post-attention, pre-feedforward, post-feedforward; the residual adds
  are the fused ``SkipSimplifiedLayerNormalization`` of the next norm, as in Llama;
- per-head RMSNorms of Q and K (``q_norm``, ``k_norm``) before the rotary embedding, which
  ``GroupQueryAttention`` then applies itself (separate Q, K, V inputs);
- the attention scale is ``query_pre_attn_scalar ** -0.5``;
- local (``sliding_attention``) and global layers per ``config.layer_types``, each with its
  own rotary table (the model's own rotary module per layer type, scaling included);
- the MLP is ``gelu_tanh(gate) * up`` (``FastGelu``: the tanh approximation);
- an optional final logit soft-cap (``cap * tanh(x / cap)``; none in Gemma 3's configs).

The sliding window. transformers lets a query at position ``q`` see a key at position ``k``
when ``q - window < k <= q`` (``masking_utils.sliding_window_overlay``). The graph applies it
in positions, not slots: a key's position is its slot's index for the row's cached slots (a
row's cache is dense from slot 0, the committed tokens in order: ``engine``) and the step's
own ``position_ids`` for the step's slots (draft-tree nodes share depths, so their slots are
not their positions). Local layers take the step's additive mask with every key ``window`` or
more positions back set to "never" (computed once per step from ``position_ids`` and
``cache_lengths``), so trees, drafts and batches of rows of any length see exactly the window
a one-token decode of their path sees. ``GroupQueryAttention``'s own ``local_window_size``
counts slots, which a tree's nodes do not fill in position order, so it is not used.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from decograph.backends.onnxruntime.graph import (DTYPES, GraphWriter, StepFrame, hidden_output, linear, logits_head,
                                                  step_frame, step_model, to_numpy)
from decograph.errors import ModelError

__all__ = ["GEMMA3_GRAPH_VERSION", "build_gemma3_step", "is_gemma3"]

GEMMA3_GRAPH_VERSION = "gemma3-1"   # part of the export cache key: bump when the graph changes
_MS = "com.microsoft"


def is_gemma3(model: Any) -> bool:
    """Whether ``model`` is a transformers Gemma 3 causal LM (text only)."""
    return type(model).__name__ == "Gemma3ForCausalLM"


def _check(cfg: Any) -> None:
    """``ModelError`` for what this graph does not compute."""
    act = getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", None)
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise ModelError(f"ONNX export of Gemma 3 supports tanh-GELU MLPs, not {act!r}")
    if getattr(cfg, "attn_logit_softcapping", None) is not None:
        raise ModelError("ONNX export of Gemma 3 does not support attention logit soft-capping")
    if getattr(cfg, "use_bidirectional_attention", False):
        raise ModelError("ONNX export of Gemma 3 supports causal attention only (use_bidirectional_attention)")
    if getattr(cfg, "attention_bias", False):
        raise ModelError("ONNX export of Gemma 3 supports attention projections without bias")
    unknown = set(cfg.layer_types) - {"sliding_attention", "full_attention"}
    if unknown:
        raise ModelError(f"ONNX export of Gemma 3: unknown layer types {sorted(unknown)}")


def _norm_weight(norm: Any, ft: Any) -> np.ndarray:
    """A Gemma RMSNorm's ``1 + w`` (float32, as its forward computes it)."""
    return to_numpy(1.0 + norm.weight.detach().float(), ft)


def _rotary(g: GraphWriter, model: Any, layer_type: str, hd: int, max_pos: int, ft: Any) -> tuple[str, str]:
    """GQA's cos / sin caches [max_pos, hd / 2] of ``layer_type`` from the model's rotary module."""
    import torch

    with torch.no_grad():
        cos, sin = model.model.rotary_emb(torch.zeros(1, dtype=torch.float32), torch.arange(max_pos)[None], layer_type)
    if hd % 2 or not np.array_equal(to_numpy(cos[0, :, : hd // 2]), to_numpy(cos[0, :, hd // 2:])):
        raise ModelError("ONNX export supports rotary embeddings of the rotate-half form only")
    return (g.init(f"rotary.{layer_type}.cos", to_numpy(cos[0, :, : hd // 2], ft)),
            g.init(f"rotary.{layer_type}.sin", to_numpy(sin[0, :, : hd // 2], ft)))


def window_mask(g: GraphWriter, f: StepFrame, window: int, neg: np.ndarray) -> str:
    """The step's mask with every key ``window`` or more positions before its query set to
    ``neg``: key positions are slot indices below the row's ``cache_lengths`` and the step's
    ``position_ids`` from there (see the module's docstring)."""
    total = g.op("Squeeze", [g.op("Slice", [g.op("Shape", [f.mask]), g.init("w.3", np.array([3])),
                                            g.init("w.4", np.array([4]))]), f.zero])
    cols = g.op("Range", [g.init("w.c0", np.array(0, np.int64)), total, g.init("w.c1", np.array(1, np.int64))])
    rel = g.op("Sub", [cols, g.op("Unsqueeze", ["cache_lengths", f.one])])          # [B, total]: slot - length
    last = g.op("Sub", [g.op("Slice", [g.op("Shape", [f.pos]), f.one, g.init("w.2", np.array([2]))]), f.one])
    idx = g.op("Min", [g.op("Max", [rel, f.zero]), last])
    key_pos = g.op("Where", [g.op("Less", [rel, f.zero]), cols, g.op("GatherElements", [f.pos, idx], axis=1)])
    dist = g.op("Sub", [g.op("Unsqueeze", [f.pos, g.init("w.u2", np.array([2]))]), g.op("Unsqueeze", [key_pos, f.one])])
    far = g.op("GreaterOrEqual", [dist, g.init(f"w.size{window}", np.array(window, np.int64))])    # [B, Q, total]
    far = g.op("Unsqueeze", [far, f.one])
    return g.op("Where", [far, g.init(f"w.neg.{neg.dtype}", neg), f.mask])


def build_gemma3_step(model: Any, exact: bool = True, opset: int = 23, dtype: str = "float32",
                      hidden: bool = False) -> Any:
    """The step graph (an ``onnx.ModelProto``) of a ``Gemma3ForCausalLM``, with the inputs and
    outputs of ``graph.build_step`` (``kv.io_names``); ``exact``, ``dtype`` and ``hidden`` as there. GQA
    applies the rotary embedding itself, so head sizes must be multiples of 16 (Gemma 3's: 256)."""
    import torch
    from onnx import TensorProto as TP

    from decograph.backends.onnxruntime.kv import io_names

    if dtype not in DTYPES:
        raise ModelError(f"ONNX export: dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if not is_gemma3(model):
        raise ModelError(f"not a Gemma 3 causal LM: {type(model).__name__}")
    ft, kv_t = DTYPES[dtype], (TP.FLOAT if dtype == "float32" else TP.FLOAT16)
    cfg = model.config
    _check(cfg)
    n_layers, heads, kv_heads, hd = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    if hd % 16:
        raise ModelError(f"ONNX export of Gemma 3 needs a head size divisible by 16, got {hd}")
    m = model.model
    g = GraphWriter()
    ins, outs = io_names(n_layers)
    max_pos = int(getattr(cfg, "max_position_embeddings", 0) or 4096)
    rotary = {t: _rotary(g, model, t, hd, max_pos, ft) for t in sorted(set(cfg.layer_types))}
    f = step_frame(g, exact, kv_t)
    masks = {"full_attention": f.mask}
    if "sliding_attention" in rotary:
        masks["sliding_attention"] = window_mask(g, f, int(cfg.sliding_window), np.array(np.finfo(ft).min, ft))
    scale = g.init("embed.scale", np.array(m.embed_tokens.embed_scale.to(m.embed_tokens.weight.dtype).item(), ft))
    x = g.op("Mul", [g.op("Gather", [g.init("embed.weight", to_numpy(m.embed_tokens.weight, ft)), f.ids]), scale])
    eps = float(cfg.rms_norm_eps)
    g.init("c.flat", np.array([0, 0, -1]))                  # the shapes ``_attention`` reshapes Q and K by
    for n in sorted({heads, kv_heads}):
        g.init(f"c.heads{n}", np.array([0, 0, n, hd]))
    res, mlp_out = x, None
    with torch.no_grad():
        for i, layer in enumerate(m.layers[:n_layers]):
            kind = cfg.layer_types[i]
            ln = g.init(f"l{i}.ln_in", _norm_weight(layer.input_layernorm, ft))
            if mlp_out is None:
                h = g.op("RMSNormalization", [x, ln], axis=-1, epsilon=eps)
            else:
                h, _, _, res = g.op("SkipSimplifiedLayerNormalization", [mlp_out, res, ln], n_out=4, domain=_MS,
                                    epsilon=eps)
            a = _attention(g, layer.self_attn, h, f, i, ins, outs, rotary[kind], masks[kind], (heads, kv_heads, hd),
                           eps, ft)
            a = g.op("RMSNormalization", [a, g.init(f"l{i}.ln_post_attn", _norm_weight(layer.post_attention_layernorm, ft))],
                     axis=-1, epsilon=eps)
            h, _, _, res = g.op("SkipSimplifiedLayerNormalization",
                                [a, res, g.init(f"l{i}.ln_pre_ff", _norm_weight(layer.pre_feedforward_layernorm, ft))],
                                n_out=4, domain=_MS, epsilon=eps)
            mlp = layer.mlp
            gu = linear(g, h, [mlp.gate_proj, mlp.up_proj], f"l{i}.gate_up", ft)
            gate, up = g.op("Split", [gu, g.init(f"l{i}.gsplit", np.array([mlp.gate_proj.out_features] * 2))],
                            n_out=2, axis=-1)
            act = g.op("FastGelu", [gate], domain=_MS)                 # 0.5 x (1 + tanh(...)): gelu_pytorch_tanh
            down = linear(g, g.op("Mul", [act, up]), [mlp.down_proj], f"l{i}.down", ft)
            mlp_out = g.op("RMSNormalization",
                           [down, g.init(f"l{i}.ln_post_ff", _norm_weight(layer.post_feedforward_layernorm, ft))],
                           axis=-1, epsilon=eps)
        h = g.op("SkipSimplifiedLayerNormalization", [mlp_out, res, g.init("norm", _norm_weight(m.norm, ft))],
                 n_out=1, domain=_MS, epsilon=eps)
        logits_head(g, f, h, model.lm_head.weight, dtype, getattr(cfg, "final_logit_softcapping", None))
        if hidden:
            hidden_output(g, f, h, dtype)
    return step_model(g, n_layers, kv_heads, hd, cfg.vocab_size, dtype, opset, cfg.hidden_size if hidden else 0)


def _attention(g: GraphWriter, att: Any, h: str, f: StepFrame, i: int, ins: list[str], outs: list[str],
               rotary: tuple[str, str], mask: str, shape: tuple[int, int, int], eps: float, ft: Any) -> str:
    """Layer ``i``'s attention output projection: Q/K/V in one MatMul, per-head RMSNorms of Q
    and K, then GQA (rotary at the step's positions, causal in slot order, ``mask`` added)."""
    heads, kv_heads, hd = shape
    qkv = linear(g, h, [att.q_proj, att.k_proj, att.v_proj], f"l{i}.qkv", ft)
    q, k, v = g.op("Split", [qkv, g.init(f"l{i}.split", np.array([heads * hd, kv_heads * hd, kv_heads * hd]))],
                   n_out=3, axis=-1)
    for name, n, norm in (("q", heads, att.q_norm), ("k", kv_heads, att.k_norm)):
        x = g.op("Reshape", [q if name == "q" else k, f"c.heads{n}"])         # [B, T, heads, hd]
        x = g.op("RMSNormalization", [x, g.init(f"l{i}.{name}_norm", _norm_weight(norm, ft))], axis=-1, epsilon=eps)
        x = g.op("Reshape", [x, "c.flat"])
        q, k = (x, k) if name == "q" else (q, x)
    kv_io = [ins[3 + 2 * i], ins[4 + 2 * i], f.seqlens, f.total]
    a = g.op("GroupQueryAttention", [q, k, v, *kv_io, *rotary, f.pos, mask, "", "", "", "", "", f.qlens], n_out=3,
             outs=[f"l{i}.attn", outs[1 + 2 * i], outs[2 + 2 * i]], domain=_MS, num_heads=heads,
             kv_num_heads=kv_heads, causal=1, scale=float(att.scaling), do_rotary=1)
    return linear(g, a[0], [att.o_proj], f"l{i}.o", ft)
