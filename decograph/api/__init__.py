"""The Python API: ``generate``, ``generate_stream`` and ``list_strategies``.

    import decograph
    model, tok = decograph.load_default_model()
    [r] = decograph.generate(model, tok, ["Write a haiku."], strategy="anpd", chat=True)
    r.new_token_ids, r.text, r.stats.tokens_per_forward
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from decograph.runtime import Event, Interpreter, RunConfig
from decograph.errors import InputError
from decograph.models.adapters import CausalLMAdapter, HFCausalLM, as_adapter
from decograph.ir import ops as O
from decograph.api.heads import corpora, head_runners
from decograph.api.inputs import Stopper, StopStrings, encode_prompts

__all__ = ["Stats", "GenerationResult", "StreamChunk", "Decoder", "generate", "generate_stream", "list_strategies",
           "resolve_model"]


@dataclass(frozen=True)
class Stats:
    """What one row's decoding cost. ``forward_passes`` counts every forward the row took part
    in, the prefill included (none for a one-token prompt); ``decode_steps`` counts iterations
    (one forward each once masks are fused). ``query_tokens``: query positions computed for the
    row (padding included); ``kv_bytes_copied``: KV moved for it (compaction, row copies)."""

    new_tokens: int
    forward_passes: int
    decode_steps: int
    accepted_per_step: tuple[int, ...]
    drafted_per_step: tuple[int, ...]
    wall_time_s: float
    finish_reason: str
    query_tokens: int = 0
    kv_bytes_copied: int = 0
    draft_time_s: float = 0.0       # seconds its draft sources took (a draft head's calls included)

    @property
    def draft_ms_per_step(self) -> float:
        """Milliseconds of drafting per decode step: the cost of a draft step."""
        return 1e3 * self.draft_time_s / self.decode_steps if self.decode_steps else 0.0

    @property
    def tokens_per_forward(self) -> float:
        """New tokens per decode forward (the prefill excluded)."""
        return self.new_tokens / self.decode_steps if self.decode_steps else 0.0

    @property
    def mean_accepted(self) -> float:
        """Mean draft tokens accepted per step (the model's own bonus token excluded)."""
        a = self.accepted_per_step
        return sum(a) / len(a) if a else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_time_s if self.wall_time_s > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "new_tokens": self.new_tokens, "forward_passes": self.forward_passes,
            "decode_steps": self.decode_steps, "tokens_per_forward": round(self.tokens_per_forward, 4),
            "mean_accepted": round(self.mean_accepted, 4), "tokens_per_s": round(self.tokens_per_s, 3),
            "wall_time_s": round(self.wall_time_s, 4), "finish_reason": self.finish_reason,
            "accepted_per_step": list(self.accepted_per_step),
            "query_tokens": self.query_tokens, "kv_bytes_copied": self.kv_bytes_copied,
            "draft_ms_per_step": round(self.draft_ms_per_step, 3),
        }


@dataclass(frozen=True)
class GenerationResult:
    """One prompt's output: ``new_token_ids`` (EOS included when generated, as in HF), ``text``."""

    prompt_ids: list[int]
    new_token_ids: list[int]
    text: str
    stats: Stats
    branches: list[Any] = field(default_factory=list)   # per join (collect, ner_dedup): its results
    trace: list[dict] = field(default_factory=list)      # generate(trace=True): per-step records


@dataclass(frozen=True)
class StreamChunk:
    """A piece of streamed output: the text and token ids just committed to prompt ``row``."""

    row: int
    text: str
    token_ids: tuple[int, ...]
    done: bool


def list_strategies() -> list[str]:
    """Names of the built-in strategies."""
    from decograph.frontends.strategies import list_strategies as _list

    return [name for name, _ in _list()]


