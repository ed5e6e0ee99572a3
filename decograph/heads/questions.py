"""Requests from a user's questions file for ``train-draft --questions``: the model's answers to
them are training data from the user's own domain, never a benchmark prompt."""
from __future__ import annotations

import json
from pathlib import Path

from decograph.errors import InputError

__all__ = ["benchmark_texts", "question_requests"]


def question_requests(path: str | Path, skip: frozenset[str] = frozenset()) -> tuple[str, ...]:
    """The first turns of a Spec-Bench style JSON Lines file (``question_id``, ``turns``), in file
    order, without those whose text is in ``skip`` (benchmark prompts)."""
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"--questions {p}: cannot read it ({exc})") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            q = json.loads(line)
            text = q["turns"][0]
        except (json.JSONDecodeError, KeyError, IndexError, TypeError) as exc:
            raise InputError(f"--questions {p}:{n}: not a question in Spec-Bench's format (turns: [...]): "
                             f"{exc}") from None
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"--questions {p}:{n}: the first turn is empty or not a string")
        if text not in skip:
            out.append(text)
    if not out:
        raise InputError(f"--questions {p}: no questions left (every one is a benchmark prompt, or the file is empty)")
    return tuple(out)


def benchmark_texts(questions: str | Path | None, per_category: int = 5) -> frozenset[str]:
    """Prompts the benchmarks time, never trained on: ``decograph bench``'s shipped subset and,
    from the questions file itself, the first ``per_category`` of each category (what
    ``benchmarks/bench_backends.py --per-category N`` picks, N <= 5)."""
    from decograph.bench.prompts import load_prompts

    out = {p.text for p in load_prompts(None, 0)}
    if questions is None:
        return frozenset(out)
    seen: dict[str, int] = {}
    try:
        lines = Path(questions).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"--questions {questions}: cannot read it ({exc})") from None
    for line in lines:
        try:
            q = json.loads(line)
            cat, text = str(q.get("category", "")), q["turns"][0]
        except (json.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError):
            continue
        seen[cat] = seen.get(cat, 0) + 1
        if seen[cat] <= per_category:
            out.add(text)
    return frozenset(out)
