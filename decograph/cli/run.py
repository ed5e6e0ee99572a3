"""``decograph run``: decode one prompt or several (``--prompt`` repeated, one batch) with a
strategy on a model, or with an exported decoder (``--exported DIR``: onnxruntime, numpy and
tokenizers only, never torch). Text goes to stdout (one block per prompt, in order), one
statistics line per prompt to stderr; ``--json`` prints one JSON record per prompt instead."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from decograph.errors import InputError
from decograph.text import check_utf8

__all__ = ["cmd_run"]


def cmd_run(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 0:
        raise InputError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.prompts_file:
        return _run_prompt_file(args)
    if args.out or args.ray is not None:
        raise InputError("--out and --ray go with --prompts-file")
    if not args.prompt:
        raise InputError("run needs --prompt TEXT (or --prompts-file IN.jsonl --out OUT.jsonl)")
    args.prompt = [check_utf8(p, f"prompt {i + 1}") for i, p in enumerate(args.prompt)]   # argv: surrogateescape'd
    if args.exported:
        return _run_exported(args)          # before any torch import
    if args.ort_device != "auto":
        raise InputError("--ort-device is for --exported decoders; the onnxruntime backends read "
                         "DECOGRAPH_ORT_DEVICE (auto, cpu or cuda)")
    from decograph.api import generate
    from decograph.apps.loading import load_model
    from decograph.frontends.overrides import parse_overrides
    from decograph.frontends.strategies import load_strategy

    if not args.strategy:
        raise InputError("run needs --strategy (or --exported DIR)")
    if args.stream and len(args.prompt) > 1:
        raise InputError(f"--stream prints one prompt's text as it is decoded; got {len(args.prompt)} --prompt")
    strategy = load_strategy(args.strategy, overrides=parse_overrides(args.set))
    adapter, tok, model_name = load_model(args.model, getattr(args, "trust_remote_code", False))
    # An instruct model (its tokenizer has a chat template) rambles without its template; a base
    # model has none and continues raw text.
    chat = args.chat if args.chat is not None else bool(getattr(tok, "chat_template", None))
    if chat and not getattr(tok, "chat_template", None):
        raise InputError(f"--chat: the tokenizer of {model_name} has no chat template; use --no-chat")
    printer = _TextPrinter(tok) if args.stream else None
    results = generate(adapter, tok, list(args.prompt), strategy.program, args.max_new_tokens, chat=chat,
                       do_sample=args.sample, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                       seed=args.seed, streamer=printer, backend=args.backend, passes=args.passes)
    for prompt, result in zip(args.prompt, results):
        s = result.stats
        if args.json:
            record = {"strategy": strategy.name, "model": model_name, "prompt": prompt, "chat": chat,
                      "new_token_ids": result.new_token_ids, "text": result.text, "new_tokens": s.new_tokens,
                      "forward_passes": s.forward_passes, "decode_steps": s.decode_steps,
                      "tokens_per_s": round(s.tokens_per_s, 3), "tokens_per_forward": round(s.tokens_per_forward, 4),
                      "mean_accepted": round(s.mean_accepted, 4), "wall_time_s": round(s.wall_time_s, 4),
                      "finish_reason": s.finish_reason}
            print(json.dumps(record, ensure_ascii=False))
            continue
        if printer is None:
            print(result.text)
        print(f"[{strategy.name}] {s.new_tokens} tokens, {s.forward_passes} forward passes "
              f"({s.decode_steps} decode steps), {s.tokens_per_s:.1f} tokens/s, "
              f"{s.tokens_per_forward:.2f} tokens/forward, {s.mean_accepted:.2f} accepted/step, "
              f"finish: {s.finish_reason}", file=sys.stderr)
    return 0


class _TextPrinter:
    """A transformers-style streamer (``put``/``end``) writing decoded text to stdout as tokens commit.

    The first ``put`` is the prompt and is skipped. Text is decoded from all new ids each time
    and only the new suffix is written, holding back an incomplete UTF-8 character (``\\ufffd``).
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tok, self.ids, self.shown, self.prompt_seen = tokenizer, [], "", False

    def put(self, value: Any) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.ids.extend(int(t) for t in value.reshape(-1).tolist())
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            self._write(text)

    def end(self) -> None:
        self._write(self.tok.decode(self.ids, skip_special_tokens=True) if self.ids else self.shown)
        sys.stdout.write("\n")
        sys.stdout.flush()

    def _write(self, text: str) -> None:
        sys.stdout.write(text[len(self.shown):])
        sys.stdout.flush()
        self.shown = text


def _run_prompt_file(args: argparse.Namespace) -> int:
    """``--prompts-file IN --out OUT [--ray [ADDRESS]]``: every prompt of IN not yet in OUT."""
    from decograph.apps.serve.scale import run_prompt_file

    if args.prompt:
        raise InputError("give --prompt or --prompts-file, not both")
    if not args.out:
        raise InputError("--prompts-file needs --out OUT.jsonl")
    if args.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be >= 1 with --prompts-file, got {args.max_new_tokens}")
    if args.workers < 1:
        raise InputError(f"--workers must be >= 1, got {args.workers}")
    model = {"model": args.model, "exported": args.exported, "strategy": args.strategy,
             "backend": args.backend}
    chat = args.chat if args.chat is not None else True    # on where the tokenizer has a chat template
    report = run_prompt_file(args.prompts_file, args.out, model, max_tokens=args.max_new_tokens, chat=chat,
                             ray_address=args.ray or None, use_ray=args.ray is not None, workers=args.workers)
    print(f"{report['written']} prompts decoded, {report['skipped']} already in {args.out}, "
          f"{report['seconds']} s", file=sys.stderr)
    return 0


def _run_exported(args: argparse.Namespace) -> int:
    """``run --exported DIR``: onnxruntime, numpy and tokenizers only (never torch); several
    prompts decode as one batch (``ExportedDecoder.generate_batch``)."""
    from decograph.exported import ExportedDecoder

    if (args.strategy or args.model or args.sample or args.set or args.stream or args.backend != "torch"
            or args.passes != "default"):
        raise InputError("--exported runs the decoder's own strategy and model: drop --strategy/--model/--set/"
                         "--backend/--passes/--sample/--stream")
    dec = ExportedDecoder(args.exported, device=args.ort_device)
    rows = dec.generate_batch([dec.encode(p, args.chat) for p in args.prompt], args.max_new_tokens)
    m = dec.manifest
    for prompt, (ids, s) in zip(args.prompt, rows):
        text = dec.decode(ids)
        if args.json:
            print(json.dumps({"exported": args.exported, "strategy": m.strategy, "quant": m.target.quant,
                              "prompt": prompt, "new_token_ids": ids, "text": text, "new_tokens": s.new_tokens,
                              "forward_passes": s.forwards, "tokens_per_s": round(s.tokens_per_s, 3),
                              "wall_time_s": round(s.wall_time_s, 4), "finish_reason": s.finish_reason},
                             ensure_ascii=False))
            continue
        print(text)
        print(f"[{m.strategy}, exported, {m.target.quant}] {s.new_tokens} tokens, {s.forwards} forward passes, "
              f"{s.tokens_per_s:.1f} tokens/s, finish: {s.finish_reason}", file=sys.stderr)
    return 0
