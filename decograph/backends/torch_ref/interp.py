"""The torch reference interpreter: runs any verified program on a causal-LM adapter.

It walks the program's ops in order, binding each SSA value to a runtime object; the
``iterate`` body runs until every row is done. Rows are ragged: each accepts its own number
of tokens per step and leaves the batch when it hits EOS, a stop token or its budget.

``run`` is a generator of ``Event``s (one per row per step that committed tokens), so that
streaming and the plain API share one loop.
"""
from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from decograph.passes.cost import DEFAULT_CURVE, CostCurve
from decograph.backends.torch_ref.batch import BatchState, DraftTree, Row, StepLayout
from decograph.backends.torch_ref.branches import JOIN_RULES, Branch, find_branches
from decograph.backends.torch_ref.layouts import Forwarded, collapse, run_forward
from decograph.backends.torch_ref.drafts import DraftSource, make_source
from decograph.backends.torch_ref.verify import greedy_walk, process_logits, sampling_walk, threshold_walk
from decograph.errors import UnsupportedError
from decograph.frontends.adapters import CausalLMAdapter
from decograph.ir import ops as O

__all__ = ["Event", "RunConfig", "Interpreter"]


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
    draft_models: dict[str, Any] = field(default_factory=dict)
    cost_curve: CostCurve = DEFAULT_CURVE
    tokenizer: Any = None               # for text branch prompts (draft.branches)
    branch_providers: dict[str, Any] = field(default_factory=dict)   # draft.branches(provider=NAME)
    kernels: dict[str, Any] = field(default_factory=dict)            # a backend's kernel slots
    suffixes: list[list[int]] | None = None     # diffusion infilling: text after the masked span
    trace: list | None = None           # a list: one JSON-ready record per top-level row per step


@dataclass
class _Drafted:
    source: DraftSource
    chains: list[list[list[int]]]        # per active row: chains


@dataclass
class _Branched:
    op: O.DraftBranches
    branches: list[list[Branch]]         # per active row


@dataclass
class _Accepted:
    forwarded: Forwarded
    paths: list[tuple[list[int], int]]   # per active row: accepted node ids, bonus token


def _trace_step(fwd: Forwarded, b: int, row: Row, path: list[int], bonus: int, committed: list[int],
                start: int) -> dict[str, Any]:
    """The trace record of row ``b``'s step (before its counters move): the draft tree (tokens,
    parent pointers, and per node the draft op and chain that first proposed it), the accepted
    node ids and tokens, the bonus token, what was committed after EOS/budget clipping and the
    position in the generated sequence where it starts. Ints, strings and lists only."""
    tree = fwd.trees[b]
    source, chain = [-1] * len(tree), [-1] * len(tree)
    k = 0
    for d, per_draft in enumerate(fwd.nodes):
        for ids in per_draft[b]:
            for node in ids:
                if source[node] < 0:
                    source[node], chain[node] = d, k
            k += 1
    return {"kind": "step", "row": row.index, "step": row.steps, "start": start,
            "draft": {"tokens": [int(t) for t in tree.tokens], "parent": list(tree.parent), "source": source,
                      "chain": chain},
            "sources": [d.source.op.NAME for d in fwd.drafts],
            "accepted": {"nodes": list(path), "tokens": [int(tree.tokens[i]) for i in path]},
            "bonus": int(bonus), "committed": [int(t) for t in committed], "done": row.done,
            "finish_reason": row.finish_reason or None}


