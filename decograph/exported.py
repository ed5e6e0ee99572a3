"""Run an exported decoder (``decograph export``) with onnxruntime, numpy and tokenizers only.

This module imports neither torch nor transformers (a test checks). The decoder directory:

    manifest.json    what the rest is: the model's shapes, EOS ids, the runner plan, file hashes
    model.onnx       the decoding step (``decograph.backends.onnxruntime.graph``), maybe int4/int8
    strategy.json    the optimized strategy program (the IR's JSON form), for reference and tools
    tokenizer.json   the tokenizer (``tokenizers``), plus the chat template in the manifest

The runner executes the strategy's plan: n-gram drafting (``ngram`` / ``adaptive_ngram``:
what followed the newest earlier occurrence of the longest matching suffix, ``max_n`` down to
``min_n`` tokens, at most ``k``) verified greedily in one causal forward per step; ``greedy``
drafts nothing. ``adaptive_ngram`` (ANPD) cuts each draft to the length with the most expected
tokens per unit of forward time, from its match level's running acceptance and this machine's
measured forward-cost curve (cached per graph and machine in ``$XDG_CACHE_HOME/decograph``);
with nothing to copy it still drafts one token (the sequence's most frequent), which the exact
graph's padding row makes free.

The output is exactly the graph's own greedy decoding (``generate(..., draft=False)``, one
token per forward): the step graph computes every query row with the same arithmetic whatever
the number of query tokens (``graph``), so verifying a draft of k tokens gives bit-identical
logits to k one-token forwards. The KV cache lives in buffers bound to the graph's past and
present (``kv``): nothing is copied per step, and a rejected draft costs no cache edit.

    decoder = ExportedDecoder("out/")
    ids, stats = decoder.generate(decoder.encode("Hello"), max_new_tokens=64)
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from decograph.backends.onnxruntime.kv import StepSession, causal_mask, pick_device
from decograph.errors import InputError, ModelError
from decograph.measure_cache import cached

__all__ = ["ExportedDecoder", "DecodeStats", "MANIFEST_VERSION"]

MANIFEST_VERSION = 2
_BUCKETS = (1, 2, 3, 4, 5, 8, 16)                     # suffix-match lengths that start each level
_FIRST_PRIOR = (0.3, 0.35, 0.4, 0.45, 0.55, 0.7, 0.8)  # prior chance the first drafted token is right
_LATER_PRIOR = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9)   # ... and each later one, given the one before
_CURVE_WIDTHS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 17)


@dataclass
class DecodeStats:
    new_tokens: int
    forwards: int
    wall_time_s: float
    finish_reason: str
    drafted: int = 0
    accepted: int = 0
    prefill_s: float = 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first over the time after the prompt's forward."""
        t = self.wall_time_s - self.prefill_s
        return (self.new_tokens - 1) / t if self.new_tokens > 1 and t > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_time_s if self.wall_time_s > 0 else 0.0


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class _Drafts:
    """N-gram drafting over one sequence: an incremental index of every n-gram's end positions,
    and (adaptive) per-level acceptance, decayed, that cuts drafts to the length that pays."""

    def __init__(self, plan: dict[str, Any], cost: list[float] | None) -> None:
        self.k, self.max_n, self.min_n = int(plan["k"]), int(plan["max_n"]), int(plan["min_n"])
        self.adaptive = bool(plan.get("adaptive")) and cost is not None
        self.cost = cost or []
        self.where: dict[tuple[int, ...], list[int]] = {}
        self.counts: dict[int, int] = {}
        self.top = -1                                   # the sequence's most frequent token
        self.seen = 0
        self.rates = {"first": {}, "later": {}}         # level -> [hits, tries]
        self.level = -1

    def _update(self, seq: list[int]) -> None:
        for end in range(self.seen + 1, len(seq) + 1):
            for n in range(1, min(self.max_n, end) + 1):
                self.where.setdefault(tuple(seq[end - n:end]), []).append(end)
            tok = seq[end - 1]
            self.counts[tok] = self.counts.get(tok, 0) + 1
            if self.counts[tok] > self.counts.get(self.top, 0):
                self.top = tok
        self.seen = len(seq)

    def _match(self, seq: list[int]) -> tuple[int, int] | None:
        """(end, length): the newest earlier occurrence of the longest suffix n-gram, and how far
        back the match really extends (up to 32 tokens). Adaptive drafting also tries 1-grams
        below ``min_n``: their drafts are cut to what pays (one drafted token costs ~10% of a
        forward, the wider forward's extra row in the matrix products)."""
        lowest = 1 if self.adaptive else self.min_n
        for n in range(min(self.max_n, len(seq) - 1), lowest - 1, -1):
            for end in reversed(self.where.get(tuple(seq[-n:]), ())):
                if end < len(seq):
                    length = n
                    while length < 32 and end - length - 1 >= 0 and seq[end - length - 1] == seq[-length - 1]:
                        length += 1
                    return end, length
        return None

    def _rate(self, table: str, level: int, prior: float) -> float:
        hits, tries = self.rates[table].get(level, (0.0, 0.0))
        return (hits + 2.0 * prior) / (tries + 2.0)

    def _record(self, table: str, level: int, ok: bool) -> None:
        h = self.rates[table].setdefault(level, [0.0, 0.0])
        h[0], h[1] = 0.95 * h[0] + ok, 0.95 * h[1] + 1.0

    def _cost(self, width: int) -> float:
        c = self.cost
        return c[width - 1] if width <= len(c) else c[-1] * width / len(c)

    def propose(self, seq: list[int], budget: int) -> list[int]:
        self._update(seq)
        self.level = -1
        k = min(self.k, budget)
        found = self._match(seq) if k > 0 else None
        if found is None:
            # nothing to copy: when a one-token draft costs nothing (an exact graph's one-token
            # step has a padding row anyway), guess the sequence's most frequent token
            free = self.adaptive and len(self.cost) > 1 and self.cost[1] <= 1.02 * self.cost[0]
            return [self.top] if k > 0 and free and self.top >= 0 else []
        end, length = found
        chain = seq[end:end + k]
        level = max(i for i, lo in enumerate(_BUCKETS) if length >= lo)
        if self.adaptive:
            first = self._rate("first", level, _FIRST_PRIOR[level])
            later = self._rate("later", level, _LATER_PRIOR[level])
            best, best_ratio, expected, chance = 0, 1.0 / self._cost(1), 1.0, 1.0
            for i in range(len(chain)):
                chance *= first if i == 0 else later
                expected += chance
                if expected / self._cost(i + 2) > best_ratio:
                    best, best_ratio = i + 1, expected / self._cost(i + 2)
            chain = chain[:best]
            if not chain:
                for table in self.rates.values():           # unused: drift back to the prior
                    if level in table:
                        table[level][0] *= 0.97
                        table[level][1] *= 0.97
                return []
        self.level = level
        return chain

    def observe(self, drafted: int, accepted: int) -> None:
        if self.level < 0 or not drafted:
            return
        self._record("first", self.level, accepted >= 1)
        for i in range(1, min(accepted + 1, drafted)):
            self._record("later", self.level, i < accepted)


