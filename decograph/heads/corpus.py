"""A corpus of the model's own answers, for drafting (``draft.corpus``): retrieval-based
speculation (REST, He et al. 2024) over text the model itself wrote.

A chat model answers in its own recurring phrases ("Here are some tips to help you ...", "I
hope this helps!"), across requests: where the context has nothing to copy, the longest
suffix of it that the model's earlier answers contain is often followed by what the model
writes next. ``decograph train-draft`` generates the model's greedy answers for its head anyway;
their training split (never a benchmark or held-out prompt) is kept as a corpus beside the head.

The corpus is a token array, sequences separated by ``-1``, and an index built when it is
loaded: every position's next ``DEPTH`` tokens packed into unsigned 64-bit keys (``bits`` per
token, as many tokens a key as fit), positions sorted by them. The positions whose window
starts with a pattern of ``n <= DEPTH`` tokens are one contiguous range of that order, found
by binary search key by key. ``lookup`` takes the longest suffix of the context (``max_n``
down to ``min_n`` tokens) that occurs and follows its occurrences' most common continuation,
token by token, while it has support. Everything is numpy: the torch-free runtime uses it.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from decograph.errors import ModelError

__all__ = ["Corpus", "DEPTH", "Match", "build_corpus", "load_corpus", "save_corpus"]

FORMAT = 1
DEPTH = 8               # the longest suffix matched (tokens)
_SEP = -1


@dataclass(frozen=True)
class Match:
    """A lookup's draft: ``tokens`` continue the context's last ``n`` tokens; ``support[i]``:
    the occurrences that agreed on ``tokens[: i + 1]``; ``share[i]``: their share of those that
    agreed on ``tokens[:i]`` and went on."""

    tokens: list[int]
    n: int
    support: list[int] = field(default_factory=list)
    share: list[float] = field(default_factory=list)


class Corpus:
    """``tokens``: int32, sequences separated by ``-1``; ``model``: the fingerprint of the model
    whose answers they are (``decograph.heads.store.model_fingerprint``); ``meta``: facts."""

    def __init__(self, tokens: np.ndarray, vocab_size: int, model: str = "", model_name: str = "",
                 meta: dict[str, Any] | None = None) -> None:
        toks = np.asarray(tokens, dtype=np.int64).ravel()
        if len(toks) and (toks.min() < _SEP or toks.max() >= vocab_size):
            raise ModelError(f"corpus: token ids must lie in [0, {vocab_size}) (or be -1 separators)")
        self.tokens = toks.astype(np.int32)
        self.vocab_size, self.model, self.model_name = int(vocab_size), model, model_name
        self.meta = dict(meta or {})
        self.bits = max(1, int(vocab_size + 1).bit_length())       # ids + 1 (0: past a sequence's end)
        self.per = 64 // self.bits                                 # tokens a key holds
        n = len(self.tokens)
        # every position's next DEPTH tokens, +1, 0 past a separator or the end
        pad = np.concatenate([self.tokens.astype(np.int64) + 1, np.zeros(DEPTH, np.int64)])
        win = np.stack([pad[i:i + n] for i in range(DEPTH)], 1) if n else np.zeros((0, DEPTH), np.int64)
        cut = np.cumsum(win == 0, 1) > 0                          # nothing after a separator counts
        win[cut] = 0
        self.keys = [self._pack(win[:, j:j + self.per]) for j in range(0, DEPTH, self.per)]
        order = np.lexsort(tuple(reversed(self.keys))) if n else np.zeros(0, np.int64)
        order = order[win[order, 0] > 0]                          # separators start nothing
        self.order = order
        self.sorted = [k[order] for k in self.keys]

    def _pack(self, cols: np.ndarray) -> np.ndarray:
        key = np.zeros(len(cols), np.uint64)
        for j in range(self.per):
            col = cols[:, j] if j < cols.shape[1] else np.zeros(len(cols), np.int64)
            key = (key << np.uint64(self.bits)) | col.astype(np.uint64)
        return key

    def __len__(self) -> int:
        return int((self.tokens >= 0).sum())

    @property
    def sequences(self) -> int:
        return int((self.tokens == _SEP).sum()) + (1 if len(self.tokens) and self.tokens[-1] != _SEP else 0)

    def _range(self, pattern: list[int]) -> tuple[int, int]:
        """[lo, hi) of ``order``: the positions whose window starts with ``pattern``."""
        lo, hi = 0, len(self.order)
        p = [t + 1 for t in pattern]
        for j, keys in enumerate(self.sorted):
            part = p[j * self.per:(j + 1) * self.per]
            if not part or lo >= hi:
                break
            a = b = 0
            for i in range(self.per):
                a <<= self.bits
                b <<= self.bits
                if i < len(part):
                    a |= part[i]
                    b |= part[i]
                else:
                    b |= (1 << self.bits) - 1
            seg = keys[lo:hi]
            lo, hi = (lo + int(np.searchsorted(seg, np.uint64(a), "left")),
                      lo + int(np.searchsorted(seg, np.uint64(b), "right")))
        return lo, hi

    def lookup(self, context: list[int], k: int, max_n: int = DEPTH, min_n: int = 2, min_support: int = 1) -> Match:
        """The draft after ``context``: the longest suffix (``max_n`` .. ``min_n`` tokens) that
        occurs with a continuation, then up to ``k`` tokens of its occurrences' most common
        continuation, kept while at least ``min_support`` occurrences agree."""
        max_n, min_n = min(max_n, DEPTH, len(context)), max(1, min_n)
        for j in range(1, max_n + 1):              # a suffix holding an id outside the vocabulary never occurs
            if not 0 <= context[-j] < self.vocab_size:
                max_n = j - 1
                break
        # where a suffix occurs, every shorter one does (one position on): binary search for the longest
        found: dict[int, tuple[int, int]] = {}
        lo, hi = min_n - 1, max_n + 1
        while hi - lo > 1:
            mid = (lo + hi) // 2
            found[mid] = self._range(list(context[-mid:]))
            lo, hi = (mid, hi) if found[mid][1] > found[mid][0] else (lo, mid)
        for n in range(lo, min_n - 1, -1):
            a, b = found[n] if n in found else self._range(list(context[-n:]))
            if b > a:
                out, support, share = self._follow(self.order[a:b].astype(np.int64) + n, k, min_support)
                if out:
                    return Match(out, n, support, share)
        return Match([], 0)

    def _follow(self, pos: np.ndarray, k: int, min_support: int) -> tuple[list[int], list[int], list[float]]:
        """Up to ``k`` tokens of the most common continuation of the occurrences ending before
        ``pos`` (ties: the smaller id), while at least ``min_support`` of them agree; with
        ``Match``'s support and share of each."""
        out: list[int] = []
        support: list[int] = []
        share: list[float] = []
        end = len(self.tokens)
        if len(pos) == 1:                          # one occurrence: its own tokens, to a separator
            p = int(pos[0])
            for t in self.tokens[p:min(end, p + k)].tolist():
                if t < 0 or min_support > 1:
                    break
                out.append(t)
            return out, [1] * len(out), [1.0] * len(out)
        for _ in range(k):
            pos = pos[pos < end]
            nxt = self.tokens[pos] if len(pos) else np.zeros(0, np.int32)
            ok = nxt >= 0
            if not ok.any():
                break
            vals, counts = np.unique(nxt[ok], return_counts=True)
            best = int(counts.argmax())
            if counts[best] < min_support:
                break
            out.append(int(vals[best]))
            support.append(int(counts[best]))
            share.append(float(counts[best] / ok.sum()))
            pos = pos[nxt == vals[best]] + 1
        return out, support, share


