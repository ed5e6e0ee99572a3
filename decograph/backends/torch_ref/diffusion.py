"""The torch reference runtime for unmask programs on masked-diffusion LMs.

Each row is a canvas: its prompt, then ``max_new_tokens`` mask tokens, then (infilling) its
suffix, if one was given. Every iteration takes
the row's current block (``draft.mask(k)``: the first block of ``k`` canvas positions that
still holds a mask; ``k=0``: the whole generation), runs the model bidirectionally
(``forward(mask=block)``), picks positions to unmask by confidence (the max softmax
probability; ``unmask.*``) and writes their argmax tokens (``commit``). A step always
unmasks at least one position, so a row ends after at most ``max_new_tokens`` steps.

EOS (when the loop stops at ``eos``): once EOS is committed at position p, the positions
after p are EOS padding (LLaDA's convention) and never decoded; the row ends when every
position before p is decoded, and its output ends with that EOS.

KV (``commit(kv=...)``), Fast-dLLM's block-wise approximate cache:
- ``recompute``: every step is a forward over the whole canvas.
- ``block_approx`` (prefix cache): the first step of a block runs the whole canvas and keeps
  every position's KV; the block's later steps run the block and everything after it,
  attending to the kept KV of the positions before the block.
- ``block_approx_dual`` (dual cache): the later steps run only the block, attending to the
  kept KV of the positions before and after it.
The kept KV is refreshed when the block completes (the next block's first step).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from decograph.backends.torch_ref.interp import Event, RunConfig
from decograph.backends.torch_ref.kernels import unmask_confidence
from decograph.errors import InputError, UnsupportedError
from decograph.frontends.diffusion import MaskedDiffusionAdapter
from decograph.ir import ops as O

__all__ = ["DiffusionInterpreter", "DiffRow", "select_unmask"]


@dataclass
class DiffRow:
    """One prompt's canvas and what decoding it cost (the fields ``api`` reads off a row)."""

    index: int
    prompt: list[int]
    gen: list[int]                          # the generation: tokens, the mask id where undecoded
    limit: int                              # positions >= limit are after EOS (never decoded)
    finish_reason: str | None = None
    forwards: int = 0
    steps: int = 0
    accepted: list[int] = field(default_factory=list)      # positions unmasked per step
    drafted: list[int] = field(default_factory=list)       # masked candidates per step
    query_tokens: int = 0
    kv_bytes_copied: int = 0
    emitted: int = 0
    order: list[list[int]] = field(default_factory=list)   # per step: the positions it unmasked
    results: list[Any] = field(default_factory=list)

    @property
    def new_tokens(self) -> list[int]:
        return self.gen[:self.limit + 1] if self.limit < len(self.gen) else list(self.gen)


@dataclass
class _State:
    rows: list[DiffRow]

    @property
    def active(self) -> list[DiffRow]:
        return [r for r in self.rows if r.finish_reason is None]


def select_unmask(op: O.Op, conf: torch.Tensor) -> list[int]:
    """Indices (into ``conf``, candidates in position order) that ``op`` unmasks; never empty."""
    c = conf.tolist()                            # one host copy, not a tensor read per comparison
    n = len(c)
    if n == 0:
        return []
    order = sorted(range(n), key=lambda i: (-c[i], i))
    if isinstance(op, O.UnmaskTopkPerStep):
        return sorted(order[:op.k])
    if isinstance(op, O.UnmaskThreshold):
        if op.contiguous:
            run = 0
            while run < n and c[run] > op.threshold:
                run += 1
            return list(range(max(run, 1)))
        picked = [i for i in range(n) if c[i] > op.threshold]
        return picked or [order[0]]
    if isinstance(op, O.UnmaskFactor):
        best = 1
        for m in range(1, n + 1):
            if (m + 1) * (1.0 - c[order[m - 1]]) < op.factor:
                best = m
        return sorted(order[:best])
    raise UnsupportedError(f"unmask rule {op.NAME} is not supported")


