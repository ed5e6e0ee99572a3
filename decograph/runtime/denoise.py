"""Uniform-noise block diffusion in the runtime (DiffusionGemma's sampler), torch-free.

A program of this kind is one loop, each iteration one denoising step of every row's canvas::

    prefill
    iterate:
        draft.noise(k)                      # the canvas: fresh uniform noise after each commit
        forward(mask=block)                 # the denoiser over it, self-conditioned on the last step
        unmask.entropy_bound(bound, t_min, t_max, steps, stable, confident)
        commit                              # the canvases, once every row's is final
    emit

The model (``NoiseBatch``, a backend's) caches each row's committed tokens and denoises a
canvas of ``L`` positions after them. ``unmask.entropy_bound`` is the rule of transformers'
``DiffusionGemma`` ``generate``, written here once for every backend: per step ``r`` of
``steps`` (counting down to 1) the logits at temperature ``t_min + (t_max - t_min) r / steps``,
a token sampled per position, kept at the positions of lowest entropy while their entropies'
sum less the largest stays <= ``bound``, every other position redrawn uniformly; a row's canvas
is final once its argmax held ``stable`` steps and the mean entropy fell below ``confident``
(a final row keeps its canvas, argmax and self-conditioning signal while the others go on).
When every row's canvas is final, or after ``steps`` steps, each row appends its argmax canvas:
its tokens up to its first EOS (included), at most its ``max_new_tokens``.

The backend draws the random tokens (``noise``, ``sample``) with its own generator over the
whole batch, finished rows included, so that on torch a run under ``torch.manual_seed(s)``
takes exactly the draws transformers' ``generate`` takes under the same seed: the same tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from decograph.errors import InputError, UnsupportedError
from decograph.ir import ops as O
from decograph.runtime.unmask import CanvasRow, select_unmask

__all__ = ["NoiseRow", "NoiseLoop", "noise_loop", "is_noise_program", "NoiseState", "Canvas", "Denoising",
           "Denoised", "start_noise", "draft_noise", "denoise", "entropy_bound", "confidence_rule", "commit_noise",
           "temperature"]


@dataclass
class NoiseRow(CanvasRow):
    """One prompt's row: ``gen`` holds its committed tokens; the canvas being denoised is in
    ``NoiseState`` (the batch's arrays)."""

    max_new: int = 0

    @property
    def new_tokens(self) -> list[int]:
        return list(self.gen)


@dataclass(frozen=True)
class NoiseLoop:
    loop: O.Iterate
    draft: O.DraftNoise
    rule: O.Op                              # unmask.entropy_bound, or a confidence rule
    commit: O.Commit


def is_noise_program(program: O.Program) -> bool:
    return any(isinstance(op, (O.DraftNoise,) + O.NOISE_RULES) for op in program.walk())


def noise_loop(program: O.Program, model: str = "the model") -> NoiseLoop:
    """The program's denoising loop, or an ``UnsupportedError`` naming the step a uniform-noise
    diffusion model cannot run."""
    loops = [op for op in program.body.ops if isinstance(op, O.Iterate)]
    if len(loops) != 1:
        raise UnsupportedError(f"strategy {program.name!r}: {model} runs one iterate loop of draft.noise, forward, "
                               f"unmask.entropy_bound, commit; found {len(loops)} loops")
    body = [op for op in loops[0].body.ops if not isinstance(op, O.Yield)]
    for op in list(program.body.ops) + body:
        if isinstance(op, O.DraftMask):
            raise UnsupportedError(f"strategy {program.name!r}: step `{op.NAME}` is masked diffusion; {model} is a "
                                   f"uniform-noise diffusion model (use draft.noise, e.g. the built-in diffusion_gemma "
                                   f"or diffusion_gemma_fast)")
        if not isinstance(op, (O.Prefill, O.Iterate, O.Emit, O.DraftNoise, O.Forward, O.Commit) + O.UNMASK_OPS):
            raise UnsupportedError(f"strategy {program.name!r}: step `{op.NAME}` cannot run on {model}, a "
                                   f"uniform-noise diffusion model")
    draft = [op for op in body if isinstance(op, O.DraftNoise)]
    rule = [op for op in body if isinstance(op, O.UNMASK_OPS)]
    commit = [op for op in body if isinstance(op, O.Commit)]
    if len(draft) != 1 or len(rule) != 1 or len(commit) != 1 or len([op for op in body if isinstance(op, O.Forward)]) != 1:
        raise UnsupportedError(f"strategy {program.name!r} needs exactly one draft.noise, forward(mask=block), "
                               f"unmask step and commit per step to run on {model}")
    if commit[0].kv != "recompute":
        raise UnsupportedError(f"commit(kv={commit[0].kv}): {model} caches committed canvases itself; use the "
                               f"default kv=recompute")
    return NoiseLoop(loops[0], draft[0], rule[0], commit[0])


@dataclass
class NoiseState:
    """The rows and their canvases: ``canvas`` (what the next forward reads), ``argmax`` (the
    last step's argmax: what a commit appends), ``history`` (the last ``stable`` argmaxes),
    ``final`` (rows whose canvas is final), ``step`` (denoising steps run on this canvas);
    ``batch``: the backend's ``NoiseBatch``; ``pad_id``: what replaces a finished row's tokens
    in the cache (None: nothing, as transformers when the generation config has no pad)."""

    rows: list[NoiseRow]
    batch: Any
    eos: set[int]
    pad_id: int | None
    canvas: np.ndarray | None = None
    argmax: np.ndarray | None = None
    history: list[np.ndarray] = field(default_factory=list)
    final: np.ndarray | None = None
    step: int = 0
    fixed: np.ndarray | None = None             # confidence rules: the positions kept so far

    @property
    def active(self) -> list[NoiseRow]:
        return [r for r in self.rows if r.finish_reason is None]


@dataclass
class Canvas:
    """``draft.noise``'s value: the canvas the forward reads."""

    tokens: np.ndarray


@dataclass
class Denoising:
    """``forward``'s value: the backend's ``NoiseStep`` over the canvas."""

    canvas: np.ndarray
    out: Any


@dataclass
class Denoised:
    """``unmask.entropy_bound``'s value: how many positions each row kept this step."""

    kept: np.ndarray


def start_noise(engine: Any, prompts: list[list[int]], max_new: int, eos: set[int], trace: list | None) -> NoiseState:
    if any(len(p) == 0 for p in prompts):
        raise InputError("an empty prompt: DiffusionGemma's encoder needs at least one token")
    limit = engine.max_positions
    width = max(len(p) for p in prompts)
    if limit and width + max_new > limit:
        raise InputError(f"a prompt of {width} tokens plus {max_new} new tokens exceeds the model's {limit} positions")
    rows = [NoiseRow(i, list(p), [], max_new, max_new=max_new, forwards=1) for i, p in enumerate(prompts)]
    for r in rows:                              # forwards: the encoder's (prompt, canvases) and the denoiser's
        if max_new == 0:
            r.finish_reason = "max_new_tokens"
    if trace is not None:
        trace.extend({"kind": "prefill", "row": r.index, "prompt_len": len(r.prompt)} for r in rows)
    batch = engine.start_noise([r.prompt for r in rows])
    return NoiseState(rows, batch, eos, batch.pad_id)


def draft_noise(state: NoiseState, op: O.DraftNoise) -> Canvas:
    if state.canvas is None:                    # the last canvas was committed: fresh noise
        width = state.batch.canvas_length
        if op.k and op.k != width:
            raise UnsupportedError(f"draft.noise(k={op.k}): this model denoises canvases of {width} positions "
                                   f"(config.canvas_length); use k=0")
        state.canvas = state.batch.noise()
        state.argmax = state.canvas.copy()
        state.history, state.step, state.fixed = [], 0, None
        state.final = np.zeros(len(state.rows), dtype=bool)
    return Canvas(state.canvas)


def denoise(state: NoiseState, canvas: Canvas) -> Denoising:
    for r, final in zip(state.rows, state.final):
        if r.finish_reason is None and not final:       # what a row decoded alone would have run
            r.forwards += 1
            r.query_tokens += canvas.tokens.shape[1]
    return Denoising(canvas.tokens, state.batch.forward(canvas.tokens))


def temperature(op: O.UnmaskEntropyBound, left: int) -> float:
    """The schedule's temperature with ``left`` steps to go, in float32 as transformers'
    ``LinearTemperatureScheduleLogitsProcessor`` computes it (an int32 step over the count)."""
    f = np.float32
    return float(f(op.t_min) + f(op.t_max - op.t_min) * (f(left) / f(op.steps)))


def entropy_bound(state: NoiseState, op: O.UnmaskEntropyBound, fwd: Denoising) -> Denoised:
    """One step of the rule (see the module docstring) on every row; final rows keep theirs."""
    left = op.steps - state.step
    t = temperature(op, left)
    out = fwd.out
    sampled = out.sample(t)
    argmax = out.argmax(t)
    ent = out.entropy(t).astype(np.float32)
    order = np.argsort(ent, axis=-1, kind="stable")
    ranked = np.take_along_axis(ent, order, -1)
    # each cumulative sum in float64, rounded to float32 (torch's CPU cumsum of float32)
    cum = np.cumsum(ranked.astype(np.float64), axis=-1).astype(np.float32)
    keep_ranked = (cum - ranked) <= np.float32(op.bound)
    keep = np.zeros_like(keep_ranked)
    np.put_along_axis(keep, order, keep_ranked, -1)
    noise = state.batch.noise()                  # the renoising draw: a whole canvas, every step
    canvas = np.where(keep, sampled, noise)
    final = state.final
    assert final is not None and state.argmax is not None
    canvas = np.where(final[:, None], fwd.canvas, canvas)
    argmax = np.where(final[:, None], state.argmax, argmax)
    out.condition(final)
    if op.stable == 0:
        stable = np.ones(len(final), dtype=bool)
    else:
        past = state.history if len(state.history) == op.stable else None
        stable = (np.all([np.all(h == argmax, axis=-1) for h in past], axis=0) if past is not None
                  else np.zeros(len(final), dtype=bool))
        state.history = (state.history + [argmax])[-op.stable:]
    confident = ent.astype(np.float64).mean(axis=-1) < op.confident
    kept = keep.sum(-1)
    for b, r in enumerate(state.rows):
        if r.finish_reason is None and not final[b]:
            r.accepted.append(int(kept[b]))
            r.drafted.append(int(canvas.shape[1]))
            r.steps += 1
    state.final = final | (stable & confident)
    state.canvas, state.argmax = canvas, argmax
    state.step += 1
    return Denoised(kept)


def confidence_rule(state: NoiseState, op: O.Op, fwd: Denoising) -> Denoised:
    """Fast-dLLM's rules (``unmask.threshold`` / ``factor`` / ``topk_per_step``, as on masked
    canvases) on a uniform-noise canvas, noise in the role of the mask: a position once kept
    holds its argmax; each step keeps, among the others, those the rule picks by confidence
    (the largest softmax probability; at least one), and renoises the rest. A canvas is final
    once every position is kept, so it takes at most ``L`` steps."""
    out = fwd.out
    conf, argmax = out.confidence(1.0), out.argmax(1.0)
    noise = state.batch.noise()
    assert state.final is not None and state.argmax is not None
    if state.fixed is None:
        state.fixed = np.zeros(fwd.canvas.shape, dtype=bool)
    kept = np.zeros(len(state.rows), dtype=np.int64)
    tokens = np.where(state.fixed, state.argmax, argmax)
    for b, r in enumerate(state.rows):
        if state.final[b]:
            continue
        cand = np.flatnonzero(~state.fixed[b])
        picks = cand[select_unmask(op, conf[b, cand])]
        state.fixed[b, picks] = True
        kept[b] = len(picks)
        if r.finish_reason is None:
            r.accepted.append(len(picks))
            r.drafted.append(len(cand))
            r.steps += 1
    out.condition(state.final)
    state.canvas = np.where(state.fixed, tokens, noise)
    state.argmax = tokens
    state.final = state.fixed.all(-1)
    state.step += 1
    return Denoised(kept)


def commit_noise(state: NoiseState, op: O.Op, trace: list | None
                 ) -> list[tuple[int, tuple[int, ...], bool]]:
    """Once every row's canvas is final (or its ``steps`` ran): each unfinished row appends its
    argmax canvas up to its first EOS and its budget; the canvas (pad after a row's end) goes
    to the backend's cache. ``(row, tokens, done)`` per row with new tokens."""
    assert state.final is not None and state.argmax is not None
    if not (state.final.all() or state.step >= getattr(op, "steps", state.step + 1)):
        return []
    events = []
    canvas = state.argmax.copy()
    for b, r in enumerate(state.rows):
        if r.finish_reason is not None:
            if state.pad_id is not None:
                canvas[b] = state.pad_id
            continue
        toks = [int(t) for t in state.argmax[b]]
        end = next((i for i, t in enumerate(toks) if t in state.eos), None)
        new = toks[: end + 1] if end is not None else toks
        room = r.max_new - len(r.gen)
        if end is not None and end + 1 <= room:
            r.finish_reason = "eos"
        new = new[:room]
        if r.finish_reason is None and len(r.gen) + len(new) >= r.max_new:
            r.finish_reason = "max_new_tokens"
        if end is not None and state.pad_id is not None:
            canvas[b, end + 1:] = state.pad_id
        if trace is not None:
            trace.append({"kind": "denoise", "row": r.index, "steps": state.step, "start": len(r.gen),
                          "committed": new})
        r.gen += new
        events.append((r.index, tuple(new), r.finish_reason is not None))
    if state.active:
        state.batch.append(canvas)
        for r in state.active:
            r.forwards += 1
    state.canvas = None
    return events
