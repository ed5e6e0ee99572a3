"""Run an exported decoder (``decograph export``) with onnxruntime, numpy and tokenizers only.

This module imports neither torch nor transformers (a test checks). The decoder directory:

    manifest.json    what the rest is: the model's shapes, EOS ids, the runner plan, file hashes
    model.onnx       the decoding step (``decograph.backends.onnxruntime.graph``), maybe int4/int8
    strategy.json    the optimized strategy program (the IR's JSON form), for reference and tools
    tokenizer.json   the tokenizer (``tokenizers``), plus the chat template in the manifest

The runner executes the strategy's plan (``decograph.exported_drafts``): n-gram drafting
(``ngram`` / ``adaptive_ngram``: what followed the newest earlier occurrence of the longest
matching suffix, ``max_n`` down to ``min_n`` tokens, at most ``k``), Jacobi or Gauss-Seidel-
Jacobi iteration, or lookahead (a pool n-gram verified, a Jacobi window beside it), verified
greedily in one causal forward per step; ``greedy`` drafts nothing. ``adaptive_ngram`` (ANPD)
cuts each draft to the length with the most expected tokens per unit of forward time, from its
match level's running acceptance and this machine's measured forward-cost curve (cached per
graph and machine in ``$XDG_CACHE_HOME/decograph``); with nothing to copy it still drafts one
token (the sequence's most frequent), which the exact graph's padding row makes free.

The output is exactly the graph's own greedy decoding (``generate(..., draft=False)``, one
token per forward): the step graph computes every query row with the same arithmetic whatever
the number of query tokens (``graph``), so verifying a draft of k tokens gives bit-identical
logits to k one-token forwards. The KV cache lives in buffers bound to the graph's past and
present (``kv``): nothing is copied per step, and a rejected draft costs no cache edit.
``generate_batch`` decodes several prompts in one step per iteration, each row with its own
cache length (the graph's ``cache_lengths``: no padding inside a row's cache), so each row's
tokens are exactly its own ``generate``'s.

    decoder = ExportedDecoder("out/")
    ids, stats = decoder.generate(decoder.encode("Hello"), max_new_tokens=64)
    rows = decoder.generate_batch([decoder.encode(q) for q in ("Hi", "Name three rivers.")], 64)
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

from decograph.backends.onnxruntime.kv import _NEG, StepSession, causal_mask, pick_device
from decograph.errors import InputError, ModelError
from decograph.exported_drafts import PLANS, make_drafts
from decograph.measure_cache import cached

__all__ = ["ExportedDecoder", "DecodeStats", "MANIFEST_VERSION", "width_invariant"]

MANIFEST_VERSION = 3                 # 3: the step graph takes cache_lengths (batches)
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


def width_invariant(step: StepSession, max_width: int = 9, context: int = 37) -> bool:
    """Whether ``step``'s graph, on this machine's kernels, gives a k-token step bit-identical
    logits and K/V to k one-token steps, for every k from 2 to ``max_width`` (in either order
    after a ``context``-token prefill of random tokens). Exact graphs are built for it; on some
    CPUs an int4 graph's MatMulNBits kernels sum a one-row product in another order than a
    several-row one, and this is what finds out."""
    widths = list(range(2, max_width + 1))
    rng = np.random.default_rng(1)
    vocab = step.vocab_size
    prompt, toks = rng.integers(0, vocab, (1, context)), rng.integers(0, vocab, sum(widths))
    runs = []
    for order in ([1] * len(toks), widths, widths[::-1]):
        kv = step.new_kv(1, context + len(toks) + 2)
        step.run(kv, prompt, np.arange(context)[None], causal_mask(context, 0), 1)
        logits, i = [], 0
        for w in order:
            pos = np.arange(context + i, context + i + w)[None]
            logits.append(step.run(kv, toks[None, i:i + w], pos, causal_mask(w, context + i)).copy())
            i += w
        runs.append((np.concatenate(logits, 1), [v.copy() for v in kv.views()]))
    (ref, ref_kv), others = runs[0], runs[1:]
    return all(np.array_equal(ref, lg) and all(np.array_equal(a, b) for a, b in zip(ref_kv, kv)) for lg, kv in others)


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
        if not isinstance(self.plan, dict) or self.plan.get("draft") not in PLANS:
            raise ModelError(f"{mpath}: field 'plan' is {self.plan!r}; its 'draft' must be one of {PLANS} (a newer "
                             f"decograph's export?)")
        self._curve: list[float] | None = None
        self._exact: bool | None = None
        self._warned = False

    def with_plan(self, plan: dict[str, Any]) -> ExportedDecoder:
        """This decoder (its session and cache-free state shared) running another plan, e.g.
        ``{"draft": "lookahead", "window": 4, "n": 4}``; greedy tokens stay the same."""
        import copy

        if not isinstance(plan, dict) or plan.get("draft") not in PLANS:
            raise InputError(f"plan {plan!r}: its 'draft' must be one of {PLANS}")
        other = copy.copy(self)
        other.plan, other._exact = dict(plan), None
        return other

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
        here, for every width a step can take, and a row's step in a batch (its own cache
        length) to the step alone (what makes drafting and batching lossless; see
        ``decograph.backends.onnxruntime.graph``): checked once on this machine, cached."""
        if self._exact is None:
            self._exact = bool(self._machine(f"exact-2-{self.width()}", self._check_exact))
        return self._exact

    def _check_exact(self, context: int = 37) -> bool:
        if not width_invariant(self.step, max(self.width(), 9), context):
            return False
        rng = np.random.default_rng(1)
        vocab = self.step.vocab_size
        prompt, toks = rng.integers(0, vocab, (1, context)), rng.integers(0, vocab, 3)
        # two rows of different lengths in one step (a 3-token step and a padded 1-token one)
        short = context - 7
        alone = []
        for n, w in ((context, 3), (short, 1)):
            kv = self.step.new_kv(1, context + 8)
            self.step.run(kv, prompt[:, :n], np.arange(n)[None], causal_mask(n, 0), 1)
            alone.append(self.step.run(kv, toks[None, :w], np.arange(n, n + w)[None], causal_mask(w, n)).copy())
        kv = self.step.new_kv(2, context + 8)
        self.step.run(kv, np.repeat(prompt, 2, 0), np.arange(context)[None].repeat(2, 0),
                      causal_mask(context, 0).repeat(2, 0), 1)
        lengths = np.array([context, short])
        mask = self._masks(lengths, [(list(toks[1:3]), []), ([], [])], 3, context)
        pos = lengths[:, None] + np.arange(3)
        both = self.step.run(kv, np.stack([toks[:3], toks[:1].repeat(3)]), pos, mask, lengths=lengths)
        return np.array_equal(both[0], alone[0][0]) and np.array_equal(both[1, :1], alone[1][0])

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

    def width(self) -> int:
        """The most query tokens a step of this plan takes (pending token, chain and window)."""
        p = self.plan
        kind = p.get("draft")
        if kind == "lookahead":
            return 1 + max(int(p["n"]) - 1, int(p["window"])) + int(p["window"])
        return 1 + int(p.get("k") or p.get("window") or p.get("block") or 0)

    def generate(self, prompt: list[int], max_new_tokens: int = 128, *,
                 draft: bool = True) -> tuple[list[int], DecodeStats]:
        """Greedy decoding of ``max_new_tokens`` after ``prompt``, drafting as the plan says
        (``draft=False``: one token per forward, the reference the drafts reproduce exactly)."""
        [out] = self.generate_batch([prompt], max_new_tokens, draft=draft)
        return out

    def generate_batch(self, prompts: list[list[int]], max_new_tokens: int = 128, *,
                       draft: bool = True) -> list[tuple[list[int], DecodeStats]]:
        """``generate`` for several prompts at once, each row's tokens exactly its own
        ``generate``'s: every row keeps its own cache length (dense from slot 0, as alone; the
        graph's ``cache_lengths``), its own drafts, and leaves the batch when it ends. The
        prompts' forwards run one by one (a row's prompt forward is then the one it has alone)."""
        if not prompts:
            raise InputError("no prompts: give at least one")
        for i, p in enumerate(prompts):
            if not p:
                raise InputError(f"prompt {i} is empty: give at least one token")
        if max_new_tokens < 0:
            raise InputError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        limit = self.manifest.get("max_positions") or 0
        longest = max(len(p) for p in prompts)
        if limit and longest + max_new_tokens > limit:
            raise InputError(f"a prompt has {longest} tokens; with max_new_tokens={max_new_tokens} it exceeds "
                             f"the model's {limit} positions")
        drafting = draft and bool(self.plan.get("draft"))
        if drafting and not self.exact():
            drafting = False
            if not self._warned:
                self._warned = True
                warnings.warn("this machine's ONNX Runtime kernels do not give a multi-token step the arithmetic of "
                              "one-token steps on this graph: decoding greedily without drafts, to stay lossless",
                              RuntimeWarning, stacklevel=2)
        curve = self.cost_curve() if drafting and self.plan.get("adaptive") else None
        stats = [DecodeStats(0, 0, 0.0, "max_new_tokens") for _ in prompts]
        new: list[list[int]] = [[] for _ in prompts]
        start = time.perf_counter()
        if max_new_tokens:
            kv = self._prefill(prompts, max_new_tokens, new, stats)
            for st in stats:
                st.prefill_s = time.perf_counter() - start
            srcs = [make_drafts(self.plan, curve) if drafting else None for _ in prompts]
            self._decode(kv, prompts, max_new_tokens, new, stats, srcs, start)
        for row, st in zip(new, stats):
            st.new_tokens = len(row)
            if row and row[-1] in self.eos:
                st.finish_reason = "eos"
            if not st.wall_time_s:
                st.wall_time_s = time.perf_counter() - start
        return list(zip(new, stats))

    def _prefill(self, prompts: list[list[int]], max_new_tokens: int, new: list[list[int]],
                 stats: list[DecodeStats]) -> Any:
        """Each prompt in one forward (its last token's logits: the first new token), into one
        batch cache with room for the whole decode."""
        cap = max(len(p) for p in prompts) + max_new_tokens + self.width() + 2
        rows = []
        for i, p in enumerate(prompts):
            n = len(p)
            kv = self.step.new_kv(1, cap if len(prompts) == 1 else n + 2)
            logits = self.step.run(kv, np.array([p], np.int64), np.arange(n, dtype=np.int64)[None],
                                   causal_mask(n, 0), 1)
            new[i].append(int(logits[0, -1].argmax()))
            stats[i].forwards = 1
            rows.append(kv)
        if len(prompts) == 1:
            return rows[0]
        hosts = [kv.views() for kv in rows]                 # each row's valid slots, read once
        bufs = []
        for j in range(2 * self.n_layers):
            full = np.zeros((len(prompts), self.kv_heads, cap, self.head_dim), self.step.kv_dtype)
            for i, views in enumerate(hosts):
                full[i, :, :views[j].shape[2]] = views[j][0]
            bufs.append(full)
        kv = self.step.new_kv(len(prompts), cap)
        kv.replace(bufs, max(len(p) for p in prompts))
        return kv

    def _decode(self, kv: Any, prompts: list[list[int]], max_new_tokens: int, new: list[list[int]],
                stats: list[DecodeStats], srcs: list[Any], start: float) -> None:
        seqs = [list(p) + row for p, row in zip(prompts, new)]
        live = [i for i in range(len(prompts)) if new[i][-1] not in self.eos and len(new[i]) < max_new_tokens]
        lengths = np.array([len(p) for p in prompts], np.int64)     # each live row's valid slots
        if len(live) < len(prompts):
            kv, lengths = self._keep_rows(kv, live, lengths)
        for i in set(range(len(prompts))) - set(live):
            stats[i].wall_time_s = time.perf_counter() - start
        one = len(prompts) == 1
        while live:
            plans = []
            for i in live:
                budget = max_new_tokens - len(new[i]) - 1
                chain, window = srcs[i].propose(seqs[i], budget) if srcs[i] else ([], [])
                plans.append((chain, window))
            w = max(1 + len(c) + len(win) for c, win in plans)
            ids = np.empty((len(live), w), np.int64)
            pos = np.empty((len(live), w), np.int64)
            for r, (i, (chain, window)) in enumerate(zip(live, plans)):
                row = [new[i][-1]] + chain + window
                ids[r] = row + [row[-1]] * (w - len(row))
                pos[r] = lengths[r] + np.arange(w)
                if window:
                    pos[r, 1 + len(chain):1 + len(chain) + len(window)] = lengths[r] + 1 + np.arange(len(window))
            if one and not plans[0][1]:
                mask, rows_len = causal_mask(w, kv.length), None
            else:
                mask, rows_len = self._masks(lengths, plans, w, kv.length), lengths
            logits = self.step.run(kv, ids, pos, mask, lengths=rows_len)
            best = logits.argmax(-1)
            done = []
            for r, (i, (chain, window)) in enumerate(zip(live, plans)):
                preds = [int(t) for t in best[r, :1 + len(chain)]]
                ok = 0
                while ok < len(chain) and chain[ok] == preds[ok]:
                    ok += 1
                st = stats[i]
                st.forwards += 1
                if srcs[i] is not None:
                    st.drafted += len(chain)
                    st.accepted += ok
                    c = 1 + len(chain)
                    srcs[i].observe(chain, ok, preds, [int(t) for t in best[r, c:c + len(window)]])
                lengths[r] += 1 + ok               # the pending token's and the accepted drafts' slots
                for tok in chain[:ok] + [preds[ok]]:
                    new[i].append(tok)
                    seqs[i].append(tok)
                    if tok in self.eos:
                        break
                if new[i][-1] in self.eos or len(new[i]) >= max_new_tokens:
                    done.append(r)
                    st.wall_time_s = time.perf_counter() - start
            kv.length = int(lengths.max())          # rejected slots past a row's length are overwritten later
            if done:
                keep = [r for r in range(len(live)) if r not in done]
                live = [live[r] for r in keep]
                kv, lengths = self._keep_rows(kv, keep, lengths)

    @staticmethod
    def _keep_rows(kv: Any, rows: list[int], lengths: np.ndarray) -> tuple[Any, np.ndarray]:
        """The cache and lengths of ``rows`` only (finished rows leave the batch)."""
        if not rows:
            return kv, lengths[:0]
        idx = np.array(rows)
        kv.select(idx, int(lengths[idx].max()))
        return kv, lengths[idx]

    @staticmethod
    def _masks(lengths: np.ndarray, plans: list[tuple[list[int], list[int]]], w: int, width: int) -> np.ndarray:
        """Each row's additive mask over its own slots: the pending token and chain causal after
        the row's ``lengths`` cached slots; a lookahead window's rows see the context, the
        pending token and the window's earlier rows; filler rows are causal (never read)."""
        cols = np.arange(width + w)
        mask = np.empty((len(plans), 1, w, width + w), np.float32)
        for r, (chain, window) in enumerate(plans):
            see = cols[None, :] < (lengths[r] + 1 + np.arange(w))[:, None]
            if window:
                c, j = 1 + len(chain), np.arange(len(window))
                see[c:c + len(window)] = cols[None, :] <= lengths[r]
                win = (cols[None, :] >= lengths[r] + c) & (cols[None, :] <= (lengths[r] + c + j)[:, None])
                see[c:c + len(window)] |= win
            mask[r, 0] = np.where(see, np.float32(0.0), _NEG)
        return mask
