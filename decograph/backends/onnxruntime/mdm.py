"""decograph's masked-diffusion LM (``models.mdm.MDMTransformer``) as an ONNX graph of ONNX
Runtime's fused CPU operators, and the adapter that runs it for the unmask strategies.

The graph is the model's forward with the block-wise caches' interface (``MDMAdapter``): the
query tokens at explicit positions, each attending to the valid keys among the given context
KV (per layer, rotary already applied) and the queries themselves; logits at chosen query
indices only; the queries' own K/V out, for the caches to keep. Per layer: RMSNorm (fused with
the residual add), one MatMul for Q/K/V, ``RotaryEmbedding`` on Q and K, ``MultiHeadAttention``
(bidirectional, an additive key mask), the output projection, one MatMul for gate and up,
SiLU (``QuickGelu``), the down projection: about 15 nodes a layer against torch's ~30
dispatches, which is most of what a small block's step costs.

    inputs   ids [B, T] int64, positions [B, T] int64, bias [B, 1, T, C + T] float32 (additive:
             0 attends, -inf-like not), context.{i}.key / .value [B, H, C, D] float32 (C may be
             0), logits_at [B, K] int64
    outputs  logits [B, K, V] float32, present.{i}.key / .value [B, H, T, D] float32

    export_mdm(model, "mdm.onnx"); adapter = ORTMDMAdapter("mdm.onnx", tokenizer=tok)
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from decograph.backends.onnxruntime.kv import NEG
from decograph.errors import ModelError
from decograph.frontends.diffusion import MaskedDiffusionAdapter
from decograph.models.mdm import KV

__all__ = ["MDM_GRAPH_VERSION", "ORTMDMAdapter", "build_mdm", "export_mdm"]

MDM_GRAPH_VERSION = "mdm-1"
_MS = "com.microsoft"



def _names(n_layers: int) -> tuple[list[str], list[str]]:
    ctx = [f"context.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    return ["ids", "positions", "bias", *ctx, "logits_at"], ["logits", *present]


def build_mdm(model: Any, opset: int = 23) -> Any:
    """The forward graph (an ``onnx.ModelProto``, fp32) of an ``MDMTransformer``."""
    import onnx
    from onnx import TensorProto as TP

    from decograph.backends.onnxruntime.graph import GraphWriter, to_numpy
    from decograph.models.mdm import MDMTransformer

    if not isinstance(model, MDMTransformer):
        raise ModelError(f"the ONNX masked-diffusion export takes decograph's MDMTransformer, not {type(model).__name__}")
    cfg = model.config
    h, d = cfg.n_heads, cfg.d_model
    dh = d // h
    g = GraphWriter()
    ins, outs = _names(cfg.n_layers)
    ang = torch.arange(cfg.max_len, dtype=torch.float32)[:, None] * model.inv_freq.float()
    cos, sin = g.init("rotary.cos", to_numpy(ang.cos())), g.init("rotary.sin", to_numpy(ang.sin()))
    shape_bthd = g.init("c.bthd", np.array([0, 0, h, dh], np.int64))
    x = g.op("Gather", [g.init("embed.weight", to_numpy(model.embed.weight)), "ids"])
    res, mlp_out = x, None
    for i, blk in enumerate(model.blocks):
        w1 = g.init(f"l{i}.norm1", to_numpy(blk.norm1.weight))
        if mlp_out is None:
            hn = g.op("RMSNormalization", [x, w1], axis=-1, epsilon=float(blk.norm1.eps))
        else:
            hn, _, _, res = g.op("SkipSimplifiedLayerNormalization", [mlp_out, res, w1], n_out=4, domain=_MS,
                                 epsilon=float(blk.norm1.eps))
        qkv = g.op("MatMul", [hn, g.init(f"l{i}.qkv", to_numpy(blk.qkv.weight).T)])
        q, k, v = g.op("Split", [qkv, g.init(f"l{i}.split", np.array([d, d, d], np.int64))], n_out=3, axis=-1)
        q = g.op("RotaryEmbedding", [q, "positions", cos, sin], domain=_MS, num_heads=h, interleaved=0)
        k = g.op("RotaryEmbedding", [k, "positions", cos, sin], domain=_MS, num_heads=h, interleaved=0)
        k4 = g.op("Transpose", [g.op("Reshape", [k, shape_bthd])], perm=[0, 2, 1, 3], outs=[outs[1 + 2 * i]])
        v4 = g.op("Transpose", [g.op("Reshape", [v, shape_bthd])], perm=[0, 2, 1, 3], outs=[outs[2 + 2 * i]])
        keys = g.op("Concat", [ins[3 + 2 * i], k4], axis=2)
        values = g.op("Concat", [ins[4 + 2 * i], v4], axis=2)
        a = g.op("MultiHeadAttention", [q, keys, values, "", "", "bias"], domain=_MS, num_heads=h)
        a = g.op("MatMul", [a, g.init(f"l{i}.out", to_numpy(blk.out.weight).T)])
        w2 = g.init(f"l{i}.norm2", to_numpy(blk.norm2.weight))
        hn, _, _, res = g.op("SkipSimplifiedLayerNormalization", [a, res, w2], n_out=4, domain=_MS,
                             epsilon=float(blk.norm2.eps))
        gu = g.op("MatMul", [hn, g.init(f"l{i}.gate_up", to_numpy(blk.gate_up.weight).T)])
        gate, up = g.op("Split", [gu, g.init(f"l{i}.gsplit", np.array([cfg.d_ff] * 2, np.int64))], n_out=2, axis=-1)
        act = g.op("QuickGelu", [gate], domain=_MS, alpha=1.0)            # x * sigmoid(x): SiLU
        mlp_out = g.op("MatMul", [g.op("Mul", [act, up]), g.init(f"l{i}.down", to_numpy(blk.down.weight).T)])
    hn = g.op("SkipSimplifiedLayerNormalization", [mlp_out, res, g.init("norm", to_numpy(model.norm.weight))], n_out=1,
              domain=_MS, epsilon=float(model.norm.eps))
    picked = g.op("GatherND", [hn, g.op("Unsqueeze", ["logits_at", g.init("c.m1", np.array([-1], np.int64))])],
                  batch_dims=1)
    g.op("MatMul", [picked, g.init("lm_head.weight", to_numpy(model.embed.weight).T)], outs=["logits"])
    f, i64 = TP.FLOAT, TP.INT64
    vi = onnx.helper.make_tensor_value_info
    inputs = [vi("ids", i64, ["batch", "seq"]), vi("positions", i64, ["batch", "seq"]),
              vi("bias", f, ["batch", 1, "seq", "total"])]
    inputs += [vi(n, f, ["batch", h, "context", dh]) for n in ins[3:-1]]
    inputs.append(vi("logits_at", i64, ["batch", "keep"]))
    outputs = [vi("logits", f, ["batch", "keep", cfg.vocab_size])]
    outputs += [vi(n, f, ["batch", h, "seq", dh]) for n in outs[1:]]
    return g.model("decograph_mdm", inputs, outputs, opset)


def export_mdm(model: Any, path: str | Path) -> Path:
    """Writes ``build_mdm(model)`` to ``path`` (atomically), checked by ``onnx.checker`` and
    shape inference."""
    import onnx

    from decograph.backends.onnxruntime.export import save_model

    proto = build_mdm(model)
    onnx.checker.check_model(proto)
    onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_model(proto, out, False)
    return out


class ORTMDMAdapter(MaskedDiffusionAdapter):
    """The exported masked-diffusion forward run by ONNX Runtime's CPU EP, behind
    ``MDMAdapter``'s interface (both block-wise caches work). ORT's idle threads do not spin
    by default (``spinning``; ``DECOGRAPH_ORT_SPINNING`` overrides): between forwards the
    runtime's unmask and commit run on torch, whose threads spinning ORT ones would slow
    down (2.3x slower on 2 cores, measured)."""

    supports_kv = True

    def __init__(self, path: str | Path, *, mask_token_id: int, eos_token_ids: tuple[int, ...], max_positions: int,
                 tokenizer: Any = None, shift_logits: bool = False, threads: int | None = None,
                 spinning: bool | None = None) -> None:
        import os

        from decograph.backends.onnxruntime.kv import open_session, session_options

        p = Path(path)
        if spinning is None and not os.environ.get("DECOGRAPH_ORT_SPINNING", "").strip():
            spinning = False
        self.session = open_session(p, session_options(threads, spinning))
        names = [i.name for i in self.session.get_inputs()]
        self.num_layers = (len(names) - 4) // 2
        if names != _names(self.num_layers)[0]:
            raise ModelError(f"{p}: inputs {names[:3]}... are not a decograph masked-diffusion graph (mdm.build_mdm)")
        ctx = self.session.get_inputs()[3].shape
        self.heads, self.head_dim = int(ctx[1]), int(ctx[3])
        vocab = int(self.session.get_outputs()[0].shape[2])
        self.path = p
        super().__init__(None, mask_token_id, eos_token_ids, vocab, max_positions, shift_logits, tokenizer,
                         f"{p.name} on ONNX Runtime")

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, key_valid: torch.Tensor | None = None,
                context: KV | None = None, context_valid: torch.Tensor | None = None,
                return_kv: bool = False, logits_at: torch.Tensor | None = None) -> tuple[torch.Tensor, KV | None]:
        if ids.shape != positions.shape or ids.dim() != 2:
            raise ModelError(f"MDM forward: ids {tuple(ids.shape)} and positions {tuple(positions.shape)} must be equal [B, T]")
        if positions.numel() and int(positions.max()) >= self.max_positions:
            raise ModelError(f"MDM forward: position {int(positions.max())} is past the model's max_len {self.max_positions}")
        b, t = ids.shape
        c = context[0][0].shape[2] if context is not None else 0
        valid = np.ones((b, c + t), bool)
        if context is not None and context_valid is not None:
            valid[:, :c] = context_valid.numpy()
        if key_valid is not None:
            valid[:, c:] = key_valid.numpy()
        bias = np.ascontiguousarray(np.broadcast_to(np.where(valid, np.float32(0.0), NEG)[:, None, None, :],
                                                    (b, 1, t, c + t)))
        at = (logits_at if logits_at is not None else torch.arange(t).expand(b, t)).numpy().astype(np.int64)
        feeds: dict[str, np.ndarray] = {"ids": ids.numpy().astype(np.int64),
                                        "positions": positions.numpy().astype(np.int64), "bias": bias, "logits_at": at}
        empty = np.zeros((b, self.heads, 0, self.head_dim), np.float32) if context is None else None
        for i in range(self.num_layers):
            k, v = (context[i][0].numpy(), context[i][1].numpy()) if context is not None else (empty, empty)
            feeds[f"context.{i}.key"], feeds[f"context.{i}.value"] = k, v
        out = self.session.run(None, feeds)
        logits = torch.from_numpy(out[0])
        if not return_kv:
            return logits, None
        return logits, [(torch.from_numpy(out[1 + 2 * i]), torch.from_numpy(out[2 + 2 * i]))
                        for i in range(self.num_layers)]
