"""Export a Llama-architecture or Gemma 3 causal LM's decoding step to ONNX, and quantize it.

The step takes what decograph's runtime hands any adapter and returns the logits of the
queries plus the cache grown by the new slots; names as optimum uses them (``kv.io_names``):

    inputs   input_ids [B, T] int64, position_ids [B, T] int64,
             attention_mask [B, 1, T, S + T] float32 (additive: 0 attends, -inf-like not),
             past_key_values.{i}.key / .value [B, Hkv, S, D] float32, logits_keep int64 [1],
             cache_lengths int64 [B] (each row's valid past slots, <= S; its new slots go there)
    outputs  logits [B, keep, V] float32 (the last ``logits_keep`` tokens; 0: all T),
             present.{i}.key / .value [B, Hkv, S + T, D] (S + 2 after a one-token step
             of an exact graph: the last slot is its padding row's, scratch, not cache)

Attention is causal in slot order (``GroupQueryAttention``); the mask can only take slots away
(trees, packed rows, padding), never let a token see a later slot. The graph is written
directly from the weights with ONNX Runtime's fused CPU operators (``graph.build_step``;
Gemma 3's ``graph_gemma3.build_gemma3_step``, its sliding window inside the graph);
``exact`` graphs (the exported decoder's) add the padding row that makes a row's result
independent of the step's width; the backends' graphs (batches, trees) are not exact and keep
fp32 activations.

    export_step(model, "out/model.onnx")            # then decograph.backends.onnxruntime.ORTCausalLM
    quantize_step("out/model.onnx", "out/model.int4.onnx", bits=4)
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from decograph.backends.onnxruntime.graph import GRAPH_VERSION, build_step
from decograph.backends.onnxruntime.graph_gemma3 import GEMMA3_GRAPH_VERSION, build_gemma3_step, is_gemma3
from decograph.backends.onnxruntime.kv import QUANT_META, io_names
from decograph.errors import ModelError
from decograph.files import plain_permissions

__all__ = ["GRAPH_VERSION", "INEXACT_ACCURACY_LEVEL", "QUANT", "bind_numpy_head", "export_step", "graph_version",
           "io_names", "quant_tag", "quantize_step", "save_model"]

# MatMulNBits settings: blocks of 32 weights per scale, symmetric. accuracy_level 4 computes with
# int8 activations (quantized per row and block): ORT's fast CPU kernels for 4- and 8-bit
# weights, for exact graphs (see ``graph``). Graphs that are not exact keep fp32 activations
# (level 0), whose float differences between step shapes stay ~1e-5 instead of growing.
QUANT = {"block_size": 32, "accuracy_level": 4}
INEXACT_ACCURACY_LEVEL = 0


def quant_tag(bits: int, accuracy_level: int = QUANT["accuracy_level"]) -> str:
    """The quantized graph's file-name tag: its settings, so a change never reuses an old file."""
    return f"int{bits}-b{QUANT['block_size']}-a{accuracy_level}-m-qe"      # qe: a tied embedding quantized


def save_model(proto: Any, out: Path, big: bool) -> None:
    """Writes ``proto`` under a temporary name and renames it into place."""
    import onnx

    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".onnx.tmp")
    os.close(fd)
    try:
        # external data lands at its final name (a location relative to the model's folder)
        onnx.save_model(proto, tmp, save_as_external_data=big, location=out.name + ".data" if big else None)
        plain_permissions(tmp)
        if big:
            plain_permissions(out.with_name(out.name + ".data"))
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def graph_version(model: Any, hidden: bool = False) -> str:
    """The layout version of ``model``'s step graph: Gemma 3's (``graph_gemma3``) or Llama's,
    with ``graph.HIDDEN_TAG`` when it has the ``hidden`` output."""
    from decograph.backends.onnxruntime import graph

    return (GEMMA3_GRAPH_VERSION if is_gemma3(model) else graph.GRAPH_VERSION) + (graph.HIDDEN_TAG if hidden else "")


def export_step(model: Any, path: str | Path, exact: bool = True, dtype: str = "float32", hidden: bool = False) -> Path:
    """Writes the step graph (``graph.build_step``, or ``graph_gemma3.build_gemma3_step`` for
    Gemma 3; ``dtype`` float32, or float16 for the CUDA EP; ``hidden``: with the final hidden
    states as an output too, for draft heads) to ``path`` (weights in ``<name>.data`` beside it
    when they are near 2 GB's protobuf limit); checks it with ``onnx.checker`` and shape
    inference."""
    import onnx

    out = Path(path)
    if is_gemma3(model):
        proto = build_gemma3_step(model, exact=exact, dtype=dtype, hidden=hidden)
        size = proto.ByteSize()         # its tied embedding is written twice: table and LM head
        big = size > 1_800_000_000
    else:
        proto = build_step(model, exact=exact, dtype=dtype, hidden=hidden)
        size, big = 0, sum(p.numel() for p in model.parameters()) * 4 > 1_800_000_000
    if size < 2_000_000_000:            # over protobuf's limit, the saved file is checked instead
        onnx.checker.check_model(proto)
        onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_model(proto, out, big)
    if size >= 2_000_000_000:
        onnx.checker.check_model(str(out))
    return out