def resolve_model(model: Any, tokenizer: Any = None, revision: str | None = None,
                  trust_remote_code: bool = False) -> tuple[CausalLMAdapter, Any]:
    """An adapter and tokenizer from a model, an adapter, None (the default model), or a name
    resolved as ``from_pretrained`` resolves it (``decograph.models.hub.model_dir``): a local
    directory, a packaged model's name (``decograph.models.packaged``), or a Hugging Face Hub
    id ``org/name`` (``org/name@revision``, or ``revision=``) from the local Hugging Face cache,
    downloaded unless the Hub is offline. ``ModelError`` names a model that is none of them.
    ``trust_remote_code``: run the model's own code from its directory (LLaDA, Dream)."""
    if model is None or (isinstance(model, str) and model == "default"):
        from decograph.models.default import load_default_model

        model, default_tok = load_default_model()
        tokenizer = tokenizer if tokenizer is not None else default_tok
    elif isinstance(model, (str, Path)):
        from decograph.models.diffusion import is_diffusion_dir, load_diffusion_model
        from decograph.models.hub import model_dir

        path = model_dir(model, revision)
        kw = {"trust_remote_code": True} if trust_remote_code else {}
        adapter = load_diffusion_model(path, **kw) if is_diffusion_dir(path) else HFCausalLM.from_pretrained(str(path), **kw)
        return adapter, tokenizer if tokenizer is not None else adapter.tokenizer
    from decograph.models.diffusion import as_diffusion_adapter, is_diffusion_model

    adapter = as_diffusion_adapter(model, tokenizer) if is_diffusion_model(model) else as_adapter(model, tokenizer)
    return adapter, tokenizer if tokenizer is not None else getattr(adapter, "tokenizer", None)


def as_program(strategy: Any, overrides: dict[str, Any] | None = None) -> O.Program:
    """The strategy's program: a Program, a Strategy, a built-in name or a strategy file path."""
    if isinstance(strategy, O.Program):
        return strategy
    if hasattr(strategy, "program"):
        return strategy.program
    from decograph.frontends.strategies import load_strategy

    return load_strategy(str(strategy), overrides=overrides).program


