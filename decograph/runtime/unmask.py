"""The unmask steps of the runtime: masked-diffusion decoding (LLaDA, semi-autoregressive
blocks, Fast-dLLM's threshold and factor rules, LUD), torch-free.

Each row is a canvas: its prompt, then ``max_new_tokens`` mask tokens, then (infilling) its
suffix, if one was given. Every iteration of the program's loop takes the row's current block
(``draft.mask(k)``: the first block of ``k`` canvas positions that still holds a mask; ``k=0``:
the whole generation), asks the backend for the block's confidences and argmax tokens
(``forward(mask=block)``: the max softmax probability, the mask token excluded, computed where
the logits are), picks the positions to unmask (``unmask.*``, ``select_unmask``) and writes
their tokens (``commit``). A step always unmasks at least one position, so a row ends after
at most ``max_new_tokens`` steps.

EOS (when the loop stops at ``eos``): once EOS is committed at position p, the positions after
p are EOS padding (LLaDA's convention) and never decoded; the row ends when every position
before p is decoded, and its output ends with that EOS.

The backend's side is a ``CanvasBatch`` (``decograph.runtime.protocol``): it owns the canvas
and the KV that ``commit(kv=...)`` asks for (``recompute``; Fast-dLLM's block-wise
approximate ``block_approx`` prefix cache and ``block_approx_dual`` dual cache).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from decograph.errors import InputError, UnsupportedError
from decograph.ir import ops as O

__all__ = ["CanvasRow", "UnmaskLoop", "Blocks", "BlockForward", "Unmasked", "select_unmask", "unmask_loop",
           "is_unmask_program", "start_canvases", "pick_unmask", "commit_canvases"]


@dataclass
class CanvasRow:
    """One prompt's canvas and what decoding it cost (the statistics a causal ``Row`` keeps)."""

    index: int
    prompt: list[int]
    gen: list[int]                          # the generation: tokens, the mask id where undecoded
    limit: int                              # positions >= limit are after EOS (never decoded)
    suffix: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    forwards: int = 0
    steps: int = 0
    accepted: list[int] = field(default_factory=list)      # positions unmasked per step
    drafted: list[int] = field(default_factory=list)       # masked candidates per step
    query_tokens: int = 0
    kv_bytes_copied: int = 0
    draft_s: float = 0.0                    # no draft sources: a canvas's drafts are its masks
    emitted: int = 0
    order: list[list[int]] = field(default_factory=list)   # per step: the positions it unmasked
    results: list[Any] = field(default_factory=list)

    @property
    def new_tokens(self) -> list[int]:
        return self.gen[:self.limit + 1] if self.limit < len(self.gen) else list(self.gen)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def block(self, k: int, mask_id: int) -> tuple[int, int]:
        """The generation positions ``[s, e)`` of the first block of ``k`` (0: all) that still
        holds a mask before ``limit``."""
        k = k or len(self.gen)
        first = next(g for g in range(self.limit) if self.gen[g] == mask_id)
        s = first // k * k
        return s, min(s + k, len(self.gen))


def select_unmask(op: O.Op, conf: Sequence[float]) -> list[int]:
    """Indices (into ``conf``, candidates in position order) that ``op`` unmasks; never empty
    (unless there is no candidate)."""
    c = [float(x) for x in conf]
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


def is_unmask_program(program: O.Program) -> bool:
    return any(isinstance(op, (O.DraftMask,) + O.MASK_RULES) for op in program.walk())


@dataclass(frozen=True)
class UnmaskLoop:
    """The one loop of an unmask program and its steps."""

    loop: O.Iterate
    draft: O.DraftMask
    unmask: O.Op
    commit: O.Commit


def unmask_loop(program: O.Program, supports_kv: bool = True, model: str = "the model") -> UnmaskLoop:
    """The program's unmask loop, or an ``UnsupportedError`` naming the step a masked-diffusion
    model cannot run (``supports_kv``: whether the backend's model takes and returns KV)."""
    loops = [op for op in program.body.ops if isinstance(op, O.Iterate)]
    if len(loops) != 1:
        raise UnsupportedError(f"strategy {program.name!r}: a masked-diffusion model runs one iterate loop "
                               f"of draft.mask, forward, unmask, commit; found {len(loops)} loops")
    body = [op for op in loops[0].body.ops if not isinstance(op, O.Yield)]
    for op in list(program.body.ops) + body:
        if isinstance(op, (O.DraftNoise,) + O.NOISE_RULES):
            raise UnsupportedError(f"strategy {program.name!r}: step `{op.NAME}` is uniform-noise diffusion "
                                   f"(DiffusionGemma); {model} is a masked-diffusion model (use draft.mask and an "
                                   f"unmask rule over mask tokens)")
        if not isinstance(op, (O.Prefill, O.Iterate, O.Emit, O.DraftMask, O.Forward, O.Commit) + O.MASK_RULES):
            raise UnsupportedError(f"strategy {program.name!r}: step `{op.NAME}` cannot run on a masked-diffusion "
                                   f"model (it needs a causal LM)")
    draft = [op for op in body if isinstance(op, O.DraftMask)]
    unmask = [op for op in body if isinstance(op, O.MASK_RULES)]
    commit = [op for op in body if isinstance(op, O.Commit)]
    forwards = [op for op in body if isinstance(op, O.Forward)]
    if len(draft) != 1 or len(unmask) != 1 or len(commit) != 1 or len(forwards) != 1:
        raise UnsupportedError(f"strategy {program.name!r} needs exactly one draft.mask, forward(mask=block), "
                               f"unmask.* and commit per step to run on a masked-diffusion model")
    kv = commit[0].kv
    if kv in ("block_approx", "block_approx_dual") and not supports_kv:
        raise UnsupportedError(f"commit(kv={kv}) needs a model with a KV interface; {model} has none: use "
                               f"kv=recompute")
    if kv == "keep_accepted":
        raise UnsupportedError("commit(kv=keep_accepted) is exact only for causal forwards; a block forward "
                               "uses recompute, block_approx or block_approx_dual")
    return UnmaskLoop(loops[0], draft[0], unmask[0], commit[0])


