"""The decoding step of a Llama-architecture model written directly as an ONNX graph of ONNX
Runtime's fused CPU operators (no tracing): per layer one ``SkipSimplifiedLayerNormalization``
(residual add + RMSNorm), one MatMul for Q, K and V together, ``GroupQueryAttention`` over the
past KV (rotary at explicit positions inside it when the head size is a multiple of 16, else
``RotaryEmbedding`` nodes; causal in slot order, the step's additive mask as its
``attention_bias``: trees, packed rows and padding take slots away), the output projection, one
MatMul for gate and up, ``QuickGelu`` (SiLU) and the down projection; about 10 nodes a layer
instead of the ~60 of a traced export. ``export.quantize_step`` turns
every MatMul into a block-wise ``MatMulNBits``; fused Q/K/V and gate/up are quantized per output
column like the separate ones, the same arithmetic in fewer, larger kernels. The interface is
``kv.io_names``; ``logits_keep`` (int64 [1]) computes logits for the last ``logits_keep`` query
rows only (0: all), so a prefill pays for one row of the vocabulary projection. A graph built
``hidden=True`` (for programs whose draft heads need it) has one more output, ``hidden``
(float32 [B, T, H]): the final norm's output, the LM head's input, for every query row (an exact
graph's padding row left out); graphs built without it are unchanged.

``exact`` graphs give every query row bit-identical logits and K/V whatever the number of query
tokens in its step (k tokens in one forward == k one-token forwards), which is what makes
greedy verification of drafts lossless when the weights are quantized with int8 activations
(``accuracy_level`` 4, where the smallest float difference becomes a different rounding of an
activation and, a few layers on, a different token now and then). ORT's kernels compute a
row of a matrix product the same way for any number of rows except one: a one-row product
takes matrix-vector routines that sum in another order. So an exact graph gives a one-token
step a padding row (a copy of its token, after it; its K/V go one slot past the step, outside
the cache) and never multiplies a single row; a two-token step then costs what a one-token
step does, and a runner may as well verify a drafted token every step. This holds for the
kernels of this ORT version on this kind of CPU with 32-weight blocks (with 128-weight blocks
the int8 kernels' row tiling changes sums too): ``decograph.exported`` checks it on the machine
it runs on before it drafts. What stays outside: a row's slots must lie where a one-token
decode puts them (a dense causal chain, as ``decograph.exported`` keeps them); padding or holes
in the cache (left-padded batches, trees) move the softmax's summation lanes. A batch stays
exact by giving each row its own cache length (``cache_lengths``: row b's slots are dense from
0, its step's slots start at ``cache_lengths[b]``), not padding.

``GroupQueryAttention`` writes the new K/V after the past ones; when ``past`` and ``present``
are bound to one preallocated buffer (``kv``: I/O binding, the mask's last axis the valid
length) it writes them in place and nothing is copied per step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from decograph.errors import ModelError

__all__ = ["DTYPES", "GRAPH_VERSION", "HIDDEN_TAG", "GraphWriter", "StepFrame", "build_step", "hidden_output", "linear",
           "logits_head", "step_frame", "step_model", "to_numpy"]

GRAPH_VERSION = "fused-8"           # part of the export cache key: bump when the graph changes
HIDDEN_TAG = "+hidden"              # a graph version's suffix when the graph has the ``hidden`` output
_MS = "com.microsoft"


class GraphWriter:
    """A small ONNX graph writer: nodes, initializers, unique names."""

    def __init__(self) -> None:
        from onnx import helper

        self.h, self.nodes, self.inits, self.n = helper, [], [], 0

    def init(self, name: str, arr: np.ndarray) -> str:
        from onnx import numpy_helper

        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def op(self, op: str, ins: list[str], n_out: int = 1, outs: list[str] | None = None, domain: str = "",
           **attrs: Any) -> Any:
        self.n += 1
        outs = outs or [f"{op}_{self.n}_{j}" for j in range(n_out)]
        self.nodes.append(self.h.make_node(op, ins, outs, name=f"{op}_{self.n}", domain=domain or None, **attrs))
        return outs[0] if len(outs) == 1 else outs

    def model(self, name: str, inputs: list[Any], outputs: list[Any], opset: int) -> Any:
        """The ``onnx.ModelProto`` of the nodes and initializers so far (the default opset
        ``opset`` and ``com.microsoft`` 1, IR version 10)."""
        h = self.h
        proto = h.make_model(h.make_graph(self.nodes, name, inputs, outputs, self.inits),
                             opset_imports=[h.make_opsetid("", opset), h.make_opsetid(_MS, 1)],
                             producer_name="decograph")
        proto.ir_version = 10
        return proto


DTYPES = {"float32": np.float32, "float16": np.float16}

def to_numpy(t: Any, dtype: Any = np.float32) -> np.ndarray:
    return t.detach().float().cpu().numpy().astype(dtype)


def linear(g: GraphWriter, x: str, layers: list[Any], name: str, dtype: Any) -> str:
    """``x @ W.T (+ b)`` for one or more ``nn.Linear`` stacked along the output axis."""
    w = np.concatenate([to_numpy(m.weight, dtype) for m in layers], 0).T          # [in, out]
    y = g.op("MatMul", [x, g.init(f"{name}.weight", w)], outs=[f"{name}/out"])
    if any(m.bias is not None for m in layers):
        b = np.concatenate([to_numpy(m.bias, dtype) if m.bias is not None else np.zeros(m.out_features, dtype)
                            for m in layers])
        y = g.op("Add", [y, g.init(f"{name}.bias", b)])
    return y



@dataclass(frozen=True)
class StepFrame:
    """The names every step graph computes before its layers (``step_frame``): the (padded)
    ids, positions and mask, GQA's per-row ``seqlens`` and ``total``, the queries per row
    ``qlens``, the step's token count ``t_len`` and the constants 1 and 0 (int64 [1])."""
    ids: str
    pos: str
    mask: str
    t_len: str
    seqlens: str
    total: str
    qlens: str
    one: str
    zero: str


