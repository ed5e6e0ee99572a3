"""One step graph on this machine: its session, whether its kernels keep drafting lossless,
its forward-cost curve, and the runtime's interpreter over it. The exported decoder
(``decograph.exported``) and the in-process ``onnxruntime*`` backends both run programs
through a ``GraphRunner``: the same code at the same speed. numpy and onnxruntime only.
"""
from __future__ import annotations

import json
import os
import platform
import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from decograph.backends.onnxruntime.engine import MIN_ROWS, tree_masks
from decograph.backends.onnxruntime.solo import OrtEngine
from decograph.backends.onnxruntime.kv import StepSession, causal_mask
from decograph.ir import ops as O
from decograph.measure_cache import cached, cpu_name
from decograph.passes.cost import DEFAULT_CURVE, CostCurve
from decograph.runtime.interp import Interpreter, RunConfig
from decograph.runtime.rows import DraftTree

__all__ = ["GraphRunner", "KeyBoundaries", "key_boundaries", "scan_boundaries", "width_invariant", "program_width",
           "exact_width"]

_CURVE_WIDTHS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 17)
_SCAN_EVERY, _SCAN_LIMIT, _SCAN_FAR = 16, 528, 1040     # boundary scan: every 16 keys to 528, then one far check
IRREGULAR = "irregular"                                 # boundaries found that are no ``first + k * period``


