"""Fork branches: where their prompts come from, and the rules that join them back.

``draft.branches`` gives every row a list of ``Branch``es (a prompt appended to the row's
tokens, plus metadata): explicit ``prompts``, the items of the last list in the row's text
found by a ``delimiter`` pattern, or a ``provider`` function the caller passes at run time
(``RunConfig.branch_providers``, e.g. PaDeLLM-NER's mention branches, which depend on the
counts an earlier fork decoded). Every prompt goes through ``template`` (``{item}``,
``{i}``: the 1-based branch number).

``join`` rules (``JOIN_RULES``) receive each forked row and its branch rows:

- ``concat``: append every branch's prompt and output (EOS or stop token dropped) to the
  row, which decodes on; the appended tokens are recomputed by its next forward, since the
  branches were computed side by side at overlapping positions;
- ``collect``: record the branches' outputs (``BranchResult``) on the row, append nothing;
- ``ner_dedup``: collect, then keep each mention once, under the label whose branch gave it
  the highest probability (PaDeLLM-NER's de-duplication).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

from decograph.backends.torch_ref.batch import Row
from decograph.errors import InputError

__all__ = ["Branch", "BranchResult", "find_branches", "list_items", "JOIN_RULES", "branch_result"]


@dataclass(frozen=True)
class Branch:
    """One branch to fork: its prompt text and token ids, and metadata for the join."""

    prompt: str
    ids: tuple[int, ...]
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BranchResult:
    """What one branch decoded: its output tokens and text, and their log-probability."""

    branch: int
    prompt: str
    meta: dict[str, Any]
    tokens: tuple[int, ...]            # the output, its EOS or stop token included
    text: str                          # the output's text, without that end token
    logprob: float                     # log p of the output's tokens, the end token excluded
    finish_reason: str
    prompt_ids: tuple[int, ...] = ()   # the branch prompt's token ids


def list_items(text: str, delimiter: str) -> list[str]:
    """The lines of the last list in ``text``: the last run of consecutive lines that each
    match ``delimiter`` at their start (blank lines between items allowed)."""
    pattern = re.compile(delimiter)
    runs: list[list[str]] = []
    current: list[str] = []
    for line in text.splitlines():
        if pattern.match(line):
            current.append(line.strip())
        elif line.strip() and current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs[-1] if runs else []


def _tokenize(tokenizer: Any, text: str) -> tuple[int, ...]:
    if tokenizer is None:
        raise InputError("draft.branches with text prompts needs a tokenizer; pass tokenizer= to generate")
    return tuple(int(t) for t in tokenizer(text, add_special_tokens=False)["input_ids"])


def find_branches(op: Any, row: Row, tokenizer: Any, sources: dict[str, Callable[..., Any]]) -> list[Branch]:
    """Branches of ``row`` for the ``draft.branches`` op ``op``, at most ``op.max_branches``."""
    if op.provider:
        fn = sources.get(op.provider)
        if fn is None:
            known = ", ".join(sorted(sources)) or "none"
            hint = "; run NER with `decograph ner` or decograph.ner.extract_entities" if op.provider.startswith("ner.") else ""
            raise InputError(f"draft.branches: no branch provider {op.provider!r} was given to the run "
                             f"(given: {known}){hint}")
        out = []
        for item in fn(row):
            if isinstance(item, Branch):
                out.append(item)
                continue
            text, meta = (item, {}) if isinstance(item, str) else item
            out.append(Branch(text, _tokenize(tokenizer, text), dict(meta)))
        return out[: op.max_branches]
    if op.prompts:
        items = list(op.prompts)
    else:
        text = tokenizer.decode(row.tokens, skip_special_tokens=False) if tokenizer is not None else None
        if text is None:
            raise InputError("draft.branches with a delimiter needs a tokenizer to read the text")
        items = list_items(text, op.delimiter)
    out = []
    for i, item in enumerate(items[: op.max_branches], start=1):
        prompt = op.template.replace("{item}", item).replace("{i}", str(i))
        out.append(Branch(prompt, _tokenize(tokenizer, prompt), {"item": item, "i": i}))
    return out


def branch_result(row: Row, tokenizer: Any, ends: set[int]) -> BranchResult:
    out = tuple(row.new_tokens)
    body = out[:-1] if out and out[-1] in ends else out
    text = tokenizer.decode(list(body), skip_special_tokens=True) if tokenizer is not None else ""
    return BranchResult(row.branch, row.prompt, row.meta, out, text, float(sum(row.logprobs[: len(body)])),
                        row.finish_reason, tuple(row.tokens[row.fork_at : row.n_prompt]))


def _collect(parent: Row, branches: list[Row], tokenizer: Any, ends: set[int]) -> list[int]:
    parent.results.append([branch_result(r, tokenizer, ends) for r in branches])
    return []


def _concat(parent: Row, branches: list[Row], tokenizer: Any, ends: set[int]) -> list[int]:
    new: list[int] = []
    for r in branches:
        out = r.new_tokens
        if out and out[-1] in ends:
            out = out[:-1]
        new += r.tokens[r.fork_at : r.n_prompt] + out
    _collect(parent, branches, tokenizer, ends)
    return new


def _ner_dedup(parent: Row, branches: list[Row], tokenizer: Any, ends: set[int]) -> list[int]:
    from decograph.ner import MentionJoin, dedupe_mentions

    results = [branch_result(r, tokenizer, ends) for r in branches]
    parent.results.append(MentionJoin(results, dedupe_mentions(results)))
    return []


# rule -> f(row, its branch rows, tokenizer, EOS and stop ids) -> tokens to append to the row
JOIN_RULES: dict[str, Callable[[Row, list[Row], Any, set[int]], list[int]]] = {
    "concat": _concat, "collect": _collect, "ner_dedup": _ner_dedup,
}
