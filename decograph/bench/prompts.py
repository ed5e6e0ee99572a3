"""Benchmark prompt sets: Spec-Bench's JSONL format, and the subset shipped with decograph.

Each line is ``{"question_id": ..., "category": "...", "turns": ["first turn", ...]}``; the
first turn is the prompt. The eight MT-bench categories count as one task, ``mt_bench``, as in
Spec-Bench's own evaluation; other categories are tasks of their own. A line that is not such
an object is an ``InputError`` naming the file and line.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from decograph.errors import InputError

__all__ = ["MT_BENCH", "SPEC_BENCH_TASKS", "Prompt", "DEFAULT_PROMPTS", "load_prompts"]

MT_BENCH = frozenset({"writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"})
SPEC_BENCH_TASKS = ("mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag")
DEFAULT_PROMPTS = "spec_bench_default.jsonl"   # 10 questions per Spec-Bench task (see data/README.md)


@dataclass(frozen=True)
class Prompt:
    """One benchmark prompt: its task (category), id and text."""

    task: str
    question_id: str
    text: str


def _read_default() -> tuple[str, str]:
    res = resources.files("decograph.bench") / "data" / DEFAULT_PROMPTS
    return f"<shipped {DEFAULT_PROMPTS}>", res.read_text(encoding="utf-8")


def _parse(origin: str, text: str) -> list[Prompt]:
    out: list[Prompt] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            q = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{origin}:{n}: not a JSON object ({exc.msg})") from None
        if not isinstance(q, dict):
            raise InputError(f"{origin}:{n}: expected a JSON object with \"turns\", got {type(q).__name__}")
        turns = q.get("turns")
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
            raise InputError(f"{origin}:{n}: \"turns\" must be a non-empty list of strings (Spec-Bench's format)")
        if not turns[0].strip():
            raise InputError(f"{origin}:{n}: the first turn is empty")
        cat = q.get("category", "default")
        if not isinstance(cat, str) or not cat:
            raise InputError(f"{origin}:{n}: \"category\" must be a non-empty string")
        task = "mt_bench" if cat in MT_BENCH else cat
        out.append(Prompt(task, str(q.get("question_id", n)), turns[0]))
    if not out:
        raise InputError(f"{origin}: no prompts in the file")
    return out


def load_prompts(path: str | Path | None = None, per_category: int = 0) -> list[Prompt]:
    """The first ``per_category`` prompts of each task (all when 0), tasks in Spec-Bench's order
    and then in order of appearance. ``path`` None: the shipped Spec-Bench subset."""
    if per_category < 0:
        raise InputError(f"--per-category must be >= 0, got {per_category}")
    if path is None:
        origin, text = _read_default()
    else:
        p = Path(path)
        if not p.is_file():
            raise InputError(f"--prompts {p}: no such file")
        try:
            origin, text = str(p), p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"--prompts {p}: cannot read it ({exc})") from None
    prompts = _parse(origin, text)
    tasks = [t for t in SPEC_BENCH_TASKS if any(p.task == t for p in prompts)]
    tasks += list(dict.fromkeys(p.task for p in prompts if p.task not in tasks))
    out: list[Prompt] = []
    for t in tasks:
        mine = [p for p in prompts if p.task == t]
        out += mine[:per_category] if per_category else mine
    return out
