"""transformers' ``DiffusionGemmaForBlockDiffusion`` as two ONNX graphs written directly from the
weights (no tracing): its encoder's step (committed tokens in, their K/V out, for the cache)
and its decoder's step (a canvas and the self-conditioning signal in, logits out). fp32; ONNX
Runtime runs them through ``noise.DGSession`` (torch-free).

    encoder  ids [B, T] int64, positions [B, T] int64, bias.full [B, 1, T, C + T],
             bias.sliding [B, 1, T, Cs + T] (float32, additive), context.{i}.key / .value
             [B, KV_i, C_i, D_i] (C_i: C on full layers, Cs on sliding ones)
             -> present.{i}.key / .value [B, KV_i, T, D_i]
    decoder  ids [B, L], positions [B, L], signal [B, L, V] float32 (the last step's logits at
             their temperature), signal_on [B] float32 (0: no signal, transformers' first step),
             bias.full, bias.sliding, context.{i}.* -> logits [B, L, V] float32

Each as transformers' ``modeling_diffusion_gemma`` computes it:

- the embedding scaled by ``sqrt(hidden)``; RMSNorms ``x * (mean(x^2) + eps)^-1/2 * w`` (no
  ``1 + w``; the value and router norms have no weight); per-head norms of Q, K and V;
- rotary embeddings per layer type from the module's own ``inv_freq`` (its ``proportional``
  type's zero frequencies included), ``cos / sin`` of ``position * inv_freq`` in the graph;
- attention scale 1, grouped query heads, full layers whose values are the keys' projection
  when the layer has no ``v_proj`` (``attention_k_eq_v``); the caller's additive bias is the
  mask (causal and the sliding window in the encoder, padding everywhere) and the sliding
  layers read only the last ``window - 1`` cached slots, as transformers' sliding cache keeps;
- a layer's dense MLP (tanh-GELU) and its mixture of experts side by side: the router's
  softmax, top-k, renormalised and scaled per expert; every expert runs on every token, the
  top-k weighted (exact, E / k times the expert arithmetic: no fused MoE kernel here);
- the decoder's self-conditioning: ``softmax(signal) @ embedding * sqrt(hidden)``, through
  its gated MLP, added to the canvas's embedding and normed; the final norm, the LM head and
  the logit soft-cap.

The encoder's last layer computes only its K/V (nothing reads its output; it takes no context),
and the encoder's final norm is left out. ``export_diffusion_gemma(model, dir)`` writes ``encoder.onnx`` and
``decoder.onnx`` (checked by ``onnx.checker`` and strict shape inference), their layout in each
graph's metadata (``decograph.*``: layer types, window, canvas length).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from decograph.backends.onnxruntime.graph import GraphWriter, linear, to_numpy
from decograph.errors import ModelError

__all__ = ["DG_GRAPH_VERSION", "build_dg_encoder", "build_dg_decoder", "export_diffusion_gemma"]

DG_GRAPH_VERSION = "dgemma-1"           # part of the export cache key: bump when the graphs change
_MS = "com.microsoft"
KINDS = ("full_attention", "sliding_attention")


def _check(model: Any) -> Any:
    """The text config, or ``ModelError`` for what these graphs do not compute."""
    if type(model).__name__ != "DiffusionGemmaForBlockDiffusion":
        raise ModelError(f"the ONNX DiffusionGemma export takes a DiffusionGemmaForBlockDiffusion, not "
                         f"{type(model).__name__}")
    cfg = model.config.text_config
    act = getattr(cfg, "hidden_activation", None)
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise ModelError(f"ONNX export of DiffusionGemma supports tanh-GELU MLPs, not {act!r}")
    if getattr(cfg, "use_bidirectional_attention", None) == "all":
        raise ModelError("ONNX export of DiffusionGemma supports a causal encoder only (use_bidirectional_attention "
                         "'all' is not)")
    unknown = set(cfg.layer_types) - set(KINDS)
    if unknown:
        raise ModelError(f"ONNX export of DiffusionGemma: unknown layer types {sorted(unknown)}")
    for kind, params in (cfg.rope_parameters or {}).items():
        rope = (params or {}).get("rope_type", "default")
        if "dynamic" in rope or rope == "longrope":
            raise ModelError(f"ONNX export of DiffusionGemma: {kind}'s rope type {rope!r} changes with the length")
    return cfg


class _Graph:
    """One graph being written: the writer, float32 constants, shared ones and the rotary
    tables per layer type."""

    def __init__(self, model: Any, rotary: Any) -> None:
        self.g, self.cfg = GraphWriter(), model.config.text_config
        self.consts: dict[str, str] = {}
        self.g.init("c.m1", np.array([-1], np.int64))
        pos = self.g.op("Unsqueeze", [self.g.op("Cast", ["positions"], to=1), "c.m1"])       # [B, T, 1] float
        self.rot: dict[str, tuple[str, str]] = {}
        self.rot_dim: dict[str, int] = {}
        for kind in sorted(set(self.cfg.layer_types)):
            inv = getattr(rotary, f"{kind}_inv_freq").detach().float()
            self.rot_dim[kind] = 2 * inv.numel()
            scaling = float(getattr(rotary, f"{kind}_attention_scaling"))
            freqs = self.g.op("Mul", [pos, self.g.init(f"rotary.{kind}.inv", to_numpy(inv.repeat(2)))])   # cat(f, f)
            cos, sin = self.g.op("Cos", [freqs]), self.g.op("Sin", [freqs])
            if scaling != 1.0:
                s = self.const(f"rotary.{kind}.scale", np.array(scaling, np.float32))
                cos, sin = self.g.op("Mul", [cos, s]), self.g.op("Mul", [sin, s])
            u2 = self.const("c.2", np.array([2], np.int64))
            self.rot[kind] = (self.g.op("Unsqueeze", [cos, u2]), self.g.op("Unsqueeze", [sin, u2]))    # [B, T, 1, D]

    def const(self, name: str, arr: np.ndarray) -> str:
        if name not in self.consts:
            self.consts[name] = self.g.init(name, arr)
        return self.consts[name]

    def norm(self, x: str, module: Any, name: str, dim: int) -> str:
        """A DiffusionGemma RMSNorm (with or without its weight) over the last axis."""
        w = getattr(module, "weight", None) if getattr(module, "with_scale", True) else None
        scale = self.g.init(name, to_numpy(w)) if w is not None else self.const(f"ones.{dim}", np.ones(dim, np.float32))
        return self.g.op("RMSNormalization", [x, scale], axis=-1, epsilon=float(module.variance_epsilon))

    def gated(self, x: str, gate: Any, up: Any, down: Any, name: str) -> str:
        """``down(gelu_tanh(gate(x)) * up(x))``."""
        gu = linear(self.g, x, [gate, up], f"{name}.gate_up", np.float32)
        n = gate.out_features
        a, b = self.g.op("Split", [gu, self.const(f"c.split{n}", np.array([n, n], np.int64))], n_out=2, axis=-1)
        return linear(self.g, self.g.op("Mul", [self.g.op("FastGelu", [a], domain=_MS), b]), [down], f"{name}.down",
                      np.float32)

    def rope(self, x: str, kind: str, hd: int) -> str:
        """``x * cos + rotate_half(x) * sin`` (``x`` [B, T, heads, hd])."""
        if self.rot_dim[kind] != hd:
            raise ModelError(f"ONNX export of DiffusionGemma: {kind}'s rotary embedding covers {self.rot_dim[kind]} "
                             f"of its {hd} head dimensions (partial rotary other than 'proportional')")
        cos, sin = self.rot[kind]
        h = self.const(f"c.half{hd}", np.array([hd // 2, hd // 2], np.int64))
        x1, x2 = self.g.op("Split", [x, h], n_out=2, axis=-1)
        rot = self.g.op("Concat", [self.g.op("Neg", [x2]), x1], axis=-1)
        return self.g.op("Add", [self.g.op("Mul", [x, cos]), self.g.op("Mul", [rot, sin])])


def _kv(c: _Graph, att: Any, h: str, i: int, kind: str) -> tuple[str, str, int, int]:
    """Layer ``i``'s new K and V ([B, KV, T, D]: normed, K rotated) as ``present.{i}.*``."""
    g, hd = c.g, att.head_dim
    kvh = att.k_proj.out_features // hd
    shape = c.const(f"c.heads{kvh}x{hd}", np.array([0, 0, kvh, hd], np.int64))
    k = linear(g, h, [att.k_proj], f"l{i}.k", np.float32)
    v = linear(g, h, [att.v_proj], f"l{i}.v", np.float32) if att.v_proj is not None else k
    k = c.rope(c.norm(g.op("Reshape", [k, shape]), att.k_norm, f"l{i}.k_norm", hd), kind, hd)
    v = c.norm(g.op("Reshape", [v, shape]), att.v_norm, f"l{i}.v_norm", hd)
    g.op("Transpose", [k], perm=[0, 2, 1, 3], outs=[f"present.{i}.key"])
    g.op("Transpose", [v], perm=[0, 2, 1, 3], outs=[f"present.{i}.value"])
    return f"present.{i}.key", f"present.{i}.value", kvh, hd


