"""``train_head``: train an EAGLE-style draft head for a causal LM on this machine's CPU.

    head = train_head(model, tokenizer, minutes=30)      # saved to cached_head_path(fingerprint)
    head = train_head(model, tokenizer, steps=200, out="head.npz")

Phases (``minutes``: one wall-clock budget over all of them; ``steps``: exact and deterministic):

1. Data (``decograph.heads.data``): held-out chunks, the target's greedy answers to requests
   derived from the standard library (at most ``gen_share`` of the budget), then standard
   library text windows (until ``data_share``); features cached per model, reused and
   extended by later runs. With ``steps``, fixed chunk counts instead of deadlines.
2. The vocabulary subset: the ``vocab`` tokens the target predicts most in the training data,
   with the token frequencies of the standard library's text as a prior (``data.vocab_ranking``);
   its coverage of the target's argmax tokens (training and held-out) is logged and kept.
3. Training (``decograph.heads.trainer``): cross-entropy of the subset logits against the
   target's own distribution at the next position plus ``feat_weight`` times a smooth-L1 on
   the predicted feature (EAGLE-1), Gaussian noise on the input features, and the
   training-time-test unroll to ``depth`` (the head fed its own predicted features). AdamW,
   linear warm-up then cosine decay (over steps, or over the training time), gradient
   clipping. A held-out evaluation (``trainer.acceptance``) at each quarter and at the end;
   the curve (JSON lines, and a PNG where matplotlib is installed) beside the checkpoint.
4. Checkpoints (model, optimizer, schedule, RNG, data cursor, step) in
   ``cache_path("heads")/<fingerprint>/runs/<run>/train.pt`` (``run_dir``: one directory per
   options, seed and budget, so runs never overwrite each other's) every ``checkpoint_every``
   steps and every two minutes; a rerun with the same settings resumes, and with ``steps`` ends
   bit-identical to an uninterrupted run; a finished run is not trained again. ``fresh`` starts
   over (the prepared data is kept: it depends only on the model and the standard library).

The head is saved with ``save_head`` (``out``, else ``cached_head_path``; the answers it trained on
as a corpus for ``draft.corpus`` beside it, ``corpus_path``), training facts in
``HeadConfig.meta``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from decograph.errors import InputError, ModelError
from decograph.heads import data as D
from decograph.heads import requests as R
from decograph.heads.model import DraftHead, head_config_for, init_from_target, to_head_weights
from decograph.heads.corpus import build_corpus, save_corpus
from decograph.heads.spec import WEIGHT_SHAPES, HeadWeights, save_head
from decograph.heads.store import cached_corpus_path, cached_head_path, model_fingerprint, resolve_head
from decograph.heads.trainer import (Batch, Trainer, TrainOptions, evaluate, load_checkpoint, plot_curve,
                                     save_checkpoint, write_curve)
from decograph.measure_cache import cache_path

__all__ = ["TrainOptions", "check_out", "corpus_path", "head_dir", "run_dir", "train_head"]

COVERAGE_SIZES = (512, 1024, 2048, 4096, 8192, 16384, 32768)


def head_dir(fingerprint: str) -> Path:
    """Where a model's training state lives (the checkpoint, the curve, the data)."""
    return cache_path("heads") / fingerprint


def _log_default(line: str) -> None:
    print(f"train-draft: {line}", file=sys.stderr, flush=True)


