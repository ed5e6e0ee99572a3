"""``decograph train-draft``: train an EAGLE-style draft head for a model on this CPU.

    decograph train-draft                                  # the default model, 30 minutes
    decograph train-draft --model DIR --minutes 10
    decograph train-draft --steps 200 --out head.npz       # exact and reproducible

Prints where the head went, its held-out acceptance and how to decode with it. Every bad
number or an unwritable ``--out`` is an ``InputError`` before the model loads. The parser
imports the standard library only; torch loads when the command runs.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

from decograph.errors import InputError

__all__ = ["add_parser", "cmd_train_draft"]


def add_parser(sub: Any, model_help: str) -> None:
    """Register ``train-draft`` on the ``decograph`` command's subparsers."""
    t = sub.add_parser("train-draft", help="train an EAGLE-style draft head for a model (the eagle strategies)",
                       description="Train a draft head (one decoder layer fed the model's final hidden states, "
                                   "EAGLE-style) on this machine: data from this Python's standard library and "
                                   "the model's own greedy answers to requests derived from it, features cached "
                                   "per model, a checkpoint that a rerun resumes. Saves the head where "
                                   "`decograph run --strategy eagle` finds it (or --out).")
    t.add_argument("--model", metavar="MODEL", help=f"a causal LM: {model_help} (default: embedded model)")
    budget = t.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=float, default=None, metavar="N",
                        help="wall-clock budget, data preparation included (default: 30)")
    budget.add_argument("--steps", type=int, default=None, metavar="N",
                        help="exactly N training steps on a fixed amount of data (reproducible; see --data-chunks)")
    t.add_argument("--data-chunks", type=int, default=None, metavar="N",
                   help="with --steps: chunks of 512 tokens to prepare and train on (default: 96)")
    t.add_argument("--out", metavar="PATH", help="write the head here (default: the model's cache entry, which "
                   "`draft.head(head=default)` finds)")
    t.add_argument("--vocab", type=int, default=None, metavar="N",
                   help="tokens the head drafts: the N the model predicts most (default: 8192)")
    t.add_argument("--questions", metavar="FILE.jsonl", default=None,
                   help="also the model's answers to these requests (Spec-Bench's JSON Lines format: the first "
                        "turn of each), generated first: drafts tuned to your own traffic. The prompts of "
                        "`decograph bench` and the first 5 of each category of FILE are skipped; every 10th "
                        "question is held out and scored")
    t.add_argument("--self-questions", type=int, default=0, metavar="N",
                   help="also the model's answers to N requests it writes itself (sampled from its chat template "
                        "where a user's turn starts): chat-like data with no dataset; cached, resumed, every 10th "
                        "held out. Needs a chat template")
    t.add_argument("--init", metavar="HEAD", default=None,
                   help="start from this head instead of a fresh one: `default` (the shipped or cached head) or a "
                        "head file; its vocabulary subset is kept (a larger --vocab extends it)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--fresh", action="store_true", help="start training over (the prepared data is kept)")
    t.add_argument("--threads", type=int, default=None, metavar="N", help="torch threads (default: every core)")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.set_defaults(func=cmd_train_draft)


def _check(args: argparse.Namespace) -> None:
    if args.minutes is not None and (not math.isfinite(args.minutes) or args.minutes <= 0):
        raise InputError(f"--minutes must be a positive number, got {args.minutes:g}")
    if args.steps is not None and args.steps <= 0:
        raise InputError(f"--steps must be a positive whole number, got {args.steps}")
    if args.data_chunks is not None:
        if args.steps is None:
            raise InputError("--data-chunks goes with --steps (a --minutes run prepares data while its share of "
                             "the time lasts)")
        if args.data_chunks < 2:
            raise InputError(f"--data-chunks must be at least 2, got {args.data_chunks}")
    for flag, value in (("--vocab", args.vocab), ("--threads", args.threads)):
        if value is not None and value < 1:
            raise InputError(f"{flag} must be at least 1, got {value}")
    if args.self_questions < 0:
        raise InputError(f"--self-questions must be at least 0, got {args.self_questions}")
    if args.init is not None and args.init != "default" and not Path(args.init).is_file():
        raise InputError(f"--init {args.init}: no such head file (give `default` or a file `train-draft` wrote)")
    if args.questions is not None and not Path(args.questions).is_file():
        raise InputError(f"--questions {args.questions}: no such file")
    if args.out is not None:
        out = Path(args.out)
        if out.is_dir():
            raise InputError(f"--out {out}: is a directory; give a file path such as {out / 'head.npz'}")
        if out.suffix != ".npz":
            raise InputError(f"--out {out}: a draft head is an .npz file; name it {out.with_suffix('.npz').name}")


def cmd_train_draft(args: argparse.Namespace) -> int:
    """Run ``train-draft``; prints the head's path, its held-out acceptance and how to use it."""
    import dataclasses

    from decograph.apps.loading import load_model
    from decograph.heads.store import cached_head_path
    from decograph.heads.train import TrainOptions, train_head

    _check(args)
    options = TrainOptions()
    if args.data_chunks is not None:
        options = dataclasses.replace(options, data_chunks=args.data_chunks)
    if args.out is not None:
        from decograph.heads.train import check_out

        check_out(args.out)                 # before the model loads
    adapter, tok, name = load_model(args.model)
    minutes = None if args.steps is not None else 30.0 if args.minutes is None else args.minutes
    head = train_head(adapter, tok, minutes=minutes, steps=args.steps,
                      out=args.out, vocab=args.vocab, seed=args.seed, progress=not args.quiet, fresh=args.fresh,
                      threads=args.threads, options=options, model_name=name, questions=args.questions,
                      self_questions=args.self_questions, init=args.init)
    path = Path(args.out) if args.out else cached_head_path(head.config.model)
    meta = head.config.meta
    print(f"draft head for {name}: {path} ({path.stat().st_size / 1e6:.1f} MB)")
    for split, r in sorted(meta.get("heldout", {}).items()):
        accs = " / ".join(f"{a:.3f}" for a in r["acc"])
        print(f"held-out {split}: top-1 acceptance by draft depth {accs} ({r['chain']:.2f} tokens per chain of "
              f"{len(r['acc'])}; {r['positions']} positions)")
    cover = meta.get("coverage", {})
    if cover:
        print(f"vocabulary subset: {len(head.vocab_ids)} tokens, {100 * cover.get('heldout', 0):.1f}% of the "
              "model's held-out greedy tokens")
    model = f" --model {args.model}" if args.model else ""
    where = f" --set head={path}" if args.out else ""
    print(f"use it: decograph run --strategy eagle{model}{where} --prompt \"...\"  (or eagle_anpd)")
    sys.stdout.flush()
    return 0
