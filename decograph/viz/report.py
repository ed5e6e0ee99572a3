"""``render_report``: one generation as a self-contained HTML page (inline CSS, JS and SVG).

The page's sections and the attributes tests read:

- ``#meta``: model, strategy, kind; ``#prompt``, ``#output-text``;
  ``#output-tokens .token[data-pos][data-id]``: the generated tokens in order;
- ``#summary .stat[data-field=NAME][data-value=V]``: ``Stats.as_dict()`` values;
- ``#ddg``: the decoding dependency graph (``.node[data-pos][data-col]``);
- ``#acceptance``: the acceptance chart (``.bar[data-col][data-accepted]``);
- ``#iterations[data-count]``: one ``.iteration[data-step][data-col]`` per decode step, with
  ``.draft-line .token[data-state=accepted|rejected]`` and ``.committed .token[data-pos]
  [data-state=committed|bonus|unmasked]`` (and ``clipped``/``discarded`` without a position);
- ``#ir-before``, ``#ir-after``: the program as written and after the passes;
- ``#trace-data``: the raw trace and stats as JSON; ``#console-errors``: script errors (empty).
"""
from __future__ import annotations

import difflib
import json
from html import escape
from typing import Any

from decograph.viz.assets import CSS, ERROR_TRAP, SCRIPT
from decograph.viz.svg import acceptance_svg, ddg_svg, shown
from decograph.viz.view import Iteration, Tok, View, build_view

__all__ = ["render_report"]

_SUMMARY = [("new_tokens", "new tokens", "{}"), ("forward_passes", "forward passes", "{}"),
            ("decode_steps", "decode steps", "{}"), ("tokens_per_forward", "tokens / forward", "{:.2f}"),
            ("mean_accepted", "mean accepted", "{:.2f}"), ("tokens_per_s", "tokens / s", "{:.1f}"),
            ("wall_time_s", "wall time (s)", "{:.2f}"), ("finish_reason", "finish reason", "{}")]


_LEGEND = {"causal": "".join(f'<span class="token" data-state="{s}">{t}</span>' for s, t in (
              ("accepted", "accepted draft"), ("rejected", "rejected draft"), ("committed", "committed"),
              ("bonus", "bonus (the model's own token)"), ("clipped", "clipped by EOS / budget"))),
           "diffusion": "".join(f'<span class="token" data-state="{s}">{t}</span>' for s, t in (
              ("unmasked", "unmasked"), ("discarded", "unmasked past EOS (dropped)")))}


def _tok(t: Tok) -> str:
    attrs = f' data-id="{t.id}" data-state="{escape(t.state)}"'
    if t.pos is not None:
        attrs += f' data-pos="{t.pos}"'
    if t.node is not None:
        attrs += f' data-node="{t.node}"'
    tip = f"id {t.id}, {t.state}" + (f", position {t.pos}" if t.pos is not None else "")
    if t.conf is not None:
        tip += f", confidence {t.conf:.3f}"
        attrs += f' data-conf="{t.conf}"'
    return f'<span class="token"{attrs} title="{escape(tip)}">{escape(shown(t.text))}</span>'


def _line(what: str, tokens: list[Tok], cls: str) -> str:
    inner = "".join(_tok(t) for t in tokens) or '<span class="muted">none</span>'
    return f'<div class="line {cls}"><span class="what">{escape(what)}</span><div class="tokens">{inner}</div></div>'


def _iteration(c: int, it: Iteration) -> str:
    kept = [t for t in it.committed if t.pos is not None]
    if it.kind == "unmask":
        head = f"step {c + 1}"
        facts = f"{it.accepted} unmasked of {it.n_drafted} masked"
        cells = "".join(f'<span class="cell" data-s="{s}"></span>' for s in it.canvas)
        body = (_line("unmasked (position order)", it.committed, "committed")
                + f'<div class="line"><span class="what">canvas</span><div class="canvas">{cells}</div></div>')
    elif it.kind == "join":
        head, facts = "join", f"{len(kept)} tokens appended"
        body = _line("appended", it.committed, "committed")
    else:
        head = f"iteration {c + 1}"
        facts = f"drafted {it.n_drafted}, accepted {it.accepted}, committed {len(kept)}"
        if not it.n_drafted:
            facts = f"no drafts, committed {len(kept)}"
        body = "".join(_line(label, toks, "draft-line") for label, toks in it.drafted)
        body += _line("committed", it.committed, "committed")
        if it.clipped:
            body += _line("clipped (EOS / budget)", it.clipped, "clipped")
    note = f'<span class="note">{escape(it.note)}</span>' if it.note else ""
    cls = "iteration" if it.kind != "join" else "join"
    return (f'<div class="{cls}" data-step="{it.step}" data-col="{c}" data-kind="{it.kind}" data-start="{it.start}" '
            f'data-accepted="{it.accepted}" data-drafted="{it.n_drafted}" data-committed="{len(kept)}">'
            f'<header><span class="title">{head}</span><span>{escape(facts)}</span>{note}</header>'
            f'<div class="body">{body}</div></div>')


def _ir_html(text: str, other: str, side: str) -> str:
    """``text`` line by line, lines absent from ``other`` marked added (after) or removed (before)."""
    mine, theirs = text.splitlines(), other.splitlines()
    changed: set[int] = set()
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, theirs, mine, autojunk=False).get_opcodes():
        if tag != "equal":
            changed.update(range(j1, j2))
    mark = "added" if side == "after" else "removed"
    return "\n".join(f'<span class="ir-line{" " + mark if i in changed else ""}">{escape(line)}</span>'
                     for i, line in enumerate(mine))


def _program_text(program: Any) -> str:
    if isinstance(program, str):
        return program
    from decograph.ir import print_program

    return print_program(program)