def step_frame(g: GraphWriter, exact: bool, kv_t: int) -> StepFrame:
    """The step's inputs as its layers take them: with ``exact``, a one-token step's padding
    query row (see the module's docstring); the mask in the KV cache's type (``kv_t``)."""
    from onnx import TensorProto as TP

    one, zero = g.init("c.1", np.array([1])), g.init("c.0", np.array([0]))
    ids, pos, mask = "input_ids", "position_ids", "attention_mask"
    t_len = g.op("Slice", [g.op("Shape", [ids]), one, g.init("c.2", np.array([2]))])
    queries = t_len
    if exact:
        # A one-token step gets a padding query row (a copy of its token and position, after
        # it): no kernel then multiplies a single row, whose matrix-vector routines sum in
        # another order than the matrix-matrix ones. A step of 2+ tokens has none.
        need = g.op("Max", [g.op("Sub", ["c.2", t_len]), zero])             # 1 if T == 1 else 0
        cut = g.op("Sub", [t_len, need])
        pos = g.op("Concat", [pos, g.op("Slice", [pos, cut, t_len, one])], axis=1)
        pads = g.op("Concat", [g.init("c.pads", np.zeros(6, np.int64)), need, need], axis=0)
        mask = g.op("Pad", [mask, pads], mode="constant")
        queries = g.op("Add", [t_len, need])
        ids = g.op("Concat", [ids, g.op("Slice", [ids, cut, t_len, one])], axis=1)
    if kv_t != TP.FLOAT:
        mask = g.op("Cast", [mask], to=kv_t)            # float32's -inf-like values become -inf
    # GQA's lengths: the buffer's total from the mask's shape; each row's own total (its
    # ``cache_lengths`` past slots + the step's queries), so rows of a batch can hold caches of
    # different lengths, each dense from slot 0, as in a one-row decode
    total = g.op("Cast", [g.op("Slice", [g.op("Shape", [mask]), g.init("c.3", np.array([3])), g.init("c.4", np.array([4]))])],
                 to=TP.INT32)
    total_scalar = g.op("Squeeze", [total, zero])
    batch = g.op("Slice", [g.op("Shape", ["input_ids"]), zero, one])
    q32 = g.op("Cast", [queries], to=TP.INT32)
    seqlens = g.op("Sub", [g.op("Add", [g.op("Cast", ["cache_lengths"], to=TP.INT32), q32]),
                           g.init("c.1i", np.array([1], np.int32))])
    qlens = g.op("Expand", [q32, batch])
    return StepFrame(ids, pos, mask, t_len, seqlens, total_scalar, qlens, one, zero)


