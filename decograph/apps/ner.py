"""PaDeLLM-NER: named entities by parallel decoding of label-wise mentions.

Step one asks, for every label at once (one fork branch each), how many mentions of that
label the text has; step two decodes every (label, mention index) at once, each branch
prompted with its label's count; the join keeps a mention claimed by several labels only
under the label whose branch gave it the highest probability (Lu et al. 2024). The strategy
is the built-in ``padellm_ner``; this module supplies its prompts (a ``NerTemplate``) and
reads its result.

    from decograph.apps.ner import extract_entities
    [ents] = extract_entities(["Tim Cook runs Apple in Cupertino."], ["PER", "ORG", "LOC"])
    [(e.text, e.label) for e in ents]

Zero-shot, the default template asks the instruct model in plain words; a model fine-tuned
for PaDeLLM-style prompts gets its own template file (TOML or JSON, the fields of
``NerTemplate``). With a 135M model the answers are poor; each branch's tokens are still
exactly that branch's greedy decoding.
"""
from __future__ import annotations

import dataclasses
import json
import re
import string
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from decograph.runtime.branches import Branch, BranchResult, branch_result, register_join_rule
from decograph.errors import InputError, StrategyFileError
from decograph.text import check_utf8

__all__ = ["NerTemplate", "Entity", "MentionJoin", "ner_dedup", "extract_entities", "dedupe_mentions", "parse_count",
           "clean_mention", "ner_request"]

DEFAULT_NAMES = {"PER": "person names", "ORG": "organizations", "LOC": "places", "MISC": "other named things"}


@dataclass(frozen=True)
class NerTemplate:
    """How the NER prompts are written. ``prefix`` ({text}) is shared by every branch (as the
    user turn of the chat template, with ``chat``); a count branch appends ``count_prompt``
    ({label}, {name}: the label's description from ``names``) and decodes a number; a mention
    branch appends, after its label's count prompt and answer, ``mention_prompt`` ({label},
    {name}, {index}, {count}) and decodes one mention. Branches end at a newline or EOS."""

    prefix: str = "Read the text and list its named entities.\n\nText: {text}"
    count_prompt: str = "How many {name} does the text mention? Answer with a number:"
    mention_prompt: str = "{name} number {index} of {count}:"
    chat: bool = True
    names: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_NAMES))
    max_count: int = 5
    count_tokens: int = 4
    mention_tokens: int = 16

    @classmethod
    def load(cls, path: str | Path) -> "NerTemplate":
        """A template from a TOML or JSON file; unknown or mistyped fields are named."""
        p = Path(path)
        try:
            raw = p.read_text(encoding="utf-8")
            data = json.loads(raw) if p.suffix == ".json" else tomllib.loads(raw)
        except OSError as exc:
            raise StrategyFileError(f"{p}: cannot read the NER template: {exc.strerror or exc}") from None
        except (ValueError, tomllib.TOMLDecodeError) as exc:
            raise StrategyFileError(f"{p}: not valid {'JSON' if p.suffix == '.json' else 'TOML'}: {exc}") from None
        if not isinstance(data, dict):
            raise StrategyFileError(f"{p}: the NER template must be a table of fields")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        default = cls()
        for key, value in data.items():
            if key not in fields:
                raise StrategyFileError(f"{p}: unknown field {key!r}; fields: {', '.join(fields)}")
            want = type(getattr(default, key))
            if not isinstance(value, want) or (want is int and isinstance(value, bool)):
                raise StrategyFileError(f"{p}: field {key!r} must be {want.__name__}, got {value!r}")
            if want is dict and not all(isinstance(v, str) for v in value.values()):
                raise StrategyFileError(f"{p}: field 'names' maps labels to descriptions (strings)")
        for key in ("prefix", "count_prompt", "mention_prompt"):
            if key in data:
                _check_placeholders(p, key, data[key])
        return cls(**data)

    def name(self, label: str) -> str:
        return self.names.get(label, label)


_PLACES = {"prefix": {"text"}, "count_prompt": {"label", "name"}, "mention_prompt": {"label", "name", "index", "count"}}


def _check_placeholders(p: Path, key: str, text: str) -> None:
    try:
        used = {f for _, f, _, _ in string.Formatter().parse(text) if f is not None}
    except ValueError as exc:
        raise StrategyFileError(f"{p}: field {key!r}: {exc}") from None
    bad = used - _PLACES[key]
    if bad:
        raise StrategyFileError(f"{p}: field {key!r} uses {{{sorted(bad)[0]}}}; it may use "
                                + ", ".join("{" + x + "}" for x in sorted(_PLACES[key])))


@dataclass(frozen=True)
class Entity:
    """One extracted mention: its text, label, log-probability and where it is in the text."""

    text: str
    label: str
    logprob: float
    index: int = 1
    start: int | None = None
    end: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class MentionJoin:
    """What ``join(rule=ner_dedup)`` leaves on a row: every mention branch, and the entities."""

    branches: list[BranchResult]
    entities: list[Entity]


def ner_dedup(parent: Any, branches: list[Any], tokenizer: Any, ends: set[int]) -> list[int]:
    """``join(rule=ner_dedup)``: collect the branches, then keep each mention once, under the
    label whose branch gave it the highest probability (PaDeLLM-NER's de-duplication);
    appends nothing to the row. Registered with the runtime (and as the entry point
    ``decograph.join_rules: ner_dedup``, so a torch-free exported decoder finds it)."""
    results = [branch_result(r, tokenizer, ends) for r in branches]
    parent.results.append(MentionJoin(results, dedupe_mentions(results)))
    return []


_NUMBER_WORDS = {w: i for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}


