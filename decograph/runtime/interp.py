"""The one interpreter of optimized programs: runs any verified program on any backend.

It walks the program's ops in order, binding each SSA value to a runtime object; the
``iterate`` body runs until every row is done. Rows are ragged: each accepts its own number
of tokens per step and leaves the batch when it hits EOS, a stop token or its budget. What a
step feeds and keeps is decided here; the backend runs it through the step protocol
(``decograph.runtime.protocol``), so drafting, verification, commit and fork/join rules have
one implementation for every backend. No torch: the exported decoder runs this module too.

``run`` is a generator of ``Event``s (one per row per step that committed tokens), so that
streaming and the plain API share one loop.
"""
from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

from decograph.errors import UnsupportedError
from decograph.ir import ops as O
from decograph.passes.cost import DEFAULT_CURVE, CostCurve
from decograph.runtime.branches import Branch, find_branches, join_rule
from decograph.runtime.drafts import DraftSource, make_source
from decograph.runtime.protocol import Batch, CanvasBatch, Engine, StepOutput, StepPlan
from decograph.runtime import denoise as dn
from decograph.runtime.rows import DraftTree, Row
from decograph.runtime.source import Drafted, clock, fit_drafts, one_chain, propose
from decograph.runtime.trace import trace_step
from decograph.runtime.unmask import (Blocks, BlockForward, UnmaskLoop, Unmasked, commit_canvases, pick_unmask,
                                      start_canvases, unmask_loop)
from decograph.runtime.verify import log_softmax, verify_tree

__all__ = ["Admission", "Event", "RunConfig", "Interpreter"]


@dataclass(frozen=True)
class Event:
    """Tokens committed to row ``row`` (caller order) in one step; ``done`` on its last event."""

    row: int
    tokens: tuple[int, ...]
    done: bool