def logits_head(g: GraphWriter, f: StepFrame, h: str, weight: Any, dtype: str, softcap: float | None = None) -> None:
    """``logits`` (float32) of the last ``logits_keep`` rows of ``h``: ``h @ weight.T``,
    optionally soft-capped (``cap * tanh(x / cap)``, computed in float32)."""
    from onnx import TensorProto as TP

    t_len, one, zero = f.t_len, f.one, f.zero
    # the last ``logits_keep`` rows only: start = T - keep, clamped to [0, T] by Slice
    start = g.op("Sub", [t_len, "logits_keep"])
    start = g.op("Where", [g.op("Greater", ["logits_keep", zero]), start, zero])
    h = g.op("Slice", [h, start, t_len, one])
    name = "logits" if softcap is None else "logits/raw"
    if dtype == "float32":
        y = g.op("MatMul", [h, g.init("lm_head.weight", to_numpy(weight).T)], outs=[name])
    else:
        y = g.op("Cast", [g.op("MatMul", [h, g.init("lm_head.weight", to_numpy(weight, DTYPES[dtype]).T)],
                               outs=["lm_head/out"])], outs=[name], to=TP.FLOAT)
    if softcap is not None:
        cap = g.init("logits.softcap", np.array(softcap, np.float32))
        g.op("Mul", [g.op("Tanh", [g.op("Div", [y, cap])]), cap], outs=["logits"])


def hidden_output(g: GraphWriter, f: StepFrame, h: str, dtype: str) -> None:
    """The ``hidden`` output (float32 [B, T, H]): ``h``'s first ``T`` rows, the step's own query
    rows (an exact graph's padding row comes after them)."""
    from onnx import TensorProto as TP

    rows = g.op("Slice", [h, f.zero, f.t_len, f.one])
    if dtype == "float32":
        g.op("Identity", [rows], outs=["hidden"])
    else:
        g.op("Cast", [rows], outs=["hidden"], to=TP.FLOAT)


def step_model(g: GraphWriter, n_layers: int, kv_heads: int, hd: int, vocab: int, dtype: str, opset: int,
               hidden: int = 0) -> Any:
    """The ``onnx.ModelProto`` of a step graph written into ``g``, with ``kv.io_names``'s
    inputs and outputs (the KV cache in ``dtype``; mask and logits float32), and the ``hidden``
    output last when ``hidden`` (the hidden size) is not 0 (``hidden_output``)."""
    import onnx
    from onnx import TensorProto as TP

    from decograph.backends.onnxruntime.kv import io_names

    ins, outs = io_names(n_layers)
    kv_t = TP.FLOAT if dtype == "float32" else TP.FLOAT16
    f, i64 = TP.FLOAT, TP.INT64
    vi = onnx.helper.make_tensor_value_info
    inputs = [vi("input_ids", i64, ["batch", "seq"]), vi("position_ids", i64, ["batch", "seq"]),
              vi("attention_mask", f, ["batch", 1, "seq", "total"])]
    inputs += [vi(n, kv_t, ["batch", kv_heads, "past", hd]) for n in ins[3:-2]]
    inputs += [vi("logits_keep", i64, [1]), vi("cache_lengths", i64, ["batch"])]
    outputs = [vi("logits", f, ["batch", "keep", vocab])]
    outputs += [vi(n, kv_t, ["batch", kv_heads, "total", hd]) for n in outs[1:]]
    if hidden:
        outputs.append(vi("hidden", f, ["batch", "seq", hidden]))
    return g.model("decograph_step", inputs, outputs, opset)


