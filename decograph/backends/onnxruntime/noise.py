"""DiffusionGemma's encoder and decoder graphs (``graph_diffusion_gemma``) on ONNX Runtime behind
the runtime's ``NoiseBatch`` protocol, torch-free: numpy and onnxruntime only.

``DGSession`` runs the two graphs on numpy arrays; ``OrtNoiseBatch`` keeps each layer's cache
of committed tokens as transformers' ``DynamicCache`` does (full layers every slot, sliding
layers the last ``window - 1``) with the rows' validity (left padding), builds the additive
masks (causal and the window in the encoder, padding in the decoder) and the positions (slot
indices shared by the batch, as transformers' ``generate``), and holds the self-conditioning
signal. ``OrtNoiseStep`` computes what the runtime's rules ask of a step's logits in numpy:
the logits at a temperature, entropy, argmax, confidence, samples.

Random draws come from numpy's generator (``numpy.random.default_rng(seed)``: the run's
``seed``, a fresh one when None): a canvas and each renoising are ``integers`` over the
vocabulary, a step's samples one uniform per position through the softmax's cumulative sum.
This cannot be torch's stream, so a seeded run on ONNX Runtime is reproducible but does not
draw what the torch backend (and transformers' ``generate``) draws under
``torch.manual_seed``; given the same draws the tokens are the same (tested).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from decograph.backends.onnxruntime.kv import NEG, open_session, session_options
from decograph.errors import ModelError, UnsupportedError
from decograph.models.diffusion_gemma import DiffusionGemmaAdapter
from decograph.runtime.protocol import Engine, NoiseBatch, NoiseStep

__all__ = ["DGSession", "OrtNoiseStep", "OrtNoiseBatch", "OrtNoiseEngine", "OrtDiffusionGemma"]

NpKV = list[tuple[np.ndarray, np.ndarray]]


class DGSession:
    """The encoder and decoder graphs in ``directory`` (``encoder.onnx``, ``decoder.onnx``) as
    ONNX Runtime sessions, their layout read from the graphs' metadata. Idle threads do not
    spin by default (``DECOGRAPH_ORT_SPINNING`` overrides), as ``canvas.MDMSession``."""

    def __init__(self, directory: str | Path, *, threads: int | None = None, spinning: bool | None = None) -> None:
        d = self.path = Path(directory)
        if spinning is None and not os.environ.get("DECOGRAPH_ORT_SPINNING", "").strip():
            spinning = False
        opts = session_options(threads, spinning)
        self.encoder = open_session(d / "encoder.onnx", opts)
        self.decoder = open_session(d / "decoder.onnx", opts)
        meta = {}
        for name, s in (("encoder", self.encoder), ("decoder", self.decoder)):
            meta = s.get_modelmeta().custom_metadata_map
            if meta.get("decograph.graph") != f"diffusion_gemma_{name}":
                raise ModelError(f"{d / (name + '.onnx')}: not a decograph DiffusionGemma {name} graph "
                                 f"(graph_diffusion_gemma)")
        self.layer_types = meta["decograph.layer_types"].split(",")
        self.window = int(meta["decograph.sliding_window"])
        self.canvas_length = int(meta["decograph.canvas_length"])
        ins = {i.name: i.shape for i in self.decoder.get_inputs()}
        self.vocab_size = int(self.decoder.get_outputs()[0].shape[2])
        self.kv_shapes = [(int(ins[f"context.{i}.key"][1]), int(ins[f"context.{i}.key"][3]))
                          for i in range(len(self.layer_types))]
        self.encoder_inputs = {i.name for i in self.encoder.get_inputs()}
        self.decoder_inputs = set(ins)

    def _feeds(self, names: set[str], ids: np.ndarray, positions: np.ndarray, bias: dict[str, np.ndarray],
               context: NpKV) -> dict[str, np.ndarray]:
        feeds = {"ids": np.ascontiguousarray(ids, dtype=np.int64),
                 "positions": np.ascontiguousarray(positions, dtype=np.int64)}
        feeds.update({f"bias.{k}": v for k, v in bias.items() if f"bias.{k}" in names})
        for i, (k, v) in enumerate(context):
            if f"context.{i}.key" in names:
                feeds[f"context.{i}.key"], feeds[f"context.{i}.value"] = k, v
        return feeds

    def encode(self, ids: np.ndarray, positions: np.ndarray, bias: dict[str, np.ndarray], context: NpKV) -> NpKV:
        """The new tokens' K/V per layer ([B, KV, T, D])."""
        out = self.encoder.run(None, self._feeds(self.encoder_inputs, ids, positions, bias, context))
        return [(out[2 * i], out[2 * i + 1]) for i in range(len(self.layer_types))]

    def decode(self, ids: np.ndarray, positions: np.ndarray, signal: np.ndarray, signal_on: np.ndarray,
               bias: dict[str, np.ndarray], context: NpKV) -> np.ndarray:
        """The canvas's logits [B, L, V] (float32)."""
        feeds = self._feeds(self.decoder_inputs, ids, positions, bias, context)
        feeds["signal"] = np.ascontiguousarray(signal, dtype=np.float32)
        feeds["signal_on"] = np.ascontiguousarray(signal_on, dtype=np.float32)
        return self.decoder.run(["logits"], feeds)[0]


