"""Export a Llama-architecture causal LM's decoding step to ONNX.

The step takes what decograph's runtime hands any adapter and returns the logits of every
query plus the cache grown by the new slots; names and dynamic axes as optimum uses them:

    inputs   input_ids [B, T] int64, position_ids [B, T] int64,
             attention_mask [B, 1, T, S + T] float32 (additive: 0 attends, -inf-like not),
             past_key_values.{i}.key / .value [B, Hkv, S, D] float32
    outputs  logits [B, T, V] float32, present.{i}.key / .value [B, Hkv, S + T, D]

The mask is the materialized tree / packed pattern (ONNX has no structural mask op that ORT
runs on every EP); the positions are explicit, so drafts of any shape run on the same graph.

    export_step(model, "out/model.onnx")            # then decograph.backends.onnxruntime.ORTCausalLM
"""
from __future__ import annotations

import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from decograph.errors import ModelError

__all__ = ["LlamaStep", "export_step", "io_names", "quantize_step"]


def io_names(n_layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    return ["input_ids", "position_ids", "attention_mask", *past], ["logits", *present]


class LlamaStep(nn.Module):
    """transformers' Llama computation with explicit past KV in and present KV out (the
    model's own modules and rotary embedding; attention written out for the exporter)."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        if type(model).__name__ != "LlamaForCausalLM":
            raise ModelError(f"ONNX export supports Llama-architecture models, not {type(model).__name__}")
        self.model = model.eval()
        cfg = model.config
        self.n_layers, self.heads = cfg.num_hidden_layers, cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        m = self.model.model
        x = m.embed_tokens(input_ids)
        cos, sin = m.rotary_emb(x, position_ids)
        b, t = input_ids.shape
        groups = self.heads // self.kv_heads
        presents: list[torch.Tensor] = []
        for i, layer in enumerate(m.layers):
            att = layer.self_attn
            h = layer.input_layernorm(x)
            q = att.q_proj(h).view(b, t, self.heads, self.head_dim).transpose(1, 2)
            k = att.k_proj(h).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
            v = att.v_proj(h).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            k = torch.cat([past[2 * i], k], 2)
            v = torch.cat([past[2 * i + 1], v], 2)
            presents += [k, v]
            kk = k.repeat_interleave(groups, 1) if groups > 1 else k
            vv = v.repeat_interleave(groups, 1) if groups > 1 else v
            scores = torch.matmul(q, kk.transpose(2, 3)) * (self.head_dim ** -0.5) + attention_mask
            o = torch.matmul(torch.softmax(scores, -1), vv)
            x = x + att.o_proj(o.transpose(1, 2).reshape(b, t, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        logits = self.model.lm_head(m.norm(x))
        return (logits, *presents)


def export_step(model: Any, path: str | Path, opset: int = 17) -> Path:
    """Writes the step graph to ``path`` (weights in ``<name>.data`` beside it when the model
    is over 2 GB's protobuf limit), written to a temporary name first; checks it with
    ``onnx.checker`` and shape inference."""
    import onnx

    step = LlamaStep(model)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    b, t, s = 1, 2, 3
    past = [torch.zeros(b, step.kv_heads, s, step.head_dim) for _ in range(2 * step.n_layers)]
    args = (torch.ones(b, t, dtype=torch.long), torch.arange(s, s + t)[None], torch.zeros(b, 1, t, s + t), *past)
    ins, outs = io_names(step.n_layers)
    axes: dict[str, dict[int, str]] = {"input_ids": {0: "batch", 1: "seq"}, "position_ids": {0: "batch", 1: "seq"},
                                       "attention_mask": {0: "batch", 2: "seq", 3: "total"},
                                       "logits": {0: "batch", 1: "seq"}}
    for name in ins[3:]:
        axes[name] = {0: "batch", 2: "past"}
    for name in outs[1:]:
        axes[name] = {0: "batch", 2: "total"}
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".onnx.tmp")
    os.close(fd)
    try:
        # The TorchScript exporter on purpose: the torch.export one needs onnxscript, and this
        # graph (no control flow) exports the same either way.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)      # shape checks traced as constants
            torch.onnx.export(step, args, tmp, input_names=ins, output_names=outs, dynamic_axes=axes,
                              opset_version=opset, dynamo=False, do_constant_folding=True)
        proto = onnx.load(tmp)
        onnx.checker.check_model(proto)
        onnx.shape_inference.infer_shapes(proto, strict_mode=True)
        big = sum(p.numel() for p in model.parameters()) * 4 > 1_800_000_000
        onnx.save_model(proto, str(out), save_as_external_data=big, location=out.name + ".data" if big else None)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return out


def quantize_step(src: str | Path, dst: str | Path, bits: int = 4, block_size: int = 32) -> Path:
    """Weight-only quantization of the step graph's MatMul weights with ORT's ``MatMulNBits``
    (``bits`` 4 or 8, symmetric, ``block_size`` weights per scale); activations stay fp32."""
    if bits not in (4, 8):
        raise ModelError(f"quantize_step: bits must be 4 or 8, got {bits}")
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    out = Path(dst)
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    q = MatMulNBitsQuantizer(onnx.load(str(src)), bits=bits, block_size=block_size, is_symmetric=True,
                             accuracy_level=0)
    q.process()
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".onnx.tmp")
    os.close(fd)
    try:
        onnx.save_model(q.model.model, tmp)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return out