def _attention(c: _Graph, att: Any, h: str, i: int, kind: str) -> str:
    """Layer ``i``'s attention output: its queries over the context and the new K/V, the kind's
    bias added, then ``o_proj``."""
    g = c.g
    k, v, kvh, hd = _kv(c, att, h, i, kind)
    heads = att.q_proj.out_features // hd
    q = linear(g, h, [att.q_proj], f"l{i}.q", np.float32)
    q = g.op("Reshape", [q, c.const(f"c.heads{heads}x{hd}", np.array([0, 0, heads, hd], np.int64))])
    q = g.op("Transpose", [c.rope(c.norm(q, att.q_norm, f"l{i}.q_norm", hd), kind, hd)], perm=[0, 2, 1, 3])
    group = heads // kvh                        # query head j * group + r reads KV head j (repeat_kv)
    q = g.op("Reshape", [q, c.const(f"c.group{kvh}x{group}x{hd}", np.array([0, kvh, group, -1, hd], np.int64))])
    one = c.const("c.1", np.array([1], np.int64))
    u2 = c.const("c.2", np.array([2], np.int64))
    keys = g.op("Unsqueeze", [g.op("Concat", [f"context.{i}.key", k], axis=2), u2])        # [B, KV, 1, S, D]
    values = g.op("Unsqueeze", [g.op("Concat", [f"context.{i}.value", v], axis=2), u2])
    scores = g.op("MatMul", [q, g.op("Transpose", [keys], perm=[0, 1, 2, 4, 3])])          # [B, KV, G, T, S]
    if float(att.scaling) != 1.0:
        scores = g.op("Mul", [scores, c.const(f"l{i}.scale", np.array(att.scaling, np.float32))])
    scores = g.op("Add", [scores, g.op("Unsqueeze", [f"bias.{kind.split('_')[0]}", one])])
    out = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), values])                     # [B, KV, G, T, D]
    out = g.op("Reshape", [out, c.const(f"c.merge{heads}x{hd}", np.array([0, heads, -1, hd], np.int64))])
    out = g.op("Reshape", [g.op("Transpose", [out], perm=[0, 2, 1, 3]),
                           c.const(f"c.flat{heads * hd}", np.array([0, 0, heads * hd], np.int64))])
    return linear(g, out, [att.o_proj], f"l{i}.o", np.float32)