@dataclass
class RunConfig:
    """Run-time options that are not part of the strategy program."""

    max_new_tokens: int = 128
    eos_token_ids: tuple[int, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0
    seed: int | None = None
    draft_models: dict[str, Any] = field(default_factory=dict)   # name -> a backend's draft runner
    draft_heads: dict[str, Any] = field(default_factory=dict)    # draft.head(head=NAME) -> a head runner
    corpora: dict[str, Any] = field(default_factory=dict)        # draft.corpus(corpus=NAME) -> a ``Corpus``
    cost_curve: CostCurve = DEFAULT_CURVE
    tokenizer: Any = None               # for text branch prompts (draft.branches)
    branch_providers: dict[str, Any] = field(default_factory=dict)   # draft.branches(provider=NAME)
    kernels: dict[str, Any] = field(default_factory=dict)            # a backend's kernel slots
    suffixes: list[list[int]] | None = None     # diffusion infilling: text after the masked span
    trace: list | None = None           # a list: one JSON-ready record per top-level row per step
    drafts: bool = True                 # False: every draft source proposes nothing (plain decoding)
    # Continuous batching: called between two steps of the top-level loop with ``idle`` (no
    # row left); returns ``Admission``: rows to take in, row indices to cancel. Returning
    # nothing while idle ends the run.
    admit: Callable[[bool], "Admission"] | None = None


@dataclass
class Admission:
    """What joins and what leaves a running batch at a step boundary: ``new`` rows as
    ``(index, prompt ids, max_new_tokens)`` (``index`` is the row's id in the events; unique
    among rows alive), optionally a fourth item, the row's ``RowSampling``; ``cancel`` the
    indices of rows to drop now (their cache rows freed)."""

    new: list[tuple[Any, ...]] = field(default_factory=list)
    cancel: list[int] = field(default_factory=list)


@dataclass
class _Branched:
    op: O.DraftBranches
    branches: list[list[Branch]]         # per active row


@dataclass
class _Forwarded:
    rows: list[Row]
    plan: StepPlan
    drafts: list[Drafted]
    nodes: list[list[list[list[int]]]]   # per draft, per row, per chain: node ids
    pending: list[int]                   # per row: pending tokens fed
    out: StepOutput
    _argmax: dict[int, list[int]] = field(default_factory=dict)

    def argmax(self, b: int) -> list[int]:
        if b not in self._argmax:
            self._argmax[b] = self.out.argmax(b)
        return self._argmax[b]


@dataclass
class _Accepted:
    forwarded: _Forwarded
    paths: list[tuple[list[int], int]]   # per active row: accepted node ids, bonus token


class Interpreter:
    """Runs one program for one batch of prompts on ``engine`` (a backend's step protocol)."""

    def __init__(self, program: O.Program, engine: Engine, config: RunConfig) -> None:
        self.program, self.engine, self.cfg = program, engine, config
        self.sources: dict[int, DraftSource] = {}
        self.unmask: UnmaskLoop | None = None
        self.noise: dn.NoiseLoop | None = None
        if getattr(engine, "canvas", False):          # a masked-diffusion model: the unmask loop
            self.unmask = unmask_loop(program, engine.supports_kv, engine.name)
        elif getattr(engine, "denoiser", False):      # a uniform-noise diffusion model: the denoising loop
            self.noise = dn.noise_loop(program, engine.name)
        for op in (() if self.unmask or self.noise else program.walk()):
            if isinstance(op, (O.DraftNoise,) + O.NOISE_RULES):
                raise UnsupportedError(f"{op.NAME} needs a uniform-noise diffusion model (DiffusionGemma); "
                                       f"the model is a causal LM")
            if isinstance(op, O.DRAFT_OPS) and not isinstance(op, O.DraftBranches):
                src = self.sources[id(op)] = make_source(op, config.draft_models, config.draft_heads,
                                                             config.corpora)
                src.cost, src.max_query = config.cost_curve, getattr(engine, "max_query", None) or 0
                src.min_query = int(getattr(engine, "min_query", 1) or 1)
                src.chains_only = bool(getattr(engine, "chains_only", False))
            elif isinstance(op, O.UNMASK_OPS):
                raise UnsupportedError(f"{op.NAME} needs a masked-diffusion model, the model is a causal LM")
            elif isinstance(op, O.Commit) and op.kv in ("block_approx", "block_approx_dual"):
                raise UnsupportedError(f"commit(kv={op.kv}) applies to masked-diffusion models only")
            elif isinstance(op, O.Join):
                join_rule(op.rule)
        if config.admit is not None and (self.unmask or self.noise
                                         or any(isinstance(op, O.Fork) for op in program.walk())):
            raise UnsupportedError("continuous batching runs causal programs without fork/join; this program "
                                   f"{'unmasks' if self.unmask or self.noise else 'forks'}: run its requests in "
                                   f"batches of their own")
        # No seed: a fresh one per run, so unseeded sampling really varies between calls.
        seed = config.seed if config.seed is not None else secrets.randbits(63)
        self.gen = np.random.default_rng(seed)
        self.stop = set(config.stop_token_ids)
        loops = [op for op in program.walk() if isinstance(op, O.Iterate)]
        self.eos = set(config.eos_token_ids) if any("eos" in op.until for op in loops) else set()
        self.state: Batch | None = None
        self.wall = 0.0
        self.adapter: Any = None            # the caller's model adapter, when it keeps statistics on it
        self.hidden = [s for s in self.sources.values() if s.hidden_tail]    # sources fed hidden states
        self._queued: dict[int, int] = {}   # id(row) -> draft tokens proposed so far this step
        self._unit = 0.0                    # measured seconds per unit of forward cost (``clock``)

    @property
    def tokenizer(self) -> Any:
        return self.cfg.tokenizer if self.cfg.tokenizer is not None else getattr(self.engine, "tokenizer", None)

    def run(self, prompts: list[list[int]]) -> Iterator[Event]:
        """Decode every prompt; yields commit events; ``self.state`` holds the rows after."""
        start = time.perf_counter()
        env: dict[Any, Any] = {id(self.program.prompt): prompts}
        try:
            yield from self._block(self.program.body.ops, env)
        finally:
            self.wall = time.perf_counter() - start

    def _block(self, ops: tuple[O.Op, ...], env: dict[Any, Any]) -> Iterator[Event]:
        for op in ops:
            if isinstance(op, O.Iterate):
                env[id(op.result)] = yield from self._iterate(op, env)
            elif isinstance(op, O.Commit):
                env[id(op.result)] = yield from self._commit(op, env)
            elif isinstance(op, O.Join):
                env[id(op.result)] = yield from self._join(op, env)
            elif isinstance(op, O.Yield):
                env["yield"] = env[id(op.value)]
            else:
                env[id(op.result)] = self._eval(op, env)

    def _iterate(self, op: O.Iterate, env: dict[Any, Any]) -> Iterator[Event]:
        state: Batch = env[id(op.init)]
        steps = 0
        admit = self.cfg.admit if any(o is op for o in self.program.body.ops) else None
        while True:
            if admit is not None:
                yield from self._admit(state, admit)
            if not state.active or (op.max_steps and steps >= op.max_steps):
                break
            env[id(op.body.params[0])] = state
            yield from self._block(op.body.ops, env)
            state = env["yield"]
            steps += 1
        return state

    def _admit(self, state: Batch, admit: Callable[[bool], Admission]) -> Iterator[Event]:
        """One step boundary of continuous batching: cancelled rows leave (cache rows freed),
        new rows join (their prompts prefilled by the backend). Finished rows are forgotten, so
        a long-running batch keeps only its live rows."""
        got = admit(not state.active)
        if got.cancel:
            gone = set(got.cancel)
            for r in state.active:
                if r.index in gone:
                    r.done, r.finish_reason = True, "cancelled"
            state.settle()
        state.rows[:] = [r for r in state.rows if not r.done]
        if got.new:
            rows = [Row(i, list(p), len(p), n, sampling=rest[0] if rest else None) for i, p, n, *rest in got.new]
            if self.cfg.trace is not None:
                self.cfg.trace.extend({"kind": "prefill", "row": r.index, "prompt_len": r.n_prompt} for r in rows)
            state.hidden_tail = max((s.hidden_tail for s in self.hidden), default=0)
            state.admit([r for r in rows if r.max_new > 0])
            self._prefilled(state, [r for r in rows if r.max_new > 0 and not r.done])
            for r in rows:
                if r.max_new <= 0:
                    r.done, r.finish_reason = True, "max_new_tokens"
                    yield Event(r.index, (), True)

    def _eval(self, op: O.Op, env: dict[Any, Any]) -> Any:
        if isinstance(op, O.Prefill):
            if self.unmask is not None:
                return self._canvas(env[id(op.prompt)])
            if self.noise is not None:
                self.state = dn.start_noise(self.engine, env[id(op.prompt)], self.cfg.max_new_tokens, self.eos, self.cfg.trace)
                return self.state
            return self._prefill(env[id(op.prompt)])
        if isinstance(op, O.DraftNoise):
            return dn.draft_noise(env[id(op.state)], op)
        if isinstance(op, O.Forward) and self.noise is not None:
            return dn.denoise(env[id(op.state)], env[id(op.drafts[0])])
        if isinstance(op, O.UNMASK_OPS) and self.noise is not None:
            return (dn.entropy_bound if isinstance(op, O.NOISE_RULES) else dn.confidence_rule)(env[id(op.state)], op, env[id(op.logits)])
        if isinstance(op, O.DraftMask):
            state = env[id(op.state)]
            return Blocks([r.block(op.k, state.mask_id) for r in state.active])
        if isinstance(op, O.Forward) and self.unmask is not None:
            state = env[id(op.state)]
            [blocks] = [env[id(d)] for d in op.drafts]
            rows = list(state.active)
            return BlockForward(rows, blocks.blocks, state.forward(blocks.blocks))
        if isinstance(op, O.UNMASK_OPS):
            return pick_unmask(op, env[id(op.logits)], env[id(op.state)].mask_id)
        if isinstance(op, O.DraftBranches):
            state = env[id(op.state)]
            found = [find_branches(op, r, self.tokenizer, self.cfg.branch_providers) for r in state.active]
            return _Branched(op, found)
        if isinstance(op, O.Fork):
            return self._fork(env[id(op.state)], env[id(op.branches)])
        if isinstance(op, O.DRAFT_OPS):
            state: Batch = env[id(op.state)]
            src = self.sources[id(op)]
            if not self.cfg.drafts:
                return Drafted(src, [[] for _ in state.active])
            src.rows = len(state.active)
            out = Drafted(src, [propose(src, r, self._queued) for r in state.active])
            if src.chains_only:
                out.value = [src.expected(r, c[0]) if c else 0.0 for r, c in zip(state.active, out.chains)]
            return out
        if isinstance(op, O.Forward):
            return self._forward(op, env[id(op.state)], [env[id(d)] for d in op.drafts])
        if isinstance(op, O.VERIFY_OPS):
            return self._verify(op, env[id(op.logits)])
        if isinstance(op, O.Emit):
            return [r.new_tokens for r in env[id(op.state)].rows]
        raise UnsupportedError(f"{op.NAME} is not supported by the runtime on a causal LM")

    def _prefill(self, prompts: list[list[int]]) -> Batch:
        rows = [Row(i, list(p), len(p), self.cfg.max_new_tokens) for i, p in enumerate(prompts)]
        for r in rows:
            if r.max_new <= 0:
                r.done, r.finish_reason = True, "max_new_tokens"
        if self.cfg.trace is not None:
            self.cfg.trace.extend({"kind": "prefill", "row": r.index, "prompt_len": r.n_prompt} for r in rows)
        state = self.state = self.engine.start(rows)
        state.hidden_tail = max((s.hidden_tail for s in self.hidden), default=0)
        state.prefill()
        self._prefilled(state, state.active)
        return state

    def _prefilled(self, state: Batch, rows: list[Row]) -> None:
        """The hidden-state sources take the prompts' last hidden states."""
        for r in rows if self.hidden else ():
            h = state.prefill_hidden(r)
            for s in self.hidden:
                s.take_hidden(r, h, r.cached - len(h))

    def _forward(self, op: O.Forward, state: Batch, drafts: list[Drafted]) -> _Forwarded:
        """Merge every draft's chains into one tree per row (a trie with ``dedup``) and run the
        forward the passes lowered (``op.mask``, ``op.layout``) on the backend."""
        n, self._queued = len(state.active), {}
        if getattr(self.engine, "chains_only", False):
            one_chain(drafts, n)
        caps = self.engine.query_caps(state) if hasattr(self.engine, "query_caps") else None
        cap = getattr(self.engine, "max_query", None)
        if caps is not None:                       # the backend's widest step for each row: drafts cut to fit
            fit_drafts(drafts, [c - len(r.pending) for c, r in zip(caps, state.active)], bool(op.dedup))
        elif cap:                                  # the backend's widest step: drafts cut to fit
            fit_drafts(drafts, [cap - len(r.pending) for r in state.active], bool(op.dedup))
        trees = [DraftTree(dedup=bool(op.dedup)) for _ in range(n)]
        nodes = [[[trees[b].add_chain(c) for c in d.chains[b]] for b in range(n)] for d in drafts]
        chains = [[c for d in drafts for c in d.chains[b]] for b in range(n)]
        chain_nodes = [[ids for per_draft in nodes for ids in per_draft[b]] for b in range(n)]
        plan = StepPlan(op.mask, op.layout, trees, chains, chain_nodes, self.cfg.pad_token_id,
                        hidden=bool(self.hidden) and self.cfg.drafts)
        pending = [len(r.pending) for r in state.active]
        rows = list(state.active)
        start = time.perf_counter()
        out = state.forward(plan)
        width = max((p + len(t) for p, t in zip(pending, trees)), default=1)
        self._unit = clock(self._unit, time.perf_counter() - start, width, n, self.engine, self.cfg.cost_curve,
                           self.sources.values())
        return _Forwarded(rows, plan, drafts, nodes, pending, out)

    def _verify(self, op: O.Op, fwd: _Forwarded) -> _Accepted:
        return _Accepted(fwd, [verify_tree(op, tree, lambda b=b: fwd.argmax(b), lambda b=b: fwd.out.logits(b),
                                           fwd.rows[b].sampling, self.gen) for b, tree in enumerate(fwd.plan.trees)])

    def _commit(self, op: O.Commit, env: dict[Any, Any]) -> Iterator[Event]:
        if self.unmask is not None:
            return (yield from self._commit_canvas(env[id(op.state)], env[id(op.accepted)]))
        if self.noise is not None:
            for row, tokens, done in dn.commit_noise(env[id(op.state)], self.noise.rule, self.cfg.trace):
                yield Event(row, tokens, done)
            return env[id(op.state)]
        state: Batch = env[id(op.state)]
        acc: _Accepted = env[id(op.accepted)]
        fwd = acc.forwarded
        keep = op.kv == "keep_accepted"
        hidden = [fwd.out.hidden(b) for b in range(len(fwd.rows))] if fwd.plan.hidden else None
        first = [row.cached for row in fwd.rows]
        state.commit(fwd.out, [p for p, _ in acc.paths], keep)
        events = []
        for b, (row, (path, bonus)) in enumerate(zip(fwd.rows, acc.paths)):
            tree = fwd.plan.trees[b]
            row.cached += fwd.pending[b] + (len(path) if keep else 0)
            start = len(row.tokens) - row.n_prompt
            committed = self._append(row, [tree.tokens[i] for i in path] + [bonus])
            if self.cfg.trace is not None and row.branch < 0:
                self.cfg.trace.append(trace_step(fwd, b, row, path, bonus, committed, start))
            if row.branch >= 0 and committed:
                self._logprobs(fwd, b, row, path, committed)
            row.accepted.append(len(path))
            row.drafted.append(len(tree))
            row.steps += 1
            if hidden is not None and not row.done:   # the pending tokens', then the accepted nodes'
                h = hidden[b][list(range(fwd.pending[b])) + [fwd.pending[b] + i for i in path]]
                for s in self.hidden:
                    s.take_hidden(row, h, first[b])
            self._observe(fwd, b, row, len(committed))
            if row.branch < 0:
                events.append(Event(row.index, tuple(committed), row.done))
        state.settle(copy=op.rollback == "copy")
        for e in events:
            yield e
        return state

    # -- unmask programs (masked-diffusion models): ``decograph.runtime.unmask`` ----------------

    def _canvas(self, prompts: list[list[int]]) -> CanvasBatch:
        assert self.unmask is not None
        self.state = start_canvases(self.engine, self.unmask, prompts, self.cfg.max_new_tokens, self.cfg.suffixes,
                                    self.cfg.trace)
        return self.state

    def _commit_canvas(self, state: CanvasBatch, acc: Unmasked) -> Iterator[Event]:
        for row, tokens, done in commit_canvases(state, acc, self.eos, self.cfg.trace):
            yield Event(row, tokens, done)
        return state

    def _logprobs(self, fwd: _Forwarded, b: int, row: Row, path: list[int], committed: list[int]) -> None:
        """log p of each committed token of branch row ``b`` (for joins that rank branches)."""
        logits = fwd.out.logits(b)
        at = [0] + [1 + i for i in path]
        logp = log_softmax(logits[at[: len(committed)]])
        row.logprobs += [float(logp[i, t]) for i, t in enumerate(committed)]

    def _fork(self, state: Batch, found: _Branched) -> Batch:
        """Every active row becomes its branches: rows of their own that start from its KV."""
        budget = found.op.max_tokens or self.cfg.max_new_tokens
        rows = []
        for parent, branches in zip(state.active, found.branches):
            mine = []
            for i, br in enumerate(branches):
                toks = parent.tokens + list(br.ids)
                r = Row(parent.index, toks, len(toks), budget, cached=parent.cached, branch=i, parent=parent,
                        prompt=br.prompt, fork_at=len(parent.tokens), meta=dict(br.meta))
                if budget <= 0:
                    r.done, r.finish_reason = True, "max_new_tokens"
                mine.append(r)
            rows.append(mine)
        state.fork(rows)
        return state

    def _join(self, op: O.Join, env: dict[Any, Any]) -> Iterator[Event]:
        """Each forked row takes back its branches by ``op.rule``; ``concat`` appends to it."""
        state: Batch = env[id(op.state)]
        rule = join_rule(op.rule)
        ends = self.eos | self.stop
        events = []
        branch_rows = state.join()
        for row, branches in zip(list(state.active), branch_rows):
            new = rule(row, branches, self.tokenizer, ends)[: max(0, row.remaining)]
            if not new:
                continue
            if self.cfg.trace is not None and row.branch < 0:
                self.cfg.trace.append({"kind": "join", "row": row.index, "step": row.steps,
                                       "start": len(row.tokens) - row.n_prompt, "committed": [int(t) for t in new]})
            row.tokens.extend(new)          # recomputed at the next forward (pending)
            if row.remaining <= 0:
                row.done, row.finish_reason = True, "max_new_tokens"
            if row.branch < 0:
                events.append(Event(row.index, tuple(new), row.done))
        state.settle()
        for e in events:
            yield e
        return state

    def _append(self, row: Row, new: list[int]) -> list[int]:
        """Commit ``new`` to ``row`` honouring EOS, stop tokens and the budget exactly."""
        out: list[int] = []
        for tok in new[: max(0, row.remaining)]:
            out.append(tok)
            if tok in self.eos or tok in self.stop:
                row.done, row.finish_reason = True, "eos" if tok in self.eos else "stop"
                break
        row.tokens.extend(out)
        if not row.done and row.remaining <= 0:
            row.done, row.finish_reason = True, "max_new_tokens"
        return out

    def _observe(self, fwd: _Forwarded, b: int, row: Row, committed: int) -> None:
        if not fwd.drafts or row.done:
            return
        argmax = fwd.argmax(b)
        preds_all = [[argmax[0]] + [argmax[1 + i] for i in ids] for d in fwd.nodes for ids in d[b]]
        chains_all = fwd.plan.chains[b]
        k = 0
        for d, ids in zip(fwd.drafts, fwd.nodes):
            n = len(ids[b])
            if d.source.observes_all:
                d.source.observe(row, chains_all, preds_all, committed)
            else:
                d.source.observe(row, d.chains[b], preds_all[k : k + n], committed)
            k += n