class Interpreter:
    """Runs one program for one batch of prompts."""

    def __init__(self, program: O.Program, adapter: CausalLMAdapter, config: RunConfig) -> None:
        self.program, self.adapter, self.cfg = program, adapter, config
        self.sources: dict[int, DraftSource] = {}
        for op in program.walk():
            if isinstance(op, O.DRAFT_OPS) and not isinstance(op, O.DraftBranches):
                self.sources[id(op)] = make_source(op, config.draft_models)
                self.sources[id(op)].cost = config.cost_curve
            elif isinstance(op, O.UNMASK_OPS):
                raise UnsupportedError(f"{op.NAME} needs a masked-diffusion model, the model is a causal LM")
            elif isinstance(op, O.Commit) and op.kv in ("block_approx", "block_approx_dual"):
                raise UnsupportedError(f"commit(kv={op.kv}) applies to masked-diffusion models only")
        # No seed: a fresh one per run, so unseeded sampling really varies between calls.
        seed = config.seed if config.seed is not None else secrets.randbits(63)
        self.gen = torch.Generator().manual_seed(seed)
        self.stop = set(config.stop_token_ids)
        loops = [op for op in program.walk() if isinstance(op, O.Iterate)]
        self.eos = set(config.eos_token_ids) if any("eos" in op.until for op in loops) else set()
        self.state: BatchState | None = None
        self.wall = 0.0

    def run(self, prompts: list[list[int]]) -> Iterator[Event]:
        """Decode every prompt; yields commit events; ``self.state`` holds the rows after."""
        start = time.perf_counter()
        env: dict[int, Any] = {id(self.program.prompt): prompts}
        try:
            yield from self._block(self.program.body.ops, env)
        finally:
            self.wall = time.perf_counter() - start

    def _block(self, ops: tuple[O.Op, ...], env: dict[int, Any]) -> Iterator[Event]:
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

    def _iterate(self, op: O.Iterate, env: dict[int, Any]) -> Iterator[Event]:
        state: BatchState = env[id(op.init)]
        steps = 0
        while state.active and (op.max_steps == 0 or steps < op.max_steps):
            env[id(op.body.params[0])] = state
            yield from self._block(op.body.ops, env)
            state = env["yield"]
            state.steps += 1
            steps += 1
        return state

    def _eval(self, op: O.Op, env: dict[int, Any]) -> Any:
        if isinstance(op, O.Prefill):
            return self._prefill(env[id(op.prompt)])
        if isinstance(op, O.DraftBranches):
            state = env[id(op.state)]
            tok = self.cfg.tokenizer if self.cfg.tokenizer is not None else getattr(self.adapter, "tokenizer", None)
            found = [find_branches(op, r, tok, self.cfg.branch_providers) for r in state.active]
            return _Branched(op, found)
        if isinstance(op, O.Fork):
            return self._fork(env[id(op.state)], env[id(op.branches)])
        if isinstance(op, O.DRAFT_OPS):
            state: BatchState = env[id(op.state)]
            src = self.sources[id(op)]
            return _Drafted(src, [src.propose(r, r.remaining - 1) for r in state.active])
        if isinstance(op, O.Forward):
            drafts = [env[id(d)] for d in op.drafts]
            return run_forward(op, env[id(op.state)], drafts, self.cfg.cost_curve, self.cfg.pad_token_id)
        if isinstance(op, O.VERIFY_OPS):
            return self._verify(op, env[id(op.logits)])
        if isinstance(op, O.Emit):
            return [r.new_tokens for r in env[id(op.state)].rows]
        raise UnsupportedError(f"{op.NAME} is not supported by the torch reference backend")

    def _prefill(self, prompts: list[list[int]]) -> BatchState:
        rows = [Row(i, list(p), len(p), self.cfg.max_new_tokens) for i, p in enumerate(prompts)]
        for r in rows:
            if r.max_new <= 0:
                r.done, r.finish_reason = True, "max_new_tokens"
        if self.cfg.trace is not None:
            self.cfg.trace.extend({"kind": "prefill", "row": r.index, "prompt_len": r.n_prompt} for r in rows)
        state = self.state = BatchState(self.adapter, rows)
        if getattr(self.adapter, "supports_attention_kernel", False):
            state.attention = self.cfg.kernels.get("attention")
        if getattr(self.adapter, "supports_compact_kernel", False):
            state.compact = self.cfg.kernels.get("kv.compact")
        if state.active and max(len(r.tokens) for r in state.active) > 1:
            saved = [r.tokens for r in state.active]
            for r in state.active:
                r.tokens = r.tokens[:-1]      # the last prompt token is the first root
            width = max(len(r.pending) for r in state.active)
            layout = StepLayout(state.active, [DraftTree() for _ in state.active], width)
            state.forward(layout, self.cfg.pad_token_id)
            for b, r in enumerate(state.active):
                state.keep_slots(b, list(range(len(r.tokens))))
                r.cached = len(r.tokens)
                r.prefill_forwards = int(bool(r.tokens))
            for r, toks in zip(state.active, saved):
                r.tokens = toks
                r.forwards = r.prefill_forwards      # rows with nothing to prefill took no part
            state.settle()
        return state

    def _verify(self, op: O.Op, fwd: Forwarded) -> _Accepted:
        paths = []
        greedy = isinstance(op, O.VerifyGreedy)
        kernel = self.cfg.kernels.get("verify.greedy")
        for b, tree in enumerate(fwd.trees):
            if greedy and kernel is not None:           # the backend's fused argmax + compare
                toks = torch.tensor([0] + tree.tokens)
                parents = torch.tensor([-1] + [p + 1 for p in tree.parent])
                argmax, _ = kernel(fwd.rows_of(b), toks, parents)
                paths.append(greedy_walk(tree, argmax.tolist()))
                continue
            if greedy:
                paths.append(greedy_walk(tree, fwd.argmax_of(b)))
                continue
            rows = fwd.rows_of(b)
            if isinstance(op, O.VerifySampling):
                probs = process_logits(rows, op.temperature, op.top_k, op.top_p)
                paths.append(sampling_walk(tree, probs, self.gen))
            else:
                paths.append(threshold_walk(tree, torch.softmax(rows.float(), -1), op.threshold))
        return _Accepted(fwd, paths)

    def _commit(self, op: O.Commit, env: dict[int, Any]) -> Iterator[Event]:
        state: BatchState = env[id(op.state)]
        acc: _Accepted = env[id(op.accepted)]
        fwd = acc.forwarded
        collapse(state, fwd, [p for p, _ in acc.paths])
        events = []
        for b, (row, (path, bonus)) in enumerate(zip(fwd.rows, acc.paths)):
            tree = fwd.trees[b]
            slots = list(fwd.pend_slots[b])
            row.cached += len(slots)
            if op.kv == "keep_accepted":
                slots += [fwd.node_slots[b][i] for i in path]
                row.cached += len(path)
            start = len(row.tokens) - row.n_prompt
            committed = self._append(row, [tree.tokens[i] for i in path] + [bonus])
            if self.cfg.trace is not None and row.branch < 0:
                self.cfg.trace.append(_trace_step(fwd, b, row, path, bonus, committed, start))
            if row.branch >= 0 and committed:
                self._logprobs(fwd, b, row, path, committed)
            state.keep_slots(b, slots)
            row.accepted.append(len(path))
            row.drafted.append(len(tree))
            row.steps += 1
            self._observe(fwd, b, row, len(committed))
            if row.branch < 0:
                events.append(Event(row.index, tuple(committed), row.done))
        state.settle(copy=op.rollback == "copy")
        for e in events:
            yield e
        return state

    def _logprobs(self, fwd: Forwarded, b: int, row: Row, path: list[int], committed: list[int]) -> None:
        """log p of each committed token of branch row ``b`` (for joins that rank branches)."""
        at = [fwd.at[b][0]] + [fwd.at[b][1 + i] for i in path]
        logp = torch.log_softmax(fwd.flat[torch.tensor(at[: len(committed)])].float(), dim=-1)
        row.logprobs += logp[torch.arange(len(committed)), torch.tensor(committed)].tolist()

    def _fork(self, state: BatchState, found: _Branched) -> BatchState:
        """Every active row becomes its branches: rows of their own that share its KV."""
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

    def _join(self, op: O.Join, env: dict[int, Any]) -> Iterator[Event]:
        """Each forked row takes back its branches by ``op.rule``; ``concat`` appends to it."""
        state: BatchState = env[id(op.state)]
        rule = JOIN_RULES[op.rule]
        tok = self.cfg.tokenizer if self.cfg.tokenizer is not None else getattr(self.adapter, "tokenizer", None)
        ends = self.eos | self.stop
        events = []
        branch_rows = state.join()
        for row, branches in zip(list(state.active), branch_rows):
            new = rule(row, branches, tok, ends)[: max(0, row.remaining)]
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

    def _observe(self, fwd: Forwarded, b: int, row: Row, committed: int) -> None:
        if not fwd.drafts or row.done:
            return
        argmax = fwd.argmax_of(b)
        preds_all = [[argmax[0]] + [argmax[1 + i] for i in ids] for d in fwd.nodes for ids in d[b]]
        chains_all = [c for d in fwd.drafts for c in d.chains[b]]
        k = 0
        for d, ids in zip(fwd.drafts, fwd.nodes):
            n = len(ids[b])
            if d.source.observes_all:
                d.source.observe(row, chains_all, preds_all, committed)
            else:
                d.source.observe(row, d.chains[b], preds_all[k : k + n], committed)
            k += n
