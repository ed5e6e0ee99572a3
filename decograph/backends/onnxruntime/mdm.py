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

The runtime runs the graph through ``canvas.OrtCanvasEngine`` (torch-free, as the exported
decoder does); ``ORTMDMAdapter`` gives torch callers the ``MaskedDiffusionAdapter`` interface.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from decograph.backends.onnxruntime.block_diffusion import BDSession
from decograph.backends.onnxruntime.canvas import MDMSession, mdm_io_names
from decograph.errors import ModelError
from decograph.models.diffusion import MaskedDiffusionAdapter
from decograph.models.mdm import KV

__all__ = ["MDM_GRAPH_VERSION", "ORTMDMAdapter", "ORTBlockDiffusionAdapter", "build_mdm", "export_mdm"]

MDM_GRAPH_VERSION = "mdm-1"
_MS = "com.microsoft"



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
    ins, outs = mdm_io_names(cfg.n_layers)
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
    """The exported masked-diffusion forward (``canvas.MDMSession``) behind ``MDMAdapter``'s
    torch interface (both block-wise caches work). The runtime runs the graph through
    ``canvas.OrtCanvasEngine`` directly; this adapter is for torch callers."""

    supports_kv = True

    def __init__(self, path: str | Path, *, mask_token_id: int, eos_token_ids: tuple[int, ...], max_positions: int,
                 tokenizer: Any = None, shift_logits: bool = False, threads: int | None = None,
                 spinning: bool | None = None, session: MDMSession | None = None) -> None:
        self.mdm = session or MDMSession(path, max_positions=max_positions, threads=threads, spinning=spinning)
        self.session, self.num_layers, self.path = self.mdm.session, self.mdm.num_layers, self.mdm.path
        super().__init__(None, mask_token_id, eos_token_ids, self.mdm.vocab_size, max_positions, shift_logits,
                         tokenizer, f"{self.path.name} on ONNX Runtime")

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, key_valid: torch.Tensor | None = None,
                context: KV | None = None, context_valid: torch.Tensor | None = None,
                return_kv: bool = False, logits_at: torch.Tensor | None = None,
                **layout: torch.Tensor | None) -> tuple[torch.Tensor, KV | None]:
        def np_(x: torch.Tensor | None) -> np.ndarray | None:
            return None if x is None else x.numpy()

        ctx = None if context is None else [(k.numpy(), v.numpy()) for k, v in context]
        logits, kv = self.mdm.forward(ids.numpy(), positions.numpy(), np_(key_valid), ctx, np_(context_valid),
                                      return_kv, np_(logits_at), **{k: np_(v) for k, v in layout.items()})
        if kv is None:
            return torch.from_numpy(logits), None
        return torch.from_numpy(logits), [(torch.from_numpy(k), torch.from_numpy(v)) for k, v in kv]


class ORTBlockDiffusionAdapter(ORTMDMAdapter):
    """The block-diffusion graph behind the ``MaskedDiffusionAdapter`` interface (both caches)."""

    wants_layout = True

    def __init__(self, path: str | Path, *, eos_token_ids: tuple[int, ...], max_positions: int,
                 tokenizer: Any = None, threads: int | None = None, spinning: bool | None = None) -> None:
        session = BDSession(path, max_positions=max_positions, threads=threads, spinning=spinning)
        super().__init__(path, mask_token_id=session.mask_token_id, eos_token_ids=eos_token_ids,
                         max_positions=max_positions, tokenizer=tokenizer, shift_logits=True, session=session)
        self.block = session.block
