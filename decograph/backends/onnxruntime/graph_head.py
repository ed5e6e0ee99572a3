"""A trained draft head (``decograph.heads.spec``) as its own small ONNX graph, and its runner.

The graph computes ``NumpyHead.step`` and ``NumpyHead.logits`` in one session run, written
directly with ``graph.GraphWriter`` (plain ONNX operators, float32):

    inputs   feats [q, H] float32 (f_i), tokens [q] int64 (t_{i+1}), positions [q] int64 (i),
             past_k / past_v [P, kv_heads, head_dim] float32 (K after rotary, as the head's
             own earlier calls returned them), mask [q, P + q] bool (True: may attend),
             logits_feats [e, H] float32 (further rows whose logits to compute; usually e = 0),
             logits_keep [1] int64 (logits for out_feats' last this many rows; 0: all)
    outputs  out_feats [q, H], k / v [q, kv_heads, head_dim], logits [kept + e, V'] over the
             head's vocabulary subset (out_feats' kept rows, then logits_feats')

The target's token embedding (gathered, then scaled) and the LM head's rows of the subset are
initializers; the embedding is stored in float16 when that loses nothing (a table that was
float16 or bfloat16 before it became float32: half the file), else float32. The rotary angles
are computed in float64 (as ``spec.rope``), so positions far out lose nothing. A compact head
(``export_head(bits=4)``) trades that exactness for speed: int4 MatMuls with int8 activations,
a float16 embedding (drafts only propose; verification keeps the output lossless). The head's
config and vocabulary subset travel in the model's metadata (``META_KEY``), so ``OrtHead``
needs only onnxruntime and numpy.

``OrtHead`` has ``NumpyHead``'s interface (``config``, ``vocab_ids``, ``step``, ``logits``):
``step`` is one session run, whose logits ``logits`` then returns for that step's features (or
rows sliced from them); other features take one more run (``logits_feats``). A feed over the
committed pairs drafts from its last row only (``step(logits_rows=1)``): measured on the default
model's int8 head, a 20-row feed took 2.8 ms with every row's 8192 logits, most of it the
vocabulary projection.
"""
from __future__ import annotations

import base64
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from decograph.backends.onnxruntime.graph import GraphWriter
from decograph.errors import ModelError
from decograph.heads.spec import HeadConfig, NumpyHead

__all__ = ["HEAD_GRAPH_VERSION", "META_KEY", "OrtHead", "build_head", "export_head"]

HEAD_GRAPH_VERSION = "head-2"       # the manifest's graph version of a head graph: bump when it changes
META_KEY = "decograph.head"
_INPUTS = ["feats", "tokens", "positions", "past_k", "past_v", "mask", "logits_feats", "logits_keep"]
_OUTPUTS = ["out_feats", "k", "v", "logits"]


def _lossless_f16(a: np.ndarray) -> bool:
    with np.errstate(over="ignore"):
        return bool(np.array_equal(a.astype(np.float16).astype(np.float32), a))


def _rms(g: GraphWriter, x: str, w: np.ndarray, name: str, eps: float) -> str:
    return g.op("RMSNormalization", [x, g.init(name, w.astype(np.float32))], axis=-1, epsilon=eps)


def _rope(g: GraphWriter, x: str, cos: str, sin: str) -> str:
    """``x * cos + rotate_half(x) * sin`` of ``x`` [q, n, d] (cos / sin [q, 1, d]; ``rope.halves``
    the split of d in two)."""
    lo, hi = g.op("Split", [x, "rope.halves"], n_out=2, axis=-1)
    rot = g.op("Concat", [g.op("Neg", [hi]), lo], axis=-1)
    return g.op("Add", [g.op("Mul", [x, cos]), g.op("Mul", [rot, sin])])