def _experts(c: _Graph, layer: Any, x: str, i: int, dim: int) -> str:
    """The mixture of experts over ``x`` (the layer's residual stream), dense: every expert on
    every token, weighted by the router's top-k weights (0 elsewhere)."""
    g, router, ex = c.g, layer.router, layer.experts
    r = c.norm(x, router.norm, f"l{i}.router.norm", dim)
    r = g.op("Mul", [g.op("Mul", [r, g.init(f"l{i}.router.scale", to_numpy(router.scale))]),
                     c.const(f"c.root{dim}", np.array(router.scalar_root_size, np.float32))])
    probs = g.op("Softmax", [linear(g, r, [router.proj], f"l{i}.router.proj", np.float32)], axis=-1)   # [B, T, E]
    k = int(router.config.top_k_experts)
    w, idx = g.op("TopK", [probs, c.const(f"c.k{k}", np.array([k], np.int64))], n_out=2, axis=-1)
    w = g.op("Div", [w, g.op("ReduceSum", [w, "c.m1"], keepdims=1)])
    w = g.op("Mul", [w, g.op("Gather", [g.init(f"l{i}.router.per_expert", to_numpy(router.per_expert_scale)), idx])])
    dense = g.op("ScatterElements", [g.op("Mul", [probs, c.const("c.zero", np.array(0, np.float32))]), idx, w], axis=-1)
    h = c.norm(x, layer.pre_feedforward_layernorm_2, f"l{i}.ln_pre_ff2", dim)
    one = c.const("c.1", np.array([1], np.int64))
    gate_up = g.init(f"l{i}.experts.gate_up", to_numpy(ex.gate_up_proj).transpose(0, 2, 1))           # [E, H, 2I]
    gu = g.op("MatMul", [g.op("Unsqueeze", [h, one]), gate_up])                                         # [B, E, T, 2I]
    n = int(ex.intermediate_dim)
    gate, up = g.op("Split", [gu, c.const(f"c.split{n}", np.array([n, n], np.int64))], n_out=2, axis=-1)
    y = g.op("MatMul", [g.op("Mul", [g.op("FastGelu", [gate], domain=_MS), up]),
                        g.init(f"l{i}.experts.down", to_numpy(ex.down_proj).transpose(0, 2, 1))])        # [B, E, T, H]
    wt = g.op("Unsqueeze", [g.op("Transpose", [dense], perm=[0, 2, 1]), "c.m1"])                     # [B, E, T, 1]
    return g.op("ReduceSum", [g.op("Mul", [y, wt]), one], keepdims=0)