def _setup(model: Any, tokenizer: Any, prompts: Any, strategy: Any, max_new_tokens: int, chat: bool,
           do_sample: bool, temperature: float, top_k: int, top_p: float, seed: int | None,
           eos_token_id: Any, stop_token_ids: Sequence[int], draft_models: dict[str, Any] | None,
           overrides: dict[str, Any] | None, passes: str | None = "default",
           branch_providers: dict[str, Any] | None = None, backend: Any = "torch",
           suffixes: Any = None, trace: bool = False,
           attention_mask: Any = None, draft_heads: dict[str, Any] | None = None
           ) -> tuple[Interpreter, list[list[int]], Any]:
    from decograph.backends.base import plan
    from decograph.backends.registry import get_backend

    engine = get_backend(backend)           # before any model work: an unknown backend fails fast
    source, tok = resolve_model(model, tokenizer)
    adapter = engine.prepare(source)        # e.g. the model exported to and run by ONNX Runtime
    program = as_program(strategy, overrides)
    if do_sample:
        from decograph.passes.sampling import to_sampling

        program = to_sampling(program, temperature, top_k, top_p)
    # Optimized as `export` does (the pipeline tuned on the source model), so an in-process
    # backend runs the program an exported decoder of the same model would; the runtime then
    # sizes drafts with the backend's own measured cost curve.
    program = optimize(program, source, passes)
    ids = encode_prompts(prompts, tok, chat, attention_mask)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise InputError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    limit = adapter.max_positions
    for i, p in enumerate(ids):
        bad = [t for t in p if not 0 <= t < adapter.vocab_size]
        if bad:
            raise InputError(f"prompt {i} has token id {bad[0]} outside the vocabulary of {adapter.vocab_size}")
        if limit and len(p) + max_new_tokens > limit:
            raise InputError(f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} it exceeds "
                             f"the model's context of {limit} positions")
    if eos_token_id is None:
        eos = adapter.eos_token_ids
    else:
        eos = tuple(eos_token_id) if isinstance(eos_token_id, (list, tuple)) else (int(eos_token_id),)
    draft_models = {name: resolve_model(m)[0] if isinstance(m, (str, Path)) else m      # a directory: loaded
                    for name, m in (draft_models or {}).items()}
    for name, draft in draft_models.items():
        dv = as_adapter(draft).vocab_size
        if dv != adapter.vocab_size:     # ids of one model would index past the other's embedding
            raise InputError(f"draft model {name!r} has a vocabulary of {dv} tokens, the target model "
                             f"{adapter.vocab_size}: they must share one vocabulary")
    pad = eos[0] if eos else 0
    plan(engine, program)                   # one BackendFallbackWarning per op without a kernel
    runners = {name: engine.draft_runner(m) for name, m in (draft_models or {}).items()}
    cfg = RunConfig(max_new_tokens, tuple(eos), tuple(stop_token_ids), pad, seed, runners,
                    draft_heads=head_runners(program, source, draft_heads), corpora=corpora(program, source),
                    cost_curve=_cost_curve(adapter),
                    tokenizer=tok, branch_providers=dict(branch_providers or {}), kernels=engine.kernels(),
                    trace=[] if trace else None)
    from decograph.models.diffusion import MaskedDiffusionAdapter
    from decograph.models.diffusion_gemma import DiffusionGemmaAdapter

    if isinstance(adapter, DiffusionGemmaAdapter) and (do_sample or suffixes is not None):
        raise InputError(f"{adapter.name} samples by its strategy's own schedule (unmask.entropy_bound's t_min/t_max)"
                         f"{'' if suffixes is None else ' and does not infill'}: drop "
                         f"{'do_sample' if do_sample else 'suffixes'}")
    if suffixes is not None:
        if not isinstance(adapter, MaskedDiffusionAdapter):
            raise InputError("suffixes (infilling) need a masked-diffusion model; a causal LM decodes left to right")
        cfg.suffixes = [list(tok(x, add_special_tokens=False)["input_ids"]) if isinstance(x, str) else [int(t) for t in x]
                        for x in suffixes]
    if isinstance(adapter, MaskedDiffusionAdapter) and do_sample:
        raise InputError("do_sample: unmask strategies decode by confidence; sampling is not supported for them")
    interp = engine.interpreter(program, adapter, cfg)
    interp.adapter = source                 # whose acceptance profile the run feeds (``_observe``)
    return interp, ids, tok


def optimize(program: O.Program, adapter: CausalLMAdapter, passes: str | None = "default") -> O.Program:
    """``program`` through the pass pipeline ``passes`` (``"default"``: the torch backend's;
    ``None``/``"none"``: as written), tuned with the model's cost curve and the acceptance
    observed on this model so far. Cached per program, pipeline and acceptance summary."""
    if passes in (None, "", "none"):
        return program
    from decograph.passes import run_pipeline
    from decograph.passes.manager import PassContext
    from decograph.passes.profile import AcceptanceProfile

    profile = getattr(adapter, "_acceptance", None)
    if profile is None:
        profile = adapter._acceptance = AcceptanceProfile()  # type: ignore[attr-defined]
    cache = getattr(adapter, "_compiled", None)
    if cache is None:
        cache = adapter._compiled = {}  # type: ignore[attr-defined]
    key = (id(program), passes, profile.key())
    hit = cache.get(key)
    if hit is not None and hit[0] is program:
        return hit[1]
    out, _ = run_pipeline(program, passes, PassContext("torch", _cost_curve(adapter), profile))
    if len(cache) >= 64:                # the acceptance summary drifts early on: stay bounded
        cache.clear()
    cache[key] = (program, out)
    return out


