"""Run an exported decoder (``decograph export``) with onnxruntime, numpy and tokenizers only.

This module imports neither torch nor transformers (a test checks). The decoder directory
(``decograph.backends.onnxruntime.manifest``, checked as untrusted input on load):

    manifest.json    what the rest is: the graphs' shapes, EOS ids, the chat template, file hashes
    strategy.json    the optimized strategy program (the IR's JSON form): what the decoder runs
    model.onnx       the decoding step (``decograph.backends.onnxruntime.graph``), maybe int4/int8
    tokenizer.json   the tokenizer (``tokenizers``)

The program runs on the runtime's one interpreter (``decograph.runtime``) over the ONNX Runtime
step protocol (``decograph.backends.onnxruntime.engine``), exactly as the in-process
``onnxruntime*`` backends run it: every draft source, verification rule and fork/join rule of
the program, ragged batches, EOS and budgets. ``adaptive_ngram`` (ANPD) cuts each draft to the
length with the most expected tokens per unit of forward time, from this machine's measured
forward-cost curve (cached per graph and machine in ``$XDG_CACHE_HOME/decograph``).

A greedy program's output is exactly the graph's own greedy decoding (``generate(...,
draft=False)``, one token per forward): the step graph computes every query row with the same
arithmetic whatever the number of query tokens (``graph``), which is checked once per machine
(``exact``); where this machine's kernels break it, the decoder drafts nothing, with a warning.

    decoder = ExportedDecoder("out/")
    ids, stats = decoder.generate(decoder.encode("Hello"), max_new_tokens=64)
    rows = decoder.generate_batch([decoder.encode(q) for q in ("Hi", "Name three rivers.")], 64)
"""
from __future__ import annotations

import json
import os
import platform
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from decograph.backends.onnxruntime.engine import OrtEngine, tree_masks
from decograph.backends.onnxruntime.kv import StepSession, causal_mask, pick_device
from decograph.backends.onnxruntime.manifest import MANIFEST_VERSION, load_manifest
from decograph.errors import InputError
from decograph.ir import ops as O
from decograph.measure_cache import cached
from decograph.passes.cost import DEFAULT_CURVE, CostCurve
from decograph.runtime.interp import Interpreter, RunConfig
from decograph.runtime.rows import DraftTree

__all__ = ["ExportedDecoder", "DecodeStats", "MANIFEST_VERSION", "width_invariant", "program_width"]
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


def program_width(program: O.Program) -> int:
    """The most query tokens one step of ``program`` feeds a row: its pending token plus every
    draft op's largest contribution to the tree (chains x candidates; at most 64 + 1)."""
    nodes = 0
    for op in program.walk():
        if isinstance(op, O.DRAFT_OPS) and not isinstance(op, O.DraftBranches):
            size = max(int(getattr(op, name, 0) or 0) for name in ("k", "window", "block", "n"))
            nodes += size * max(1, int(getattr(op, "candidates", 1) or 1))
    return 1 + min(nodes, O.MAX_DRAFT)