def _attention(g: GraphWriter, c: Any, q: str, k: str, v: str) -> str:
    """Softmax attention of ``q`` [q, heads, d] over ``past`` + the step's ``k`` / ``v`` under
    ``mask``; the heads' outputs [q, heads * d]. Grouped-query without copying K/V per query
    head: query head ``h`` reads K/V head ``h // rep``, so the queries go as [kv_heads, rep * q, d]
    against [kv_heads, d, P + q]."""
    keys = g.op("Concat", ["past_k", k], axis=0)                  # [T, kv_heads, d]
    vals = g.op("Concat", ["past_v", v], axis=0)
    rep, kvh, d = c.heads // c.kv_heads, c.kv_heads, c.head_dim
    qg = g.op("Reshape", [q, g.init("att.q4", np.array([0, kvh, rep, d]))])                    # [q, kvh, rep, d]
    qg = g.op("Reshape", [g.op("Transpose", [qg], perm=[1, 2, 0, 3]), g.init("att.q3", np.array([kvh, -1, d]))])
    s = g.op("MatMul", [qg, g.op("Transpose", [keys], perm=[1, 2, 0])])                       # [kvh, rep * q, T]
    s = g.op("Div", [s, g.init("att.scale", np.array(np.sqrt(d), np.float32))])
    rows = g.op("Tile", ["mask", g.init("att.tile", np.array([rep, 1]))])                      # [rep * q, T]
    s = g.op("Softmax", [g.op("Where", [rows, s, g.init("att.never", np.array(-1e30, np.float32))])], axis=-1)
    a = g.op("MatMul", [s, g.op("Transpose", [vals], perm=[1, 0, 2])])                        # [kvh, rep * q, d]
    a = g.op("Transpose", [g.op("Reshape", [a, g.init("att.a4", np.array([kvh, rep, -1, d]))])], perm=[2, 0, 1, 3])
    return g.op("Reshape", [a, g.init("att.flat", np.array([0, -1]))])


def _inputs(g: GraphWriter, bound: NumpyHead, half: bool) -> str:
    """``fc(concat(feats, embed_scale * E[tokens]))``: the layer's input [q, H]; ``E`` stored in
    float16 with ``half``."""
    from onnx import TensorProto as TP

    c = bound.config
    emb = np.ascontiguousarray(bound.embed, np.float32)
    e = g.op("Gather", [g.init("embed.weight", emb.astype(np.float16) if half else emb), "tokens"], axis=0)
    if half:
        e = g.op("Cast", [e], to=TP.FLOAT)
    if c.embed_scale != 1.0:
        e = g.op("Mul", [e, g.init("embed.scale", np.array(c.embed_scale, np.float32))])
    x = g.op("MatMul", [g.op("Concat", ["feats", e], axis=-1), g.init("fc.weight", bound.w["fc.weight"].T)])
    return g.op("Add", [x, g.init("fc.bias", bound.w["fc.bias"])])