def _layers(c: _Graph, layers: Any, x: str, encoder: bool) -> str:
    """The layers over the hidden states ``x``; in the encoder the last one only writes its K/V."""
    dim = c.cfg.hidden_size
    for i, layer in enumerate(layers):
        kind = c.cfg.layer_types[i]
        h = c.norm(x, layer.input_layernorm, f"l{i}.ln_in", dim)
        if encoder and i == len(layers) - 1:
            _kv(c, layer.self_attn, h, i, kind)
            return x
        a = c.norm(_attention(c, layer.self_attn, h, i, kind), layer.post_attention_layernorm, f"l{i}.ln_post_attn",
                   dim)
        x = c.g.op("Add", [x, a])
        h = c.norm(x, layer.pre_feedforward_layernorm, f"l{i}.ln_pre_ff", dim)
        h1 = c.norm(c.gated(h, layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj, f"l{i}.mlp"),
                    layer.post_feedforward_layernorm_1, f"l{i}.ln_post_ff1", dim)
        h2 = c.norm(_experts(c, layer, x, i, dim), layer.post_feedforward_layernorm_2, f"l{i}.ln_post_ff2", dim)
        h = c.norm(c.g.op("Add", [h1, h2]), layer.post_feedforward_layernorm, f"l{i}.ln_post_ff", dim)
        x = c.g.op("Mul", [c.g.op("Add", [x, h]), c.g.init(f"l{i}.scalar", to_numpy(layer.layer_scalar))])
    return x


def _embed(c: _Graph, embed: Any) -> tuple[str, str]:
    """``embed(ids)``, and the scale's name (``sqrt(hidden)`` in the weight's type, as transformers)."""
    scale = c.g.init("embed.scale", np.array(embed.embed_scale.to(embed.weight.dtype).item(), np.float32))
    return c.g.op("Mul", [c.g.op("Gather", [c.g.init("embed.weight", to_numpy(embed.weight)), "ids"]), scale]), scale


def _io(c: _Graph, layers: Any, decoder: bool) -> tuple[list[Any], list[Any]]:
    """The graph's inputs, and its outputs (the decoder's logits; the encoder's presents)."""
    import onnx
    from onnx import TensorProto as TP

    vi, cfg, f = onnx.helper.make_tensor_value_info, c.cfg, TP.FLOAT
    ins = [vi("ids", TP.INT64, ["batch", "seq"]), vi("positions", TP.INT64, ["batch", "seq"])]
    if decoder:
        ins += [vi("signal", f, ["batch", "seq", cfg.vocab_size]), vi("signal_on", f, ["batch"])]
    attending = len(layers) if decoder else len(layers) - 1          # the encoder's last layer reads no context
    kinds = set(cfg.layer_types[:attending])
    ins += [vi(f"bias.{k.split('_')[0]}", f, ["batch", 1, "seq", f"total_{k}"]) for k in KINDS if k in kinds]
    outs = [vi("logits", f, ["batch", "seq", cfg.vocab_size])] if decoder else []
    for i, layer in enumerate(layers):
        att, kind = layer.self_attn, cfg.layer_types[i]
        kvh = att.k_proj.out_features // att.head_dim
        for kv in ("key", "value"):
            if i < attending:
                ins.append(vi(f"context.{i}.{kv}", f, ["batch", kvh, f"context_{kind}", att.head_dim]))
            if not decoder:
                outs.append(vi(f"present.{i}.{kv}", f, ["batch", kvh, "seq", att.head_dim]))
    return ins, outs