class DiffusionInterpreter:
    """Runs one unmask program for one batch of prompts (same interface as ``Interpreter``)."""

    def __init__(self, program: O.Program, adapter: MaskedDiffusionAdapter, config: RunConfig) -> None:
        self.program, self.adapter, self.cfg = program, adapter, config
        loops = [op for op in program.body.ops if isinstance(op, O.Iterate)]
        if len(loops) != 1:
            raise UnsupportedError(f"strategy {program.name!r}: a masked-diffusion model runs one iterate loop "
                                   f"of draft.mask, forward, unmask, commit; found {len(loops)} loops")
        self.loop = loops[0]
        body = [op for op in self.loop.body.ops if not isinstance(op, O.Yield)]
        kinds = [type(op) for op in body]
        draft = [op for op in body if isinstance(op, O.DraftMask)]
        unmask = [op for op in body if isinstance(op, O.UNMASK_OPS)]
        commit = [op for op in body if isinstance(op, O.Commit)]
        for op in list(program.body.ops) + body:
            if not isinstance(op, (O.Prefill, O.Iterate, O.Emit, O.DraftMask, O.Forward, O.Commit) + O.UNMASK_OPS):
                raise UnsupportedError(f"strategy {program.name!r}: step `{op.NAME}` cannot run on a masked-diffusion "
                                       f"model (it needs a causal LM)")
        if len(draft) != 1 or len(unmask) != 1 or len(commit) != 1 or kinds.count(O.Forward) != 1:
            raise UnsupportedError(f"strategy {program.name!r} needs exactly one draft.mask, forward(mask=block), "
                                   f"unmask.* and commit per step to run on a masked-diffusion model")
        self.draft, self.unmask, self.commit = draft[0], unmask[0], commit[0]
        if self.commit.kv in ("block_approx", "block_approx_dual") and not adapter.supports_kv:
            raise UnsupportedError(f"commit(kv={self.commit.kv}) needs a model with a KV interface; {adapter.name} has "
                                   f"none: use kv=recompute")
        if self.commit.kv == "keep_accepted":
            raise UnsupportedError("commit(kv=keep_accepted) is exact only for causal forwards; a block forward "
                                   "uses recompute, block_approx or block_approx_dual")
        self._confidence = config.kernels.get("unmask.confidence") or unmask_confidence
        self.mask_id = adapter.mask_token_id if self.draft.mask_token < 0 else self.draft.mask_token
        self.eos = set(config.eos_token_ids) if "eos" in self.loop.until else set()
        self.state: _State | None = None
        self.wall = 0.0
        self._kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._kv_block: dict[int, int] = {}
        self._plans: dict[tuple[Any, ...], tuple[Any, ...]] = {}

    # -- running ---------------------------------------------------------------------------

    def run(self, prompts: list[list[int]]) -> Iterator[Event]:
        start = time.perf_counter()
        try:
            yield from self._run(prompts)
        finally:
            self.wall = time.perf_counter() - start

    def _run(self, prompts: list[list[int]]) -> Iterator[Event]:
        n = self.cfg.max_new_tokens
        rows = [DiffRow(i, list(p), [self.mask_id] * n, n) for i, p in enumerate(prompts)]
        for r in rows:
            if self.mask_id in r.prompt:
                raise InputError(f"prompt {r.index} contains the mask token id {self.mask_id}")
        self.state = _State(rows)
        self._kv, self._kv_block, self._plans = None, {}, {}      # nothing kept from an earlier run
        if self.cfg.trace is not None:
            self.cfg.trace.extend({"kind": "prefill", "row": r.index, "prompt_len": len(r.prompt)} for r in rows)
        width = max(len(p) for p in prompts)
        self.width = width
        suffixes = self.cfg.suffixes or [[] for _ in prompts]
        if len(suffixes) != len(prompts):
            raise InputError(f"{len(suffixes)} suffixes for {len(prompts)} prompts: give one per prompt")
        if any(self.mask_id in sfx for sfx in suffixes):
            raise InputError(f"a suffix contains the mask token id {self.mask_id}")
        tail = max(len(sfx) for sfx in suffixes)
        limit = self.adapter.max_positions
        if limit and width + n + tail > limit:
            raise InputError(f"a prompt of {width} tokens plus {n} masked positions and a suffix of {tail} exceeds "
                             f"the model's {limit} positions")
        pad = self.cfg.pad_token_id
        self.ids = torch.full((len(rows), width + n + tail), pad, dtype=torch.long)
        self.valid = torch.zeros(len(rows), width + n + tail, dtype=torch.bool)
        for r, sfx in zip(rows, suffixes):
            self.ids[r.index, width - len(r.prompt):width] = torch.tensor(r.prompt)
            self.valid[r.index, width - len(r.prompt):width + n + len(sfx)] = True
            self.ids[r.index, width:width + n] = self.mask_id
            if sfx:                                     # infilling: the text after the masked span
                self.ids[r.index, width + n:width + n + len(sfx)] = torch.tensor(sfx)
        self.pos = (self.valid.long().cumsum(1) - 1).clamp_min(0)
        for r in rows:
            if n == 0:
                r.finish_reason = "max_new_tokens"
                yield Event(r.index, (), True)
        steps = 0
        while self.state.active and (self.loop.max_steps == 0 or steps < self.loop.max_steps):
            yield from self._step(self.state.active)
            steps += 1

    def _block(self, r: DiffRow) -> tuple[int, int]:
        k = self.draft.k or len(r.gen)
        first = next(g for g in range(r.limit) if r.gen[g] == self.mask_id)
        s = first // k * k
        return s, min(s + k, len(r.gen))

    def _step(self, active: list[DiffRow]) -> Iterator[Event]:
        blocks = {r.index: self._block(r) for r in active}
        logits = self._logits(active, blocks)
        for r in active:
            s, e = blocks[r.index]
            cand = [g for g in range(s, min(e, r.limit)) if r.gen[g] == self.mask_id]
            # the max softmax probability and the argmax, never the mask token itself
            conf, tok = self._confidence(logits[r.index][[g - s for g in cand]], self.mask_id)
            chosen = select_unmask(self.unmask, conf)
            picked = [cand[i] for i in chosen]
            for i, g in zip(chosen, picked):
                t = int(tok[i])
                r.gen[g] = t
                self.ids[r.index, self.width + g] = t
                if t in self.eos and g < r.limit:
                    r.limit = g
            if r.limit < len(r.gen):                     # after EOS: EOS padding, never decoded
                fill = r.gen[r.limit]
                for g in range(r.limit + 1, len(r.gen)):
                    r.gen[g] = fill
                self.ids[r.index, self.width + r.limit + 1:self.width + len(r.gen)] = fill
            record = None if self.cfg.trace is None else self._record(
                r, (s, e), picked, [int(tok[i]) for i in chosen], [float(conf[i]) for i in chosen], len(cand))
            r.steps += 1
            r.accepted.append(len(picked))
            r.drafted.append(len(cand))
            r.order.append(picked)
            events = list(self._emit(r))
            if record is not None:
                record["committed"] = r.gen[record["start"]:r.emitted]
            yield from events

    def _record(self, r: DiffRow, block: tuple[int, int], picked: list[int], toks: list[int], conf: list[float],
                masked: int) -> dict[str, Any]:
        """Row ``r``'s trace record of this step, appended to the trace: the block, the positions
        unmasked with their tokens and confidences, the masked candidates the block had, the
        masks left before the row's end (``limit``: EOS position or budget) after it;
        ``committed`` (tokens newly final from ``start``) is filled in once emitted."""
        assert self.cfg.trace is not None
        left = sum(1 for g in range(r.limit) if r.gen[g] == self.mask_id)
        record = {"kind": "unmask", "row": r.index, "step": r.steps, "block": list(block), "positions": picked,
                  "tokens": toks, "confidence": [round(c, 6) for c in conf], "masked": masked,
                  "masked_left": left, "limit": r.limit, "start": r.emitted, "committed": []}
        self.cfg.trace.append(record)
        return record

    def _emit(self, r: DiffRow) -> Iterator[Event]:
        end = next((g for g in range(r.limit) if r.gen[g] == self.mask_id), None)
        done = end is None
        if done:
            end = min(r.limit + 1, len(r.gen))
            r.finish_reason = "eos" if r.limit < len(r.gen) else "max_new_tokens"
        if end > r.emitted or done:
            yield Event(r.index, tuple(r.gen[r.emitted:end]), done)
            r.emitted = end

    # -- forwards --------------------------------------------------------------------------

    def _logits(self, active: list[DiffRow], blocks: dict[int, tuple[int, int]]) -> dict[int, torch.Tensor]:
        """Per active row: logits for its block's positions ``[e - s, V]`` (shift applied)."""
        shift = int(self.adapter.shift_logits)
        out: dict[int, torch.Tensor] = {}
        kv = self.commit.kv
        fresh = [r for r in active if kv == "recompute" or self._kv_block.get(r.index) != blocks[r.index][0]]
        cached = [r for r in active if r not in fresh]
        if fresh:
            idx = torch.tensor([r.index for r in fresh])
            at = self._block_columns([blocks[r.index] for r in fresh], shift)
            lg, new_kv = self.adapter.forward(self.ids[idx], self.pos[idx], self.valid[idx], return_kv=kv != "recompute",
                                              logits_at=at)
            if new_kv is not None:
                self._store(idx, new_kv)
            for j, r in enumerate(fresh):
                s, e = blocks[r.index]
                out[r.index] = lg[j, :e - s]
                self._kv_block[r.index] = s
                r.forwards += 1
                r.query_tokens += int(self.valid[r.index].sum())
        if cached:
            out.update(self._cached(cached, blocks, shift))
        return out

    def _block_columns(self, blocks: list[tuple[int, int]], shift: int) -> torch.Tensor:
        """Per row, the canvas columns whose logits predict its block (padded by repeating)."""
        w = max(e - s for s, e in blocks)
        return torch.stack([torch.arange(s, s + w).clamp_max(e - 1) + self.width - shift for s, e in blocks])

    def _store(self, idx: torch.Tensor, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        if self._kv is None:
            n = len(self.state.rows) if self.state else 0
            self._kv = [(k.new_zeros((n,) + k.shape[1:]), v.new_zeros((n,) + v.shape[1:])) for k, v in kv]
        for (ck, cv), (k, v) in zip(self._kv, kv):
            ck[idx], cv[idx] = k, v

    def _cached(self, rows: list[DiffRow], blocks: dict[int, tuple[int, int]], shift: int) -> dict[int, torch.Tensor]:
        assert self._kv is not None
        key = tuple((r.index, blocks[r.index]) for r in rows)
        plan = self._plans.get(key)
        if plan is None:                   # the same for every step of these rows' blocks: built once
            plan = self._plans[key] = self._cached_plan(rows, blocks, shift)
        idx, cols, pos, qvalid, cvalid, at, every = plan
        ctx = self._kv if every else [(k[idx], v[idx]) for k, v in self._kv]     # no copy when all rows run
        lg, _ = self.adapter.forward(self.ids[idx].gather(1, cols), pos, qvalid, context=ctx, context_valid=cvalid,
                                     logits_at=at)
        out = {}
        for j, r in enumerate(rows):
            s, e = blocks[r.index]
            out[r.index] = lg[j, :e - s]
            r.forwards += 1
            r.query_tokens += int(qvalid[j].sum())
        return out

    def _cached_plan(self, rows: list[DiffRow], blocks: dict[int, tuple[int, int]], shift: int) -> tuple[Any, ...]:
        """What a cached step of ``rows`` at ``blocks`` reads: the rows, the query columns, their
        positions and validity, the context's validity (the query's own columns excluded), the
        block's logit columns, and whether every row runs (the kept KV is then used as is)."""
        total = self.ids.shape[1]
        dual = self.commit.kv == "block_approx_dual"
        starts = [self.width + blocks[r.index][0] - shift for r in rows]
        ends = [self.width + blocks[r.index][1] if dual else total for r in rows]
        w = max(e - s for s, e in zip(starts, ends))
        cols = torch.stack([torch.arange(s, s + w) for s in starts])
        inside = cols < torch.tensor(ends)[:, None]
        cols = cols.clamp_max(total - 1)
        idx = torch.tensor([r.index for r in rows])
        pos = self.pos[idx].gather(1, cols)
        qvalid = inside & self.valid[idx].gather(1, cols)
        span = torch.arange(total)[None, :]
        in_query = (span >= torch.tensor(starts)[:, None]) & (span < torch.tensor(ends)[:, None])
        cvalid = self.valid[idx] & ~in_query
        every = len(rows) == self.ids.shape[0] and idx.tolist() == list(range(len(rows)))
        at = torch.stack([torch.arange(w).clamp_max(e - s - 1) for s, e in (blocks[r.index] for r in rows)])
        return idx, cols, pos, qvalid, cvalid, at, every