def build_corpus(sequences: Iterable[Iterable[int]], vocab_size: int, model: str = "", model_name: str = "",
                 meta: dict[str, Any] | None = None) -> Corpus:
    """A corpus of ``sequences`` (token ids), in order."""
    parts: list[np.ndarray] = []
    count = 0
    for s in sequences:
        arr = np.asarray(list(s), dtype=np.int64)
        if len(arr):
            parts += [arr, np.array([_SEP])]
            count += 1
    toks = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    return Corpus(toks, vocab_size, model, model_name, {"sequences": count, **(meta or {})})


def save_corpus(corpus: Corpus, path: str | Path) -> Path:
    """Writes ``corpus`` (atomically: a partial file never takes the name)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "kind": "corpus", "vocab_size": corpus.vocab_size, "model": corpus.model,
            "model_name": corpus.model_name, "meta": corpus.meta}
    dtype = np.uint16 if corpus.vocab_size < 65535 else np.int32      # -1 stored as 65535 in uint16
    data = corpus.tokens.astype(np.int64)
    if dtype is np.uint16:
        data = np.where(data < 0, 65535, data)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez_compressed(f, tokens=data.astype(dtype), meta=np.frombuffer(json.dumps(meta).encode(), np.uint8))
    os.replace(tmp, p)
    return p


def load_corpus(path: str | Path) -> Corpus:
    """The corpus in ``path`` (errors name the file)."""
    p = Path(path)
    try:
        with np.load(p, allow_pickle=False) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            raw = z["tokens"]
    except FileNotFoundError:
        raise ModelError(f"{p}: no such corpus file") from None
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        raise ModelError(f"{p}: not a decograph corpus file ({e})") from None
    if meta.get("kind") != "corpus" or meta.get("format") != FORMAT:
        raise ModelError(f"{p}: not a decograph corpus file of format {FORMAT} (kind {meta.get('kind')!r}, "
                         f"format {meta.get('format')!r})")
    toks = raw.astype(np.int64)
    if raw.dtype == np.uint16:
        toks = np.where(toks == 65535, _SEP, toks)
    try:
        return Corpus(toks, int(meta["vocab_size"]), str(meta.get("model", "")), str(meta.get("model_name", "")),
                      dict(meta.get("meta", {})))
    except ModelError as e:
        raise ModelError(f"{p}: {e}") from None