def _bias(mask: np.ndarray) -> np.ndarray:
    """An additive mask [B, 1, Q, K] from a boolean one [B, Q, K]."""
    return np.ascontiguousarray(np.where(mask, np.float32(0.0), NEG)[:, None])


class OrtNoiseStep(NoiseStep):
    """One decoder forward's logits [B, L, V] and what the rules ask of them, in numpy."""

    def __init__(self, batch: OrtNoiseBatch, logits: np.ndarray) -> None:
        self.batch, self.logits = batch, logits
        self._t: float | None = None
        self._processed: np.ndarray | None = None
        self._exp: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def processed(self, temperature: float) -> np.ndarray:
        """The logits over ``temperature`` (float32, as transformers' logits processor)."""
        if self._t != temperature or self._processed is None:
            self._t, self._exp = temperature, None
            self._processed = self.logits / np.float32(temperature)
        return self._processed

    def _softmax(self, temperature: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(z, exp(z), sum)`` with ``z`` the processed logits less their maximum (float32)."""
        p = self.processed(temperature)
        if self._exp is None:
            z = p - p.max(-1, keepdims=True)
            e = np.exp(z)
            self._exp = (z, e, e.sum(-1, keepdims=True, dtype=np.float32))
        return self._exp

    def entropy(self, temperature: float) -> np.ndarray:
        z, e, s = self._softmax(temperature)
        return -((z - np.log(s)) * (e / s)).sum(-1, dtype=np.float32)

    def argmax(self, temperature: float) -> np.ndarray:
        return self.processed(temperature).argmax(-1).astype(np.int64)

    def confidence(self, temperature: float) -> np.ndarray:
        return (np.float32(1.0) / self._softmax(temperature)[2][..., 0]).astype(np.float32)

    def sample(self, temperature: float) -> np.ndarray:
        """A token per position: the first whose cumulative probability exceeds a uniform draw
        (one per position, the batch's generator; the sums in float64, a row at a time)."""
        _, e, _ = self._softmax(temperature)
        b, n, v = e.shape
        u = self.batch.rng.random((b, n))
        out = np.empty((b, n), np.int64)
        for r in range(b):
            cdf = np.cumsum(e[r], axis=-1, dtype=np.float64)
            out[r] = np.minimum((cdf <= (u[r] * cdf[:, -1])[:, None]).sum(-1), v - 1)
        return out

    def condition(self, keep: np.ndarray) -> None:
        assert self._t is not None, "condition() before the step's temperature was asked"
        new = self.processed(self._t)
        old = self.batch.signal
        if old is not None and keep.any():
            new = np.where(keep[:, None, None], old, new)
        self.batch.signal = new


class OrtNoiseBatch(NoiseBatch):
    """Prompts left-padded (pad: ``pad_id``, else 0) and encoded; canvases denoised after them."""

    def __init__(self, model: DGSession, prompts: list[list[int]], pad_id: int | None,
                 rng: np.random.Generator) -> None:
        self.model, self.rng = model, rng
        self.canvas_length, self.vocab_size, self.pad_id = model.canvas_length, model.vocab_size, pad_id
        b, width = len(prompts), max(len(p) for p in prompts)
        ids = np.full((b, width), pad_id if pad_id is not None else 0, np.int64)
        valid = np.zeros((b, width), bool)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = p
            valid[i, width - len(p):] = True
        self.valid = np.zeros((b, 0), bool)
        self.kv: NpKV = [(np.zeros((b, h, 0, d), np.float32), np.zeros((b, h, 0, d), np.float32))
                         for h, d in model.kv_shapes]
        self.signal: np.ndarray | None = None
        self._zeros: np.ndarray | None = None
        self._encode(ids, valid)

    def _sliding_start(self, length: int) -> int:
        """The first slot a sliding layer still holds when ``length`` are cached."""
        return max(0, length - (self.model.window - 1))

    def _encode(self, ids: np.ndarray, valid: np.ndarray) -> None:
        """``ids`` (with their validity) through the encoder, their K/V appended."""
        b, n = ids.shape
        s = self.valid.shape[1]
        self.valid = np.concatenate([self.valid, valid], axis=1)
        q = np.arange(s, s + n)
        keys = np.arange(s + n)
        attend = self.valid[:, None, :] & (keys[None, :] <= q[:, None])[None]
        lo = self._sliding_start(s)
        near = attend[:, :, lo:] & ((q[:, None] - keys[None, lo:]) < self.model.window)[None]
        new = self.model.encode(ids, np.broadcast_to(q, (b, n)), {"full": _bias(attend), "sliding": _bias(near)},
                                self.kv)
        kept = []
        for kind, (k, v), (nk, nv) in zip(self.model.layer_types, self.kv, new):
            k, v = np.concatenate([k, nk], axis=2), np.concatenate([v, nv], axis=2)
            if kind == "sliding_attention":       # transformers' sliding cache keeps the last window - 1
                cut = self._sliding_start(k.shape[2])
                k, v = np.ascontiguousarray(k[:, :, cut:]), np.ascontiguousarray(v[:, :, cut:])
            kept.append((k, v))
        self.kv = kept
        length, L = self.valid.shape[1], self.canvas_length
        see = np.concatenate([self.valid, np.ones((b, L), bool)], axis=1)[:, None, :]
        self._dec_bias = {"full": _bias(np.broadcast_to(see, (b, L, length + L))),
                          "sliding": _bias(np.broadcast_to(see[:, :, self._sliding_start(length):],
                                                           (b, L, length + L - self._sliding_start(length))))}
        self._dec_pos = np.broadcast_to(np.arange(length, length + L), (b, L))

    def noise(self) -> np.ndarray:
        return self.rng.integers(0, self.vocab_size, size=(self.valid.shape[0], self.canvas_length), dtype=np.int64)

    def forward(self, canvas: np.ndarray) -> OrtNoiseStep:
        b = canvas.shape[0]
        if self.signal is None:
            if self._zeros is None:
                self._zeros = np.zeros((b, self.canvas_length, self.vocab_size), np.float32)
            signal, on = self._zeros, np.zeros(b, np.float32)
        else:
            signal, on = self.signal, np.ones(b, np.float32)
        return OrtNoiseStep(self, self.model.decode(canvas, self._dec_pos, signal, on, self._dec_bias, self.kv))

    def append(self, canvas: np.ndarray) -> None:
        self.signal = None
        self._encode(np.asarray(canvas, dtype=np.int64), np.ones(canvas.shape, bool))


class OrtNoiseEngine(Engine):
    """Uniform-noise diffusion batches over a ``DGSession``; draws from
    ``numpy.random.default_rng(seed)`` per batch (see the module docstring)."""

    denoiser = True

    def __init__(self, model: DGSession, *, pad_id: int | None, max_positions: int = 0, seed: int | None = None,
                 tokenizer: Any = None) -> None:
        self.model, self.pad_id, self.seed, self.tokenizer = model, pad_id, seed, tokenizer
        self.max_positions = int(max_positions)
        self.name = f"DiffusionGemma ({model.path.name}) on ONNX Runtime"

    def start(self, rows: list[Any]) -> Any:
        raise UnsupportedError(f"{self.name} is a uniform-noise diffusion model: it runs draft.noise strategies "
                               f"only (the built-in diffusion_gemma)")

    def start_noise(self, prompts: list[list[int]]) -> OrtNoiseBatch:
        return OrtNoiseBatch(self.model, prompts, self.pad_id, np.random.default_rng(self.seed))


class OrtDiffusionGemma(DiffusionGemmaAdapter):
    """A DiffusionGemma's graphs (``DGSession``) with what the runtime needs of the model (its
    source adapter's EOS and pad ids and positions): the ``onnxruntime`` backend's prepared
    model, run by ``engine``."""

    def __init__(self, session: DGSession, *, eos_token_ids: tuple[int, ...], pad_token_id: int | None,
                 max_positions: int, tokenizer: Any = None) -> None:
        self.session, self.model, self.tokenizer = session, None, tokenizer
        self.name = "DiffusionGemmaForBlockDiffusion on ONNX Runtime"
        self.vocab_size, self.canvas_length = session.vocab_size, session.canvas_length
        self.eos_token_ids, self.pad_token_id = tuple(eos_token_ids), pad_token_id
        self.max_positions = int(max_positions)

    def engine(self, seed: int | None = None, tokenizer: Any = None) -> OrtNoiseEngine:
        return OrtNoiseEngine(self.session, pad_id=self.pad_token_id, max_positions=self.max_positions, seed=seed,
                              tokenizer=tokenizer if tokenizer is not None else self.tokenizer)