def bind_numpy_head(head: Any, model: Any) -> Any:
    """``head`` (``HeadWeights``) bound, as a ``NumpyHead``, to ``model``'s (a Hugging Face causal
    LM's) input embedding and LM head in float32: what a head graph (``graph_head``) is built from."""
    embed_w = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    embed = embed_w.detach().float().cpu().numpy()
    lm = embed if out is None or out.weight is embed_w else out.weight.detach().float().cpu().numpy()
    return head.bind(embed, lm)


def quantize_step(src: str | Path, dst: str | Path, bits: int = 4,
                  accuracy_level: int = QUANT["accuracy_level"], block_size: int = QUANT["block_size"]) -> Path:
    """Weight-only quantization of the step graph's MatMul weights with ORT's ``MatMulNBits``
    (``bits`` 4 or 8, symmetric, one scale per ``block_size`` weights: 32 as onnxruntime-genai's
    builder; 128 runs faster, less accurately). A tied input embedding (a ``Gather`` whose table
    is the transpose of a ``MatMul``'s weight, as in SmolLM2 and Gemma 3) reads the LM head's
    quantized weights with ``GatherBlockQuantized`` instead of keeping its float table (Gemma 3
    270M's int4 step graph: 906 MB -> about 240 MB); an untied table stays float."""
    if bits not in (4, 8):
        raise ModelError(f"quantize_step: bits must be 4 or 8, got {bits}")
    if block_size not in (16, 32, 64, 128, 256):
        raise ModelError(f"quantize_step: block_size must be 16, 32, 64, 128 or 256, got {block_size}")
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    out = Path(dst)
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    proto = onnx.load(str(src))
    tied = _tied_embedding(proto)
    q = MatMulNBitsQuantizer(proto, bits=bits, block_size=block_size, is_symmetric=True,
                             accuracy_level=accuracy_level)
    q.process()
    proto = q.model.model
    if tied is not None:
        _share_quantized_embedding(proto, *tied)
    # read back by ``kv.StepSession.quantized``: quantized activations turn a float difference
    # into another token, so the runtime verifies draft chains, not trees, on this graph
    proto.metadata_props.add(key=QUANT_META, value=f"int{bits}")
    save_model(proto, out, Path(str(src) + ".data").is_file())
    return out


def _tied_embedding(proto: Any) -> tuple[str, str] | None:
    """``(gather node's output, MatMul's output)`` when a ``Gather``'s 2-D initializer table is
    exactly the transpose of a ``MatMul``'s initializer weight (tied embeddings), else None."""
    from onnx import numpy_helper

    inits = {i.name: i for i in proto.graph.initializer}
    shapes = {n: tuple(i.dims) for n, i in inits.items()}
    gathers = [n for n in proto.graph.node if n.op_type == "Gather" and n.input[0] in inits
               and len(shapes[n.input[0]]) == 2]
    for g in gathers:
        table = shapes[g.input[0]]
        for m in proto.graph.node:
            if m.op_type == "MatMul" and m.input[1] in inits and shapes[m.input[1]] == table[::-1]:
                e, w = numpy_helper.to_array(inits[g.input[0]]), numpy_helper.to_array(inits[m.input[1]])
                if e.dtype == w.dtype and (e == w.T).all():
                    return g.output[0], m.output[0]
    return None


def _share_quantized_embedding(proto: Any, gather_out: str, head_out: str) -> None:
    """Replaces the ``Gather`` producing ``gather_out`` by a ``GatherBlockQuantized`` over the
    ``MatMulNBits`` (producing ``head_out``)'s blocks and scales (the same bytes: rows of
    ``K * bits / 8`` packed weights, one scale per block; zero point 8 or 128 as MatMulNBits's),
    and drops the float table. Left as is when ``K`` is not a whole number of blocks."""
    import onnx
    from onnx import numpy_helper

    nodes = list(proto.graph.node)
    head = next((n for n in nodes if n.op_type == "MatMulNBits" and n.output[0] == head_out), None)
    gather = next(n for n in nodes if n.op_type == "Gather" and n.output[0] == gather_out)
    if head is None:
        return
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in head.attribute}
    k, n, block, bits = attrs["K"], attrs["N"], attrs["block_size"], attrs["bits"]
    if k % block:
        return
    table = gather.input[0]
    shape = proto.graph.initializer.add()
    shape.CopyFrom(numpy_helper.from_array(np.array([n, -1], np.int64), gather_out + "/quant_shape"))
    data = onnx.helper.make_node("Reshape", [head.input[1], shape.name], [gather_out + "/quant_data"])
    scales = onnx.helper.make_node("Reshape", [head.input[2], shape.name], [gather_out + "/quant_scales"])
    lookup = onnx.helper.make_node("GatherBlockQuantized", [data.output[0], gather.input[1], scales.output[0]],
                                   [gather_out], name=gather.name or gather_out, domain="com.microsoft",
                                   gather_axis=0, quantize_axis=1, block_size=block, bits=bits)
    at = nodes.index(gather)
    del proto.graph.node[:]
    proto.graph.node.extend(nodes[:at] + [data, scales, lookup] + nodes[at + 1:])
    if not any(table in nd.input for nd in proto.graph.node):
        keep = [i for i in proto.graph.initializer if i.name != table]
        del proto.graph.initializer[:]
        proto.graph.initializer.extend(keep)