@dataclass
class Blocks:
    """``draft.mask``'s value: per active canvas row, its block ``[s, e)``."""

    blocks: list[tuple[int, int]]


@dataclass
class BlockForward:
    """``forward(mask=block)``'s value: the rows, their blocks, the backend's ``CanvasStep``."""

    rows: list[CanvasRow]
    blocks: list[tuple[int, int]]
    out: Any


@dataclass
class Unmasked:
    """``unmask.*``'s value, per row: positions, their tokens and confidences, the candidates."""

    rows: list[CanvasRow]
    blocks: list[tuple[int, int]]
    picks: list[tuple[list[int], list[int], list[float], int]]


def start_canvases(engine: Any, loop: UnmaskLoop, prompts: list[list[int]], max_new: int,
                   suffixes: list[list[int]] | None, trace: list | None) -> Any:
    """Every prompt's canvas (prompt, ``max_new`` masks, its suffix) on the backend's engine."""
    mask_id = engine.mask_token_id if loop.draft.mask_token < 0 else loop.draft.mask_token
    suffixes = suffixes or [[] for _ in prompts]
    if len(suffixes) != len(prompts):
        raise InputError(f"{len(suffixes)} suffixes for {len(prompts)} prompts: give one per prompt")
    rows = [CanvasRow(i, list(p), [mask_id] * max_new, max_new, list(sfx))
            for i, (p, sfx) in enumerate(zip(prompts, suffixes))]
    for r in rows:
        if mask_id in r.prompt:
            raise InputError(f"prompt {r.index} contains the mask token id {mask_id}")
        if mask_id in r.suffix:
            raise InputError(f"a suffix contains the mask token id {mask_id}")
    width, tail = max(len(p) for p in prompts), max(len(r.suffix) for r in rows)
    limit = engine.max_positions
    if limit and width + max_new + tail > limit:
        raise InputError(f"a prompt of {width} tokens plus {max_new} masked positions and a suffix of {tail} exceeds "
                         f"the model's {limit} positions")
    if trace is not None:
        trace.extend({"kind": "prefill", "row": r.index, "prompt_len": len(r.prompt)} for r in rows)
    for r in rows:
        if max_new == 0:
            r.finish_reason = "max_new_tokens"
    return engine.start_canvas(rows, mask_id, loop.commit.kv)


def pick_unmask(op: O.Op, fwd: BlockForward, mask_id: int) -> Unmasked:
    """Per row, the masked positions of its block that ``op`` unmasks, with their tokens."""
    picks = []
    for b, (r, (s, e)) in enumerate(zip(fwd.rows, fwd.blocks)):
        cand = [g for g in range(s, min(e, r.limit)) if r.gen[g] == mask_id]
        conf, tok = fwd.out.confidence[b], fwd.out.tokens[b]
        c = [float(conf[g - s]) for g in cand]
        chosen = select_unmask(op, c)
        picks.append(([cand[i] for i in chosen], [int(tok[cand[i] - s]) for i in chosen], [c[i] for i in chosen],
                      len(cand)))
        r.forwards += 1
        r.query_tokens += fwd.out.query_tokens[b]
    return Unmasked(fwd.rows, fwd.blocks, picks)


def commit_canvases(state: Any, acc: Unmasked, eos: set[int], trace: list | None) -> list[tuple[int, tuple[int, ...], bool]]:
    """Write each row's unmasked tokens (``state.write``); after an EOS the row is EOS padding.
    Returns ``(row, tokens, done)`` for every row with newly final tokens: the decoded prefix
    up to its first mask, the whole row (through its EOS) once no mask is left."""
    events = []
    mask_id = state.mask_id
    for r, block, (picked, toks, conf, masked) in zip(acc.rows, acc.blocks, acc.picks):
        for g, t in zip(picked, toks):
            r.gen[g] = t
            if t in eos and g < r.limit:
                r.limit = g
        state.write(r, picked, toks)
        if r.limit < len(r.gen):                     # after EOS: EOS padding, never decoded
            rest = list(range(r.limit + 1, len(r.gen)))
            fill = r.gen[r.limit]
            for g in rest:
                r.gen[g] = fill
            state.write(r, rest, [fill] * len(rest))
        record = None
        if trace is not None:
            left = sum(1 for g in range(r.limit) if r.gen[g] == mask_id)
            record = {"kind": "unmask", "row": r.index, "step": r.steps, "block": list(block), "positions": picked,
                      "tokens": toks, "confidence": [round(c, 6) for c in conf], "masked": masked,
                      "masked_left": left, "limit": r.limit, "start": r.emitted, "committed": []}
            trace.append(record)
        r.steps += 1
        r.accepted.append(len(picked))
        r.drafted.append(masked)
        r.order.append(picked)
        end = next((g for g in range(r.limit) if r.gen[g] == mask_id), None)
        done = end is None
        if done:
            end = min(r.limit + 1, len(r.gen))
            r.finish_reason = "eos" if r.limit < len(r.gen) else "max_new_tokens"
        if end > r.emitted or done:
            events.append((r.index, tuple(r.gen[r.emitted:end]), done))
            r.emitted = end
        if record is not None:
            record["committed"] = r.gen[record["start"]:r.emitted]
    return events