class Decoder:
    """A model, its tokenizer, a backend and a strategy made ready once (program optimized,
    kernels planned, draft models loaded), for callers that start many runs: a server's
    lanes (``decograph.runtime.scheduler``). ``interpreter(config)`` is the runtime over it;
    ``sampling_program(temperature, top_p)`` the strategy's lossless sampling form."""

    def __init__(self, model: Any = None, tokenizer: Any = None, strategy: Any = "greedy", *, backend: Any = "torch",
                 passes: str | None = "default", overrides: dict[str, Any] | None = None,
                 draft_models: dict[str, Any] | None = None, draft_heads: dict[str, Any] | None = None) -> None:
        from decograph.backends.base import plan
        from decograph.backends.registry import get_backend

        self.backend = get_backend(backend)
        self.source, self.tokenizer = resolve_model(model, tokenizer)
        self.adapter = self.backend.prepare(self.source)
        self.passes = passes
        self.base = as_program(strategy, overrides)
        self.program = optimize(self.base, self.source, passes)
        plan(self.backend, self.program)
        self.runners = {name: self.backend.draft_runner(resolve_model(m)[0] if isinstance(m, (str, Path)) else m)
                        for name, m in (draft_models or {}).items()}
        self.heads = head_runners(self.base, self.source, draft_heads)
        self.corpora = corpora(self.base, self.source)
        self.eos_token_ids = tuple(self.adapter.eos_token_ids)
        self.max_positions = int(self.adapter.max_positions or 0)
        self.vocab_size = int(self.adapter.vocab_size)
        self._sampling: dict[tuple[float, float], O.Program] = {}

    def sampling_program(self, temperature: float, top_p: float = 1.0) -> O.Program:
        key = (float(temperature), float(top_p))
        if key not in self._sampling:
            from decograph.passes.sampling import to_sampling

            self._sampling[key] = optimize(to_sampling(self.base, temperature, 0, top_p), self.source, self.passes)
        return self._sampling[key]

    def interpreter(self, config: RunConfig, program: O.Program | None = None) -> Interpreter:
        """The runtime for ``program`` (default: the strategy's) with ``config``, its model
        fields (EOS, padding, draft runners, cost curve, tokenizer, kernels) filled in here."""
        config.eos_token_ids = config.eos_token_ids or self.eos_token_ids
        config.pad_token_id = self.eos_token_ids[0] if self.eos_token_ids else 0
        config.draft_models = dict(self.runners)
        config.draft_heads = dict(self.heads)
        config.corpora = dict(self.corpora)
        config.cost_curve = _cost_curve(self.adapter)
        config.tokenizer = self.tokenizer
        config.kernels = self.backend.kernels()
        interp = self.backend.interpreter(program or self.program, self.adapter, config)
        interp.adapter = self.source
        return interp


def _observe(interp: Interpreter, adapter: CausalLMAdapter, rows: list[Any] | None = None) -> None:
    """Feed the acceptance of single-draft strategies into the adapter's profile."""
    profile = getattr(adapter, "_acceptance", None)
    drafts = [op for op in interp.program.walk() if isinstance(op, O.DRAFT_OPS)]
    if any(isinstance(op, (O.DraftMask, O.DraftNoise)) for op in drafts):
        return
    if profile is None or len(drafts) != 1 or interp.state is None:
        return
    for row in rows if rows is not None else interp.state.rows:
        profile.observe(drafts[0].NAME, row.accepted, row.drafted)


def _cost_curve(adapter: CausalLMAdapter) -> Any:
    """The measured forward-cost curve where the model is big enough for timing to mean
    something; the default curve otherwise (deterministic)."""
    from decograph.backends.torch_ref.cost import DEFAULT_CURVE, cached_cost_curve

    model = getattr(adapter, "model", None)
    if (model is None and getattr(adapter, "cost_key", None) is None) or not isinstance(adapter, CausalLMAdapter):
        return DEFAULT_CURVE                    # no causal step to time (diffusion models)
    curve = getattr(adapter, "_cost_curve", None)       # read (or measured) once per adapter
    if curve is None:
        big = (sum(p.numel() for p in model.parameters()) >= 20_000_000 if model is not None
               else getattr(adapter, "weight_bytes", 0) >= 20_000_000)
        curve = cached_cost_curve(adapter) if big else DEFAULT_CURVE
        adapter._cost_curve = curve  # type: ignore[attr-defined]
    return curve


