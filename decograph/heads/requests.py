"""The requests whose answers train a draft head (``train.train_head``): a questions file's,
then the ones the model writes itself (``self_questions``), and the feature store their answers
go to, kept per request sequence so that later runs extend it."""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Any, Callable

from decograph.heads import data as D
from decograph.heads import questions as Q
from decograph.heads import self_questions as SQ
from decograph.heads.trainer import TrainOptions

__all__ = ["text_digest", "file_requests", "question_store", "self_path", "resumed_requests", "self_requests"]


def text_digest(texts: tuple[str, ...]) -> str | None:
    return hashlib.sha256("\n\0".join(texts).encode()).hexdigest()[:10] if texts else None


def file_requests(questions: str | Path | None, own: int) -> tuple[frozenset[str], tuple[str, ...]]:
    """(the benchmark prompts never to train on, a questions file's requests)."""
    if questions is None and not own:
        return frozenset(), ()              # nothing to skip: the benchmark prompts are not even read
    bench = Q.benchmark_texts(questions)
    return bench, (Q.question_requests(questions, bench) if questions is not None else ())


def question_store(root: Path, fp: str, o: TrainOptions, fqs: tuple[str, ...], seed: int | None) -> D.FeatureStore:
    """The answers' features, kept per request *sequence*: a questions file's requests, then the
    self-written ones of ``seed`` in their cache's (append-only) order, so a later run asking for
    more requests extends the answers an earlier one made instead of starting over."""
    name = f"{text_digest(fqs) or 'none'}-self{seed}" if seed is not None else text_digest(fqs)
    return D.FeatureStore(root / f"questions-{name}-{o.seq_len}",
                          {"fingerprint": fp, "seq_len": o.seq_len, "python": sys.version.split()[0],
                           "questions": text_digest(fqs), "self_seed": seed})


def self_path(root: Path, seed: int) -> Path:
    return root / f"self-questions-s{seed}.jsonl"


def resumed_requests(state: dict[str, Any], root: Path, seed: int, fqs: tuple[str, ...],
                      say: Callable[[str], None]) -> tuple[str, ...] | None:
    """The self-written requests a checkpointed run trained on: as many as that run had (its
    request writing may have been cut short by its deadline), read back from the cache without
    sampling more; None (start over) where the cache no longer holds them."""
    used = state.get("requests") or {}
    mine = SQ.cached(self_path(root, seed), int(used.get("self", -1)))
    if len(mine) != used.get("self") or text_digest(fqs + mine) != used.get("digest"):
        say(f"the self-written requests of the checkpointed run are no longer in {self_path(root, seed)}; "
            "starting over")
        return None
    return mine


def self_requests(hf: Any, tok: Any, root: Path, own: int, skip: frozenset[str], o: TrainOptions,
                   minutes: float | None, seed: int, t0: float, progress: bool,
                   say: Callable[[str], None]) -> tuple[str, ...]:
    """``own`` requests the model writes itself (with ``minutes``: for at most a quarter of the
    answers' share of the budget), cached and extended per model and seed."""
    from tqdm.auto import tqdm

    deadline = None if minutes is None else t0 + o.gen_share * float(minutes) * 60.0 / 4
    path = self_path(root, seed)
    bar = tqdm(total=own, desc="draft-head requests", unit="req", disable=not progress, file=sys.stderr,
               dynamic_ncols=True)
    try:
        mine = SQ.self_questions(hf, tok, own, path, seed=seed, deadline=deadline, skip=skip,
                                 progress=lambda kept: bar.update(kept - bar.n))
    finally:
        bar.close()
    say(f"{len(mine)} requests written by the model itself ({path})")
    return mine