class ExportedDecoder:
    def __init__(self, directory: str | Path, *, threads: int | None = None, spinning: bool | None = None,
                 check_hashes: bool = True, device: str = "auto") -> None:
        """``threads``/``spinning``: ONNX Runtime's intra-op threads and idle-thread spinning
        (``kv.session_options``; ``None``: ``DECOGRAPH_ORT_THREADS`` / ``_SPINNING``, else ORT's).
        ``device``: ``cpu``, ``cuda`` (ONNX Runtime's CUDA EP, the cache in GPU memory), or
        ``auto``: cuda for a float16 export (``export --dtype float16``) where the CUDA EP is
        there, else cpu."""
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
                             f"'decograph-exported-decoder'/{MANIFEST_VERSION} (export it again with this version)")
        for name, digest in m.get("files", {}).items():
            f = d / name
            if not f.is_file():
                raise ModelError(f"{f}: listed in the manifest but missing")
            if check_hashes and _sha(f) != digest:
                raise ModelError(f"{f}: its sha256 differs from the manifest's (the decoder was modified)")
        if device == "auto":
            device = pick_device("auto") if m.get("dtype") == "float16" else "cpu"
        self.step = StepSession(d / m["model_file"], threads, spinning, device=device)
        self.device = self.step.device
        self.session = self.step.session
        opts = self.session.get_session_options()
        self.threads = opts.intra_op_num_threads
        self.spinning = opts.get_session_config_entry("session.intra_op.allow_spinning") != "0"
        self.tokenizer = Tokenizer.from_file(str(d / "tokenizer.json"))
        self.n_layers, self.kv_heads, self.head_dim = m["num_layers"], m["kv_heads"], m["head_dim"]
        self.eos = set(m["eos_token_ids"])
        self.plan = m["plan"]
        self._curve: list[float] | None = None
        self._exact: bool | None = None
        self._warned = False

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

    # -- measured on this machine (once per graph, machine and threads; cached) ----------------

    def _machine(self, kind: str, measure: Any) -> Any:
        """``measure()``'s result for this graph, ORT version, machine and threads, cached in
        ``$XDG_CACHE_HOME/decograph/exported_machine.json``."""
        import onnxruntime as ort

        key = json.dumps([kind, self.manifest["files"].get(self.manifest["model_file"]), ort.__version__,
                          self.threads, self.spinning, platform.machine(), platform.processor(), os.cpu_count()]
                         + ([self.device] if self.device != "cpu" else []))
        return cached("exported_machine.json", key, measure)

    def exact(self) -> bool:
        """Whether a k-token forward gives bit-identical logits and K/V to k one-token forwards
        here, for every width a draft can take (what makes drafting lossless; see
        ``decograph.backends.onnxruntime.graph``): checked once on this machine, cached."""
        if self._exact is None:
            self._exact = bool(self._machine("exact-1", self._check_exact))
        return self._exact

    def _check_exact(self, context: int = 37) -> bool:
        widths = list(range(2, int(self.plan.get("k") or 8) + 2))
        rng = np.random.default_rng(1)
        vocab = self.step.vocab_size
        prompt, toks = rng.integers(0, vocab, (1, context)), rng.integers(0, vocab, sum(widths))
        runs = []
        for order in ([1] * len(toks), widths, widths[::-1]):
            kv = self.step.new_kv(1, context + len(toks) + 2)
            self.step.run(kv, prompt, np.arange(context)[None], causal_mask(context, 0), 1)
            logits, i = [], 0
            for w in order:
                pos = np.arange(context + i, context + i + w)[None]
                logits.append(self.step.run(kv, toks[None, i:i + w], pos, causal_mask(w, context + i)).copy())
                i += w
            runs.append((np.concatenate(logits, 1), [v.copy() for v in kv.views()]))
        (ref, ref_kv), others = runs[0], runs[1:]
        return all(np.array_equal(ref, lg) and all(np.array_equal(a, b) for a, b in zip(ref_kv, kv))
                   for lg, kv in others)

    def cost_curve(self) -> list[float]:
        """Time of a forward over w query tokens over one token's, for w = 1, 2, ...: measured
        once per graph and machine (cached)."""
        if self._curve is not None:
            return self._curve
        points = {int(w): float(c) for w, c in self._machine("curve-5", self._measure_curve).items()}
        out, prev = [], 1.0
        for w in range(1, max(points) + 1):   # interpolated, and never cheaper than a narrower width
            lo = max(p for p in points if p <= w)
            hi = min(p for p in points if p >= w)
            c = points[lo] if lo == hi else points[lo] + (points[hi] - points[lo]) * (w - lo) / (hi - lo)
            prev = max(prev, c)
            out.append(prev)
        self._curve = out
        return out

    def _measure_curve(self, context: int = 128, reps: int = 7) -> dict[str, float]:
        rng = np.random.default_rng(0)
        kv = self.step.new_kv(1, context + max(_CURVE_WIDTHS) + 2)
        vocab = self.step.vocab_size
        self.step.run(kv, rng.integers(0, vocab, (1, context)), np.arange(context)[None], causal_mask(context, 0), 1)
        feeds = {w: (rng.integers(0, vocab, (1, w)), np.arange(context, context + w)[None], causal_mask(w, context))
                 for w in _CURVE_WIDTHS}
        times: dict[int, list[float]] = {w: [] for w in _CURVE_WIDTHS}
        for rep in range(reps + 1):             # round robin, so a busy moment hits every width alike
            for w in _CURVE_WIDTHS:
                t0 = time.perf_counter()
                self.step.run(kv, *feeds[w])
                if rep:
                    times[w].append(time.perf_counter() - t0)
                kv.length = context
        # A forward's time is close to linear in its matrix rows (w; 2 for one token, with the
        # exact graph's padding row): a least-squares line through each width's least disturbed
        # run keeps a busy machine's noise out of the curve.
        rows = np.array([max(w, 2) for w in _CURVE_WIDTHS], float)
        best = np.array([min(times[w]) for w in _CURVE_WIDTHS])
        slope, base = np.polyfit(rows, best, 1)
        fit = max(float(base), 0.05 * float(best.min())) + max(float(slope), 0.0) * rows
        return {str(w): round(float(fit[i] / fit[0]), 4) for i, w in enumerate(_CURVE_WIDTHS)}

    # -- decoding --------------------------------------------------------------------------

    def generate(self, prompt: list[int], max_new_tokens: int = 128, *,
                 draft: bool = True) -> tuple[list[int], DecodeStats]:
        """Greedy decoding of ``max_new_tokens`` after ``prompt``, drafting as the plan says
        (``draft=False``: one token per forward, the reference the drafts reproduce exactly)."""
        if not prompt:
            raise InputError("the prompt is empty: give at least one token")
        if max_new_tokens < 0:
            raise InputError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        limit = self.manifest.get("max_positions") or 0
        if limit and len(prompt) + max_new_tokens > limit:
            raise InputError(f"the prompt has {len(prompt)} tokens; with max_new_tokens={max_new_tokens} it exceeds "
                             f"the model's {limit} positions")
        drafts = None
        if draft and self.plan.get("draft"):
            if self.exact():
                drafts = _Drafts(self.plan, self.cost_curve() if self.plan.get("adaptive") else None)
            elif not self._warned:
                self._warned = True
                warnings.warn("this machine's ONNX Runtime kernels do not give a multi-token step the arithmetic of "
                              "one-token steps on this graph: decoding greedily without drafts, to stay lossless",
                              RuntimeWarning, stacklevel=2)
        start = time.perf_counter()
        stats = DecodeStats(0, 0, 0.0, "max_new_tokens")
        new: list[int] = []
        if max_new_tokens:
            k = int(self.plan.get("k", 0)) if drafts else 0
            kv = self.step.new_kv(1, len(prompt) + max_new_tokens + k + 2)
            run, seq = self.step.run, list(prompt)
            n = len(prompt)                     # the prompt in one forward: its last token's logits
            logits = run(kv, np.array([prompt], np.int64), np.arange(n, dtype=np.int64)[None], causal_mask(n, 0), 1)
            stats.forwards, stats.prefill_s = 1, time.perf_counter() - start
            tok = int(logits[0, -1].argmax())
            new.append(tok)
            seq.append(tok)
            while tok not in self.eos and len(new) < max_new_tokens:
                chain = drafts.propose(seq, max_new_tokens - len(new) - 1) if drafts else []
                cached, t = kv.length, 1 + len(chain)
                logits = run(kv, np.array([[tok] + chain], np.int64), np.arange(cached, cached + t, dtype=np.int64)[None],
                             causal_mask(t, cached))
                stats.forwards += 1
                best = logits[0].argmax(-1)
                ok = 0
                while ok < len(chain) and chain[ok] == best[ok]:
                    ok += 1
                kv.length = cached + 1 + ok              # the rejected drafts' slots are overwritten later
                if drafts:
                    drafts.observe(len(chain), ok)
                    stats.drafted += len(chain)
                    stats.accepted += ok
                for tok in chain[:ok] + [int(best[ok])]:
                    new.append(tok)
                    seq.append(tok)
                    if tok in self.eos:
                        break
        if new and new[-1] in self.eos:
            stats.finish_reason = "eos"
        stats.new_tokens, stats.wall_time_s = len(new), time.perf_counter() - start
        return new, stats