def _decode(tok: Any, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=True) if tok is not None else ""


def _results(interp: Interpreter, ids: list[list[int]], tok: Any, rows: list[Any] | None = None,
             cut: dict[int, int] | None = None) -> list[GenerationResult]:
    """One result per row (``rows``: default the final state's); ``cut``: rows a stop string
    ended, with the number of new tokens each keeps."""
    assert interp.state is not None
    out = []
    records = interp.cfg.trace or []
    for row in rows if rows is not None else interp.state.rows:
        new, reason = row.new_tokens, row.finish_reason or "max_steps"     # unfinished: the loop's step cap
        if cut and row.index in cut:
            new, reason = new[: cut[row.index]], "stop"
        stats = Stats(len(new), row.forwards, row.steps, tuple(row.accepted), tuple(row.drafted),
                      interp.wall, reason, row.query_tokens, row.kv_bytes_copied, row.draft_s)
        out.append(GenerationResult(ids[row.index], new, _decode(tok, new), stats, list(row.results),
                                    [r for r in records if r["row"] == row.index]))
    return out


def _events(interp: Interpreter, ids: list[list[int]]) -> Iterator[Event]:
    # Inference mode only while the interpreter runs: held across a ``yield`` it would leak
    # into the caller's code between streamed chunks (and into a generator never finished).
    gen = interp.run(ids)
    try:
        while True:
            with torch.inference_mode():
                event = next(gen, None)
            if event is None:
                return
            yield event
    finally:
        gen.close()


def generate(model: Any, tokenizer: Any, prompts: Any, strategy: Any = "greedy", max_new_tokens: int = 128, *,
             chat: bool = False, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, seed: int | None = None, eos_token_id: Any = None,
             stop_token_ids: Sequence[int] = (), draft_models: dict[str, Any] | None = None,
             streamer: Any = None, overrides: dict[str, Any] | None = None,
             passes: str | None = "default", branch_providers: dict[str, Any] | None = None,
             backend: Any = "torch", suffixes: Any = None, trace: bool = False, attention_mask: Any = None,
             stop_strings: str | Sequence[str] | None = None,
             draft_heads: dict[str, Any] | None = None) -> list[GenerationResult]:
    """Decode ``prompts`` with ``strategy``; one ``GenerationResult`` per prompt, in order.

    ``prompts``: a string, a list of strings (tokenized as they are, or with the chat template
    when ``chat``), a token-id list, or a list of them. ``strategy``: a built-in name, a
    strategy file path, a ``Strategy`` or an IR ``Program``. ``passes``: the optimization
    pipeline (``"default"``, ``"none"``, or e.g. ``"mask-fusion,cache-reuse"``). Greedy strategies return exactly
    the tokens of greedy decoding; with ``do_sample`` their verification becomes lossless
    speculative sampling. ``streamer``: a transformers streamer (``put``/``end``), batch 1.
    ``branch_providers``: functions a fork strategy's ``draft.branches(provider=NAME)`` calls
    with a row for its branch prompts (see ``decograph.apps.ner``). What fork/join strategies left
    on a row with ``join(rule=collect|ner_dedup)`` is in ``GenerationResult.branches``.
    ``backend``: a registered backend name (``decograph backends``) or a ``Backend``; ops it
    has no kernel for run on the torch reference, each with a ``BackendFallbackWarning``.
    ``suffixes`` (masked-diffusion models): per prompt, text or ids after the masked span, so
    the ``max_new_tokens`` positions between prompt and suffix are infilled.
    ``trace``: record each step (drafted, accepted, committed tokens; unmasked positions) in
    ``GenerationResult.trace`` (see ``decograph viz``).
    ``attention_mask`` (with ``prompts`` as ``input_ids``, a 2-D tensor or list of rows): the
    positions marked 0 are padding, left or right, and are dropped, so each row decodes as if
    alone. ``stop_strings``: a row ends after the token that completes one of them (exactly
    where transformers' ``generate(stop_strings=..., tokenizer=...)`` ends it; finish reason
    ``"stop"``); needs the tokenizer. ``draft_heads``: runners for a strategy's ``draft.head(head=NAME)``
    (by default each is the model's own head: ``decograph.api.heads``).
    """
    interp, ids, tok = _setup(model, tokenizer, prompts, strategy, max_new_tokens, chat, do_sample, temperature,
                              top_k, top_p, seed, eos_token_id, stop_token_ids, draft_models, overrides, passes,
                              branch_providers, backend, suffixes, trace, attention_mask, draft_heads)
    stopper = Stopper(interp, StopStrings(tok, stop_strings, ids)) if stop_strings else None
    if streamer is not None:
        if len(ids) != 1:
            raise InputError("a transformers streamer supports one prompt at a time")
        streamer.put(torch.tensor([ids[0]]))
    try:
        for event in _events(interp, ids):
            tokens = stopper.filter(event) if stopper is not None else event.tokens
            if streamer is not None and tokens:
                streamer.put(torch.tensor(list(tokens)))
    finally:
        if streamer is not None:
            streamer.end()
    rows = stopper.rows if stopper is not None else None
    _observe(interp, interp.adapter, rows)
    return _results(interp, ids, tok, rows, stopper.stops.cut if stopper is not None else None)


