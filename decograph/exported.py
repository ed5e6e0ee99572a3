"""Run an exported decoder (``decograph export``) with onnxruntime, numpy and tokenizers only.

This module imports neither torch nor transformers (a test checks). The decoder directory
(``decograph.backends.onnxruntime.manifest``, checked as untrusted input on load):

    manifest.json    what the rest is: the graphs' shapes, EOS ids, the chat template, file hashes
    strategy.json    the optimized strategy program (the IR's JSON form): what the decoder runs
    model.onnx       the decoding step (``decograph.backends.onnxruntime.graph``), maybe int4/int8
    draft.NAME.onnx  a ``draft.model(model=NAME)`` strategy's draft model's step, same precision
    head.I.onnx      a ``draft.head`` strategy's draft head (``graph_head``: ``OrtHead`` runs it); the
                     step graph then returns the final hidden states the head reads
    tokenizer.json   the tokenizer (``tokenizers``)

A masked-diffusion decoder (an unmask strategy exported with decograph's masked-diffusion
model) has that model's forward graph (``mdm.build_mdm``) as its target: the same interpreter
runs the unmask loop over ``canvas.OrtCanvasEngine``; ``suffixes=`` fills in between.

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

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from decograph.backends.onnxruntime.block_diffusion import BDSession
from decograph.backends.onnxruntime.canvas import MDMSession, OrtCanvasEngine
from decograph.backends.onnxruntime.draft import OrtDraftRunner
from decograph.backends.onnxruntime.graph_head import OrtHead
from decograph.backends.onnxruntime.kv import StepSession, pick_device
from decograph.backends.onnxruntime.manifest import MANIFEST_VERSION, load_manifest
from decograph.errors import InputError, ModelError, UnsupportedError
from decograph.heads.corpus import load_corpus
from decograph.ir import ops as O
from decograph.backends.onnxruntime.runner import GraphRunner, exact_width, program_width, width_invariant
from decograph.runtime.interp import Interpreter, RunConfig

__all__ = ["ExportedDecoder", "DecodeStats", "MANIFEST_VERSION", "width_invariant", "program_width"]


@dataclass
class DecodeStats:
    new_tokens: int
    forwards: int
    wall_time_s: float
    finish_reason: str
    drafted: int = 0
    accepted: int = 0
    prefill_s: float = 0.0
    draft_s: float = 0.0            # seconds its draft sources took (a draft head's graph calls included)

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first over the time after the prompt's forward."""
        t = self.wall_time_s - self.prefill_s
        return (self.new_tokens - 1) / t if self.new_tokens > 1 and t > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_time_s if self.wall_time_s > 0 else 0.0




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
        self.tokenizer = m.tokenizer
        self.canvas: OrtCanvasEngine | None = None
        self.runner: GraphRunner | None = None
        self.draft_runners: dict[str, OrtDraftRunner] = {}       # draft.model(model=NAME)
        self.draft_heads: dict[str, OrtHead] = {}                # draft.head(head=NAME)
        self.corpora = {name: load_corpus(m.path(file)) for name, file in m.corpora.items()}   # draft.corpus
        if target.diffusion:                # an unmask strategy on the masked-diffusion forward
            if device not in ("auto", "cpu"):
                raise InputError(f"device {device!r}: a masked-diffusion decoder runs on the CPU EP only")
            assert target.mask_token_id is not None
            kind = BDSession if target.graph.startswith("bd-") else MDMSession
            mdm = kind(m.path(target.file), max_positions=target.max_positions, threads=threads, spinning=spinning)
            self.canvas = OrtCanvasEngine(mdm, mask_token_id=target.mask_token_id, shift_logits=target.shift_logits,
                                          pad_id=m.eos_token_ids[0] if m.eos_token_ids else 0,
                                          tokenizer=self.tokenizer)
            self.device, self.session, self.threads, self.spinning = "cpu", mdm.session, threads, spinning
        else:
            if device == "auto":
                device = pick_device("auto") if target.dtype == "float16" else "cpu"
            self.step = StepSession(m.path(target.file), threads, spinning, device=device)
            self.step.quantized = self.step.quantized or target.quant != "none"    # exports older than the graph's tag
            self.runner = GraphRunner(self.step, m.files[target.file], target.max_positions)
            self.draft_runners = {role.removeprefix("draft:"): OrtDraftRunner(
                StepSession(m.path(g.file), threads, spinning, device=device))
                for role, g in m.graphs.items() if role.startswith("draft:")}
            self.draft_heads = {name: OrtHead(m.path(g.file), threads) for name, g in m.heads.items()}
            if self.draft_heads and not self.step.hidden_size:
                raise ModelError(f"{m.path(target.file)}: the step graph returns no hidden states, which this "
                                 f"decoder's draft heads read (export it again)")
            self.device = self.step.device
            self.session = self.step.session
            self.threads, self.spinning = self.runner.threads, self.runner.spinning
        self.n_layers, self.kv_heads, self.head_dim = target.num_layers, target.kv_heads, target.head_dim
        self.eos = set(m.eos_token_ids)
        self.program: O.Program = m.program

    def with_program(self, program: O.Program) -> ExportedDecoder:
        """This decoder (its session shared) running another verified program, e.g. a built-in
        strategy's; greedy tokens stay the same."""
        import copy

        from decograph.ir.verify import verify

        verify(program)
        for op in program.walk():
            if isinstance(op, O.DraftCorpus) and op.corpus not in self.corpora:
                raise UnsupportedError(f"strategy {program.name!r}: step `draft.corpus(corpus={op.corpus})` needs a "
                                       f"corpus this decoder does not carry (it has {sorted(self.corpora) or 'none'}): "
                                       f"export a strategy with that step, e.g. anpd_corpus")
        other = copy.copy(self)
        other.program = program
        return other

    # -- text ------------------------------------------------------------------------------

    def encode(self, text: str, chat: bool | None = None) -> list[int]:
        """Token ids of ``text``; with ``chat`` (default: the manifest's), through the chat
        template saved at export (rendered at export time around a placeholder, its special
        tokens in the text). Plain text gets the tokenizer's own special tokens (Gemma's
        ``<bos>``), as the torch path's ``tokenizer(text)`` does."""
        use_chat = self.manifest.chat_default if chat is None else chat
        if use_chat:
            tpl = self.manifest.chat_prompt
            if not tpl:
                raise InputError("this decoder was exported without a chat template; use chat=False")
            text = tpl.replace("{prompt}", text)
        return self.tokenizer.encode(text, add_special_tokens=not use_chat).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # -- measured on this machine (the runner's, shared with the in-process backends) --------

    def _causal(self) -> GraphRunner:
        if self.runner is None:
            raise InputError("this is a masked-diffusion decoder: it has no causal step graph")
        return self.runner

    def exact(self) -> bool:
        """Whether this machine's kernels keep drafting and batching lossless on this graph
        (``GraphRunner.exact``; checked once per machine, cached)."""
        return self._causal().exact(self.check_width())

    def cost_curve(self) -> list[float]:
        return self._causal().cost_curve()

    # -- decoding --------------------------------------------------------------------------

    def width(self) -> int:
        """The most query tokens a step of this decoder's program takes."""
        return program_width(self.program)

    def check_width(self) -> int:
        """The widest step the decoder takes where drafting is exact (``exact_width``)."""
        return exact_width(self.program)

    def generate(self, prompt: list[int], max_new_tokens: int = 128, *,
                 draft: bool = True) -> tuple[list[int], DecodeStats]:
        """Decoding of ``max_new_tokens`` after ``prompt`` by the program (``draft=False``: no
        draft proposes anything, one token per forward: the reference the drafts reproduce)."""
        [out] = self.generate_batch([prompt], max_new_tokens, draft=draft)
        return out

    def generate_batch(self, prompts: list[list[int]], max_new_tokens: int = 128, *, draft: bool = True,
                       seed: int | None = None, **options: Any) -> list[tuple[list[int], DecodeStats]]:
        """``generate`` for several prompts at once, each row's tokens exactly its own
        ``generate``'s: every row keeps its own cache length (dense from slot 0, as alone; the
        graph's ``cache_lengths``), its own drafts, and leaves the batch when it ends. The
        prompts' forwards run one by one (a row's prompt forward is then the one it has alone).
        ``options``: ``stop_token_ids``, ``branch_providers`` (fork strategies' run-time
        branches), ``trace`` (a list that gets the runtime's per-step records)."""
        interp = self._interpreter(prompts, max_new_tokens, draft, seed, **options)
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
            st.prefill_s, st.draft_s = getattr(interp, "prefill_s", 0.0), row.draft_s
            out.append((list(row.new_tokens), st))
        return out

    def interpreter(self, config: RunConfig, program: O.Program | None = None) -> Interpreter:
        """The runtime for ``program`` (default: the decoder's) with ``config``, its model fields
        (EOS, draft runners, tokenizer) filled in here: what a server's lanes run
        (``decograph.runtime.scheduler``)."""
        config.eos_token_ids = config.eos_token_ids or tuple(sorted(self.eos))
        config.tokenizer = self.tokenizer
        config.draft_models = dict(self.draft_runners)
        config.draft_heads = dict(self.draft_heads)
        config.corpora = dict(self.corpora)
        program = program or self.program
        if self.canvas is not None:
            config.pad_token_id = self.canvas.pad_id
            return Interpreter(program, self.canvas, config)
        config.pad_token_id = config.eos_token_ids[0] if config.eos_token_ids else 0
        return self._causal().interpreter(program, config, tokenizer=self.tokenizer)

    def sampling_program(self, temperature: float, top_p: float = 1.0) -> O.Program:
        """The decoder's program with every greedy verification sampling (lossless speculative
        sampling: the tokens follow the model's tempered, top-p distribution)."""
        from decograph.passes.sampling import to_sampling

        return to_sampling(self.program, temperature, 0, top_p)

    def stream(self, prompts: list[list[int]], max_new_tokens: int = 128, *, draft: bool = True,
               seed: int | None = None, **options: Any) -> Any:
        """The runtime's events (``row``, ``tokens``, ``done``) as the program commits them."""
        return self._interpreter(prompts, max_new_tokens, draft, seed, **options).run([list(p) for p in prompts])

    def _interpreter(self, prompts: list[list[int]], max_new_tokens: int, draft: bool, seed: int | None, *,
                     stop_token_ids: tuple[int, ...] = (), branch_providers: dict[str, Any] | None = None,
                     trace: list | None = None, suffixes: list[list[int]] | None = None) -> Interpreter:
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
        cfg = RunConfig(max_new_tokens=max_new_tokens, eos_token_ids=tuple(self.eos), seed=seed,
                        tokenizer=self.tokenizer, stop_token_ids=tuple(stop_token_ids),
                        branch_providers=dict(branch_providers or {}), trace=trace,
                        draft_models=dict(self.draft_runners), draft_heads=dict(self.draft_heads),
                        corpora=dict(self.corpora))
        if self.canvas is not None:
            cfg.suffixes = [list(x) for x in suffixes] if suffixes is not None else None
            cfg.pad_token_id = self.canvas.pad_id
            return Interpreter(self.program, self.canvas, cfg)
        if suffixes is not None:
            raise InputError("suffixes (infilling) need a masked-diffusion decoder; a causal LM decodes left to right")
        return self._causal().interpreter(self.program, cfg, draft=draft, tokenizer=self.tokenizer)
