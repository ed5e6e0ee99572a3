"""The systems ``decograph bench`` times and the interleaved loop that times them.

Every system turns one prompt's token ids into new token ids and the seconds it took
(``Outcome``); decograph strategies and Hugging Face ``generate`` also report their forward
passes (counted by a forward hook for HF). For each prompt and repetition the systems run back
to back in a rotated order, so a drift of the machine's speed hits all of them alike; after a
warm-up run of each, every repetition's tokens must equal the first's (a system whose output
changes between runs is reported). Lossless strategies are checked token for token against the
reference: Hugging Face greedy on the torch backend, decograph's own one-token ``greedy`` on
any other backend (a quantized graph's own greedy is the only fair reference there).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

from decograph.errors import InputError

__all__ = ["Outcome", "System", "HFSystem", "DecographSystem", "ExternalSystem", "Measured", "run_interleaved",
           "first_difference"]


@dataclass(frozen=True)
class Outcome:
    """One generation: new tokens (EOS included when generated), wall seconds, forward passes
    (prefill included) and decode forwards (``None`` where the system cannot tell)."""

    tokens: list[int]
    seconds: float
    forwards: int | None = None
    decode_forwards: int | None = None
    draft_seconds: float | None = None      # time spent drafting (decograph strategies)


class System(Protocol):
    name: str
    kind: str              # "hf", "decograph" or "external"
    lossless: bool         # checked token for token against the reference

    def run(self, ids: list[int], max_new_tokens: int) -> Outcome: ...


class HFSystem:
    """Hugging Face ``generate``: greedy, or with prompt lookup (``prompt_lookup_num_tokens``)."""

    kind, lossless = "hf", False

    def __init__(self, name: str, model: Any, lookup: int = 0) -> None:
        self.name, self.model, self.lookup = name, model, lookup

    def run(self, ids: list[int], max_new_tokens: int) -> Outcome:
        import torch

        calls = [0]

        def count(*_: Any) -> None:
            calls[0] += 1

        hook = self.model.register_forward_hook(count)
        x = torch.tensor([ids])
        kw = {"prompt_lookup_num_tokens": self.lookup} if self.lookup else {}
        eos = self.model.generation_config.eos_token_id
        try:
            t = time.perf_counter()
            with torch.inference_mode():
                out = self.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                                          do_sample=False, pad_token_id=eos[0] if isinstance(eos, list) else eos, **kw)
            dt = time.perf_counter() - t
        finally:
            hook.remove()
        toks = out[0, len(ids):].tolist()
        return Outcome(toks, dt, calls[0], calls[0])      # each HF forward, the prefill too, yields a token


def split_spec(spec: str) -> tuple[str, str]:
    """``anpd@none`` -> (``anpd``, ``none``); ``a+b`` in the pipeline means ``a,b``. An ``@``
    inside a path's directories is part of the path."""
    head, sep, tail = spec.rpartition("@")
    if not sep or "/" in tail:
        return spec, "default"
    return head, tail.replace("+", ",") or "default"


class DecographSystem:
    """A decograph strategy (``name``, a strategy file, or ``name@pipeline``) on a backend."""

    kind = "decograph"

    def __init__(self, spec: str, model: Any, tokenizer: Any, backend: str = "torch",
                 overrides: dict[str, Any] | None = None) -> None:
        from decograph.frontends.strategies import load_strategy

        strategy_name, self.passes = split_spec(spec)
        if not strategy_name:
            raise InputError(f"--strategies: empty strategy name in {spec!r}")
        strategy = load_strategy(strategy_name, overrides=overrides)
        self.name = spec if backend == "torch" else f"{spec}:{backend}"
        self.strategy, self.program, self.lossless = strategy, strategy.program, strategy.lossless
        self.model, self.tok, self.backend = model, tokenizer, backend

    def run(self, ids: list[int], max_new_tokens: int) -> Outcome:
        from decograph.api import generate

        t = time.perf_counter()
        [r] = generate(self.model, self.tok, [ids], strategy=self.program, max_new_tokens=max_new_tokens,
                       passes=self.passes, backend=self.backend)
        dt = time.perf_counter() - t
        return Outcome(r.new_token_ids, dt, r.stats.forward_passes, r.stats.decode_steps, r.stats.draft_time_s)


class ExternalSystem:
    """A system from ``decograph.baselines`` (onnxruntime-genai, llama.cpp): tokens and seconds."""

    kind, lossless = "external", False

    def __init__(self, name: str, impl: Any) -> None:
        self.name, self.impl = name, impl

    def run(self, ids: list[int], max_new_tokens: int) -> Outcome:
        toks, dt = self.impl.generate(list(ids), max_new_tokens)
        return Outcome(list(toks), float(dt))


@dataclass
class Measured:
    """One system on one prompt, over the repetitions."""

    system: str
    prompt: int
    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def tokens(self) -> list[int]:
        return self.outcomes[0].tokens

    @property
    def seconds(self) -> float:
        return statistics.median(o.seconds for o in self.outcomes)

    @property
    def stable(self) -> bool:
        return all(o.tokens == self.tokens for o in self.outcomes)


def run_interleaved(systems: Sequence[System], prompts: Sequence[list[int]], max_new_tokens: int, reps: int,
                    warmup: bool = True, tick: Callable[[str], None] = lambda _: None) -> list[dict[str, Measured]]:
    """Per prompt, ``{system name: Measured}``; the systems rotate their order per prompt and
    repetition. ``tick(label)`` is called after every generation (a progress bar)."""
    if reps < 1:
        raise InputError(f"--reps must be >= 1, got {reps}")
    if warmup and prompts:
        for s in systems:
            s.run(prompts[0], min(8, max_new_tokens))
            tick(f"warm-up {s.name}")
    out: list[dict[str, Measured]] = []
    for i, ids in enumerate(prompts):
        res = {s.name: Measured(s.name, i) for s in systems}
        for rep in range(reps):
            k = (i + rep) % len(systems)
            for s in list(systems[k:]) + list(systems[:k]):
                res[s.name].outcomes.append(s.run(ids, max_new_tokens))
                tick(f"prompt {i + 1}/{len(prompts)} {s.name}")
        out.append(res)
    return out


def first_difference(ref: list[int], got: list[int], hf_model: Any = None, ids: list[int] | None = None) -> str:
    """Where two outputs part; with the HF model, its top-2 logit margin at that step (a near
    tie in fp32 is the one legitimate reason for a lossless strategy to part from greedy)."""
    i = next((j for j, (a, b) in enumerate(zip(ref, got)) if a != b), min(len(ref), len(got)))
    where = f"step {i}: reference={ref[i] if i < len(ref) else 'end'} got={got[i] if i < len(got) else 'end'}"
    if hf_model is None or ids is None:
        return where
    import torch

    with torch.inference_mode():
        logits = hf_model(torch.tensor([ids + ref[:i]])).logits[0, -1]
    top = torch.topk(logits.float(), 2).values
    return f"{where} (reference top-2 logit margin {float(top[0] - top[1]):.2e})"