def generate_stream(model: Any, tokenizer: Any, prompts: Any, strategy: Any = "greedy",
                    max_new_tokens: int = 128, **kwargs: Any) -> Iterator[StreamChunk]:
    """Like ``generate``, but yields ``StreamChunk``s as tokens commit; each row's last chunk
    has ``done=True`` and the concatenated texts equal ``generate``'s ``text``."""
    kw = {k: kwargs.pop(k, d) for k, d in (("chat", False), ("do_sample", False), ("temperature", 1.0),
          ("top_k", 0), ("top_p", 1.0), ("seed", None), ("eos_token_id", None), ("stop_token_ids", ()),
          ("draft_models", None), ("overrides", None), ("passes", "default"), ("branch_providers", None),
          ("backend", "torch"), ("suffixes", None), ("attention_mask", None), ("draft_heads", None))}
    if kwargs:
        raise TypeError(f"unexpected arguments: {', '.join(kwargs)}")
    interp, ids, tok = _setup(model, tokenizer, prompts, strategy, max_new_tokens, **kw)
    new: dict[int, list[int]] = {i: [] for i in range(len(ids))}
    held: dict[int, list[int]] = {i: [] for i in range(len(ids))}   # committed, not yet in a chunk
    shown: dict[int, str] = {i: "" for i in range(len(ids))}
    finished: set[int] = set()
    for event in _events(interp, ids):
        new[event.row].extend(event.tokens)
        held[event.row].extend(event.tokens)
        text = _decode(tok, new[event.row])
        if not event.done and text.endswith("\ufffd"):
            continue            # an incomplete UTF-8 sequence: wait for the rest
        delta, shown[event.row] = text[len(shown[event.row]):], text
        if event.done:
            finished.add(event.row)
        chunk_ids, held[event.row] = tuple(held[event.row]), []
        yield StreamChunk(event.row, delta, chunk_ids, event.done)
    for i in range(len(ids)):
        if i not in finished:
            yield StreamChunk(i, _decode(tok, new[i])[len(shown[i]):], tuple(held[i]), True)
