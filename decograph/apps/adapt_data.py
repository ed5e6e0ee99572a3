"""The training text of ``decograph adapt-diffusion``: the autoregressive model's own answers.

No instruction data can be downloaded here, so the block-diffusion adaptation of the default
model learns from the default model itself (self-distillation, as Fast-dLLM v2's SFT stage but
with the teacher's outputs as the responses): the first turn of every Spec-Bench question that
is *not* one of the shipped benchmark prompts (``decograph.bench``'s 60, held out for the
benchmark), rendered with the chat template, answered by Hugging Face greedy ``generate``.
Prompts longer than ``max_prompt`` tokens are skipped (their answers would cost the most
training time). The answers are cached as JSON Lines next to the model cache, written to a
temporary file and renamed when complete, so an interrupted run starts over cleanly.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from decograph.errors import InputError

__all__ = ["training_prompts", "distill_answers", "REPO_QUESTIONS"]

REPO_QUESTIONS = Path(__file__).resolve().parents[2] / "benchmarks" / "data" / "spec_bench_questions.jsonl"


def training_prompts(tokenizer: Any, path: str | Path | None = None, held_out: set[str] | frozenset[str] = frozenset(),
                     max_prompt: int = 320) -> list[list[int]]:
    """Chat-template token ids of the first turns of ``path``'s questions (Spec-Bench's file by
    default) whose ``question_id`` is not in ``held_out`` (the benchmark's), at most
    ``max_prompt`` tokens."""
    p = Path(path) if path is not None else REPO_QUESTIONS
    if not p.is_file():
        raise InputError(f"adapt-diffusion: the training questions {p} are missing (pass --questions, a Spec-Bench "
                         f"style JSON Lines file)")
    out = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            q = json.loads(line)
            qid, text = str(q["question_id"]), q["turns"][0]
        except (json.JSONDecodeError, KeyError, IndexError, TypeError) as exc:
            raise InputError(f"{p}:{n}: not a Spec-Bench question (question_id, turns): {exc}") from None
        if qid in held_out or not isinstance(text, str) or not text.strip():
            continue
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False)
        if len(ids) <= max_prompt:
            out.append(list(ids))
    return out


def distill_answers(model: Any, tokenizer: Any, prompts: list[list[int]], target: Path, max_new: int = 256,
                    batch: int = 16, progress: bool = True) -> list[tuple[list[int], list[int]]]:
    """``(prompt, answer)`` pairs: greedy answers of ``model`` to ``prompts`` (cut after the first
    EOS, which is kept), read from ``target`` when it exists, else generated and written there."""
    if target.is_file():
        rows = [json.loads(line) for line in target.read_text(encoding="utf-8").splitlines() if line.strip()]
        return [(r["prompt"], r["answer"]) for r in rows]
    import torch

    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(eos_ids))
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: dict[int, list[int]] = {}
    t0 = time.time()
    for s in range(0, len(order), batch):
        idx = order[s:s + batch]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        att = torch.zeros((len(idx), width), dtype=torch.long)
        for j, i in enumerate(idx):
            ids[j, width - len(prompts[i]):] = torch.tensor(prompts[i])
            att[j, width - len(prompts[i]):] = 1
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=att, max_new_tokens=max_new, do_sample=False,
                                 pad_token_id=pad)
        for j, i in enumerate(idx):
            gen = out[j, width:].tolist()
            cut = next((k + 1 for k, t in enumerate(gen) if t in eos_ids), len(gen))
            answers[i] = gen[:cut]
        if progress:
            done = min(s + batch, len(order))
            print(f"adapt-diffusion: answered {done}/{len(order)} training prompts ({time.time() - t0:.0f} s)",
                  file=sys.stderr, flush=True)
    pairs = [(prompts[i], answers[i]) for i in range(len(prompts))]
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        for p, a in pairs:
            f.write(json.dumps({"prompt": p, "answer": a}) + "\n")
    os.replace(tmp, target)
    return pairs