def _summary(stats: Any) -> str:
    values = stats.as_dict()
    cells = []
    for key, label, fmt in _SUMMARY:
        v = values[key]
        text = fmt.format(v) if not isinstance(v, str) else v
        cells.append(f'<div class="stat" data-field="{key}" data-value="{escape(str(v))}">'
                     f'<span class="label">{escape(label)}</span><span class="value">{escape(text)}</span></div>')
    return '<section id="summary"><h2>Summary</h2><div class="stats">' + "".join(cells) + "</div></section>"


def _json_script(data: Any) -> str:
    # ASCII JSON with "<" escaped: still valid JSON, and it cannot close the script element.
    text = json.dumps(data).replace("<", "\\u003c")
    return f'<script type="application/json" id="trace-data">{text}</script>'


def _sections(view: View, before: str, after: str) -> str:
    kind = "diffusion" if view.kind == "diffusion" else "causal"
    ddg_note = ("Column = the step that unmasked the position; each arrow points to the nearest position "
                "decoded in an earlier step." if kind == "diffusion" else
                "Column = the iteration that committed the token; each arrow points to the token it waited for "
                "(the one before it). A vertical run in one column was accepted in parallel; an arrow into an "
                "earlier column is the sequential dependency between iterations. Orange: the bonus token.")
    acc_note = ("Outline: masked positions in the block; green: positions unmasked." if kind == "diffusion" else
                "Outline: tokens drafted; green: drafts accepted and committed; orange: the model's bonus token; "
                "dashed: mean tokens committed per iteration.")
    its = "".join(_iteration(c, it) for c, it in enumerate(view.iterations))
    n_steps = sum(1 for it in view.iterations if it.kind != "join")
    return (f'<section id="ddg"><h2>Decoding dependency graph</h2><p class="note">{escape(ddg_note)}</p>'
            f'<div class="scroll">{ddg_svg(view)}</div></section>'
            f'<section id="acceptance"><h2>Acceptance per iteration</h2><p class="note">{escape(acc_note)}</p>'
            f'<div class="scroll">{acceptance_svg(view)}</div></section>'
            f'<section id="iterations" data-count="{n_steps}"><h2>Iterations ({n_steps})</h2>'
            f'<div class="legend">{_LEGEND[kind]}</div>'
            '<div class="controls"><button type="button" id="toggle-iterations">collapse all</button>'
            '<label><input type="checkbox" id="toggle-rejected" checked> show rejected drafts</label></div>'
            f'{its}</section>'
            '<section id="ir"><h2>Strategy IR</h2><div class="ir-pair">'
            f'<figure><figcaption>as written</figcaption><pre id="ir-before">{_ir_html(before, after, "before")}'
            '</pre></figure>'
            f'<figure><figcaption>after the passes</figcaption><pre id="ir-after">{_ir_html(after, before, "after")}'
            '</pre></figure></div></section>')


def render_report(result: Any, strategy_program: Any, optimized_program: Any, tokenizer: Any, *,
                  model_name: str, prompt: str | list[int], strategy_name: str | None = None,
                  passes: str = "default") -> str:
    """The HTML report of ``result`` (a ``GenerationResult`` from ``generate(..., trace=True)``).

    ``strategy_program``/``optimized_program``: the program as written and as run (IR
    ``Program`` objects or their printed text). ``tokenizer`` decodes token texts (``None``:
    ``#id``). Assumes ``result.trace`` is the trace of ``result``; raises ``InputError`` if it
    is empty or describes other tokens. Every text is HTML-escaped; the page needs no network.
    """
    view = build_view(list(result.trace), list(result.new_token_ids), tokenizer)
    before, after = _program_text(strategy_program), _program_text(optimized_program)
    name = strategy_name or (getattr(strategy_program, "name", None) or "strategy")
    prompt_text = prompt if isinstance(prompt, str) else " ".join(str(t) for t in prompt)
    out_tokens = "".join(_tok(t) for t in view.output) or '<span class="muted">none</span>'
    meta = [("model", model_name), ("strategy", name), ("passes", passes),
            ("decoding", "masked diffusion (unmask)" if view.kind == "diffusion" else "causal (draft, verify, commit)"),
            ("prompt tokens", str(view.prompt_len))]
    data = {"strategy": name, "model": model_name, "kind": view.kind, "prompt_ids": list(result.prompt_ids),
            "new_token_ids": list(result.new_token_ids), "stats": result.stats.as_dict(), "records": result.trace}
    return "".join([
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>decograph viz: {escape(name)}</title>",
        f"<script>{ERROR_TRAP}</script><style>{CSS}</style></head>",
        f'<body data-kind="{view.kind}"><header><h1>decograph viz: {escape(name)}</h1>',
        '<p class="muted" id="js-status">static page (script not run)</p><dl id="meta">',
        "".join(f'<dt>{escape(k)}</dt><dd data-field="{escape(k)}">{escape(v)}</dd>' for k, v in meta),
        '</dl></header><pre id="console-errors"></pre>',
        f'<section id="prompt-output"><h2>Prompt</h2><pre id="prompt">{escape(prompt_text)}</pre>',
        '<h2 style="margin-top:12px">Output</h2>',
        f'<pre id="output-text">{escape(result.text)}</pre>' if result.text else
        '<pre id="output-text" class="muted">(empty: no tokens or no tokenizer)</pre>',
        f'<h2 style="margin-top:12px">Generated tokens</h2><div class="tokens" id="output-tokens">{out_tokens}</div>',
        "</section>", _summary(result.stats), _sections(view, before, after),
        _json_script(data), f"<script>{SCRIPT}</script></body></html>\n"])
