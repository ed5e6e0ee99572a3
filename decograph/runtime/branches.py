"""Fork branches: where their prompts come from, and the rules that join them back.

``draft.branches`` gives every row a list of ``Branch``es (a prompt appended to the row's
tokens, plus metadata): explicit ``prompts``, the items of the last list in the row's text
found by a ``delimiter`` pattern, or a ``provider`` function the caller passes at run time
(``RunConfig.branch_providers``, e.g. PaDeLLM-NER's mention branches, which depend on the
counts an earlier fork decoded). Every prompt goes through ``template`` (``{item}``,
``{i}``: the 1-based branch number).

``join`` rules (``JOIN_RULES``, extended by applications with ``register_join_rule``) receive
each forked row and its branch rows:

- ``concat``: append every branch's prompt and output (EOS or stop token dropped) to the
  row, which decodes on; the appended tokens are recomputed by its next forward, since the
  branches were computed side by side at overlapping positions;
- ``collect``: record the branches' outputs (``BranchResult``) on the row, append nothing.

The NER application registers ``ner_dedup`` (PaDeLLM-NER's de-duplication) when imported.
Tokenizers are either Hugging Face's (``tok(text, add_special_tokens=False)["input_ids"]``)
or the ``tokenizers`` library's (``tok.encode(text, add_special_tokens=False).ids``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

from decograph.errors import InputError
from decograph.runtime.rows import Row

__all__ = ["Branch", "BranchResult", "find_branches", "list_items", "JOIN_RULES", "branch_result",
           "register_join_rule", "join_rule", "encode_text", "decode_ids"]


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


def encode_text(tokenizer: Any, text: str) -> tuple[int, ...]:
    """``text``'s token ids, no special tokens, with either kind of tokenizer."""
    if tokenizer is None:
        raise InputError("draft.branches with text prompts needs a tokenizer; pass tokenizer= to generate")
    if callable(tokenizer):
        return tuple(int(t) for t in tokenizer(text, add_special_tokens=False)["input_ids"])
    return tuple(int(t) for t in tokenizer.encode(text, add_special_tokens=False).ids)


def decode_ids(tokenizer: Any, ids: list[int], skip_special_tokens: bool) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)


def find_branches(op: Any, row: Row, tokenizer: Any, sources: dict[str, Callable[..., Any]]) -> list[Branch]:
    """Branches of ``row`` for the ``draft.branches`` op ``op``, at most ``op.max_branches``."""
    if op.provider:
        fn = sources.get(op.provider)
        if fn is None:
            known = ", ".join(sorted(sources)) or "none"
            hint = "; the application that owns it passes it (for ner.*: `decograph ner`)" if "." in op.provider else ""
            raise InputError(f"draft.branches: no branch provider {op.provider!r} was given to the run "
                             f"(given: {known}){hint}")
        out = []
        for item in fn(row):
            if isinstance(item, Branch):
                out.append(item)
                continue
            text, meta = (item, {}) if isinstance(item, str) else item
            out.append(Branch(text, encode_text(tokenizer, text), dict(meta)))
        return out[: op.max_branches]
    if op.prompts:
        items = list(op.prompts)
    else:
        text = decode_ids(tokenizer, row.tokens, False) if tokenizer is not None else None
        if text is None:
            raise InputError("draft.branches with a delimiter needs a tokenizer to read the text")
        items = list_items(text, op.delimiter)
    out = []
    for i, item in enumerate(items[: op.max_branches], start=1):
        prompt = op.template.replace("{item}", item).replace("{i}", str(i))
        out.append(Branch(prompt, encode_text(tokenizer, prompt), {"item": item, "i": i}))
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


# rule -> f(row, its branch rows, tokenizer, EOS and stop ids) -> tokens to append to the row
JoinRule = Callable[[Row, list[Row], Any, set[int]], list[int]]
JOIN_RULES: dict[str, JoinRule] = {"concat": _concat, "collect": _collect}


JOIN_GROUP = "decograph.join_rules"     # entry point group of applications' join rules


def register_join_rule(name: str, rule: JoinRule) -> None:
    """Make ``join(rule=NAME)`` run ``rule`` (an application's join; a name already taken by
    another rule is an error)."""
    if JOIN_RULES.get(name, rule) is not rule:
        raise ValueError(f"join rule {name!r} is already registered")
    JOIN_RULES[name] = rule


def join_rule(name: str) -> JoinRule:
    """The join rule called ``name``: built-in, registered, or found (once) through the entry
    point group ``decograph.join_rules`` (how an application such as NER provides its rule
    without the runtime naming it); ``UnsupportedError`` lists the known ones."""
    if name not in JOIN_RULES:
        from importlib import metadata

        for ep in metadata.entry_points(group=JOIN_GROUP):
            if ep.name == name:
                register_join_rule(name, ep.load())
                break
    if name not in JOIN_RULES:
        from decograph.errors import UnsupportedError

        raise UnsupportedError(f"join(rule={name}): no such join rule; known: {', '.join(sorted(JOIN_RULES))} "
                               f"(an application registers its own with register_join_rule or the entry point "
                               f"group {JOIN_GROUP!r})")
    return JOIN_RULES[name]