def _model(c: _Graph, model: Any, name: str, layers: Any, decoder: bool) -> Any:
    import onnx

    ins, outs = _io(c, layers, decoder)
    proto = c.g.model(name, ins, outs, 23)
    onnx.helper.set_model_props(proto, {
        "decograph.graph": name, "decograph.version": DG_GRAPH_VERSION,
        "decograph.layer_types": ",".join(c.cfg.layer_types), "decograph.sliding_window": str(c.cfg.sliding_window),
        "decograph.canvas_length": str(model.config.canvas_length)})
    return proto


def build_dg_encoder(model: Any) -> Any:
    """The encoder's step graph (an ``onnx.ModelProto``, fp32; see the module docstring)."""
    import torch

    _check(model)
    enc = model.model.encoder.language_model
    c = _Graph(model, enc.rotary_emb)
    with torch.no_grad():
        x, _ = _embed(c, enc.embed_tokens)
        _layers(c, enc.layers[: c.cfg.num_hidden_layers], x, encoder=True)
    return _model(c, model, "diffusion_gemma_encoder", enc.layers[: c.cfg.num_hidden_layers], decoder=False)


def build_dg_decoder(model: Any) -> Any:
    """The decoder's step graph (an ``onnx.ModelProto``, fp32; see the module docstring)."""
    import torch

    cfg = _check(model)
    dec = model.model.decoder
    c = _Graph(model, dec.rotary_emb)
    g, dim, layers = c.g, cfg.hidden_size, dec.layers[: cfg.num_hidden_layers]
    with torch.no_grad():
        x, scale = _embed(c, dec.embed_tokens)
        soft = g.op("Mul", [g.op("MatMul", [g.op("Softmax", ["signal"], axis=-1), "embed.weight"]), scale])
        on = g.op("Unsqueeze", ["signal_on", c.const("c.u12", np.array([1, 2], np.int64))])
        sc = dec.self_conditioning
        s = c.gated(c.norm(g.op("Mul", [soft, on]), sc.pre_norm, "sc.pre_norm", dim), sc.gate_proj, sc.up_proj,
                    sc.down_proj, "sc")
        x = c.norm(g.op("Add", [x, s]), sc.post_norm, "sc.post_norm", dim)
        h = c.norm(_layers(c, layers, x, encoder=False), dec.norm, "norm", dim)
        cap = cfg.final_logit_softcapping
        y = g.op("MatMul", [h, g.init("lm_head.weight", to_numpy(model.lm_head.weight).T)],
                 outs=["logits"] if cap is None else None)
        if cap is not None:
            capped = g.init("logits.softcap", np.array(cap, np.float32))
            g.op("Mul", [g.op("Tanh", [g.op("Div", [y, capped])]), capped], outs=["logits"])
    return _model(c, model, "diffusion_gemma_decoder", layers, decoder=True)


def export_diffusion_gemma(model: Any, directory: str | Path) -> Path:
    """Writes ``encoder.onnx`` and ``decoder.onnx`` of ``model`` into ``directory`` (each
    atomically; the decoder last, so its presence means both are whole)."""
    import onnx

    from decograph.backends.onnxruntime.export import save_model

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    for name, build in (("encoder", build_dg_encoder), ("decoder", build_dg_decoder)):
        proto = build(model)
        onnx.checker.check_model(proto)
        onnx.shape_inference.infer_shapes(proto, strict_mode=True)
        save_model(proto, out / f"{name}.onnx", proto.ByteSize() > 1_800_000_000)
    return out