def check_out(out: str | Path | None) -> Path | None:
    """``out`` as a path we can write (``InputError`` before any work when we cannot)."""
    if out is None:
        return None
    path = Path(out)
    if path.is_dir():
        raise InputError(f"--out {path}: is a directory; give a file path such as {path / 'head.npz'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe = path.with_name(f".{path.name}.{os.getpid()}.probe")
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise InputError(f"--out {path}: cannot write there ({exc.strerror or exc})") from None
    return path


def _target(model: Any, tokenizer: Any) -> tuple[Any, Any, Any, np.ndarray, torch.Tensor, str]:
    """(adapter, tokenizer, HF model, embedding [V, H] numpy, LM head [V, H], fingerprint)."""
    from decograph.api import resolve_model

    adapter, tok = resolve_model(model, tokenizer)
    hf = getattr(adapter, "model", None)
    if hf is None or not hasattr(hf, "get_decoder") or hf.get_output_embeddings() is None:
        raise ModelError(f"train-draft needs a Hugging Face causal LM with an LM head, got {type(adapter).__name__}")
    if tok is None:
        raise ModelError("train-draft needs the model's tokenizer")
    embed = hf.get_input_embeddings().weight.detach().to(torch.float32).numpy()
    lm_head = hf.get_output_embeddings().weight.detach().to(torch.float32)
    return adapter, tok, hf, embed, lm_head, model_fingerprint(hf.config, embed)


def _data_plan(o: TrainOptions, minutes: float | None, steps: int | None, t0: float) -> D.DataPlan:
    if steps is not None:
        held = max(2, min(12, o.data_chunks // 8))       # 12 at the default 96: 8 answers, 4 text windows
        chat = o.data_chunks // 3
        return D.DataPlan(seq_len=o.seq_len, chat_heldout=held - max(1, held // 3), text_heldout=max(1, held // 3),
                          chat_train=chat,
                          text_train=o.data_chunks - chat, max_new=min(192, o.seq_len // 2))
    budget = float(minutes) * 60.0          # held-out first, scaled down for short runs (8 answers, 4 windows at 30)
    return D.DataPlan(seq_len=o.seq_len, chat_heldout=max(2, min(8, round(minutes / 4))),
                      text_heldout=max(2, min(4, round(minutes / 8))), chat_deadline=t0 + o.gen_share * budget,
                      text_deadline=t0 + o.data_share * budget, max_new=min(192, o.seq_len // 2))


def _question_plan(o: TrainOptions, minutes: float | None, steps: int | None, t0: float,
                   qs: tuple[str, ...]) -> D.DataPlan:
    """The questions' answers: every 10th held out, the rest for training (with ``minutes``
    until the answers' share of the budget ends: they come before the standard library's)."""
    held = len(range(0, len(qs), 10))
    train = None if steps is None else max(1, o.data_chunks // 3)
    deadline = None if minutes is None else t0 + o.gen_share * float(minutes) * 60.0
    return D.DataPlan(seq_len=o.seq_len, chat_heldout=held, text_heldout=0, chat_train=train, text_train=0,
                      chat_deadline=deadline, max_new=min(192, o.seq_len // 2), questions=qs)


def _prepare(store: D.FeatureStore, adapter: Any, tok: Any, plan: D.DataPlan, progress: bool,
             log: Callable[[str], None], required: bool = True) -> dict[str, int]:
    """Run the data phase; returns the chunk count of each stream to use."""
    from tqdm.auto import tqdm

    bar = tqdm(desc="draft-head data", unit="tok", disable=not progress, file=sys.stderr, dynamic_ncols=True)

    def step(stream: str, tokens: int) -> None:
        bar.update(tokens)
        bar.set_postfix_str(", ".join(f"{s} {store.count(s)}" for s in D.STREAMS))

    try:
        with store.writer() as mine:
            if mine:
                D.prepare(store, adapter, tok, plan, step)
            else:
                log(f"another process is preparing the data in {store.root}; training on what is there")
                store.reload()
    finally:
        bar.close()
    counts = {s: store.count(s) for s in D.STREAMS}
    fixed = {"chat/heldout": plan.chat_heldout, "text/heldout": plan.text_heldout, "chat/train": plan.chat_train,
             "text/train": plan.text_train}
    use = {s: min(counts[s], fixed[s]) if fixed[s] is not None else counts[s] for s in D.STREAMS}
    if required and use["chat/train"] + use["text/train"] == 0:
        raise ModelError("train-draft: no training data was prepared (the budget ended first); give more --minutes")
    log("data: " + ", ".join(f"{s} {use[s]} chunks" for s in D.STREAMS)
        + f" ({sum(store.tokens(s) for s in D.STREAMS)} tokens of features in {store.root})")
    return use


def _vocab(train: D.Chunks, held: D.Chunks, size: int, prior: np.ndarray,
           fixed: np.ndarray | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """The ``size`` tokens the target predicts most in ``train`` (``D.vocab_ranking`` with the
    corpus ``prior``), and the share of the target's argmax tokens that subsets of several sizes
    hold, in ``train`` and in ``held`` (response positions of the chats, all of the text).
    ``fixed`` (a starting head's subset) is kept, ranked first (``size`` beyond it adds the next)."""
    order = D.vocab_ranking(train, prior)
    if fixed is not None:
        fixed = np.asarray(fixed, np.int64)
        order = np.concatenate([fixed, order[~np.isin(order, fixed)]])
        size = max(size, len(fixed))      # a larger --vocab extends the subset by the next most predicted
    vocab_size = len(order)
    rank = np.empty(vocab_size, np.int64)
    rank[order] = np.arange(vocab_size)
    held_am = np.concatenate([held.argmax[i, held.starts[i] + 1:held.lengths[i]] for i in range(len(held))]
                             + [np.zeros(0, held.argmax.dtype)])
    cover = {}
    for k in sorted({*COVERAGE_SIZES, size}):
        if k <= vocab_size:
            cover[str(k)] = {split: round(float((rank[am] < k).mean()), 4) if len(am) else 0.0
                             for split, am in (("train", train.argmax[train.argmax >= 0]), ("heldout", held_am))}
    return order[:min(size, vocab_size)].astype(np.int64), cover


def _loop(tr: Trainer, train: D.Chunks, held: dict[str, D.Chunks], run: Path, extra: dict[str, Any],
          progress: bool, callback: Callable[[int, dict[str, Any]], None] | None) -> None:
    """Train until the budget ends: checkpoints, evaluations at each quarter, the curve."""
    from tqdm.auto import tqdm

    o, ckpt = tr.o, run / "train.pt"
    bar = tqdm(total=tr.steps, initial=tr.step, desc="draft-head training", unit="step", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)
    window: list[dict[str, float]] = []
    last_ckpt, last_eval = time.monotonic(), {}
    try:
        while not tr.finished():
            t = time.monotonic()
            stats = tr.update(Batch(train.pick(tr.indices()), tr.module.sub_index))
            window.append(stats)
            record = {"step": tr.step, "tokens": tr.tokens}
            if tr.step % 10 == 0 or tr.finished():
                mean = {k: round(sum(w[k] for w in window) / len(window), 5) for k in window[0]}
                tr.curve.append({**record, "seconds": round(tr.seconds + time.monotonic() - t, 2), **mean})
                window = []
            if tr.evals_done < 3 and tr.progress() >= (tr.evals_done + 1) / 4:
                last_eval = evaluate(tr.module, held, o)
                tr.evals_done += 1
                tr.curve.append({**record, "eval": last_eval})
            tr.seconds += time.monotonic() - t
            bar.update(1)
            shown = last_eval.get("chat") or last_eval.get("text") or {}
            bar.set_postfix_str(f"loss {stats['loss']:.3f} acc1 {stats['acc1']:.3f}"
                                + (f" held-out {'/'.join(f'{a:.2f}' for a in shown['acc'])}" if shown else "")
                                + ("" if tr.steps else f" left {max(0.0, tr.budget_s - tr.seconds) / 60:.1f} min"))
            if tr.step % o.checkpoint_every == 0 or time.monotonic() - last_ckpt > 120:
                save_checkpoint(ckpt, tr.state({**extra, "done": False}))
                write_curve(run, tr.curve)
                last_ckpt = time.monotonic()
            if callback is not None:
                callback(tr.step, {**record, **stats})
    finally:
        bar.close()


def train_head(model: Any, tokenizer: Any = None, *, minutes: float | None = 30.0, steps: int | None = None,
               out: str | Path | None = None, vocab: int | None = None, seed: int = 0, progress: bool = True,
               fresh: bool = False, threads: int | None = None, options: TrainOptions | None = None,
               model_name: str | None = None, log: Callable[[str], None] | None = None,
               callback: Callable[[int, dict[str, Any]], None] | None = None,
               questions: str | Path | None = None, self_questions: int = 0,
               init: str | Path | None = None) -> HeadWeights:
    """Train a draft head for ``model`` (an adapter, a Hugging Face causal LM, a name or None for
    the default model) and save it to ``out`` (default: ``cached_head_path``, where
    ``resolve_head("default", ...)`` finds it). ``steps`` (exact, deterministic) replaces the
    ``minutes`` budget. ``callback(step, record)`` runs after every step (after any
    checkpoint). ``questions``: a Spec-Bench style JSON Lines file whose first turns the model
    answers first, as training data from the user's own domain (benchmark prompts are skipped:
    ``questions.benchmark_texts``; every 10th question is held out and scored as ``questions``).
    ``self_questions``: that many requests the model writes itself (``self_questions``), answered
    and held out the same way. ``init``: start from a head (``default`` or a head file) instead of
    a fresh one, keeping its vocabulary subset. Returns the head; its ``config.meta`` holds the training facts."""
    o = dataclasses.replace(options or TrainOptions(), **({"vocab": vocab} if vocab is not None else {}))
    _check_budget(minutes, steps, o, threads)
    say = log or _log_default
    path = check_out(out)
    torch.set_num_threads(threads or os.cpu_count() or 1)
    t0 = time.monotonic()
    adapter, tok, hf, embed, lm_head, fp = _target(model, tokenizer)
    name = model_name or str(getattr(hf.config, "_name_or_path", "") or fp)
    start = _start_head(init, fp, name)
    root = head_dir(fp)
    bench, fqs = R.file_requests(questions, self_questions)
    key = {"fingerprint": fp, "options": dataclasses.asdict(o), "seed": seed,
           "budget": ["steps", steps] if steps is not None else ["minutes", minutes],
           **({"questions": {"file": R.text_digest(fqs), "self": self_questions}} if fqs or self_questions else {}),
           **({"init": _digest(start)} if start is not None else {})}
    run = run_dir(fp, key)
    state = None if fresh else load_checkpoint(run / "train.pt", key, say)
    mine = R.resumed_requests(state, root, seed, fqs, say) if state is not None and self_questions else None
    if state is not None and self_questions and mine is None:
        state = None
    if mine is None:
        mine = R.self_requests(hf, tok, root, self_questions, bench | frozenset(fqs), o, minutes, seed, t0, progress,
                              say) if self_questions else ()
    qs = fqs + mine
    qdigest = R.text_digest(qs)
    store = D.FeatureStore(root / f"data-{o.seq_len}",
                           {"fingerprint": fp, "seq_len": o.seq_len, "python": sys.version.split()[0]})
    qstore = R.question_store(root, fp, o, fqs, seed if mine else None) if qs else None
    if state is None:
        quse = (_prepare(qstore, adapter, tok, _question_plan(o, minutes, steps, t0, qs), progress, say, False)
                if qstore is not None else None)
        use = _prepare(store, adapter, tok, _data_plan(o, minutes, steps, t0), progress, say)
        if quse is not None:
            use = {**use, "questions": quse}
    else:
        use = state["data"]
        say(f"resuming {run / 'train.pt'} at step {state['step']}" + (" (finished)" if state["done"] else ""))
    data_s = time.monotonic() - t0
    train, held = _load_data(store, use, o, int(embed.shape[1]), qstore)
    if state is None:
        vocab_ids, cover = _vocab(train, D.Chunks.concat(list(held.values()), o.seq_len, int(embed.shape[1])),
                                  o.vocab if start is None or vocab is not None else 0,
                                  D.corpus_counts(store, tok, len(lm_head), o.corpus_chars),
                                  None if start is None else start.vocab_ids)
        say("vocabulary subset coverage of the target's argmax tokens (train / held-out): "
            + ", ".join(f"{k} {c['train']:.3f}/{c['heldout']:.3f}" for k, c in cover.items()))
    else:
        vocab_ids, cover = np.asarray(state["vocab_ids"], np.int64), state["coverage"]
    module = _new_module(hf, fp, name, embed, lm_head, vocab_ids, o, seed, say if state is None else None, start)
    budget_s = 0.0 if steps is not None else max(10.0, float(minutes) * 60 - data_s - min(60.0, 3.0 * minutes))
    tr = Trainer(module, o, seed, len(train), steps, budget_s)
    extra = {"key": key, "data": use, "vocab_ids": vocab_ids.tolist(), "coverage": cover,
             "requests": {"self": len(mine), "digest": qdigest}}
    if state is not None:
        tr.load(state)
    if state is None or not state["done"]:
        say(f"training on {int(train.lengths.sum())} tokens ({len(train)} chunks) "
            + (f"for {steps} steps" if steps is not None else f"for {budget_s / 60:.1f} min"))
        _loop(tr, train, held, run, extra, progress, callback)
    final = evaluate(module, held, o)
    meta = _meta(tr, use, train, final, cover, o, seed, data_s, time.monotonic() - t0, state)
    tr.curve = [r for r in tr.curve if not r.get("final")] + [{"step": tr.step, "eval": final, "final": True}]
    done = tr.state({**extra, "done": True, "meta": meta})
    del done["optim"]                       # a finished run is not trained further: keep it small
    save_checkpoint(run / "train.pt", done)
    write_curve(run, tr.curve)
    plot_curve(run, tr.curve)
    head = to_head_weights(module, vocab_ids, dataclasses.replace(module.config, meta=meta))
    say(f"saved {save_head(head, path or cached_head_path(fp))}; curve {run / 'curve.jsonl'}")
    corpus = build_corpus((train.tokens[i, train.starts[i] + 1:train.lengths[i]] for i in range(len(train))
                           if train.starts[i] > 0), len(lm_head), fp, name, {"source": "train-draft answers"})
    say(f"saved {save_corpus(corpus, corpus_path(path, fp))}: {len(corpus)} tokens of the model's own answers "
        f"({corpus.sequences}) for draft.corpus")
    return head


def corpus_path(out: str | Path | None, fingerprint: str) -> Path:
    """Where a run's corpus of answers goes: beside ``out`` (``X.npz`` -> ``X.corpus.npz``), else
    where ``corpus=default`` finds it."""
    return cached_corpus_path(fingerprint) if out is None else Path(out).with_suffix(".corpus.npz")


def _start_head(init: str | Path | None, fp: str, name: str) -> HeadWeights | None:
    """The head a run starts from (``default``: the shipped or cached one), checked against the model."""
    if init is None:
        return None
    if str(init) != "default" and not Path(init).is_file():
        raise InputError(f"--init {init}: no such head file (give `default` or a file `train-draft` wrote)")
    return resolve_head(str(init), fp, name)


def _digest(head: HeadWeights) -> str:
    h = hashlib.sha256(np.asarray(head.vocab_ids, np.int64).tobytes())
    for k in sorted(head.weights):
        h.update(np.ascontiguousarray(head.weights[k], np.float32).tobytes())
    return h.hexdigest()[:10]


def run_dir(fingerprint: str, key: dict[str, Any]) -> Path:
    """One run's directory (checkpoint, curve): runs of other options, seeds or budgets never
    overwrite each other's checkpoint."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    return head_dir(fingerprint) / "runs" / digest


def _load_data(store: D.FeatureStore, use: dict[str, Any], o: TrainOptions, H: int,
               qstore: D.FeatureStore | None = None) -> tuple[D.Chunks, dict[str, D.Chunks]]:
    parts = [store.load("text/train", use["text/train"], o.seq_len, H),
             store.load("chat/train", use["chat/train"], o.seq_len, H)]
    held = {s: store.load(f"{s}/heldout", use[f"{s}/heldout"], o.seq_len, H) for s in ("chat", "text")}
    if qstore is not None and "questions" in use:
        parts.append(qstore.load("chat/train", use["questions"]["chat/train"], o.seq_len, H))
        held["questions"] = qstore.load("chat/heldout", use["questions"]["chat/heldout"], o.seq_len, H)
    return D.Chunks.concat(parts, o.seq_len, H), held


def _check_budget(minutes: float | None, steps: int | None, o: TrainOptions, threads: int | None) -> None:
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0):
        raise InputError(f"--steps must be a positive whole number, got {steps!r}")
    if steps is None and (minutes is None or not math.isfinite(minutes) or minutes <= 0):
        raise InputError(f"--minutes must be a positive number, got {minutes!r}")
    if o.vocab < 1:
        raise InputError(f"--vocab must be at least 1, got {o.vocab}")
    if threads is not None and threads < 1:
        raise InputError(f"--threads must be at least 1, got {threads}")
    if o.depth < 1 or o.eval_depth < 1 or o.batch < 1 or o.seq_len < 8:
        raise InputError(f"train-draft: bad options {o}")


def _new_module(hf: Any, fp: str, name: str, embed: np.ndarray, lm_head: torch.Tensor, vocab_ids: np.ndarray,
                o: TrainOptions, seed: int, say: Callable[[str], None] | None,
                start: HeadWeights | None = None) -> DraftHead:
    """A freshly initialised head (its random init drawn from ``seed`` alone), or ``start``'s."""
    config = head_config_for(hf, fp, name, o.intermediate)
    if start is not None:
        if WEIGHT_SHAPES(start.config) != WEIGHT_SHAPES(config):
            raise InputError(f"--init: the head's shapes ({start.config.intermediate}-wide MLP) are not this run's "
                             f"({config.intermediate}); give the same --intermediate or start fresh")
        module = DraftHead.from_head_weights(dataclasses.replace(start, config=config, vocab_ids=vocab_ids),
                                             torch.from_numpy(embed), lm_head)
        if say is not None:
            say(f"head: starting from {start.config.meta.get('steps', '?')} steps of an earlier head "
                f"(vocab {len(start.vocab_ids)}" + (f", extended to {len(vocab_ids)})" if len(vocab_ids) >
                                                    len(start.vocab_ids) else ")"))
        return module
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = DraftHead(config, torch.from_numpy(embed), lm_head, vocab_ids)
    done = init_from_target(module, hf, last_layer=o.init == "last-layer")
    if say is not None:
        say(f"head: {sum(p.numel() for p in module.parameters()) / 1e6:.2f}M weights "
            f"(heads {config.heads}/{config.kv_heads}, head_dim {config.head_dim}, MLP {config.intermediate}, "
            f"vocab {len(vocab_ids)}); from the target: {', '.join(done) or 'nothing'}")
    return module


def _meta(tr: Trainer, use: dict[str, int], train: D.Chunks, final: dict[str, Any], cover: dict[str, Any],
          o: TrainOptions, seed: int, data_s: float, wall_s: float, state: dict[str, Any] | None) -> dict[str, Any]:
    if state is not None and state.get("done") and "meta" in state:
        return dict(state["meta"], heldout=final)
    return {"steps": tr.step, "tokens": tr.tokens, "train_minutes": round(tr.seconds / 60, 2),
            "data_minutes": round(data_s / 60, 2), "minutes": round(wall_s / 60, 2),
            "tokens_per_s": round(tr.tokens / tr.seconds, 1) if tr.seconds else 0.0,
            "data": {"chunks": use, "train_tokens": int(train.lengths.sum())}, "heldout": final,
            "vocab": o.vocab, "coverage": cover.get(str(o.vocab), {}), "seed": seed,
            "options": dataclasses.asdict(o)}
