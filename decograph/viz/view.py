"""The report's view model: a generation's trace records as iterations, tokens and graph nodes.

Pure Python over the plain records ``generate(..., trace=True)`` leaves in
``GenerationResult.trace`` (no torch). Causal strategies give ``step`` records (drafted tree,
accepted path, bonus token, committed tokens), masked-diffusion strategies ``unmask`` records
(block, positions unmasked, confidences), fork/join strategies also ``join`` records.

Guarantees: the committed tokens of the iterations, in order, are the generation's
``new_token_ids`` (diffusion: every generated position appears in exactly one iteration as
unmasked and kept); one ``Iteration`` per decode step.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from decograph.errors import InputError

__all__ = ["Tok", "Iteration", "Node", "View", "build_view", "token_text"]


@dataclass(frozen=True)
class Tok:
    """One token as shown: ``state`` is committed, bonus, accepted, rejected, clipped (accepted
    but cut by EOS/budget), unmasked or discarded (unmasked past EOS); ``pos``: its position in
    the generated sequence where it is part of the output."""

    id: int
    text: str
    state: str
    pos: int | None = None
    node: int | None = None
    conf: float | None = None


@dataclass
class Iteration:
    """One decode step (or a join) of the row."""

    step: int
    kind: str                                   # step | unmask | join
    start: int                                  # position of its first committed token
    drafted: list[tuple[str, list[Tok]]] = field(default_factory=list)   # (label, tokens) per leaf path
    n_drafted: int = 0                          # draft nodes (diffusion: masked candidates)
    committed: list[Tok] = field(default_factory=list)
    clipped: list[Tok] = field(default_factory=list)
    accepted: int = 0                           # draft tokens accepted (diffusion: positions unmasked)
    note: str = ""
    canvas: list[str] = field(default_factory=list)   # diffusion: per position masked|earlier|now|eos


@dataclass(frozen=True)
class Node:
    """A graph node: generated position ``pos`` committed (unmasked) by iteration ``col``;
    ``dep``: the position it waited for (-1: the prompt)."""

    pos: int
    col: int
    tok: Tok
    dep: int


@dataclass
class View:
    """One row's report content: its iterations, its graph nodes and its output tokens in order."""

    kind: str                                   # causal | diffusion
    prompt_len: int
    iterations: list[Iteration]
    nodes: list[Node]
    output: list[Tok]


def token_text(tokenizer: Any) -> Callable[[int], str]:
    """A token id's text (``#id`` without a tokenizer); memoized per id."""
    memo: dict[int, str] = {}

    def text(tid: int) -> str:
        if tid not in memo:
            if tokenizer is None:
                memo[tid] = f"#{tid}"
            else:
                try:
                    memo[tid] = tokenizer.decode([tid], skip_special_tokens=False)
                except Exception:           # a tokenizer that cannot decode one id alone
                    memo[tid] = f"#{tid}"
        return memo[tid]

    return text


def build_view(trace: list[dict[str, Any]], new_token_ids: list[int], tokenizer: Any) -> View:
    """The view of one row's ``trace``; raises ``InputError`` when the trace does not describe
    ``new_token_ids`` (a trace from another run, or none at all)."""
    if not trace:
        raise InputError("result.trace is empty: generate with trace=True (decograph.generate(..., trace=True))")
    text = token_text(tokenizer)
    prompt_len = next((r["prompt_len"] for r in trace if r["kind"] == "prefill"), 0)
    if any(r["kind"] == "unmask" for r in trace):
        view = _diffusion(trace, new_token_ids, text, prompt_len)
    else:
        view = _causal(trace, text, prompt_len)
    shown = [t.id for t in view.output]
    if shown != list(new_token_ids):
        raise InputError(f"result.trace does not match result.new_token_ids ({len(shown)} traced tokens, "
                         f"{len(new_token_ids)} generated): pass the trace of this generation")
    return view


