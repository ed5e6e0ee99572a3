"""The block-diffusion LM adapted from a causal one (``models.block_diffusion``) as an ONNX graph
of ONNX Runtime's CPU operators, its session, and the adapter the ``onnxruntime`` backend runs.

The graph is the model's forward with the block-wise caches' interface, as ``mdm.build_mdm``'s
(queries at explicit positions, the kept context KV, logits at chosen query indices, the
queries' K/V out) plus a ``noisy`` input: where it is 1 the LoRA update of every projection is
added and a mask token reads the learned mask embedding. The attention mask (``bias``) and
``noisy`` are the host's: ``models.block_layout.block_causal_layout``, the one implementation
the torch model uses too; torch-free but for the export itself (the exported decoder runs
``BDSession``; ``mdm.ORTBlockDiffusionAdapter`` serves torch callers). Grouped-query attention repeats the key/value heads for ONNX
Runtime's ``MultiHeadAttention``.

    inputs   ids [B, T] int64, positions [B, T] int64, noisy [B, T] float32 (0 or 1),
             bias [B, 1, T, C + T] float32, context.{i}.key / .value [B, KV, C, D], logits_at [B, K] int64
    outputs  logits [B, K, V] float32, present.{i}.key / .value [B, KV, T, D] float32
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from decograph.backends.onnxruntime.canvas import MDMSession
from decograph.backends.onnxruntime.kv import NEG
from decograph.errors import ModelError
from decograph.models.block_layout import block_causal_layout

__all__ = ["BD_GRAPH_VERSION", "bd_io_names", "build_block_diffusion", "export_block_diffusion", "BDSession"]

BD_GRAPH_VERSION = "bd-1"
_MS = "com.microsoft"


def bd_io_names(n_layers: int) -> tuple[list[str], list[str]]:
    ctx = [f"context.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    return ["ids", "positions", "noisy", "bias", *ctx, "logits_at"], ["logits", *present]


def _lora_pair(mods: list[Any], scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Stacked ``A.T`` [in, n*r] and block-diagonal ``scale * B.T`` [n*r, sum(out)] of LoRA factors
    sharing an input: one MatMul pair for several projections."""
    a = np.concatenate([m.a.detach().float().numpy() for m in mods], 0).T
    outs = [m.b.shape[0] for m in mods]
    r = mods[0].a.shape[0]
    b = np.zeros((r * len(mods), sum(outs)), np.float32)
    at = 0
    for j, m in enumerate(mods):
        b[j * r:(j + 1) * r, at:at + outs[j]] = m.b.detach().float().numpy().T * scale
        at += outs[j]
    return np.ascontiguousarray(a, np.float32), b