def build_step(model: Any, exact: bool = True, rotary_in_attention: bool | None = None, opset: int = 23,
               dtype: str = "float32", hidden: bool = False) -> Any:
    """The step graph (an ``onnx.ModelProto``) of a ``LlamaForCausalLM``; with ``exact``, the
    padding query row that makes every query row's result independent of the step's width (see
    the module's docstring). ``rotary_in_attention``: GQA applies the rotary embedding (default
    where it can: head sizes divisible by 16). ``dtype``: of the weights, activations and KV
    cache, ``float32`` or ``float16`` (what ``GroupQueryAttention``'s CUDA kernel takes); the
    mask input and the logits output are float32 either way. ``hidden``: the ``hidden`` output
    too (``hidden_output``; the other outputs' arithmetic is the same)."""
    import torch
    from onnx import TensorProto as TP

    from decograph.backends.onnxruntime.kv import io_names

    if dtype not in DTYPES:
        raise ModelError(f"ONNX export: dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    ft, kv_t = DTYPES[dtype], (TP.FLOAT if dtype == "float32" else TP.FLOAT16)

    if type(model).__name__ != "LlamaForCausalLM":
        raise ModelError(f"ONNX export supports Llama-architecture and Gemma 3 models, not {type(model).__name__}")
    cfg = model.config
    n_layers, heads = cfg.num_hidden_layers, cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise ModelError(f"ONNX export supports SiLU MLPs, not {cfg.hidden_act!r}")
    if rotary_in_attention is None:
        rotary_in_attention = hd % 16 == 0     # GQA's own rotary needs head sizes divisible by 16
    m = model.model
    g = GraphWriter()
    ins, outs = io_names(n_layers)
    # cos / sin of every position, from the model's own rotary module (its scaling included)
    max_pos = int(getattr(cfg, "max_position_embeddings", 0) or 4096)
    with torch.no_grad():
        pos = torch.arange(max_pos)[None]
        cos, sin = m.rotary_emb(torch.zeros(1, dtype=torch.float32), pos)
    cos_c = g.init("rotary.cos", to_numpy(cos[0, :, : hd // 2], ft))
    sin_c = g.init("rotary.sin", to_numpy(sin[0, :, : hd // 2], ft))
    if not (np.allclose(to_numpy(cos[0, :, : hd // 2]), to_numpy(cos[0, :, hd // 2:])) or hd % 2):
        raise ModelError("ONNX export supports rotary embeddings of the rotate-half form only")
    f = step_frame(g, exact, kv_t)
    ids, pos, mask, seqlens, total_scalar, qlens = f.ids, f.pos, f.mask, f.seqlens, f.total, f.qlens
    x = g.op("Gather", [g.init("embed.weight", to_numpy(m.embed_tokens.weight, ft)), ids])
    eps = float(cfg.rms_norm_eps)
    res, mlp_out = x, None
    for i, layer in enumerate(m.layers):
        att, mlp = layer.self_attn, layer.mlp
        ln1 = g.init(f"l{i}.ln1", to_numpy(layer.input_layernorm.weight, ft))
        if mlp_out is None:
            h = g.op("RMSNormalization", [x, ln1], axis=-1, epsilon=eps)          # opset 23
        else:
            h, _, _, res = g.op("SkipSimplifiedLayerNormalization", [mlp_out, res, ln1], n_out=4, domain=_MS,
                                epsilon=eps)
        qkv = linear(g, h, [att.q_proj, att.k_proj, att.v_proj], f"l{i}.qkv", ft)
        scale = float(getattr(att, "scaling", hd ** -0.5))
        kv_io = [ins[3 + 2 * i], ins[4 + 2 * i], seqlens, total_scalar]
        if rotary_in_attention:                 # packed Q/K/V, GQA rotates Q and K itself
            attn_in, rot = [qkv, "", "", *kv_io, cos_c, sin_c, pos, mask], {"do_rotary": 1}
        else:
            q, k, v = g.op("Split", [qkv, g.init(f"l{i}.split", np.array([heads * hd, kv_heads * hd, kv_heads * hd]))],
                           n_out=3, axis=-1)
            q = g.op("RotaryEmbedding", [q, pos, cos_c, sin_c], domain=_MS, num_heads=heads, interleaved=0)
            k = g.op("RotaryEmbedding", [k, pos, cos_c, sin_c], domain=_MS, num_heads=kv_heads, interleaved=0)
            attn_in, rot = [q, k, v, *kv_io, "", "", "", mask], {}
        a = g.op("GroupQueryAttention", attn_in + ["", "", "", "", "", qlens], n_out=3,
                 outs=[f"l{i}.attn", outs[1 + 2 * i], outs[2 + 2 * i]], domain=_MS, num_heads=heads,
                 kv_num_heads=kv_heads, causal=1, scale=scale, **rot)
        a = linear(g, a[0], [att.o_proj], f"l{i}.o", ft)
        ln2 = g.init(f"l{i}.ln2", to_numpy(layer.post_attention_layernorm.weight, ft))
        h, _, _, res = g.op("SkipSimplifiedLayerNormalization", [a, res, ln2], n_out=4, domain=_MS, epsilon=eps)
        gu = linear(g, h, [mlp.gate_proj, mlp.up_proj], f"l{i}.gate_up", ft)
        gate, up = g.op("Split", [gu, g.init(f"l{i}.gsplit", np.array([mlp.gate_proj.out_features] * 2))],
                        n_out=2, axis=-1)
        act = g.op("QuickGelu", [gate], domain=_MS, alpha=1.0)          # x * sigmoid(x): SiLU
        mlp_out = linear(g, g.op("Mul", [act, up]), [mlp.down_proj], f"l{i}.down", ft)
    h = g.op("SkipSimplifiedLayerNormalization", [mlp_out, res, g.init("norm", to_numpy(m.norm.weight, ft))], n_out=1,
             domain=_MS, epsilon=eps)
    logits_head(g, f, h, model.lm_head.weight, dtype)
    if hidden:
        hidden_output(g, f, h, dtype)
    return step_model(g, n_layers, kv_heads, hd, cfg.vocab_size, dtype, opset, cfg.hidden_size if hidden else 0)