def _draft_lines(rec: dict[str, Any], text: Callable[[int], str]) -> list[tuple[str, list[Tok]]]:
    """The draft tree as its root-to-leaf paths, leaves in chain order."""
    d = rec["draft"]
    toks, parent = d["tokens"], d["parent"]
    chain = d.get("chain") or [-1] * len(toks)
    source = d.get("source") or [-1] * len(toks)
    names = rec.get("sources") or []
    on_path = set(rec["accepted"]["nodes"])
    has_child = set(p for p in parent if p >= 0)
    leaves = sorted((i for i in range(len(toks)) if i not in has_child), key=lambda i: (chain[i], i))
    lines = []
    for leaf in leaves:
        path, at = [], leaf
        while at >= 0:
            path.append(at)
            at = parent[at]
        path.reverse()
        src = names[source[leaf]] if 0 <= source[leaf] < len(names) else "draft"
        label = f"{src} #{chain[leaf]}" if chain[leaf] >= 0 else src
        lines.append((label, [Tok(toks[i], text(toks[i]), "accepted" if i in on_path else "rejected", node=i)
                              for i in path]))
    return lines


def _causal(trace: list[dict[str, Any]], text: Callable[[int], str], prompt_len: int) -> View:
    iterations: list[Iteration] = []
    nodes: list[Node] = []
    output: list[Tok] = []
    for rec in trace:
        if rec["kind"] not in ("step", "join"):
            continue
        col = len(iterations)
        start, committed = rec["start"], rec["committed"]
        if rec["kind"] == "join":
            it = Iteration(rec["step"], "join", start, note="tokens a join appended")
            it.committed = [Tok(t, text(t), "committed", start + j) for j, t in enumerate(committed)]
        else:
            acc = rec["accepted"]["tokens"]
            proposed = acc + [rec["bonus"]]
            it = Iteration(rec["step"], "step", start, _draft_lines(rec, text), len(rec["draft"]["tokens"]),
                           accepted=len(acc))
            for j, t in enumerate(proposed):
                state = "bonus" if j == len(acc) else "committed"
                if j < len(committed):
                    it.committed.append(Tok(t, text(t), state, start + j))
                else:
                    it.clipped.append(Tok(t, text(t), "clipped"))
            if rec.get("finish_reason"):
                it.note = f"finished: {rec['finish_reason']}"
        for tok in it.committed:
            output.append(tok)
            nodes.append(Node(tok.pos, col, tok, tok.pos - 1))   # type: ignore[operator]
        iterations.append(it)
    return View("causal", prompt_len, iterations, nodes, output)


def _diffusion(trace: list[dict[str, Any]], new_ids: list[int], text: Callable[[int], str], prompt_len: int) -> View:
    steps = [r for r in trace if r["kind"] == "unmask"]
    n_out = len(new_ids)
    size = max((r["limit"] for r in steps), default=n_out)
    size = max([size, n_out] + [p + 1 for r in steps for p in r["positions"]])
    when: dict[int, int] = {}              # kept position -> the step (column) that unmasked it
    for col, rec in enumerate(steps):
        for p in rec["positions"]:
            if p < n_out:
                when[p] = col
    iterations: list[Iteration] = []
    decoded: set[int] = set()
    for col, rec in enumerate(steps):
        it = Iteration(rec["step"], "unmask", rec["start"], n_drafted=rec["masked"], accepted=len(rec["positions"]))
        s, e = rec["block"]
        it.note = (f"block {s}–{e}: {rec['masked']} masked, {len(rec['positions'])} unmasked; "
                   f"{rec['masked_left']} masked left")
        now = set(rec["positions"])
        for p, t, c in zip(rec["positions"], rec["tokens"], rec["confidence"]):
            kept = when.get(p) == col
            it.committed.append(Tok(t, text(t), "unmasked" if kept else "discarded", p if kept else None, conf=c))
        decoded |= now
        it.canvas = ["now" if p in now else "earlier" if p in decoded else
                     "eos" if p > rec["limit"] else "masked" for p in range(size)]
        iterations.append(it)
    output = [Tok(t, text(t), "committed", p) for p, t in enumerate(new_ids)]
    nodes = []
    for p, tok in enumerate(output):
        col = when.get(p, len(steps) - 1)
        earlier = [q for q in when if when[q] < col]
        dep = min(earlier, key=lambda q: (abs(q - p), q > p)) if earlier else -1
        nodes.append(Node(p, col, tok, dep))
    return View("diffusion", prompt_len, iterations, nodes, output)