def parse_count(text: str, cap: int) -> int:
    """The first number in a count branch's answer (digits or a word up to ten), at most
    ``cap``; 0 when there is none ("none", "no", nothing)."""
    m = re.search(r"\d+|\b(?:" + "|".join(_NUMBER_WORDS) + r")\b", text.lower())
    if m is None:
        return 0
    n = int(m.group()) if m.group().isdigit() else _NUMBER_WORDS[m.group()]
    return max(0, min(n, cap))


def clean_mention(text: str) -> str:
    """A mention branch's answer as a mention: first line, trimmed of quotes, list marks and
    a final period; empty for none-answers."""
    line = text.strip().splitlines()[0].strip() if text.strip() else ""
    line = re.sub(r"^(?:[-*\u2022]|\d+[.)])\s*", "", line).strip().rstrip(".").strip("\"'`*").strip()
    return "" if line.lower() in ("", "none", "n/a", "no", "nothing", "null") else line


def dedupe_mentions(results: Sequence[BranchResult], text: str | None = None) -> list[Entity]:
    """Entities from mention branches: a mention (compared case-insensitively) given by
    several branches is kept once, from the branch with the highest log-probability; the
    result is ordered by where the mention occurs in ``text`` (else by label, index)."""
    best: dict[str, Entity] = {}
    for r in results:
        mention = clean_mention(r.text)
        if not mention:
            continue
        e = Entity(mention, str(r.meta.get("label", "")), r.logprob, int(r.meta.get("index", 1)))
        key = mention.casefold()
        if key not in best or e.logprob > best[key].logprob:
            best[key] = e
    out = list(best.values())
    if text is not None:
        located = []
        for e in out:
            at = text.lower().find(e.text.lower())
            located.append(dataclasses.replace(e, start=at, end=at + len(e.text)) if at >= 0 else e)
        out = located
    return sorted(out, key=lambda e: (e.start if e.start is not None else 1 << 30, e.label, e.index))


def _ids(tokenizer: Any, text: str) -> tuple[int, ...]:
    return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])


def ner_request(texts: Sequence[str], labels: Sequence[str], tokenizer: Any,
                template: NerTemplate | None = None) -> tuple[list[list[int]], dict[str, Any]]:
    """The prompts (token ids) and branch providers that run ``padellm_ner`` on ``texts``."""
    t = template or NerTemplate()
    labels = [lab.strip() for lab in labels]
    if not labels or any(not lab for lab in labels):
        raise InputError(f"NER needs at least one non-empty label, got {list(labels)!r}")
    if len(set(labels)) != len(labels):
        raise InputError(f"NER labels must be distinct, got {list(labels)!r}")
    prompts = []
    for i, text in enumerate(texts):
        text = check_utf8(text, f"text {i}")
        if not text.strip():
            raise InputError(f"text {i} is empty")
        body = t.prefix.format(text=text)
        if t.chat:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": body}], add_generation_prompt=True,
                                                tokenize=True)
            ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        else:
            ids = tokenizer(body)["input_ids"]
        prompts.append([int(x) for x in ids])

    def counts(row: Any) -> list[Branch]:
        out = []
        for lab in labels:
            prompt = t.count_prompt.format(label=lab, name=t.name(lab))
            out.append(Branch(prompt, _ids(tokenizer, prompt), {"label": lab}))
        return out

    def mentions(row: Any) -> list[Branch]:
        out = []
        for c in row.results[-1]:
            n = parse_count(c.text, t.max_count)
            lab = c.meta["label"]
            sep = "" if tokenizer.decode(list(c.tokens[-1:])).endswith("\n") else "\n"
            for k in range(1, n + 1):
                prompt = sep + t.mention_prompt.format(label=lab, name=t.name(lab), index=k, count=n)
                ids = c.prompt_ids + c.tokens + _ids(tokenizer, prompt)
                out.append(Branch(c.prompt + c.text + prompt, ids, {"label": lab, "index": k, "count": n}))
        return out

    return prompts, {"ner.count": counts, "ner.mention": mentions}


_NEWLINES: dict[int, tuple[int, ...]] = {}


def newline_ids(tokenizer: Any) -> tuple[int, ...]:
    """Token ids whose text holds a newline (where a branch's answer line ends)."""
    key = id(tokenizer)
    if key not in _NEWLINES:
        vocab = tokenizer.get_vocab()
        ids = [i for i in vocab.values() if "\n" in tokenizer.decode([i])]
        _NEWLINES[key] = tuple(sorted(ids))
    return _NEWLINES[key]


def extract_entities(texts: Sequence[str] | str, labels: Sequence[str], model: Any = None, tokenizer: Any = None,
                     template: NerTemplate | None = None, passes: str | None = "default",
                     details: bool = False) -> Any:
    """Entities of each text, by PaDeLLM-NER on ``model`` (default: the embedded model).
    With ``details``, the ``GenerationResult``s too (branch outputs in ``.branches``)."""
    from decograph.api import generate, resolve_model

    if isinstance(texts, str):
        texts = [texts]
    adapter, tok = resolve_model(model, tokenizer)
    if tok is None:
        raise InputError("NER needs the model's tokenizer")
    t = template or NerTemplate()
    prompts, providers = ner_request(texts, labels, tok, t)
    results = generate(adapter, tok, prompts, "padellm_ner", 1, passes=passes, branch_providers=providers,
                       stop_token_ids=newline_ids(tok),
                       overrides={"count_tokens": t.count_tokens, "mention_tokens": t.mention_tokens,
                                  "max_labels": min(64, len(labels)),
                                  "max_mentions": max(1, min(64, len(labels) * t.max_count))})
    entities = []
    for text, r in zip(texts, results):
        join = r.branches[-1]
        entities.append(dedupe_mentions(join.branches, text))
    return (entities, results) if details else entities


register_join_rule("ner_dedup", ner_dedup)
