"""``decograph bench``: strategies against Hugging Face greedy and prompt lookup, one process.

    decograph bench --strategies greedy,ngram,anpd --per-category 2 --max-new-tokens 128 --reps 3
    decograph bench --prompts my_questions.jsonl --strategies anpd,./my_strategy.yaml --out results/

Same model, same prompts (Spec-Bench's format; a shipped subset by default), systems
interleaved after a warm-up, repetitions with the median kept, a progress bar on stderr.
Lossless strategies are checked token for token against the reference (the run exits 1 and
names the prompt, step and logit margin when one differs). Prints a table per task and writes
``bench.json``, ``bench.md`` and ``bench.png`` to ``--out``. Where onnxruntime-genai or
llama-cpp-python is installed (``pip install -e '.[compare]'``), their greedy decoding (and
onnxruntime-genai's n-gram speculation) on their own export of the default model run too.

Only the standard library is imported here: the CLI builds its parser from this module.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_parser", "HF_BASELINES", "EXTERNAL_BASELINES"]

HF_BASELINES = ("hf_greedy", "hf_prompt_lookup")
EXTERNAL_BASELINES = ("ort_genai_greedy", "ort_genai_ngram", "llamacpp_greedy")


def add_parser(sub: Any) -> None:
    """Register ``bench`` on the ``decograph`` command's subparsers."""
    b = sub.add_parser("bench", help="benchmark strategies against Hugging Face greedy and prompt lookup",
                       description=__doc__.split("\n\n")[2].replace("\n", " "))
    b.add_argument("--strategies", default="greedy,ngram,anpd", metavar="S1,S2,...",
                   help="strategies to time: built-in names or strategy files, each optionally NAME@PIPELINE "
                        "(e.g. anpd@none; a+b for the pipeline a,b); default: greedy,ngram,anpd")
    b.add_argument("--prompts", metavar="FILE.jsonl", help="prompts in Spec-Bench's format (question_id, category, "
                   "turns; the first turn is used); default: the shipped Spec-Bench subset (10 per task)")
    b.add_argument("--per-category", type=int, default=2, metavar="N", help="prompts per task (0: all; default 2)")
    b.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="default: 128")
    b.add_argument("--reps", type=int, default=1, metavar="N", help="repetitions per prompt; the median counts")
    b.add_argument("--no-warmup", dest="warmup", action="store_false", help="skip the warm-up run of each system")
    b.add_argument("--baselines", default="auto", metavar="B1,B2|auto|none",
                   help="besides hf_greedy (always run: the speedup reference): hf_prompt_lookup, ort_genai_greedy, "
                        "ort_genai_ngram, llamacpp_greedy; 'auto' (default): hf_prompt_lookup and every installed "
                        "external one (default model only)")
    b.add_argument("--model", metavar="MODEL", help="a local Hugging Face causal-LM directory, a packaged model's "
                   "name or a Hugging Face Hub id org/name[@revision] (default: embedded model)")
    b.add_argument("--backend", default="torch", metavar="NAME", help="backend of the decograph strategies (see "
                   "`decograph backends`); off torch the lossless reference is decograph's greedy on that backend")
    b.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="apply the chat template (default: on for the embedded instruct model, off with --model)")
    b.add_argument("--set", action="append", metavar="KEY=VALUE", help="a strategy parameter for every strategy")
    b.add_argument("--threads", type=int, default=0, metavar="N", help="torch threads (default: every core)")
    b.add_argument("--out", default="decograph-bench", metavar="DIR", help="where bench.json/.md/.png go "
                   "(default: ./decograph-bench)")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=_cmd_bench)


def _baselines(spec: str, default_model: bool) -> tuple[list[str], bool]:
    """The requested extra baselines and whether they were asked for by name (not ``auto``)."""
    from decograph.errors import InputError

    if spec == "auto":
        return ["hf_prompt_lookup"] + (list(EXTERNAL_BASELINES) if default_model else []), False
    if spec == "none":
        return [], True
    names = [n.strip() for n in spec.split(",") if n.strip() and n.strip() != "hf_greedy"]
    for n in names:
        if n not in HF_BASELINES + EXTERNAL_BASELINES:
            raise InputError(f"--baselines: unknown baseline {n!r}; choose from "
                             f"{', '.join(HF_BASELINES[1:] + EXTERNAL_BASELINES)}, 'auto' or 'none'")
    if not default_model and any(n in EXTERNAL_BASELINES for n in names):
        raise InputError("--baselines: onnxruntime-genai and llama.cpp baselines run on their own export of the "
                         "embedded default model only; drop them or --model")
    return names, True


def _external(names: list[str], explicit: bool, log: Any) -> tuple[list[Any], dict[str, str]]:
    from decograph.bench.runner import ExternalSystem
    from decograph.errors import InputError

    wanted = [n for n in names if n in EXTERNAL_BASELINES]
    if not wanted:
        return [], {}
    from decograph.baselines import external_systems

    found, reasons = external_systems(log=log)
    missing = {n: reasons.get(n, "not available") for n in wanted if n not in found}
    if explicit and missing:
        raise InputError("--baselines: " + "; ".join(f"{n}: {r}" for n, r in missing.items()))
    return [ExternalSystem(n, found[n]) for n in wanted if n in found], missing


