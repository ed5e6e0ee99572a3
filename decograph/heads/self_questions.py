"""Requests the model writes itself, for ``train-draft --self-questions N``: the chat template up
to the start of a user turn, sampled (temperature 1) until the turn ends, gives the kind of
request the model was tuned to answer (the pre-query idea of Magpie, Xu et al. 2024). The
model's greedy answers to them are then training data from the distribution drafting sees in
a chat, with no dataset and no benchmark prompt.

Sampling is deterministic per (seed, batch): batch ``b`` draws from a generator seeded with
``seed * 1_000_003 + b``. Kept requests are appended to a JSON Lines file in Spec-Bench's format
(``question_id``, ``category: "self"``, ``turns``: ``--questions`` reads it too) as each batch
finishes, and a rerun continues after the last batch counted, so an interrupted run resumes and a longer one extends.
"""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any, Callable

import torch

from decograph.errors import InputError

__all__ = ["SENTINEL", "pre_query", "self_questions"]

SENTINEL = "\x00decograph-user-turn\x00"
_MAX_NEW = 96           # a request longer than this is dropped (unfinished)
_MIN_WORDS = 4


def pre_query(tokenizer: Any) -> tuple[list[int], int]:
    """(the chat template's tokens up to where a user's request starts, the token that ends a
    user turn). ``InputError`` for a tokenizer without a chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise InputError("--self-questions needs a chat model: this tokenizer has no chat template to write "
                         "requests in (use --questions FILE instead)")
    text = tokenizer.apply_chat_template([{"role": "user", "content": SENTINEL}], tokenize=False,
                                         add_generation_prompt=False)
    at = text.find(SENTINEL)
    if at < 0:
        raise InputError("--self-questions: the chat template does not place the user's text in the prompt")
    head = tokenizer.encode(text[:at], add_special_tokens=False)
    tail = tokenizer.encode(text[at + len(SENTINEL):], add_special_tokens=False)
    if not head or not tail:
        raise InputError("--self-questions: the chat template has no marker before or after a user turn")
    return head, int(tail[0])


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().casefold()


def _read(path: Path) -> tuple[list[str], int]:
    """(the requests kept so far, the next batch to sample: the count in the ``.batches`` file
    beside ``path``; a batch whose requests were written but not counted is sampled again, and
    its requests are then repeats, not kept twice)."""
    kept = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                kept.append(json.loads(line)["turns"][0])
            except (json.JSONDecodeError, KeyError, IndexError, TypeError):
                continue                    # a line cut short by an interrupted write
    done = _counter(path)
    return kept, int(done.read_text()) if done.is_file() else 0


def cached(path: str | Path, n: int) -> tuple[str, ...]:
    """The first ``n`` requests already kept in ``path`` (fewer if it holds fewer), sampling nothing."""
    return tuple(_read(Path(path))[0][:n])


def _counter(path: Path) -> Path:
    return path.with_name(path.name + ".batches")


def self_questions(hf: Any, tokenizer: Any, n: int, path: str | Path, *, seed: int = 0, batch: int = 32,
                   skip: frozenset[str] = frozenset(), deadline: float | None = None,
                   progress: Callable[[int], None] = lambda kept: None) -> tuple[str, ...]:
    """``n`` distinct requests written by ``hf`` (a Hugging Face causal LM) in its chat template,
    cached in ``path`` (resumed and extended there). Dropped: a turn that does not end within
    ``_MAX_NEW`` tokens, fewer than ``_MIN_WORDS`` words, a repeat, anything in ``skip``
    (benchmark prompts). Stops early at ``deadline`` (``time.monotonic()``); returns what it kept,
    at most ``n``, in order."""
    if n < 1:
        raise InputError(f"--self-questions must be at least 1, got {n}")
    path = Path(path)
    kept, b = _read(path)
    if len(kept) >= n:
        return tuple(kept[:n])
    head, end = pre_query(tokenizer)
    eos = {end, *([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])}
    seen = {_clean(q) for q in kept} | {_clean(q) for q in skip}
    ids = torch.tensor([head] * batch)
    path.parent.mkdir(parents=True, exist_ok=True)
    last = 0.0
    while len(kept) < n and (deadline is None or time.monotonic() + last <= deadline):
        t0 = time.monotonic()
        with torch.random.fork_rng(devices=[]), torch.inference_mode():
            torch.manual_seed(seed * 1_000_003 + b)
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_p=1.0,
                              top_k=0, max_new_tokens=_MAX_NEW, eos_token_id=sorted(eos),
                              pad_token_id=end)
        rows = []
        for j, seq in enumerate(out[:, len(head):].tolist()):
            stop = next((i for i, t in enumerate(seq) if t in eos), None)
            if stop is None:
                continue
            text = tokenizer.decode(seq[:stop], skip_special_tokens=True).strip()
            key = _clean(text)
            if len(text.split()) < _MIN_WORDS or key in seen or SENTINEL in text:
                continue
            seen.add(key)
            kept.append(text)
            rows.append({"question_id": f"self-{seed}-{b}-{j}", "category": "self", "turns": [text]})
        b += 1
        with open(path, "a", encoding="utf-8") as f:      # a batch's requests, then its count
            f.writelines(json.dumps(r) + "\n" for r in rows)
            f.flush()
            os.fsync(f.fileno())
        tmp = _counter(path).with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(str(b))
        os.replace(tmp, _counter(path))
        progress(len(kept))
        last = time.monotonic() - t0
    return tuple(kept[:n])