def build_block_diffusion(lm: Any, opset: int = 23) -> Any:
    """The forward graph (fp32 ``onnx.ModelProto``) of a ``BlockDiffusionLM``."""
    import onnx
    import torch
    from onnx import TensorProto as TP

    from decograph.backends.onnxruntime.graph import GraphWriter, to_numpy
    from decograph.models.block_diffusion import BlockDiffusionLM

    if not isinstance(lm, BlockDiffusionLM):
        raise ModelError(f"the block-diffusion export takes a BlockDiffusionLM, not {type(lm).__name__}")
    base, c = lm.base.model, lm.base.config
    h, kvh, dh = lm.heads, lm.kv_heads, lm.head_dim
    g = GraphWriter()
    ins, outs = bd_io_names(c.num_hidden_layers)
    rot = base.rotary_emb
    ang = torch.arange(c.max_position_embeddings, dtype=torch.float32)[:, None] * rot.inv_freq.float()[None]
    sc = float(getattr(rot, "attention_scaling", 1.0))
    cos, sin = g.init("rotary.cos", to_numpy(ang.cos() * sc)), g.init("rotary.sin", to_numpy(ang.sin() * sc))
    shape_bthd = g.init("c.bthd", np.array([0, 0, kvh, dh], np.int64))
    rep = g.init("c.rep", np.array([1, 1, h // kvh, 1, 1], np.int64))
    shape_heads = g.init("c.heads", np.array([0, h, -1, dh], np.int64))
    two = g.init("c.ax2", np.array([2], np.int64))
    m1 = g.init("c.m1", np.array([-1], np.int64))
    gate = g.op("Unsqueeze", ["noisy", m1])                                     # [B, T, 1]
    emb = g.op("Gather", [g.init("embed.weight", to_numpy(base.embed_tokens.weight)), "ids"])
    is_mask = g.op("And", [g.op("Equal", ["ids", g.init("c.mask", np.array(lm.config.mask_token_id, np.int64))]),
                           g.op("Greater", ["noisy", g.init("c.half", np.array(0.5, np.float32))])])
    x = g.op("Where", [g.op("Unsqueeze", [is_mask, m1]), g.init("mask_embed", to_numpy(lm.mask_embed)), emb])

    def proj(i: int, name: str, hn: str, lins: list[Any], loras: list[Any]) -> str:
        w = np.concatenate([to_numpy(m.weight) for m in lins], 0).T
        y = g.op("MatMul", [hn, g.init(f"l{i}.{name}", np.ascontiguousarray(w))])
        a, b = _lora_pair(loras, lm.scale_lora)
        d = g.op("MatMul", [g.op("MatMul", [hn, g.init(f"l{i}.{name}.lora_a", a)]), g.init(f"l{i}.{name}.lora_b", b)])
        return g.op("Add", [y, g.op("Mul", [d, gate])])

    res, mlp_out = x, None
    for i, layer in enumerate(base.layers):
        at, mlp, lo = layer.self_attn, layer.mlp, lm.lora[i]
        w1 = g.init(f"l{i}.norm1", to_numpy(layer.input_layernorm.weight))
        eps1 = float(layer.input_layernorm.variance_epsilon)
        if mlp_out is None:
            hn = g.op("RMSNormalization", [x, w1], axis=-1, epsilon=eps1)
        else:
            hn, _, _, res = g.op("SkipSimplifiedLayerNormalization", [mlp_out, res, w1], n_out=4, domain=_MS,
                                 epsilon=eps1)
        qkv = proj(i, "qkv", hn, [at.q_proj, at.k_proj, at.v_proj], [lo["q_proj"], lo["k_proj"], lo["v_proj"]])
        sizes = np.array([h * dh, kvh * dh, kvh * dh], np.int64)
        q, k, v = g.op("Split", [qkv, g.init(f"l{i}.split", sizes)], n_out=3, axis=-1)
        q = g.op("RotaryEmbedding", [q, "positions", cos, sin], domain=_MS, num_heads=h, interleaved=0)
        k = g.op("RotaryEmbedding", [k, "positions", cos, sin], domain=_MS, num_heads=kvh, interleaved=0)
        k4 = g.op("Transpose", [g.op("Reshape", [k, shape_bthd])], perm=[0, 2, 1, 3], outs=[outs[1 + 2 * i]])
        v4 = g.op("Transpose", [g.op("Reshape", [v, shape_bthd])], perm=[0, 2, 1, 3], outs=[outs[2 + 2 * i]])
        keys = g.op("Concat", [ins[4 + 2 * i], k4], axis=2)
        values = g.op("Concat", [ins[5 + 2 * i], v4], axis=2)
        if h != kvh:                                      # head j reads key/value head j // (h / kvh)
            keys = g.op("Reshape", [g.op("Expand", [g.op("Unsqueeze", [keys, two]), rep]), shape_heads])
            values = g.op("Reshape", [g.op("Expand", [g.op("Unsqueeze", [values, two]), rep]), shape_heads])
        a = g.op("MultiHeadAttention", [q, keys, values, "", "", "bias"], domain=_MS, num_heads=h,
                 scale=float(at.scaling))
        a = proj(i, "o", a, [at.o_proj], [lo["o_proj"]])
        w2 = g.init(f"l{i}.norm2", to_numpy(layer.post_attention_layernorm.weight))
        hn, _, _, res = g.op("SkipSimplifiedLayerNormalization", [a, res, w2], n_out=4, domain=_MS,
                             epsilon=float(layer.post_attention_layernorm.variance_epsilon))
        gu = proj(i, "gate_up", hn, [mlp.gate_proj, mlp.up_proj], [lo["gate_proj"], lo["up_proj"]])
        ff = int(mlp.gate_proj.out_features)
        gt, up = g.op("Split", [gu, g.init(f"l{i}.gsplit", np.array([ff, ff], np.int64))], n_out=2, axis=-1)
        act = g.op("QuickGelu", [gt], domain=_MS, alpha=1.0)                  # x * sigmoid(x): SiLU
        mlp_out = proj(i, "down", g.op("Mul", [act, up]), [mlp.down_proj], [lo["down_proj"]])
    hn = g.op("SkipSimplifiedLayerNormalization", [mlp_out, res, g.init("norm", to_numpy(base.norm.weight))],
              n_out=1, domain=_MS, epsilon=float(base.norm.variance_epsilon))
    picked = g.op("GatherND", [hn, g.op("Unsqueeze", ["logits_at", m1])], batch_dims=1)
    g.op("MatMul", [picked, g.init("lm_head.weight", np.ascontiguousarray(to_numpy(lm.base.lm_head.weight).T))],
         outs=["logits"])
    f, i64 = TP.FLOAT, TP.INT64
    vi = onnx.helper.make_tensor_value_info
    inputs = [vi("ids", i64, ["batch", "seq"]), vi("positions", i64, ["batch", "seq"]),
              vi("noisy", f, ["batch", "seq"]), vi("bias", f, ["batch", 1, "seq", "total"])]
    inputs += [vi(n, f, ["batch", kvh, "context", dh]) for n in ins[4:-1]]
    inputs.append(vi("logits_at", i64, ["batch", "keep"]))
    outputs = [vi("logits", f, ["batch", "keep", lm.vocab_size])]
    outputs += [vi(n, f, ["batch", kvh, "seq", dh]) for n in outs[1:]]
    proto = g.model("decograph_block_diffusion", inputs, outputs, opset)
    meta = {"decograph.graph": BD_GRAPH_VERSION, "decograph.block": str(lm.config.block),
            "decograph.mask_token_id": str(lm.config.mask_token_id)}
    for key, val in meta.items():
        proto.metadata_props.add(key=key, value=val)
    return proto


def export_block_diffusion(lm: Any, path: str | Path) -> Path:
    """Writes ``build_block_diffusion(lm)`` to ``path`` (atomically), checked by ``onnx.checker``."""
    import onnx

    from decograph.backends.onnxruntime.export import save_model

    proto = build_block_diffusion(lm)
    onnx.checker.check_model(proto)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_model(proto, out, False)
    return out


class BDSession(MDMSession):
    """The block-diffusion graph's forward on numpy arrays; the layout (``noisy`` and the
    attention bias) from each query row's answer start and the context's positions."""

    wants_layout = True

    def __init__(self, path: str | Path, *, max_positions: int, threads: int | None = None,
                 spinning: bool | None = None) -> None:
        super().__init__(path, max_positions=max_positions, threads=threads, spinning=spinning)
        meta = self.session.get_modelmeta().custom_metadata_map
        if meta.get("decograph.graph") != BD_GRAPH_VERSION:
            raise ModelError(f"{self.path}: not a decograph block-diffusion graph ({BD_GRAPH_VERSION})")
        self.block, self.mask_token_id = int(meta["decograph.block"]), int(meta["decograph.mask_token_id"])

    def _check_names(self, names: list[str]) -> int:
        n = (len(names) - 5) // 2
        if names != bd_io_names(n)[0]:
            raise ModelError(f"{self.path}: inputs {names[:4]}... are not a decograph block-diffusion graph")
        return n

    def forward(self, ids: np.ndarray, positions: np.ndarray, key_valid: np.ndarray | None = None,
                context: Any = None, context_valid: np.ndarray | None = None, return_kv: bool = False,
                logits_at: np.ndarray | None = None, gen_start: np.ndarray | None = None,
                context_pos: np.ndarray | None = None) -> tuple[np.ndarray, Any]:
        if gen_start is None or (context is not None and context_pos is None):
            raise ModelError(f"{self.path.name}: the block-diffusion forward needs gen_start (and context_pos)")
        self.check(ids, positions)
        b, t = ids.shape
        kv = np.ones((b, t), bool) if key_valid is None else key_valid
        noisy, attend = block_causal_layout(ids, positions, kv, gen_start, self.block, self.mask_token_id,
                                            context_pos if context is not None else None, context_valid)
        bias = np.where(attend, np.float32(0.0), NEG)[:, None].astype(np.float32)
        return self.run_feeds(ids, positions, bias, context, return_kv, logits_at,
                              {"noisy": noisy.astype(np.float32)})