def _load(model_dir: str | None) -> tuple[Any, Any, str]:
    """The Hugging Face model (for HF's ``generate``), its tokenizer and a display name."""
    from decograph.errors import InputError

    if model_dir is None:
        from decograph.models.default import DEFAULT_MODEL_NAME, load_default_model

        model, tok = load_default_model()
        return model, tok, DEFAULT_MODEL_NAME
    from decograph.models.diffusion import is_diffusion_dir
    from decograph.models.hub import model_dir as resolve_dir

    path = resolve_dir(model_dir)       # a directory, a packaged model's name or a Hub id
    if is_diffusion_dir(path):
        raise InputError(f"--model {model_dir}: a masked-diffusion model; bench compares against Hugging Face "
                         "generate on causal LMs (masked-diffusion: benchmarks/bench_diffusion.py)")
    from decograph.models.adapters import HFCausalLM

    adapter = HFCausalLM.from_pretrained(str(path))
    return adapter.model, adapter.tokenizer, model_dir


def _encode(tok: Any, text: str, chat: bool) -> list[int]:
    if chat:
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    return list(tok(text)["input_ids"])


def _cmd_bench(args: argparse.Namespace) -> int:
    from decograph.apps.loading import quiet_loading
    from decograph.errors import InputError
    from decograph.frontends.overrides import parse_overrides

    if args.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.reps < 1:
        raise InputError(f"--reps must be >= 1, got {args.reps}")
    if args.threads < 0:
        raise InputError(f"--threads must be >= 0, got {args.threads}")
    from decograph.bench.prompts import load_prompts

    prompts = load_prompts(args.prompts, args.per_category)     # bad input fails before the model loads
    specs = [s.strip() for s in args.strategies.split(",") if s.strip()]
    if not specs:
        raise InputError("--strategies: give at least one strategy")
    extra, explicit = _baselines(args.baselines, args.model is None)
    from decograph.backends.registry import get_backend

    get_backend(args.backend)           # an unknown backend fails before the model loads
    import torch

    from decograph.bench.report import summarize, write_outputs
    from decograph.bench.runner import DecographSystem, HFSystem, first_difference, run_interleaved

    if args.threads:
        torch.set_num_threads(args.threads)
    with quiet_loading():
        model, tok, model_name = _load(args.model)
    chat = args.chat if args.chat is not None else args.model is None
    if chat and not getattr(tok, "chat_template", None):
        raise InputError(f"--chat: the tokenizer of {model_name} has no chat template; use --no-chat")
    overrides = parse_overrides(args.set)
    systems: list[Any] = [HFSystem("hf_greedy", model)]
    if "hf_prompt_lookup" in extra:
        systems.append(HFSystem("hf_prompt_lookup", model, lookup=10))
    ours = [DecographSystem(s, model, tok, args.backend, overrides) for s in specs]
    reference = "hf_greedy"
    if args.backend != "torch":
        ref = next((s for s in ours if s.strategy.name == "greedy" and s.passes == "default"), None)
        if ref is None:
            ref = DecographSystem("greedy", model, tok, args.backend)
            ours.insert(0, ref)
        reference = ref.name
    systems += ours
    log = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr))
    externals, unavailable = _external(extra, explicit, log)
    systems += externals
    names = [s.name for s in systems]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InputError(f"--strategies: {', '.join(dup)} given twice")
    ids = [_encode(tok, p.text, chat) for p in prompts]
    from tqdm.auto import tqdm

    total = len(systems) * (len(ids) * args.reps + (1 if args.warmup else 0))
    bar = tqdm(total=total, desc="bench", unit="run", file=sys.stderr, disable=args.quiet, dynamic_ncols=True)

    def tick(label: str) -> None:
        bar.set_postfix_str(label, refresh=False)
        bar.update(1)

    try:
        results = run_interleaved(systems, ids, args.max_new_tokens, args.reps, args.warmup, tick)
    finally:
        bar.close()
    lossless = {s.name for s in systems if s.lossless and s.name != reference}
    identical: list[dict[str, bool | None]] = []
    rows: list[dict[str, Any]] = []
    failures: list[str] = []
    for i, (p, res) in enumerate(zip(prompts, results)):
        ref = res[reference].tokens
        same = {s: (None if s == reference else m.tokens == ref) for s, m in res.items()}
        identical.append(same)
        for s, m in res.items():
            diff = ""
            if same[s] is False:
                diff = first_difference(ref, m.tokens, model if reference == "hf_greedy" else None, ids[i])
                if s in lossless:
                    failures.append(f"{s} on prompt {i + 1} ({p.task}, question {p.question_id}): {diff}")
            if not m.stable and s in lossless | {reference}:
                failures.append(f"{s} on prompt {i + 1}: the output changed between repetitions")
            o = m.outcomes[0]
            rows.append({"task": p.task, "prompt": i, "question_id": p.question_id, "system": s,
                         "new_tokens": len(m.tokens), "time_s": m.seconds, "times_s": [x.seconds for x in m.outcomes],
                         "forwards": o.forwards, "decode_forwards": o.decode_forwards, "identical": same[s],
                         "stable": m.stable, "diff": diff, "tokens": m.tokens})
    table = summarize(results, [p.task for p in prompts], names, identical)
    import transformers

    import decograph

    meta = {"model": model_name, "prompt_set": args.prompts or "shipped Spec-Bench subset",
            "prompts": len(prompts), "per_category": args.per_category, "max_new_tokens": args.max_new_tokens,
            "reps": args.reps, "warmup": args.warmup, "threads": torch.get_num_threads(), "backend": args.backend,
            "chat": chat, "reference": reference, "strategies": specs, "systems": names,
            "lossless_checked": sorted(lossless), "unavailable": unavailable,
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
            "versions": {"decograph": getattr(decograph, "__version__", "?"), "torch": torch.__version__,
                         "transformers": transformers.__version__},
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "command": sys.argv[1:],
            "lossless_failures": failures}
    paths = write_outputs(Path(args.out), table, meta, rows)
    print((Path(args.out) / "bench.md").read_text(), end="")
    print("wrote " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)
    if failures:
        print("decograph: lossless check failed:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0