@dataclass(frozen=True)
class KeyBoundaries:
    """Key counts where this machine's attention kernels take another code path: ``first + k *
    period`` (k >= 0). A step's rows see the arithmetic of one-token steps only if they all sit on
    one side of each: the step ending at ``length + w`` keys, the one-token step of its row i at
    ``length + i + 2`` (a filler row each). Seen with Gemma 3's graphs (fp32 and int4) on an
    AVX-512 VNNI CPU: 64, 192, 320, ... keys; the default model's graphs have none."""

    first: int
    period: int

    def next(self, keys: int) -> int:
        """The first boundary at or after ``keys``."""
        if keys <= self.first:
            return self.first
        return self.first + -(-(keys - self.first) // self.period) * self.period

    def room(self, length: int) -> tuple[int, int]:
        """``(tokens, width)`` for a row of ``length`` cached slots: the most query tokens its
        step may hold, and the widest (padded) step it may sit in, without its rows straddling a
        boundary (a step of w >= 2 tokens straddles ``B`` if ``length + 2 <= B <= length + w``)."""
        b = self.next(length + 2)
        return b - length - 1, b - length


def scan_boundaries(step: StepSession, limit: int = _SCAN_LIMIT, every: int = _SCAN_EVERY) -> list[int]:
    """The key counts ``B`` (multiples of ``every`` up to ``limit``) where a two-token step ending
    at ``B`` keys is not the arithmetic of its two one-token steps, along one random sequence
    (each point costs four forwards: a prefill to it and the three compared)."""
    toks = np.random.default_rng(3).integers(0, step.vocab_size, limit + 2)
    kv = step.new_kv(1, limit + 4)
    found = []
    for b in range(every, limit + 1, every):
        _advance(step, kv, toks, b - 2)
        if not _pair_exact(step, kv, toks, b - 2):
            found.append(b)
    return found


def key_boundaries(step: StepSession, max_positions: int | None = None) -> KeyBoundaries | str | None:
    """``step``'s ``KeyBoundaries`` on this machine (``scan_boundaries``, then the pattern
    checked once far past the scan: at its boundary there and at the scan point after it), None
    where it has none, ``IRREGULAR`` where what it has is no such pattern (no drafts then).
    ``max_positions``: the graph's (its rotary table's) length, which the scan stays within."""
    room = 1 << 30 if max_positions is None else max_positions - 2
    limit = min(_SCAN_LIMIT, room) // _SCAN_EVERY * _SCAN_EVERY
    found = scan_boundaries(step, limit)
    if not found:
        return None
    period = found[1] - found[0] if len(found) > 1 else 0
    if not period or found != list(range(found[0], limit + 1, period)):
        return IRREGULAR
    kb = KeyBoundaries(found[0], period)
    far = kb.next(_SCAN_FAR)
    if far + _SCAN_EVERY > room:
        return IRREGULAR                                # no room to check the pattern: no drafts
    toks = np.random.default_rng(4).integers(0, step.vocab_size, far + _SCAN_EVERY + 2)
    kv = step.new_kv(1, far + _SCAN_EVERY + 4)
    _advance(step, kv, toks, far - 2)
    if _pair_exact(step, kv, toks, far - 2):
        return IRREGULAR
    _advance(step, kv, toks, far + _SCAN_EVERY - 2)
    return kb if _pair_exact(step, kv, toks, far + _SCAN_EVERY - 2) else IRREGULAR


def _advance(step: StepSession, kv: Any, toks: np.ndarray, to: int) -> None:
    """``kv`` filled with ``toks`` up to ``to`` slots (one forward)."""
    at = kv.length
    if to > at:
        step.run(kv, toks[None, at:to], np.arange(at, to)[None], causal_mask(to - at, at), 1)


def _pair_exact(step: StepSession, kv: Any, toks: np.ndarray, at: int) -> bool:
    """Whether tokens ``at`` and ``at + 1`` in one step give the logits and K/V of two one-token
    steps (``kv`` holds ``at`` slots; it holds ``at + 2`` after)."""
    pos = np.arange(at, at + 2)[None]
    one = np.concatenate([padded_step(step, kv, toks[None, at + i:at + i + 1], pos[:, i:i + 1], at + i)
                          for i in range(2)], 1)
    one_kv = [v[:, :, at:at + 2].copy() for v in kv.views()]
    kv.length = at
    two = padded_step(step, kv, toks[None, at:at + 2], pos, at)
    return bool(np.array_equal(one, two) and all(np.array_equal(a, v[:, :, at:at + 2])
                                                 for a, v in zip(one_kv, kv.views())))


def padded_step(step: StepSession, kv: Any, ids: np.ndarray, pos: np.ndarray, past: int) -> np.ndarray:
    """One causal step of ``ids`` [1, T] after ``past`` slots, as ``OrtBatch`` runs it: a
    one-token step with its filler query row (``engine.MIN_ROWS``); the logits of ``ids``."""
    t = ids.shape[1]
    if t >= MIN_ROWS:
        return step.run(kv, ids, pos, causal_mask(t, past)).copy()
    fill = MIN_ROWS - t
    logits = step.run(kv, np.concatenate([ids, np.repeat(ids[:, -1:], fill, 1)], 1),
                      np.concatenate([pos, pos[:, -1:] + 1 + np.arange(fill)[None]], 1), causal_mask(MIN_ROWS, past))
    kv.length -= fill
    return logits[:, :t].copy()


def width_invariant(step: StepSession, max_width: int = 9, context: int = 37,
                    boundaries: tuple[int, ...] = (64, 128), bounds: KeyBoundaries | None = None) -> bool:
    """Whether ``step``'s graph, on this machine's kernels, gives a k-token step bit-identical
    logits and K/V to k one-token steps (each with its filler row, ``padded_step``), for every k
    from 2 to ``max_width``: in either order after a ``context``-token prefill of random tokens,
    and for each k once more with the k-token step ending exactly at each of ``boundaries``
    keys (one-token steps then run one key past it: some attention kernels switch code paths
    there, seen with Gemma 3's graphs on an AVX-512 VNNI CPU at 64 + 128k keys, which
    ``key_boundaries`` finds and the runtime cuts steps at). Exact graphs are built for
    it; on some CPUs an int4 graph's MatMulNBits kernels sum a one-row product in another order
    than a several-row one, and this is what finds out. With ``bounds``, each step is cut where
    it would straddle one of them, as the runtime cuts it (``KeyBoundaries.room``)."""
    widths = list(range(2, max_width + 1))
    rng = np.random.default_rng(1)
    vocab = step.vocab_size
    prompt, toks = rng.integers(0, vocab, (1, context)), rng.integers(0, vocab, sum(widths))
    runs = []
    for order in ([1] * len(toks), widths, widths[::-1]):
        runs.append(_steps(step, prompt, toks, order, bounds))
    (ref, ref_kv), others = runs[0], runs[1:]
    if not all(_same(ref, ref_kv, lg, kv) for lg, kv in others):
        return False
    for edge in boundaries:
        for w in widths:
            prompt, toks = rng.integers(0, vocab, (1, edge - w)), rng.integers(0, vocab, w)
            (ref, ref_kv), (lg, kv) = _steps(step, prompt, toks, [1] * w), _steps(step, prompt, toks, [w], bounds)
            if not _same(ref, ref_kv, lg, kv):
                return False
    return True


def _steps(step: StepSession, prompt: np.ndarray, toks: np.ndarray, order: list[int],
           bounds: KeyBoundaries | None = None) -> tuple[np.ndarray, list]:
    """The logits of ``toks`` stepped in widths ``order`` after ``prompt``'s prefill (each step
    cut where it would straddle one of ``bounds``), and the K/V."""
    context = prompt.shape[1]
    kv = step.new_kv(1, context + len(toks) + 2)
    step.run(kv, prompt, np.arange(context)[None], causal_mask(context, 0), 1)
    logits, i = [], 0
    for width in order:
        end = i + width
        while i < end:
            w = end - i if bounds is None else max(1, min(end - i, bounds.room(context + i)[0]))
            pos = np.arange(context + i, context + i + w)[None]
            logits.append(padded_step(step, kv, toks[None, i:i + w], pos, context + i))
            i += w
    return np.concatenate(logits, 1), [v.copy() for v in kv.views()]


def _same(ref: np.ndarray, ref_kv: list, logits: np.ndarray, kv: list) -> bool:
    return np.array_equal(ref, logits) and all(np.array_equal(a, b) for a, b in zip(ref_kv, kv))


def program_width(program: O.Program) -> int:
    """The most query tokens one step of ``program`` feeds a row: its pending token plus every
    draft op's largest contribution to the tree (chains x candidates; a head's node budget; at
    most 64 + 1)."""
    nodes = 0
    for op in program.walk():
        if isinstance(op, O.DraftHead):         # a tree of ``nodes``, or as many as pay (about a level a depth)
            nodes += op.nodes or op.topk * op.depth
        elif isinstance(op, O.DRAFT_OPS) and not isinstance(op, O.DraftBranches):
            size = max(int(getattr(op, name, 0) or 0) for name in ("k", "window", "block", "n"))
            nodes += size * max(1, int(getattr(op, "candidates", 1) or 1))
    return 1 + min(nodes, O.MAX_DRAFT)


def exact_width(program: O.Program) -> int:
    """Widths the exactness check covers, and the widest step a runner then takes: the
    program's, at least 9, at most 16 (CPU kernels switch to other blocking beyond 16 rows;
    seen on this project's CPUs: a 17-token step is not the arithmetic of 17 one-token ones)."""
    return min(max(program_width(program), 9), 16)


class GraphRunner:
    """``step`` (a ``StepSession``) on this machine; ``identity``: what names the graph in the
    machine-measurement cache (its file's sha256 for an export); ``max_positions``: the graph's
    rotary table length (the boundary scan stays within it)."""

    def __init__(self, step: StepSession, identity: str, max_positions: int | None = None) -> None:
        self.step, self.identity, self.max_positions = step, identity, max_positions
        self.device = step.device
        opts = step.session.get_session_options()
        self.threads = opts.intra_op_num_threads
        self.spinning = opts.get_session_config_entry("session.intra_op.allow_spinning") != "0"
        self._exact: dict[int, bool] = {}
        self._bounds: list[Any] | None = None
        self._curve: list[float] | None = None
        self._shape: tuple[int, bool] | None = None
        self._warned = False

    def interpreter(self, program: O.Program, cfg: RunConfig, *, draft: bool = True, tokenizer: Any = None) -> Interpreter:
        """The runtime's interpreter for ``program`` on this graph. Drafts and batched steps run
        where this machine's kernels keep them lossless (else: no drafts, with one warning, and
        every row steps alone), drafts cut to the widths checked exact, sized by this graph's
        measured cost curve."""
        drafting = draft and cfg.drafts and any(isinstance(op, O.DRAFT_OPS) and not isinstance(op, O.DraftBranches)
                                                for op in program.walk())
        # the program's widest step, or the widest this machine keeps exact (drafts are cut to it)
        width = self.widest_exact(exact_width(program))
        exact = width >= 2
        if drafting and not exact:
            drafting = False
            if not self._warned:
                self._warned = True
                warnings.warn("this machine's ONNX Runtime kernels do not give a multi-token step the arithmetic of "
                              "one-token steps on this graph: decoding greedily without drafts, to stay lossless",
                              RuntimeWarning, stacklevel=3)
        curve = CostCurve({w + 1: c for w, c in enumerate(self.cost_curve())}) if drafting else DEFAULT_CURVE
        cfg.cost_curve, cfg.drafts = curve, drafting
        # where the kernels are not exact, a row in a batch is not the row alone either: rows step alone
        rows, filler = self.batch_shape() if exact else (1, True)
        found = self.boundaries() if exact else None
        bounds = found if isinstance(found, KeyBoundaries) else None      # where steps are cut (none: any width)
        engine = OrtEngine(self.step, tokenizer, curve, max_query=width if drafting else None, solo=not exact,
                           batch_filler=filler or bounds is not None, max_rows=rows, bounds=bounds)
        return Interpreter(program, engine, cfg)

    def _machine(self, kind: str, measure: Any) -> Any:
        """``measure()``'s result for this graph, ORT version, machine and threads, cached in
        ``$XDG_CACHE_HOME/decograph/exported_machine.json``."""
        import onnxruntime as ort

        key = json.dumps([kind, self.identity, ort.__version__,
                          self.threads, self.spinning, platform.machine(), cpu_name(), os.cpu_count()]
                         + ([self.device] if self.device != "cpu" else []))
        return cached("exported_machine.json", key, measure)

    def exact(self, width: int) -> bool:
        """Whether a k-token forward gives bit-identical logits and K/V to k one-token forwards
        here, for every width up to ``width``, and a row's step in a batch (its own cache
        length) to the step alone (what makes drafting and batching lossless; see
        ``decograph.backends.onnxruntime.graph``): checked once on this machine, cached."""
        if width not in self._exact:
            self._exact[width] = bool(self._machine(f"exact-7-{width}", lambda: self._check_exact(width)))
        return self._exact[width]

    def boundaries(self) -> KeyBoundaries | str | None:
        """This graph's ``KeyBoundaries`` on this machine (``key_boundaries``: None where it has
        none, ``IRREGULAR`` where no drafting is lossless), measured once and cached."""
        if self._bounds is None:
            def measure() -> list[Any]:
                got = key_boundaries(self.step, self.max_positions)
                return [] if got is None else [got] if isinstance(got, str) else [got.first, got.period]
            self._bounds = list(self._machine("bounds-1", measure))
        got = self._bounds
        return None if not got else IRREGULAR if len(got) == 1 else KeyBoundaries(int(got[0]), int(got[1]))

    def widest_exact(self, width: int) -> int:
        """The widest step of at most ``width`` tokens that is exact here (``exact``: its check
        covers every narrower width too), or 1 where none is: for CPUs that keep narrow steps
        exact and not wide ones. Widths are searched by halving, each checked once per machine
        and cached."""
        if self.exact(width):
            return width
        lo, hi = 1, width                   # a step of ``lo`` tokens is exact, one of ``hi`` is not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.exact(mid) else (lo, mid)
        return lo

    def _check_exact(self, width: int, context: int = 37) -> bool:
        bounds = self.boundaries()
        if isinstance(bounds, str):                     # IRREGULAR
            return False
        if not width_invariant(self.step, width, context, bounds=bounds):   # steps cut at boundaries
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
            alone.append(padded_step(self.step, kv, toks[None, :w], np.arange(n, n + w)[None], n))
        kv = self.step.new_kv(2, context + 8)
        self.step.run(kv, np.repeat(prompt, 2, 0), np.arange(context)[None].repeat(2, 0),
                      causal_mask(context, 0).repeat(2, 0), 1)
        lengths = np.array([context, short])
        chain = DraftTree()
        chain.add_chain([int(t) for t in toks[1:3]])
        mask = tree_masks(lengths, [1, 1], [chain, DraftTree()], 3, context)
        pos = lengths[:, None] + np.arange(3)
        both = self.step.run(kv, np.stack([toks[:3], toks[:1].repeat(3)]), pos, mask, lengths=lengths)
        if not (np.array_equal(both[0], alone[0][0]) and np.array_equal(both[1, :1], alone[1][0])):
            return False
        return True

    def batch_shape(self) -> tuple[int, bool]:
        """``(rows, filler)``: the most rows one product may hold with each row's tokens exactly
        its own alone (1, 2, 4, 8 or 16), and whether their one-token steps need the filler
        row as a lone row's do (measured once per graph and machine, rows of different lengths
        stepping one token each: here int4 graphs keep 16 rows exact without the filler; the
        default model's fp32 graph 16 rows with it only; the tests' tiny fp32 graph 4)."""
        if self._shape is None:
            def measure() -> list:
                rows = 1
                for n in (2, 4, 8, 16):
                    if not self._batch_exact(n, filler=True):
                        break
                    rows = n
                nofill = rows > 1 and all(self._batch_exact(n, filler=False) for n in (2, 4, 8, 16) if n <= rows)
                return [rows, not nofill]
            got = self._machine("batch-shape-1", measure)
            self._shape = (int(got[0]), bool(got[1]))
        return self._shape

    def _batch_exact(self, rows: int, filler: bool, context: int = 37) -> bool:
        """``rows`` rows of different lengths stepping one token in one product (with or
        without a filler row each) give each row's logits alone."""
        rng = np.random.default_rng(1)
        vocab = self.step.vocab_size
        prompt, tok = rng.integers(0, vocab, (1, context)), rng.integers(0, vocab, 1)
        kv = self.step.new_kv(rows, context + 8)
        self.step.run(kv, np.repeat(prompt, rows, 0), np.arange(context)[None].repeat(rows, 0),
                      causal_mask(context, 0).repeat(rows, 0), 1)
        lengths = np.array([context - (i % 7) for i in range(rows)])
        w = MIN_ROWS if filler else 1
        got = self.step.run(kv, np.repeat(tok[None], rows, 0).repeat(w, 1), lengths[:, None] + np.arange(w),
                            tree_masks(lengths, [1] * rows, [DraftTree()] * rows, w, context), lengths=lengths)
        for i in range(rows):
            n = int(lengths[i])
            one = self.step.new_kv(1, context + 8)
            self.step.run(one, prompt[:, :n], np.arange(n)[None], causal_mask(n, 0), 1)
            if not np.array_equal(got[i, :1], padded_step(self.step, one, tok[None], np.array([[n]]), n)[0]):
                return False
        return True

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