def _qkv(g: GraphWriter, bound: NumpyHead, h: str) -> tuple[str, str, str]:
    """Q [q, heads, d] and the outputs ``k`` / ``v`` [q, kv_heads, d] of ``h``: one MatMul, the
    rotary embedding of Q and K together, its angles in float64 as ``spec.rope``'s."""
    from onnx import TensorProto as TP

    c, w, d = bound.config, bound.w, bound.config.head_dim
    qkv = np.concatenate([w["q.weight"], w["k.weight"], w["v.weight"]], 0).T
    qk, v = g.op("Split", [g.op("MatMul", [h, g.init("qkv.weight", qkv)]),
                           g.init("qkv.split", np.array([(c.heads + c.kv_heads) * d, c.kv_heads * d]))],
                 n_out=2, axis=-1)
    inv = 1.0 / (c.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    ang = g.op("Mul", [g.op("Unsqueeze", [g.op("Cast", ["positions"], to=TP.DOUBLE), g.init("c.ax1", np.array([1]))]),
                       g.init("rope.inv", inv)])
    ang = g.op("Unsqueeze", [g.op("Concat", [ang, ang], axis=-1), "c.ax1"])          # [q, 1, d]
    g.init("rope.halves", np.array([d // 2, d // 2]))
    cos = g.op("Cast", [g.op("Cos", [ang])], to=TP.FLOAT)
    sin = g.op("Cast", [g.op("Sin", [ang])], to=TP.FLOAT)
    qk = _rope(g, g.op("Reshape", [qk, g.init("qk.shape", np.array([0, c.heads + c.kv_heads, d]))]), cos, sin)
    q, k = g.op("Split", [qk, g.init("qk.split", np.array([c.heads, c.kv_heads]))], n_out=2, axis=1,
                outs=["q.rope", "k"])
    return q, k, g.op("Reshape", [v, g.init("kv.shape", np.array([0, c.kv_heads, d]))], outs=["v"])


def _last_rows(g: GraphWriter, out: str) -> str:
    """The last ``logits_keep`` rows of ``out`` [q, H] (0, or more than q: all of them)."""
    zero = g.init("keep.zero", np.array([0]))
    start = g.op("Sub", [g.op("Shape", [out], start=0, end=1), "logits_keep"])
    start = g.op("Where", [g.op("Greater", ["logits_keep", zero]), g.op("Max", [start, zero]), zero])
    return g.op("Slice", [out, start, g.init("keep.end", np.array([np.iinfo(np.int64).max])), zero])


def build_head(bound: NumpyHead, opset: int = 23, half_embed: bool | None = None) -> Any:
    """The graph (an ``onnx.ModelProto``, see the module docstring) of a head bound to its
    target (``HeadWeights.bind``: the target's input embedding, its LM head's rows of the
    subset), computing what ``bound`` computes. ``half_embed``: the embedding in float16
    (default: where that loses nothing)."""
    import onnx
    from onnx import TensorProto as TP

    c, w, d = bound.config, bound.w, bound.config.head_dim
    g = GraphWriter()
    x = _inputs(g, bound, _lossless_f16(bound.embed) if half_embed is None else half_embed)
    q, k, v = _qkv(g, bound, _rms(g, x, w["ln1.weight"], "ln1.weight", c.eps))
    x = g.op("Add", [x, g.op("MatMul", [_attention(g, c, q, k, v), g.init("o.weight", w["o.weight"].T)])])
    h = _rms(g, x, w["ln2.weight"], "ln2.weight", c.eps)
    gu = g.op("MatMul", [h, g.init("gate_up.weight", np.concatenate([w["gate.weight"], w["up.weight"]], 0).T)])
    gate, up = g.op("Split", [gu, g.init("gate_up.split", np.array([c.intermediate] * 2))], n_out=2, axis=-1)
    act = g.op("Mul", [gate, g.op("Sigmoid", [gate])])
    x = g.op("Add", [x, g.op("MatMul", [g.op("Mul", [act, up]), g.init("down.weight", w["down.weight"].T)])])
    out = g.op("RMSNormalization", [x, g.init("norm.weight", w["norm.weight"])], axis=-1, epsilon=c.eps,
               outs=["out_feats"])
    rows = np.ascontiguousarray(bound.lm_rows.T, np.float32)         # [H, V']
    g.op("MatMul", [g.op("Concat", [_last_rows(g, out), "logits_feats"], axis=0), g.init("lm_rows.weight", rows)],
         outs=["logits"])
    vi, f32, i64, H = onnx.helper.make_tensor_value_info, TP.FLOAT, TP.INT64, c.hidden
    inputs = [vi("feats", f32, ["q", H]), vi("tokens", i64, ["q"]), vi("positions", i64, ["q"]),
              vi("past_k", f32, ["past", c.kv_heads, d]), vi("past_v", f32, ["past", c.kv_heads, d]),
              vi("mask", TP.BOOL, ["q", "total"]), vi("logits_feats", f32, ["extra", H]), vi("logits_keep", i64, [1])]
    outputs = [vi("out_feats", f32, ["q", H]), vi("k", f32, ["q", c.kv_heads, d]), vi("v", f32, ["q", c.kv_heads, d]),
               vi("logits", f32, ["rows", len(bound.vocab_ids)])]
    proto = g.model("decograph_head", inputs, outputs, opset)
    ids = bound.vocab_ids.astype("<i4").tobytes()
    meta = {"version": HEAD_GRAPH_VERSION, "config": asdict(c), "vocab_ids": base64.b64encode(ids).decode()}
    onnx.helper.set_model_props(proto, {META_KEY: json.dumps(meta)})
    return proto


def export_head(bound: NumpyHead, path: str | Path, bits: int = 0, block_size: int = 32) -> Path:
    """Writes the graph of the bound head (``build_head``) to ``path``, checked with
    ``onnx.checker`` and strict shape inference. ``bits`` 4 or 8: a compact head, faster and
    approximate (it only drafts; verification decides): its MatMuls block-wise ``MatMulNBits``
    with int8 activations (ORT's fast kernels, ``accuracy_level`` 4), its embedding float16."""
    import onnx

    from decograph.backends.onnxruntime.export import QUANT, save_model

    out = Path(path)
    proto = build_head(bound, half_embed=True if bits else None)
    onnx.checker.check_model(proto)
    onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_model(proto, out, False)
    if bits:
        from decograph.backends.onnxruntime.export import quantize_step

        quantize_step(out, out, bits, accuracy_level=QUANT["accuracy_level"], block_size=block_size)
    return out


class OrtHead:
    """A head graph (``export_head``) run by ONNX Runtime, with ``NumpyHead``'s interface.
    ``threads``: its intra-op threads (``kv.session_options``); its idle threads never spin
    (``spinning`` False): a head runs between the model's forwards, whose threads would lose
    their cores to the head's busy-waiting ones (measured: 32 greedy-length steps of the default
    model's int4 decoder took 3.7 s with a spinning head, 2.3 s without, 2.2 s with no head)."""

    def __init__(self, path: str | Path, threads: int | None = None, spinning: bool = False) -> None:
        from decograph.backends.onnxruntime.kv import open_session, session_options

        p = self.path = Path(path)
        self.session = open_session(p, session_options(threads, spinning))
        names = [i.name for i in self.session.get_inputs()], [o.name for o in self.session.get_outputs()]
        raw = self.session.get_modelmeta().custom_metadata_map.get(META_KEY)
        if names != (_INPUTS, _OUTPUTS) or raw is None:
            raise ModelError(f"{p}: not a decograph draft-head graph (inputs {names[0]}, outputs {names[1]})")
        try:
            meta = json.loads(raw)
            self.config = HeadConfig(**meta["config"])
            self.vocab_ids = np.frombuffer(base64.b64decode(meta["vocab_ids"]), "<i4").astype(np.int64)
        except (ValueError, TypeError, KeyError) as exc:
            raise ModelError(f"{p}: the draft head's metadata cannot be read ({type(exc).__name__}: {exc})") from None
        if meta.get("version") != HEAD_GRAPH_VERSION:
            raise ModelError(f"{p}: draft-head graph version {meta.get('version')!r}, this decograph runs "
                             f"{HEAD_GRAPH_VERSION!r}; export it again")
        c = self.config
        self._no_rows = np.zeros((0, c.hidden), np.float32)
        # the last step's out_feats, its logits, and the first of its rows they were computed for
        self._last: tuple[np.ndarray, np.ndarray, int] | None = None

    def step(self, feats: np.ndarray, tokens: np.ndarray, positions: np.ndarray, past_k: np.ndarray,
             past_v: np.ndarray, mask: np.ndarray | None = None,
             logits_rows: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """As ``NumpyHead.step``: the predicted features [q, H] and the queries' k, v; one run.
        It computes the logits of the last ``logits_rows`` rows (0: of all) too, for ``logits``:
        a feed whose last row only drafts skips the vocabulary projection of the others."""
        q_n, past = len(tokens), len(past_k)
        if mask is None:
            mask = np.concatenate([np.ones((q_n, past), bool), np.tri(q_n, dtype=bool)], 1)
        keep = q_n if not 0 < logits_rows < q_n else int(logits_rows)
        out, k, v, logits = self.session.run(None, {
            "feats": np.ascontiguousarray(feats, np.float32), "tokens": np.asarray(tokens, np.int64),
            "positions": np.asarray(positions, np.int64), "past_k": np.ascontiguousarray(past_k, np.float32),
            "past_v": np.ascontiguousarray(past_v, np.float32), "mask": np.asarray(mask, bool),
            "logits_feats": self._no_rows, "logits_keep": np.array([keep], np.int64)})
        self._last = (out, logits, q_n - keep)
        return out, k, v

    def logits(self, feats: np.ndarray) -> np.ndarray:
        """[q, V'] over ``vocab_ids``: computed by the step that returned ``feats`` (or the rows
        sliced from its features), else by one run for them."""
        rows = self._rows_of_last(feats)
        if rows is not None:
            return rows
        x = np.ascontiguousarray(np.atleast_2d(feats), np.float32)
        c = self.config
        got = self.session.run(["logits"], {
            "feats": np.zeros((1, c.hidden), np.float32), "tokens": np.zeros(1, np.int64),
            "positions": np.zeros(1, np.int64), "past_k": np.zeros((0, c.kv_heads, c.head_dim), np.float32),
            "past_v": np.zeros((0, c.kv_heads, c.head_dim), np.float32), "mask": np.ones((1, 1), bool),
            "logits_feats": x, "logits_keep": np.zeros(1, np.int64)})[0][1:]
        return got if feats.ndim == 2 else got[0]

    def _rows_of_last(self, feats: np.ndarray) -> np.ndarray | None:
        """The last step's logits of ``feats`` when it is that step's ``out_feats``, or a row or
        a run of rows of it (a basic slice: a view into its memory) among the rows the step
        computed logits for."""
        if self._last is None or not isinstance(feats, np.ndarray):
            return None
        out, logits, first = self._last
        if feats is out:
            return logits[: len(out)] if first == 0 else None
        base, at = out.__array_interface__["data"][0], feats.__array_interface__["data"][0]
        row = out.strides[0]
        if feats.dtype != out.dtype or not base <= at < base + out.nbytes or feats.shape[-1] != out.shape[1]:
            return None
        start, rem = divmod(at - base, row)
        if rem or feats.strides[-1] != out.strides[1] or start < first:
            return None
        if feats.ndim == 1:
            return logits[start - first]
        if feats.ndim == 2 and (feats.strides[0] == row or len(feats) == 1) and start + len(feats) <= len(out):
            return logits[start - first:start - first + len(feats)]
        return None
