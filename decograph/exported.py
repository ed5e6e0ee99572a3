"""Run an exported decoder (``decograph export``) with onnxruntime, numpy and tokenizers only.

This module imports neither torch nor transformers (a test checks). The decoder directory:

    manifest.json    what the rest is: the model's shapes, EOS ids, the runner plan, file hashes
    model.onnx       the decoding step (``decograph.backends.onnxruntime.export``), maybe int4/int8
    strategy.json    the optimized strategy program (the IR's JSON form), for reference and tools
    tokenizer.json   the tokenizer (``tokenizers``), plus the chat template in the manifest

The runner executes the strategy's plan: n-gram drafting (``ngram`` / ``adaptive_ngram``:
the tokens that followed the longest earlier match of the last n tokens, n from ``max_n``
down to ``min_n``, at most ``k``) verified greedily in one causal forward per step, so the
output is exactly the graph's own greedy decoding; ``greedy`` drafts nothing.

    decoder = ExportedDecoder("out/")
    ids = decoder.generate(decoder.encode("Hello"), max_new_tokens=64)
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from decograph.errors import InputError, ModelError

__all__ = ["ExportedDecoder", "DecodeStats", "MANIFEST_VERSION"]

MANIFEST_VERSION = 1
_NEG = np.float32(np.finfo(np.float32).min)


@dataclass
class DecodeStats:
    new_tokens: int
    forwards: int
    wall_time_s: float
    finish_reason: str

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_time_s if self.wall_time_s > 0 else 0.0


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class ExportedDecoder:
    def __init__(self, directory: str | Path, *, threads: int = 0, check_hashes: bool = True) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        d = Path(directory)
        mpath = d / "manifest.json"
        if not mpath.is_file():
            raise ModelError(f"{d}: no manifest.json (not a decograph exported decoder)")
        try:
            self.manifest: dict[str, Any] = json.loads(mpath.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ModelError(f"{mpath}: not valid JSON ({e})") from None
        m = self.manifest
        if m.get("format") != "decograph-exported-decoder" or m.get("version") != MANIFEST_VERSION:
            raise ModelError(f"{mpath}: field 'format'/'version' is {m.get('format')!r}/{m.get('version')!r}, expected "
                             f"'decograph-exported-decoder'/{MANIFEST_VERSION}")
        for name, digest in m.get("files", {}).items():
            f = d / name
            if not f.is_file():
                raise ModelError(f"{f}: listed in the manifest but missing")
            if check_hashes and _sha(f) != digest:
                raise ModelError(f"{f}: its sha256 differs from the manifest's (the decoder was modified)")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(d / m["model_file"]), opts, providers=["CPUExecutionProvider"])
        self.tokenizer = Tokenizer.from_file(str(d / "tokenizer.json"))
        self.n_layers, self.kv_heads, self.head_dim = m["num_layers"], m["kv_heads"], m["head_dim"]
        self.eos = set(m["eos_token_ids"])
        self.plan = m["plan"]
        self.past_names = [f"past_key_values.{i}.{kv}" for i in range(self.n_layers) for kv in ("key", "value")]

    # -- text ------------------------------------------------------------------------------

    def encode(self, text: str, chat: bool | None = None) -> list[int]:
        """Token ids of ``text``; with ``chat`` (default: the manifest's), through the chat
        template saved at export (rendered at export time around a placeholder)."""
        use_chat = self.manifest.get("chat_default", False) if chat is None else chat
        if use_chat:
            tpl = self.manifest.get("chat_prompt")
            if not tpl:
                raise InputError("this decoder was exported without a chat template; use chat=False")
            text = tpl.replace("{prompt}", text)
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # -- decoding --------------------------------------------------------------------------

    def _forward(self, cache: list[np.ndarray], tokens: list[int], start: int) -> np.ndarray:
        t, past = len(tokens), cache[0].shape[2]
        mask = np.zeros((1, 1, t, past + t), dtype=np.float32)
        mask[0, 0, :, past:] = np.where(np.tril(np.ones((t, t), dtype=bool)), np.float32(0.0), _NEG)
        feed = {"input_ids": np.array([tokens], dtype=np.int64),
                "position_ids": np.arange(start, start + t, dtype=np.int64)[None], "attention_mask": mask}
        feed.update(zip(self.past_names, cache))
        out = self.session.run(None, feed)
        cache[:] = out[1:]
        return out[0][0]

    def _draft(self, seq: list[int], budget: int) -> list[int]:
        source = self.plan.get("draft")
        if source is None or budget <= 0:
            return []
        k, max_n, min_n = min(self.plan["k"], budget), self.plan["max_n"], self.plan["min_n"]
        for n in range(min(max_n, len(seq) - 1), min_n - 1, -1):
            tail = seq[-n:]
            for start in range(len(seq) - n - 1, -1, -1):          # the latest earlier match
                if seq[start:start + n] == tail:
                    return seq[start + n:start + n + k]
        return []

    def generate(self, prompt: list[int], max_new_tokens: int = 128) -> tuple[list[int], DecodeStats]:
        if not prompt:
            raise InputError("the prompt is empty: give at least one token")
        if max_new_tokens < 0:
            raise InputError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        limit = self.manifest.get("max_positions") or 0
        if limit and len(prompt) + max_new_tokens > limit:
            raise InputError(f"the prompt has {len(prompt)} tokens; with max_new_tokens={max_new_tokens} it exceeds "
                             f"the model's {limit} positions")
        start = time.perf_counter()
        empty = np.zeros((1, self.kv_heads, 0, self.head_dim), dtype=np.float32)
        cache = [empty] * (2 * self.n_layers)
        seq, new, forwards, reason = list(prompt), [], 0, "max_new_tokens"
        if len(prompt) > 1:                                   # prefill all but the pending last token
            self._forward(cache, prompt[:-1], 0)
            forwards += 1
        while len(new) < max_new_tokens:
            cached = cache[0].shape[2]
            draft = self._draft(seq, max_new_tokens - len(new) - 1)
            logits = self._forward(cache, [seq[-1]] + draft, cached)
            forwards += 1
            argmax = logits.argmax(-1).tolist()
            ok = 0
            while ok < len(draft) and draft[ok] == argmax[ok]:
                ok += 1
            commit = draft[:ok] + [argmax[ok]]
            cache[:] = [c[:, :, : cached + 1 + ok] for c in cache]     # drop the rejected drafts' slots
            for tok in commit:
                new.append(tok)
                seq.append(tok)
                if tok in self.eos:
                    reason = "eos"
                    break
            if reason == "eos":
                break
        return new, DecodeStats(len(new), forwards, time.perf_counter() - start, reason)