class ExportedDecoder:
    def __init__(self, directory: str | Path, *, threads: int | None = None, spinning: bool | None = None,
                 check_hashes: bool = True, device: str = "auto") -> None:
        """``threads``/``spinning``: ONNX Runtime's intra-op threads and idle-thread spinning
        (``kv.session_options``; ``None``: ``DECOGRAPH_ORT_THREADS`` / ``_SPINNING``, else ORT's).
        ``device``: ``cpu``, ``cuda`` (ONNX Runtime's CUDA EP, the cache in GPU memory), or
        ``auto``: cuda for a float16 export (``export --dtype float16``) where the CUDA EP is
        there, else cpu. The directory is untrusted input: ``load_manifest`` checks it all
        (schema, bounds, paths inside it, hashes) before anything is allocated."""
        m = self.manifest = load_manifest(directory, check_hashes=check_hashes)
        target = m.target
        if device == "auto":
            device = pick_device("auto") if target.dtype == "float16" else "cpu"
        self.step = StepSession(m.path(target.file), threads, spinning, device=device)
        self.device = self.step.device
        self.session = self.step.session
        opts = self.session.get_session_options()
        self.threads = opts.intra_op_num_threads
        self.spinning = opts.get_session_config_entry("session.intra_op.allow_spinning") != "0"
        self.tokenizer = m.tokenizer
        self.n_layers, self.kv_heads, self.head_dim = target.num_layers, target.kv_heads, target.head_dim
        self.eos = set(m.eos_token_ids)
        self.program: O.Program = m.program
        self._curve: list[float] | None = None
        self._exact: bool | None = None
        self._warned = False

    def with_program(self, program: O.Program) -> ExportedDecoder:
        """This decoder (its session shared) running another verified program, e.g. a built-in
        strategy's; greedy tokens stay the same."""
        import copy

        from decograph.ir.verify import verify

        verify(program)
        other = copy.copy(self)
        other.program, other._exact = program, None
        return other

    # -- text ------------------------------------------------------------------------------

    def encode(self, text: str, chat: bool | None = None) -> list[int]:
        """Token ids of ``text``; with ``chat`` (default: the manifest's), through the chat
        template saved at export (rendered at export time around a placeholder)."""
        use_chat = self.manifest.chat_default if chat is None else chat
        if use_chat:
            tpl = self.manifest.chat_prompt
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

        key = json.dumps([kind, self.manifest.files.get(self.manifest.target.file), ort.__version__,
                          self.threads, self.spinning, platform.machine(), platform.processor(), os.cpu_count()]
                         + ([self.device] if self.device != "cpu" else []))
        return cached("exported_machine.json", key, measure)

    def exact(self) -> bool:
        """Whether a k-token forward gives bit-identical logits and K/V to k one-token forwards
        here, for every width a step can take, and a row's step in a batch (its own cache
        length) to the step alone (what makes drafting and batching lossless; see
        ``decograph.backends.onnxruntime.graph``): checked once on this machine, cached."""
        if self._exact is None:
            self._exact = bool(self._machine(f"exact-2-{self.check_width()}", self._check_exact))
        return self._exact

    def _check_exact(self, context: int = 37) -> bool:
        if not width_invariant(self.step, self.check_width(), context):
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
        chain = DraftTree()
        chain.add_chain([int(t) for t in toks[1:3]])
        mask = tree_masks(lengths, [1, 1], [chain, DraftTree()], 3, context)
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
        """The most query tokens a step of this decoder's program takes."""
        return program_width(self.program)

    def check_width(self) -> int:
        """Widths the exactness check covers, and the widest step the decoder then takes: the
        program's, at least 9, at most 16 (CPU kernels switch to other blocking beyond 16 rows;
        seen on this project's CPUs: a 17-token step is not the arithmetic of 17 one-token ones)."""
        return min(max(self.width(), 9), 16)

    def generate(self, prompt: list[int], max_new_tokens: int = 128, *,
                 draft: bool = True) -> tuple[list[int], DecodeStats]:
        """Decoding of ``max_new_tokens`` after ``prompt`` by the program (``draft=False``: no
        draft proposes anything, one token per forward: the reference the drafts reproduce)."""
        [out] = self.generate_batch([prompt], max_new_tokens, draft=draft)
        return out

    def generate_batch(self, prompts: list[list[int]], max_new_tokens: int = 128, *, draft: bool = True,
                       seed: int | None = None) -> list[tuple[list[int], DecodeStats]]:
        """``generate`` for several prompts at once, each row's tokens exactly its own
        ``generate``'s: every row keeps its own cache length (dense from slot 0, as alone; the
        graph's ``cache_lengths``), its own drafts, and leaves the batch when it ends. The
        prompts' forwards run one by one (a row's prompt forward is then the one it has alone)."""
        interp = self._interpreter(prompts, max_new_tokens, draft, seed)
        start = time.perf_counter()
        ends = [0.0] * len(prompts)
        for event in interp.run([list(p) for p in prompts]):
            if event.done:
                ends[event.row] = time.perf_counter() - start
        assert interp.state is not None
        out = []
        for i, row in enumerate(interp.state.rows):
            st = DecodeStats(len(row.new_tokens), row.forwards, ends[i] or interp.wall,
                             row.finish_reason or "max_new_tokens", sum(row.drafted), sum(row.accepted))
            st.prefill_s = getattr(interp, "prefill_s", 0.0)
            out.append((list(row.new_tokens), st))
        return out

    def stream(self, prompts: list[list[int]], max_new_tokens: int = 128, *, draft: bool = True,
               seed: int | None = None) -> Any:
        """The runtime's events (``row``, ``tokens``, ``done``) as the program commits them."""
        return self._interpreter(prompts, max_new_tokens, draft, seed).run([list(p) for p in prompts])

    def _interpreter(self, prompts: list[list[int]], max_new_tokens: int, draft: bool,
                     seed: int | None) -> Interpreter:
        if not prompts:
            raise InputError("no prompts: give at least one")
        for i, p in enumerate(prompts):
            if not p:
                raise InputError(f"prompt {i} is empty: give at least one token")
        if max_new_tokens < 0:
            raise InputError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        limit = self.manifest.target.max_positions
        longest = max(len(p) for p in prompts)
        if limit and longest + max_new_tokens > limit:
            raise InputError(f"a prompt has {longest} tokens; with max_new_tokens={max_new_tokens} it exceeds "
                             f"the model's {limit} positions")
        drafts = [op for op in self.program.walk() if isinstance(op, O.DRAFT_OPS)]
        drafting = draft and bool(drafts)
        if drafting and not self.exact():
            drafting = False
            if not self._warned:
                self._warned = True
                warnings.warn("this machine's ONNX Runtime kernels do not give a multi-token step the arithmetic of "
                              "one-token steps on this graph: decoding greedily without drafts, to stay lossless",
                              RuntimeWarning, stacklevel=3)
        curve = CostCurve({w + 1: c for w, c in enumerate(self.cost_curve())}) if drafting else DEFAULT_CURVE
        cfg = RunConfig(max_new_tokens=max_new_tokens, eos_token_ids=tuple(self.eos), seed=seed, cost_curve=curve,
                        tokenizer=self.tokenizer, drafts=drafting)
        engine = OrtEngine(self.step, self.tokenizer, curve, max_query=self.check_width() if drafting else None)
        return Interpreter(self.program, engine, cfg)
